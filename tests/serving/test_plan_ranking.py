"""Which route ships: `rank_routes` puts the fastest measured route first at every batch size,
the runtime serves it, and an int8 route that fails its agreement check ships nowhere — on a
tiny ticket trained for real, with a real int8 graph (ONNX Runtime's dynamic quantization)."""
from __future__ import annotations

import itertools
import json
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from ticketsmith.base.config import load_config
from ticketsmith.engine.checkpoint import model_from_checkpoint
from ticketsmith.engine.lottery import run_experiment
from ticketsmith.engine.store import RunStore
from ticketsmith.serving import agreement
from ticketsmith.serving.plan.build import build_plan
from ticketsmith.serving.plan.check import check_plan, verify
from ticketsmith.serving.plan.layout import (ONNX_INT8, PLAN, PlanError, read_plan, shipped,
                                             write_plan)
from ticketsmith.serving.plan.rank import describe, rank_routes, shipped_speedups
from ticketsmith.serving.plan.runtime import load_plan

REPO = Path(__file__).resolve().parents[2]
SIZES = (1, 8)
INT8 = "onnxruntime_int8"


def wall_timer(calls):
    """Seconds per call, best of five: only to let the builder pick kernels (and make the int8
    route, which a plan gets only where it is measured); the ranking below is given."""
    out = {}
    for name, fn in calls.items():
        times = []
        for _ in range(5):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        out[name] = min(times)
    return out


@pytest.fixture(scope="module")
def ticket(tmp_path_factory):
    """(checkpoint, masked model, metadata, probe) of a tiny level-1 ticket."""
    root = tmp_path_factory.mktemp("rank")
    cfg = load_config(REPO / "configs" / "tiny.yaml",
                      [f"experiment.output_dir={root}", "prune.levels=1",
                       "experiment.variants=[ticket]"])
    result = run_experiment(cfg, progress=False, echo=lambda _: None)
    ckpt = RunStore(result.run_root).checkpoint_path(0, 1, "ticket")
    model, _, meta = model_from_checkpoint(ckpt)
    return ckpt, model, meta, result.data.test_x[:400].cpu()


@pytest.fixture
def plan(ticket, tmp_path):
    """A fresh measured plan folder (onnxruntime, numpy and int8 routes) of the ticket."""
    _, model, meta, probe = ticket
    examples = {bs: probe[:bs].numpy() for bs in SIZES}
    folder = build_plan(model, meta, tmp_path / "serving", examples=examples, timer=wall_timer,
                        threads=1)
    assert set(read_plan(folder)["routes"]) == {"onnxruntime", "numpy", INT8}
    return folder


# Speedups against dense (route -> batch size -> x), one order per batch size; None: not timed.
ORDERS = [
    {"onnxruntime": {1: 1.5, 8: 3.0}, "numpy": {1: 2.5, 8: 1.2}, INT8: {1: None, 8: 4.0}},
    {"onnxruntime": {1: 0.9, 8: 2.0}, "numpy": {1: 0.8, 8: 2.5}, INT8: {1: 1.1, 8: 1.9}},
]


@pytest.mark.parametrize("speedups", ORDERS)
def test_the_fastest_measured_route_ships_at_every_batch_size(ticket, plan, speedups):
    _, model, _, probe = ticket
    check = check_plan(plan, model, probe)
    assert check["inexact"][INT8]["passed"], check  # the honest int8 graph agrees
    ranked = rank_routes(plan, speedups, check, threads=1)
    for bs in SIZES:
        measured = {r: s[bs] for r, s in speedups.items() if s[bs] is not None}
        order = sorted(measured, key=measured.get, reverse=True)
        # every measured route, fastest first; int8 only where it was measured
        assert ranked["ranking"][str(bs)] == order, (bs, ranked["ranking"])
        assert shipped(ranked)[bs] == order[0]
        assert shipped_speedups(ranked)[bs] == (order[0], measured[order[0]])
    # what is written is what the runtime serves, and what the tags say
    runner = load_plan(plan, threads=1)
    assert {bs: runner.route_for(bs) for bs in SIZES} == shipped(read_plan(plan))
    assert describe(read_plan(plan))["format"] == ", ".join(
        f"batch {bs}: {shipped(ranked)[bs]}" for bs in SIZES)


