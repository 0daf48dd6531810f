"""The registered language-model champion serves text over HTTP.

A tiny structured GPT ticket is trained, gated and registered by the pipeline (as in
test_lm_pyfunc); the real `mlflow models serve -m models:/NAME@champion --env-manager local`
(its own process group, stopped at the end) answers real /invocations requests: a string, a
list and a DataFrame split give the engine's own continuations on the masked checkpoint
(computed here), max_new_tokens and seed are honoured, and an image batch or a bad param is
a 400 naming the input, after which the server keeps serving. Last,
benchmarks/serving_http_lm.py runs in a tiny mode against the same store: its table and JSON
(never its speed).
"""
from __future__ import annotations

import contextlib
import io
import json

import mlflow
import pytest

from conftest import free_port, invoke, load_benchmark, wait_for_http
from test_lm_pyfunc import registered_lm
from mlflow import MlflowClient
from ticketsmith.engine.generate import Sampling, generate_text
from ticketsmith.report.deployed import end_to_end_figures
from ticketsmith.tracking.serving_tags import HTTP, PYFUNC, figure_key, path_key, speedup_key
from ticketsmith.serving.lm_load import load_lm
from ticketsmith.tracking.benchmarks import resolve_checkpoint

# A real training and registration, then three `mlflow models serve` starts.
pytestmark = pytest.mark.slow

bench = load_benchmark("serving_http")
bench_lm = load_benchmark("serving_http_lm")
PROMPTS = ["The ", "We the "]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """(tracking URI, model name, folder) of the registered tiny structured LM champion."""
    tmp = tmp_path_factory.mktemp("lm_http")
    uri, name = registered_lm(tmp)
    mlflow.set_tracking_uri(None)
    return uri, name, tmp


@pytest.fixture(scope="module")
def served(store):
    """(base URL of the real scoring server of the champion, masked model, tokenizer)."""
    uri, name, tmp = store
    model_uri = f"models:/{name}@champion"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        masked, tok, _, _ = load_lm(resolve_checkpoint(model_uri))
    port = free_port()
    proc = bench.serve(model_uri, port, uri, 1, tmp / "serve.log")
    try:
        wait_for_http(f"http://127.0.0.1:{port}/ping", proc, timeout_s=300)
        yield f"http://127.0.0.1:{port}", masked, tok
    finally:
        bench.stop_server(proc)



def engine(served, prompts, n, sampling=Sampling()):
    _, masked, tok = served
    return generate_text(masked, tok, prompts, n, sampling)


def test_a_string_a_list_and_a_dataframe_split_are_answered_with_the_continuations(served):
    base = served[0]
    params = {"max_new_tokens": 9}
    for payload, prompts in (({"inputs": PROMPTS[0]}, PROMPTS[:1]),
                             ({"inputs": PROMPTS}, PROMPTS),
                             ({"dataframe_split": {"columns": ["prompt"],
                                                   "data": [[p] for p in PROMPTS]}}, PROMPTS)):
        status, body = invoke(base, {**payload, "params": params})
        assert status == 200, body
        assert body["predictions"] == engine(served, prompts, 9), payload


def test_max_new_tokens_and_seed_are_honoured(served):
    base, _, tok = served
    status, body = invoke(base, {"inputs": PROMPTS, "params": {"max_new_tokens": 4}})
    assert status == 200 and [len(tok.encode(t)) for t in body["predictions"]] == [4, 4]
    sampled = {"max_new_tokens": 16, "temperature": 1.0, "top_k": 40, "seed": 11}
    first = invoke(base, {"inputs": PROMPTS, "params": sampled})[1]["predictions"]
    assert invoke(base, {"inputs": PROMPTS, "params": sampled})[1]["predictions"] == first
    assert first == engine(served, PROMPTS, 16, Sampling(1.0, 40, 11))
    other = invoke(base, {"inputs": PROMPTS, "params": {**sampled, "seed": 12}})
    assert other[0] == 200 and other[1]["predictions"] != first


