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
import functools
import io
import json
import os
import urllib.request
from datetime import date
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from mlflow import MlflowClient

from conftest import free_port, invoke, load_benchmark, wait_for_http
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
# Each route's own contract, fixed here (not read from the plan code, so a loosened bound there
# is caught): exact routes give the masked network's probabilities to float precision; int8
# weights are inexact by design and are held to argmax agreement and relative error.
EXACT_ATOL = 1e-5
INEXACT = {"onnxruntime_int8": {"agreement": 0.98, "rtol": 0.1}}
EXACT = {"onnxruntime", "numpy"}


@pytest.fixture(scope="module")
def store(tmp_path_factory, brief_benchmark):
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



@pytest.mark.parametrize("form", ["uint8 (N, 28, 28)", "0..1 floats (N, 784)"])
def test_the_served_champion_gives_the_masked_models_probabilities(served, reference, form):
    images, labels, probs, _ = reference
    x = images.tolist() if form.startswith("uint8") else (images.reshape(N, 784) / 255).tolist()
    status, body = invoke(served, {"inputs": x})
    assert status == 200
    got = np.asarray(body["predictions"])
    assert got.shape == (N, 10)
    # what the server answers is what the plan's own runner gives in this process...
    x = np.asarray(x)
    np.testing.assert_allclose(got, champion_plan(reference).predict(x), atol=EXACT_ATOL)
    # ...and every route of the plan keeps its own contract against the masked network
    for route in champion_plan(reference).routes:
        meets_its_contract(route, load_plan(plan_folder(reference[3]), route=route).predict(x),
                           probs)
    assert (got.argmax(1) == labels).mean() > 0.7  # a trained network, not a constant


def meets_its_contract(route: str, got: np.ndarray, probs: np.ndarray) -> None:
    """Exact routes to float tolerance; an inexact one by argmax agreement and relative
    error, with the bounds fixed in this test. A route of neither kind is a new route this
    test must be told about."""
    assert route in EXACT | set(INEXACT), f"route {route}: no contract known to this test"
    agree = (got.argmax(1) == probs.argmax(1)).mean()
    if route in EXACT:
        np.testing.assert_allclose(got, probs, atol=EXACT_ATOL, err_msg=route)
        assert agree == 1.0, (route, agree)
    else:
        rel = np.linalg.norm(got - probs) / np.linalg.norm(probs)
        assert rel <= INEXACT[route]["rtol"] and agree >= INEXACT[route]["agreement"], \
            (route, rel, agree)


@functools.cache
def plan_folder(model_uri: str) -> Path:
    """The champion's serving plan, as registered (its artifact), downloaded once."""
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri))
    return next(local.rglob(PLAN)).parent


def champion_plan(reference):
    """The champion's plan loaded in this process, as the server loads it."""
    return load_plan(plan_folder(reference[3]))


def test_labels_and_the_masked_dense_format_are_asked_for_by_params(served, reference):
    images, _, probs, _ = reference
    status, body = invoke(served, {"inputs": images.tolist(), "params": {"output": "labels"}})
    assert status == 200
    np.testing.assert_array_equal(np.asarray(body["predictions"]),
                                  champion_plan(reference).predict(images, "labels"))
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
    np.testing.assert_allclose(np.asarray(body["predictions"]),
                               champion_plan(reference).predict(images[:3]), atol=EXACT_ATOL)


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
    # the same model on the same payload: every sample agrees, counted, not rounded
    assert "batch 1: max |diff| " in text and "argmax agreement 1/1;" in text
    assert "argmax agreement 256/256" in text and "environment: " in text and "mlflow " in text
    assert sum("invocations() " in line and "deep copy" in line for line in lines) == 2
    res = json.loads(out.read_text())
    assert set(res["batches"]) == {"1", "256"} and res["settings"]["threads"] == 1
    tags = client.get_model_version_by_alias(name, "champion").tags
    for b, r in res["batches"].items():
        assert r["check"]["agreed"] == r["check"]["samples"] == int(b)
        # the figures, unrounded, are positive; the tags are those figures (2 decimals: a
        # small model share on a loaded machine is tagged 0.00, which is not a failure)
        for key, got in (("serving.http.speedup_bs", r["http_speedup"]["median"]),
                         ("serving.http.p50_ms_bs", r["champion"]["p50_ms"]),
                         ("serving.http.model_share_bs", r["champion"]["model_share"]),
                         ("serving.pyfunc.speedup_bs", r["pyfunc_speedup"]["median"])):
            assert got > 0 and tags[key + b] == f"{got:.2f}", (key + b, got, tags[key + b])
    assert tags["serving.http.measured"].startswith("1 threads, concurrency 1, 2 rounds x 2")
    assert date.today().isoformat() in tags["serving.http.measured"]
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
