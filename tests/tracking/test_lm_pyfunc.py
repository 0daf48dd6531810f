"""The registered language-model champion's pyfunc: prompts in, continuations out.

A tiny structured (head-pruned) GPT ticket is trained for real on this repository's docs,
gated and registered by the pipeline into a SQLite store; `models:/NAME@champion` is loaded as
MLflow loads it. Every answer is compared with the engine's own KV-cache generation on the
masked checkpoint (`engine.generate.generate_text`), computed here: a string, a list and a
DataFrame column give that text; max_new_tokens, seed, top_k and stop are honoured; the
structured ticket serves its compacted model; an image batch and bad params are refused in
one line; the signature declares the params.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow import MlflowClient

from ticketsmith.engine.generate import GenerationError, Sampling, generate_text
from ticketsmith.pipeline import run_prune
from ticketsmith.serving.lm_load import load_lm
from ticketsmith.serving.lm_plan.check import shippable
from ticketsmith.serving.lm_plan.runtime import shipped_line
from ticketsmith.tracking.benchmarks import resolve_checkpoint

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "engine"))
from test_lm import tiny_lm  # noqa: E402

# A real training (dense, then one structured level) and a registration: about 30 s here.
pytestmark = pytest.mark.slow

PROMPTS = ["The ", "We the "]  # different lengths: a left-padded batch (context: 32 bytes)
STRUCTURED = ["train.iterations=40", "prune.levels=1", "prune.granularity=head",
              "prune.fraction=0.5", "experiment.variants=[ticket]"]


def registered_lm(tmp: Path) -> tuple[str, str]:
    """A tiny structured LM ticket trained, gated and registered as @champion in a fresh
    SQLite store under `tmp`: (tracking URI, model name). The process's tracking URI is left
    pointing at it."""
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    cfg = tiny_lm(tmp / "runs", *STRUCTURED)
    cwd = os.getcwd()
    os.chdir(tmp)  # MLflow's local artifacts (./mlruns) land in tmp
    try:
        mlflow.set_tracking_uri(uri)
        out = run_prune(cfg, client=MlflowClient(uri), progress=False, echo=lambda s: None)
    finally:
        os.chdir(cwd)
    assert out.promotion is not None and out.promotion.champion is not None
    return uri, out.promotion.model_name


@pytest.fixture(scope="module")
def champion(tmp_path_factory):
    """(served pyfunc, masked-dense pyfunc, masked model, tokenizer, model name, store URI)."""
    with pytest.MonkeyPatch.context() as mp:
        tmp = tmp_path_factory.mktemp("lm_pyfunc")
        uri, name = registered_lm(tmp)
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        model_uri = f"models:/{name}@champion"
        served = mlflow.pyfunc.load_model(model_uri)
        masked_pyfunc = mlflow.pyfunc.load_model(model_uri,
                                                 model_config={"format": "masked_dense"})
        masked, tok, _, _ = load_lm(resolve_checkpoint(model_uri))
        yield served, masked_pyfunc, masked, tok, name, uri
    mlflow.set_tracking_uri(None)


def expected(champion, prompts, n, sampling=Sampling(), stop=()):
    """The engine's continuations on the masked checkpoint: what every answer must be."""
    _, _, masked, tok, _, _ = champion
    return generate_text(masked, tok, prompts, n, sampling, stop)


@pytest.mark.parametrize("form", ["string", "list", "DataFrame column"])
def test_a_string_a_list_and_a_dataframe_column_give_the_engines_continuations(champion, form):
    served = champion[0]
    prompts = PROMPTS[:1] if form == "string" else PROMPTS
    model_input = {"string": PROMPTS[0], "list": PROMPTS,
                   # the `prompt` column is read, wherever it stands
                   "DataFrame column": pd.DataFrame({"id": [7, 8], "prompt": PROMPTS})}[form]
    got = served.predict(model_input, params={"max_new_tokens": 10})
    assert got == expected(champion, prompts, 10)
    assert len(got) == len(prompts) and all(len(t) > 0 for t in got)


