"""MLflow "model from code" for a registered language-model ticket: prompts in, text out.

Artifacts: `checkpoint`, the ticket's safetensors checkpoint (mask baked into the weights;
nothing is unpickled), and, for a trained tokenizer, `tokenizer` (its saved folder). Input:
a list of prompt strings, or a DataFrame whose first column holds them. Output: one generated
continuation per prompt. params: `max_new_tokens` (default 64), `temperature` (0 = greedy,
the default) and `seed` (sampling). A plain loop over the context window; fast decoding (KV
cache) is the serving side's.
"""
import inspect

import mlflow
from mlflow.pyfunc import PythonModel


class ByteCodec:
    """The byte-level tokenizer: UTF-8 bytes, vocabulary 256."""

    vocab_size = 256

    def encode(self, text):
        return list(text.encode("utf-8"))

    def decode(self, ids):
        return bytes(ids).decode("utf-8", errors="replace")


class LanguageModel(PythonModel):
    def load_context(self, context):
        from ticketsmith.engine.checkpoint import model_from_checkpoint

        config = context.model_config or {}
        self.model, _, meta = model_from_checkpoint(context.artifacts["checkpoint"],
                                                    allow_factory=config.get("allow_factory"))
        self.context = int(meta["input_shape"][0])
        folder = context.artifacts.get("tokenizer")
        if folder:
            from ticketsmith.engine.text import load_tokenizer

            self.tokenizer = load_tokenizer(folder)
        else:
            self.tokenizer = ByteCodec()

    def predict(self, context, model_input, params=None):
        import torch

        from ticketsmith.engine.lm_train import generate

        params = params or {}
        prompts = prompts_of(model_input)
        new = int(params.get("max_new_tokens") or 64)
        temperature = float(params.get("temperature") or 0.0)
        gen = torch.Generator().manual_seed(int(params.get("seed") or 0))
        return [self.tokenizer.decode(generate(self.model, self.tokenizer.encode(p), new,
                                               self.context, temperature=temperature,
                                               generator=gen))
                for p in prompts]


def prompts_of(model_input):
    """Prompt strings from a list, a string, a numpy array or a DataFrame's first column."""
    if hasattr(model_input, "columns"):
        model_input = model_input[model_input.columns[0]].tolist()
    elif hasattr(model_input, "tolist"):
        model_input = model_input.tolist()
    if isinstance(model_input, str):
        model_input = [model_input]
    if not all(isinstance(p, str) for p in model_input):
        raise TypeError("expected prompts as strings (a list, or a DataFrame's first column)")
    return model_input


LanguageModel.predict.__signature__ = inspect.signature(LanguageModel.predict)
mlflow.models.set_model(LanguageModel())