@pytest.mark.parametrize("payload, says", [
    ({"inputs": [[[0, 255], [3, 4]], [[5, 6], [7, 8]]]}, "input: expected prompts as text"),
    ({"inputs": PROMPTS, "params": {"max_new_tokens": -2}}, "max_new_tokens: expected"),
], ids=["image batch", "negative max_new_tokens"])
def test_a_bad_request_is_refused_naming_it_and_the_server_keeps_serving(served, payload, says):
    base = served[0]
    status, body = invoke(base, payload)
    assert status == 400
    # MLflow's scoring server puts the model's own message last in the trace it returns.
    assert says in body["stack_trace"].strip().splitlines()[-1]
    status, body = invoke(base, {"inputs": PROMPTS[0], "params": {"max_new_tokens": 3}})
    assert status == 200 and body["predictions"] == engine(served, PROMPTS[:1], 3)


def test_the_tokens_per_second_benchmark_prints_its_table_and_writes_its_figures(store,
                                                                              tmp_path):
    uri, name, _ = store
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = bench_lm.main(["--tracking-uri", uri, "--model-name", name, "--new-tokens", "4",
                              "--prompt", "The ", "--batch-sizes", "1,2", "--rounds", "2",
                              "--requests", "1", "--record", "--output",
                              str(tmp_path / "lm.json")])
    text = out.getvalue()
    assert code == 0, err.getvalue()
    assert text.startswith(f"{name} v1 @champion (lm_plan) against the dense level-0 network")
    assert "batch 1: same text (1 rows); batch 2: same text (2 rows)" in text
    res = json.loads((tmp_path / "lm.json").read_text())
    assert set(res["batches"]) == {"1", "2"} and res["settings"]["new_tokens"] == 4
    for r in res["batches"].values():
        for m in ("dense", "champion"):
            assert set(r[m]) == {"p50_ms", "p99_ms", "http_tokens_per_s",
                                 "pyfunc_tokens_per_s", "model_share"}
            assert all(v > 0 for v in r[m].values())
        assert r["http_speedup"]["median"] > 0 and r["pyfunc_speedup"]["median"] > 0
    # the baseline is the dense level-0 network, served as trained (never compacted)
    flavor = mlflow.models.get_model_info(res["dense_model"]).flavors["python_function"]
    # --record: the figures are tags on the champion's version, under the keys the report reads
    tags = MlflowClient(uri).get_model_version(name, "1").tags
    mlflow.set_tracking_uri(None)
    assert flavor["config"]["format"] == "masked_dense"
    for b, r in res["batches"].items():
        assert float(tags[speedup_key(b, HTTP)]) == pytest.approx(r["http_speedup"]["median"],
                                                                  abs=0.005)
        assert float(tags[speedup_key(b, PYFUNC)]) == pytest.approx(
            r["pyfunc_speedup"]["median"], abs=0.005)
        assert float(tags[figure_key("tokens_per_s", b, HTTP)]) == pytest.approx(
            r["champion"]["http_tokens_per_s"], abs=0.5)
        assert float(tags[figure_key("dense_tokens_per_s", b, HTTP)]) == pytest.approx(
            r["dense"]["http_tokens_per_s"], abs=0.5)
    assert "4 new tokens per row" in tags[path_key("measured", HTTP)]
    rows, _ = end_to_end_figures(tags, ["1", "2"])
    assert {w for w, *_ in rows} >= {"HTTP tokens/s", "HTTP dense tokens/s", "HTTP p50",
                                     "pyfunc tokens/s"}


def test_the_tokens_per_second_benchmark_refuses_a_model_without_champion_in_one_line(store):
    uri, _, _ = store
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = bench_lm.main(["--tracking-uri", uri, "--model-name", "no-such-model"])
    mlflow.set_tracking_uri(None)
    assert code == 2
    assert err.getvalue().strip() == (f"serving_http_lm: --model-name: no-such-model has no "
                                      f"@champion in {uri}")


def test_the_benchmark_refuses_a_model_registered_before_the_lm_signature():
    """A version registered before the language-model signature declares no params: MLflow
    drops max_new_tokens, and its pyfunc is the old code without the KV cache."""
    from types import SimpleNamespace

    from mlflow.models import Model, ModelSignature
    from mlflow.types import ColSpec, Schema

    from ticketsmith.tracking.registry import lm_signature

    old = SimpleNamespace(metadata=Model(signature=ModelSignature(
        Schema([ColSpec("string")]), Schema([ColSpec("string")]))))
    bench_lm.check_decodes("new", SimpleNamespace(metadata=Model(signature=lm_signature())))
    with pytest.raises(bench_lm.http_bench.Refused, match="--model-name: old's signature "
                       "declares no max_new_tokens: it was registered before the KV-cache"):
        bench_lm.check_decodes("old", old)
