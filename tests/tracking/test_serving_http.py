"""The registered champion end to end over HTTP.

A tiny real MNIST lottery experiment (one level, ticket only, benchmarked so a measured plan
ships) is pruned and registered into a SQLite store through the CLI. The real `mlflow models
serve -m models:/NAME@champion --env-manager local` then answers /invocations with the masked
network's predictions (computed here from the champion's checkpoint on normalised images) for
uint8 images shaped (N, 28, 28), 0..1 floats flat (N, 784), labels and the masked dense
format; a wrong-sized request is an HTTP error naming the input, and the server keeps serving.
Last, benchmarks/serving_http.py runs in a tiny mode against the same store: its table, JSON
and recorded tags (never its speed).
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import urllib.error
import urllib.request
from datetime import date
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from mlflow import MlflowClient

from conftest import free_port, load_benchmark, wait_for_http
from ticketsmith.cli import main
from ticketsmith.base.config import load_config
from ticketsmith.engine.checkpoint import model_from_checkpoint
from ticketsmith.engine.data import normalisation
from ticketsmith.serving.agreement import INEXACT_AGREEMENT, INEXACT_RTOL
from ticketsmith.serving.plan.layout import INEXACT, PLAN
from ticketsmith.serving.plan.runtime import load_plan
from ticketsmith.tracking.benchmarks import resolve_checkpoint
from ticketsmith.tracking.registry import model_name_for

# A prune of real MNIST with its serving benchmark, then three `mlflow models serve` starts.
pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
CONFIG = str(REPO / "configs" / "imp_mnist.yaml")
DATA_ROOT = Path(os.environ.get("TICKETSMITH_DATA_ROOT") or REPO / "data")
TINY = ["train.epochs=null", "train.iterations=200", "prune.levels=1",
        "experiment.variants=[ticket]", "experiment.benchmark=true", f"data.root={DATA_ROOT}"]
N = 64  # test images per request
bench = load_benchmark("serving_http")


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """The tiny experiment pruned, benchmarked and registered: (tracking URI, model name)."""
    tmp = tmp_path_factory.mktemp("serving_http")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    overrides = [*TINY, f"experiment.output_dir={tmp / 'runs'}"]
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        mp.chdir(tmp)
        mlflow.set_tracking_uri(uri)
        argv = ["prune", "--config", CONFIG, "-q", "--no-report"]
        assert main([*argv, *(a for o in overrides for a in ("--set", o))]) == 0
        yield uri, model_name_for("imp_mnist", load_config(CONFIG, overrides).hash())
    mlflow.set_tracking_uri(None)


@pytest.fixture(scope="module")
def served(store, tmp_path_factory):
    """The real scoring server of `models:/NAME@champion`: its base URL."""
    uri, name = store
    port, log = free_port(), tmp_path_factory.mktemp("serve") / "serve.log"
    proc = bench.serve(f"models:/{name}@champion", port, uri, None, log)
    try:
        wait_for_http(f"http://127.0.0.1:{port}/ping", proc, timeout_s=300)
        yield f"http://127.0.0.1:{port}"
    finally:
        bench.stop_server(proc)


@pytest.fixture(scope="module")
def reference(store):
    """uint8 test images, labels and the masked champion's probabilities on them, computed
    here: the checkpoint's network on (pixels / 255 - mean) / std."""
    _, name = store
    images, labels = bench.test_images(DATA_ROOT, N)
    model, _, _ = model_from_checkpoint(resolve_checkpoint(f"models:/{name}@champion"))
    mean, std = normalisation("mnist")
    x = ((images.astype(np.float32) / 255 - mean[0]) / std[0])[:, None]
    with torch.inference_mode():
        probs = torch.softmax(model.eval()(torch.from_numpy(x)), 1).numpy()
    return images, labels, probs, f"models:/{name}@champion"


def invoke(base: str, payload: dict) -> tuple[int, dict]:
    req = urllib.request.Request(f"{base}/invocations", json.dumps(payload).encode(),
                                 {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


@pytest.mark.parametrize("form", ["uint8 (N, 28, 28)", "0..1 floats (N, 784)"])
def test_the_served_champion_gives_the_masked_models_probabilities(served, reference, form):
    images, labels, probs, _ = reference
    x = images.tolist() if form.startswith("uint8") else (images.reshape(N, 784) / 255).tolist()
    status, body = invoke(served, {"inputs": x})
    assert status == 200
    got = np.asarray(body["predictions"])
    assert got.shape == (N, 10)
    if served_route(reference) in INEXACT:  # int8 where it measured fastest: gated, not exact
        assert np.linalg.norm(got - probs) / np.linalg.norm(probs) <= INEXACT_RTOL
        assert (got.argmax(1) == probs.argmax(1)).mean() >= INEXACT_AGREEMENT
    else:
        np.testing.assert_allclose(got, probs, atol=1e-5)
        assert (got.argmax(1) == probs.argmax(1)).all()
    assert (got.argmax(1) == labels).mean() > 0.7  # a trained network, not a constant


def served_route(reference, n: int = N) -> str:
    """The route the champion's plan serves a batch of n with (the plan is its artifact)."""
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=reference[3]))
    return load_plan(next(local.rglob(PLAN)).parent).route_for(n)