def test_every_order_of_three_routes_ranks_the_fastest_first(ticket, plan):
    _, model, _, probe = ticket
    check = check_plan(plan, model, probe)
    for speeds in itertools.permutations([0.7, 1.3, 2.9]):
        speedups = {r: {bs: s for bs in SIZES}
                    for r, s in zip(("onnxruntime", "numpy", INT8), speeds)}
        ranked = rank_routes(plan, speedups, check)
        fastest = max(speedups, key=lambda r: speedups[r][1])
        slowest = min(speedups, key=lambda r: speedups[r][1])
        assert all(order[0] == fastest and order[-1] == slowest
                   for order in ranked["ranking"].values()), (speeds, ranked["ranking"])


def wrong_int8_graph(folder: Path) -> None:
    """Replace the int8 graph by one that always leans to class 0 (its output bias raised),
    rewriting the digests as a consistent but wrong plan would have them."""
    path = folder / ONNX_INT8
    graph = onnx.load(str(path))
    outputs = None
    for init in graph.graph.initializer:  # the last layer's bias: float, one value per class
        arr = numpy_helper.to_array(init)
        if arr.dtype == np.float32 and arr.ndim == 1:
            outputs = init
    arr = numpy_helper.to_array(outputs).copy()
    arr[0] += 50.0
    outputs.CopyFrom(numpy_helper.from_array(arr, outputs.name))
    onnx.save(graph, str(path))
    write_plan(folder, json.loads((folder / PLAN).read_text()))  # digests of the new graph


def test_an_int8_route_that_disagrees_ships_nowhere(ticket, plan):
    ckpt, model, _, probe = ticket
    fastest_int8 = {"onnxruntime": {1: 1.0, 8: 1.5}, "numpy": {1: 1.2, 8: 1.1},
                    INT8: {1: 3.0, 8: 5.0}}
    # measured and checked before the graph went wrong: int8 ships at both sizes
    assert set(shipped(rank_routes(plan, fastest_int8, check_plan(plan, model, probe))
                       ).values()) == {INT8}
    wrong_int8_graph(plan)
    # registration checks again: a shipped int8 route that now disagrees is refused
    with pytest.raises(PlanError, match=f"route {INT8} ships at batch 1 but fails its check"):
        verify(plan, ckpt, probe)
    check = check_plan(plan, model, probe)
    got = check["inexact"][INT8]
    assert not got["passed"] and got["argmax_agreement"] < agreement.INEXACT_AGREEMENT, got
    assert "argmax agreement" in got["why"]
    ranked = rank_routes(plan, fastest_int8, check)
    assert all(INT8 not in order for order in ranked["ranking"].values()), ranked["ranking"]
    assert shipped(ranked) == {1: "numpy", 8: "onnxruntime"}
    runner = load_plan(plan, threads=1)
    assert {runner.route_for(bs) for bs in SIZES} == {"numpy", "onnxruntime"}
    verify(plan, ckpt, probe)  # what ships now passes


def logits_with_flips(n: int, flipped: int, noise: float) -> tuple[np.ndarray, np.ndarray]:
    """(reference logits, outputs) of n samples: `flipped` samples whose top two classes swap
    by a hair (a tiny relative error, a different label), the rest off by `noise` (relative)."""
    rng = np.random.default_rng(0)
    ref = rng.normal(size=(n, 10)).astype(np.float32)
    top = ref.argmax(1)
    second = np.argsort(ref, 1)[:, -2]
    rows = np.arange(n)
    ref[rows, second] = ref[rows, top] - 1e-3  # a near tie in every sample
    got = ref * (1 + noise)
    got[rows[:flipped], second[:flipped]] += 2e-3  # the runner-up now wins
    return ref, got


def test_the_int8_bounds_refuse_low_agreement_and_large_error():
    ref, got = logits_with_flips(1000, 10, 0.0)  # 99% agree: passes
    record, why = agreement.inexact(got, ref)
    assert why is None and record["argmax_agreement"] == pytest.approx(0.99)
    ref, got = logits_with_flips(1000, 30, 0.0)  # 97% agree, error tiny: agreement refuses
    record, why = agreement.inexact(got, ref)
    assert record["relative_error"] < 1e-3 and record["argmax_agreement"] == pytest.approx(0.97)
    assert why is not None and "argmax agreement 97.00%" in why
    ref, got = logits_with_flips(1000, 0, 0.15)  # labels all agree, 15% off: error refuses
    record, why = agreement.inexact(got, ref)
    assert record["argmax_agreement"] == 1.0 and why is not None and "relative error" in why
    ref, got = logits_with_flips(1000, 0, 0.05)
    assert agreement.inexact(got, ref)[1] is None
    assert agreement.inexact(np.full_like(got, np.nan), ref)[1] == "outputs are not finite"