def test_max_new_tokens_sets_the_length_of_each_continuation(champion):
    served, _, _, tok, _, _ = champion
    short = served.predict(PROMPTS, params={"max_new_tokens": 3})
    long = served.predict(PROMPTS, params={"max_new_tokens": 11})
    assert short == expected(champion, PROMPTS, 3) and long == expected(champion, PROMPTS, 11)
    assert [len(tok.encode(t)) for t in short] == [3, 3]
    assert all(b.startswith(a) for a, b in zip(short, long))  # greedy: the same start
    assert served.predict(PROMPTS, params={"max_new_tokens": 0}) == ["", ""]


def test_the_same_seed_gives_the_same_text_and_another_seed_other_text(champion):
    served = champion[0]
    params = {"max_new_tokens": 20, "temperature": 1.0, "top_k": 40, "seed": 7}
    first = served.predict(PROMPTS, params=params)
    assert served.predict(PROMPTS, params=params) == first
    assert first == expected(champion, PROMPTS, 20, Sampling(1.0, 40, 7))
    assert served.predict(PROMPTS, params={**params, "seed": 8}) != first
    assert first != served.predict(PROMPTS, params={"max_new_tokens": 20})  # not greedy


def test_a_stop_string_ends_the_continuation_before_it(champion):
    served = champion[0]
    free = served.predict(PROMPTS, params={"max_new_tokens": 12})
    stop = free[1][4:6]  # text the second prompt's continuation holds
    got = served.predict(PROMPTS, params={"max_new_tokens": 12, "stop": [stop]})
    assert got == expected(champion, PROMPTS, 12, stop=(stop,))
    assert got[1] == free[1][:free[1].find(stop)] and stop not in got[1]


def test_the_structured_ticket_ships_its_checked_plan_and_serves_the_masked_models_text(
        champion):
    served, masked_pyfunc, masked, _, name, uri = champion
    runner = served.unwrap_python_model().backend  # the `plan` artifact's runner
    assert [b.attn.heads for b in runner.models["compacted"].blocks] < \
        [b.attn.heads for b in masked.blocks]  # head-pruned: fewer heads in the plan
    assert masked_pyfunc.unwrap_python_model().backend.route == "masked_dense"
    shipped = {r for phase in runner.describe()["routes"].values() for r in phase.values()}
    check = runner.plan["check"]
    assert shipped <= set(shippable(check)) and shipped
    text = served.predict(PROMPTS, params={"max_new_tokens": 12})
    if "int8" not in shipped:  # exact routes: the masked model's greedy text, token for token
        assert text == masked_pyfunc.predict(PROMPTS, params={"max_new_tokens": 12})
    tags = MlflowClient(uri).get_model_version_by_alias(name, "champion").tags
    assert tags["serving.format"] == "lm_plan"
    assert tags["serving.routes"] == shipped_line(runner)
    assert tags["serving.checked"].startswith("against the masked model: compacted max |logit")


@pytest.mark.parametrize("image", [np.zeros((2, 28, 28), np.uint8), [[0.0, 0.5], [1.0, 0.2]],
                                   pd.DataFrame(np.zeros((2, 784)))],
                         ids=["uint8 array", "nested floats", "numeric DataFrame"])
def test_an_image_batch_is_refused_in_one_line(champion, image):
    with pytest.raises(GenerationError) as err:
        champion[0].predict(image)
    message = str(err.value)
    assert len(message.splitlines()) == 1
    assert message.startswith("input: expected prompts as text") and "got " in message


@pytest.mark.parametrize("params, field", [({"max_new_tokens": -1}, "max_new_tokens"),
                                           ({"temperature": -0.5}, "temperature"),
                                           ({"max_new_tokens": 1000}, "context")])
def test_bad_params_are_refused_in_one_line_naming_them(champion, params, field):
    with pytest.raises(GenerationError) as err:
        champion[0].predict(PROMPTS, params=params)
    assert len(str(err.value).splitlines()) == 1 and field in str(err.value)


def test_the_signature_declares_text_out_and_every_param(champion):
    signature = champion[0].metadata.signature
    assert signature.inputs is None  # on purpose: see registry.lm_signature
    assert [c.type.name for c in signature.outputs.inputs] == ["string"]
    params = {p.name: (p.dtype.name, p.default, p.shape) for p in signature.params.params}
    assert params == {"max_new_tokens": ("long", 64, None), "temperature": ("double", 0.0, None),
                      "top_k": ("long", 0, None), "seed": ("long", 0, None),
                      "stop": ("string", [], (-1,))}