def test_labels_and_the_masked_dense_format_are_asked_for_by_params(served, reference):
    images, _, probs, _ = reference
    status, body = invoke(served, {"inputs": images.tolist(), "params": {"output": "labels"}})
    assert status == 200
    agree = (np.asarray(body["predictions"]) == probs.argmax(1)).mean()
    assert agree >= (INEXACT_AGREEMENT if served_route(reference) in INEXACT else 1.0)
    status, body = invoke(served, {"inputs": images.tolist(),
                                   "params": {"format": "masked_dense"}})
    assert status == 200
    np.testing.assert_allclose(np.asarray(body["predictions"]), probs, atol=1e-5)


def test_a_wrong_sized_request_is_an_error_naming_the_input_and_the_server_keeps_serving(
        served, reference):
    images, _, probs, _ = reference
    status, body = invoke(served, {"inputs": images[:2, :27, :27].tolist()})
    assert 400 <= status < 600
    # MLflow's scoring server puts the model's own message last in the trace it returns.
    last = body["stack_trace"].strip().splitlines()[-1]
    assert "input: expected a batch of 784 values per sample" in last and "[2, 27, 27]" in last
    with urllib.request.urlopen(f"{served}/ping", timeout=10) as resp:
        assert resp.status == 200
    status, body = invoke(served, {"inputs": images[:3].tolist()})
    assert status == 200
    atol = 0.05 if served_route(reference, 3) in INEXACT else 1e-5
    np.testing.assert_allclose(np.asarray(body["predictions"]), probs[:3], atol=atol)


def run_benchmark(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = bench.main(list(argv))
    return code, out.getvalue(), err.getvalue()


def test_the_http_benchmark_prints_its_table_and_records_its_figures(store, tmp_path):
    uri, name = store
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("imp_mnist").experiment_id
    runs_before = len(client.search_runs([experiment]))
    out = tmp_path / "http.json"
    code, text, _ = run_benchmark("--tracking-uri", uri, "--data-root", str(DATA_ROOT),
                                  "--rounds", "2", "--requests", "2", "--threads", "1",
                                  "--record", "--output", str(out))
    assert code == 0, text
    lines = text.splitlines()
    assert lines[0].startswith(f"{name} v1 @champion (") and "1 threads" in lines[0]
    rows = {tuple(line.split()[:2]) for line in lines if line.split()[:1] in (["1"], ["256"])}
    assert {("1", "dense"), ("1", "champion"), ("256", "dense"), ("256", "champion")} <= rows
    assert "pyfunc.predict in-process" in text and ">= 1.5x" in text and ">= 4.0x" in text
    assert "argmax agreement 100%" in text and "environment: " in text and "mlflow " in text
    assert sum("invocations() " in line and "deep copy" in line for line in lines) == 2
    tags = client.get_model_version_by_alias(name, "champion").tags
    for b in ("1", "256"):
        for key in ("serving.http.speedup_bs", "serving.http.p50_ms_bs",
                    "serving.http.model_share_bs", "serving.pyfunc.speedup_bs"):
            assert float(tags[key + b]) > 0, key + b
    assert tags["serving.http.measured"].startswith("1 threads, concurrency 1, 2 rounds x 2")
    assert date.today().isoformat() in tags["serving.http.measured"]
    res = json.loads(out.read_text())
    assert set(res["batches"]) == {"1", "256"} and res["settings"]["threads"] == 1
    # The dense baseline lives in a scratch run of its own experiment, not among the results.
    assert len(client.search_runs([experiment])) == runs_before
    scratch = client.search_runs([client.get_experiment_by_name(bench.SCRATCH).experiment_id])
    assert [r.data.tags["ticketsmith.model_uri"] for r in scratch] == [res["dense_model"]]


def test_the_http_benchmark_refuses_a_model_without_champion_in_one_line(store):
    uri, _ = store
    code, _, err = run_benchmark("--tracking-uri", uri, "--model-name", "no-such-model")
    assert code == 2
    assert err.strip() == (f"serving_http: --model-name: no-such-model has no @champion in "
                           f"{uri}")
