"""MLflow "model from code" for a registered language-model ticket: prompts in, text out.

Artifacts: `checkpoint`, the ticket's safetensors checkpoint (mask baked into the weights;
nothing is unpickled), `plan`, its checked serving plan (`serving.lm_plan`), and, for a
trained tokenizer, `tokenizer` (its saved folder).

Input: a string, a list of strings, a 1-D array of strings, or a DataFrame (its `prompt`
column, else its first). Over HTTP: `{"inputs": "The "}`, `{"inputs": ["The ", "We "]}` or
`{"dataframe_split": {"columns": ["prompt"], "data": [["The "]]}}`. Numbers (an image batch)
are refused in one line. Output: one continuation per prompt (the text after it).

params (declared in the signature, `registry.lm_signature`): `max_new_tokens` (default 64),
`temperature` (0 = greedy, the default), `top_k` (0 = every token), `seed` (the same seed and
request give the same text) and `stop` (strings that end a continuation).

The text comes from one backend object with `generate(prompts, *, max_new_tokens,
temperature, top_k, seed, stop)`: `serving.lm_backend` (KV cache, batched prompts; a
structured ticket's compacted model where exact), or the serving plan's runner, which has
the same method and serves when the model ships a plan (`_backend`). model_config: `format` ('serving', or 'masked_dense' to
serve the masked model as trained), `threads` (torch threads; 0: as the environment says).
"""
import inspect

import mlflow
from mlflow.pyfunc import PythonModel


class LanguageModel(PythonModel):
    def load_context(self, context):
        config = context.model_config or {}
        if config.get("threads"):
            import torch

            torch.set_num_threads(int(config["threads"]))
        self.backend = _backend(context.artifacts, config)

    def predict(self, context, model_input, params=None):
        from ticketsmith.serving.lm_backend import PARAMS

        params = {**PARAMS, **{k: v for k, v in (params or {}).items() if v is not None}}
        stop = params.get("stop") or ()
        return self.backend.generate(
            prompts_of(model_input), max_new_tokens=params["max_new_tokens"],
            temperature=float(params["temperature"]), top_k=int(params["top_k"]) or None,
            seed=int(params["seed"]), stop=(stop,) if isinstance(stop, str) else tuple(stop))


def _backend(artifacts, config):
    """The one object that generates: `generate(prompts, *, max_new_tokens, temperature,
    top_k, seed, stop) -> list[str]`. The checked serving plan shipped as the `plan` artifact
    (`serving.lm_plan`: routes per phase and batch size, each checked against the masked
    model, built for this checkpoint's digest) serves unless model_config asks for
    'masked_dense'; without a plan, `serving.lm_backend` (compacted where exact)."""
    if artifacts.get("plan") and (config.get("format") or "serving") == "serving":
        from ticketsmith.serving.lm_plan import checkpoint_digest, load_lm_plan

        return load_lm_plan(artifacts["plan"],
                            expect_checkpoint_digest=checkpoint_digest(artifacts["checkpoint"]),
                            threads=int(config.get("threads") or 0) or None)
    from ticketsmith.serving.lm_backend import load_backend

    return load_backend(artifacts["checkpoint"], artifacts.get("tokenizer"),
                        config.get("allow_factory"), config.get("format") or "serving")


def prompts_of(model_input) -> list:
    """Prompt strings from a string, a list, a 1-D array or a DataFrame's `prompt` (else
    first) column; anything else (numbers: an image batch) is one GenerationError line."""
    from ticketsmith.engine.generate import GenerationError

    shape = getattr(model_input, "shape", None)
    if hasattr(model_input, "columns"):
        cols = list(model_input.columns)
        model_input = model_input["prompt" if "prompt" in cols else cols[0]] if cols else []
    if hasattr(model_input, "tolist"):
        model_input = model_input.tolist()
    if isinstance(model_input, str):
        model_input = [model_input]
    if not isinstance(model_input, list) or not all(isinstance(p, str) for p in model_input):
        what = (f"an array of shape {tuple(shape)}" if shape is not None
                else type(model_input).__name__)
        raise GenerationError(f"input: expected prompts as text (a string, a list of strings "
                              f"or a DataFrame column of strings), got {what} holding "
                              f"{_kind(model_input)}")
    return model_input


def _kind(values) -> str:
    """What a non-text input holds, in two words (for the one-line refusal)."""
    while isinstance(values, list) and values:
        values = values[0]
    return "nothing" if values == [] else type(values).__name__ + " values"


# MLflow looks up `predict`'s signature on every call; a stored one answers at once.
LanguageModel.predict.__signature__ = inspect.signature(LanguageModel.predict)
mlflow.models.set_model(LanguageModel())
