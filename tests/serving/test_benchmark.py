"""The serving benchmark end to end on tiny real checkpoints: the scorecard JSON contract,
failed formats, safe checkpoint loading, MLflow URIs, the CLI and the per-level benchmark.
Nothing here asserts on wall-clock speed."""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from ticketsmith.serving import formats as serving
from ticketsmith.serving.benchmark import (RESULT_KEYS, BenchmarkError, benchmark_checkpoint,
                                           benchmark_experiment, format_scorecard, load_ticket,
                                           write_benchmark)
from ticketsmith.tracking.benchmarks import resolve_checkpoint
from ticketsmith.engine.checkpoint import CheckpointError, save_checkpoint
from ticketsmith.cli import main
from ticketsmith.engine.data import load_dataset
from ticketsmith.engine.masks import Mask, apply_mask_, prune_magnitude
from ticketsmith.serving.measure import Clock, traffic
from ticketsmith.engine.models import build_model, prunable_weights
from ticketsmith.serving.formats import CSRLinear, Served

SYNTH = {"n_train": 200, "n_test": 100, "image_size": 8, "num_classes": 4}
FAST = {"batch_sizes": (1, 8), "trials": 2, "quick": True}


@pytest.fixture(scope="module")
def data():
    return load_dataset("synthetic", val_size=50, options=SYNTH)


def make_checkpoint(path: Path, fraction: float = 0.8, seed: int = 0, **meta) -> Path:
    """A real masked MLP ticket saved the way the lottery saves one."""
    torch.manual_seed(seed)
    model = build_model("mlp", (1, 8, 8), 4, options={"hidden": [32, 16]})
    weights = prunable_weights(model)
    mask = prune_magnitude(weights, Mask.ones_like(weights), dict.fromkeys(weights, fraction))
    apply_mask_(weights, mask)
    info = {"model": "mlp", "factory": None, "options": {"hidden": [32, 16]}, "exclude": [],
            "input_shape": [1, 8, 8], "num_classes": 4, "dataset": "synthetic", "level": 3,
            "variant": "ticket", **meta}
    return save_checkpoint(path, model.state_dict(), mask, info)


def test_scorecard_has_every_field_for_every_format_and_batch_size(tmp_path, data):
    path = make_checkpoint(tmp_path / "checkpoint.safetensors")
    result = benchmark_checkpoint(path, data=data, threads=1, **FAST)
    formats = serving.default_formats("cpu")
    assert [(r["format"], r["batch_size"]) for r in result["results"]] == \
        [(f, bs) for bs in (1, 8) for f in formats]
    for r in result["results"]:
        assert set(RESULT_KEYS) <= set(r), r["format"]
        assert r["correct"], (r["format"], r["error"])
        assert set(r["latency_ms"]) == {"p50", "p95", "p99"}
        assert 0 < r["latency_ms"]["p50"] <= r["latency_ms"]["p95"] <= r["latency_ms"]["p99"]
        for key in ("throughput", "speedup", "ideal_speedup", "ideal_speedup_macs"):
            assert isinstance(r[key], float) and r[key] > 0 and math.isfinite(r[key])
        assert isinstance(r["weight_bytes"], int) and isinstance(r["peak_memory_bytes"], int)
        assert r["weight_bytes"] > 0 and r["peak_memory_bytes"] > 0
        assert 0.0 <= r["accuracy"] <= 1.0
    dense = [r for r in result["results"] if r["format"] == "dense"]
    assert all(r["speedup"] == 1.0 and r["ideal_speedup"] == 1.0 for r in dense)
    exact = [r for r in result["results"] if r["exact"]]
    assert {r["accuracy"] for r in exact} == {dense[0]["accuracy"]}  # exact formats agree
    env = result["environment"]
    assert env["threads"] == 1 and env["torch"] == torch.__version__ and env["cpu"]
    assert "gpu" in env and env["gpu"] is None and env["trials"] == 2
    assert set(env["noise_floor"]) == {"1", "8"}  # dense timed against itself
    model = result["model"]
    assert model["name"] == "mlp" and math.isclose(model["sparsity"] + model["density"], 1.0)
    assert 0 < model["nonzero_params"] < model["total_params"]
    assert set(result["plan"]["formats"]) == {"hidden.0", "hidden.1", "out"}
    assert set(result["plan"]["speedup"]) == {"1", "8"}
    written = write_benchmark(result, tmp_path / "out" / "benchmark.json")
    assert json.loads(written.read_text())["results"] == json.loads(json.dumps(result["results"]))
    card = format_scorecard(result)
    assert "compacted_int8" in card and "auto plan" in card


def test_compacted_format_is_smaller_than_dense(tmp_path, data):
    path = make_checkpoint(tmp_path / "c.safetensors", fraction=0.9)
    result = benchmark_checkpoint(path, data=data, formats=["compacted"], **FAST)
    rows = {r["format"]: r for r in result["results"] if r["batch_size"] == 8}
    assert rows["compacted"]["weight_bytes"] < rows["dense"]["weight_bytes"]
    assert rows["compacted"]["ideal_speedup"] > 1.0
    assert rows["compacted"]["max_abs_error"] < 1e-4


def broken(model, mask, ctx):
    """A format with a bug: every output is off by one."""
    class OffByOne(torch.nn.Module):
        def forward(self, x):
            return model(x) + 1.0
    return Served(OffByOne(), {"hidden.0": "broken"})


def unavailable(model, mask, ctx):
    raise serving.FormatUnavailable("not on this machine")


def test_a_format_that_fails_its_check_is_reported_failed_not_timed(tmp_path, monkeypatch):
    monkeypatch.setitem(serving.FORMATS, "broken", broken)
    monkeypatch.setitem(serving.FORMATS, "missing", unavailable)
    path = make_checkpoint(tmp_path / "checkpoint.safetensors")
    result = benchmark_checkpoint(path, data_root=None, formats=["csr", "broken", "missing"],
                                  **FAST)
    rows = {(r["format"], r["batch_size"]): r for r in result["results"]}
    assert len(rows) == 8
    for bs in (1, 8):
        assert rows[("csr", bs)]["correct"]
        for name, why in (("broken", "tolerance"), ("missing", "not on this machine")):
            r = rows[(name, bs)]
            assert set(RESULT_KEYS) <= set(r)
            assert r["correct"] is False and why in r["error"]
            assert r["latency_ms"] is None and r["throughput"] is None and r["speedup"] is None
            assert r["peak_memory_bytes"] is None and r["accuracy"] is None
    assert rows[("broken", 1)]["max_abs_error"] == pytest.approx(1.0)
    assert "NO" in format_scorecard(result)


def test_a_quantized_format_below_the_accuracy_gate_fails(tmp_path, data, monkeypatch):
    def noisy(model, mask, ctx):
        class Noisy(torch.nn.Module):
            def forward(self, x):
                out = model(x)
                return out + 0.01 * out.norm() * torch.randn_like(out)
        return Served(Noisy(), {}, exact=False, tolerance=10.0)

    monkeypatch.setitem(serving.FORMATS, "noisy", noisy)
    path = make_checkpoint(tmp_path / "checkpoint.safetensors")
    result = benchmark_checkpoint(path, data=data, formats=["noisy"], max_accuracy_drop=0.0,
                                  **FAST)
    noisy_rows = [r for r in result["results"] if r["format"] == "noisy"]
    assert noisy_rows and all(not r["correct"] and "below dense" in r["error"] for r in noisy_rows)
    assert all(r["accuracy"] is not None for r in noisy_rows)  # measured and reported


class Boom:
    """Unpickling this would create the marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_a_pickle_is_never_unpickled(tmp_path):
    marker = tmp_path / "pwned"
    bad = tmp_path / "checkpoint.safetensors"
    torch.save({"model": Boom(marker)}, bad)
    assert not marker.exists()
    with pytest.raises(CheckpointError, match="not a safetensors checkpoint"):
        benchmark_checkpoint(bad, data_root=None, **FAST)
    with pytest.raises(CheckpointError):
        load_ticket(bad)
    assert not marker.exists()


def test_tampered_and_foreign_files_get_a_clear_error(tmp_path):
    path = make_checkpoint(tmp_path / "checkpoint.safetensors")
    raw = bytearray(path.read_bytes())
    raw[-5] ^= 0xFF  # inside the tensor data
    tampered = tmp_path / "tampered.safetensors"
    tampered.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="checksum mismatch"):
        benchmark_checkpoint(tampered, data_root=None, **FAST)
    raw = bytearray(path.read_bytes())
    raw[3] ^= 0xFF  # inside the header length
    header = tmp_path / "header.safetensors"
    header.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="header.safetensors"):
        benchmark_checkpoint(header, data_root=None, **FAST)
    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(3)}, str(foreign))
    with pytest.raises(CheckpointError, match="not a TicketSmith checkpoint"):
        benchmark_checkpoint(foreign, data_root=None, **FAST)
    with pytest.raises(CheckpointError, match="not found"):
        benchmark_checkpoint(tmp_path / "missing.safetensors", data_root=None, **FAST)


def test_a_factory_in_metadata_is_not_imported_unless_allowed(tmp_path):
    path = make_checkpoint(tmp_path / "checkpoint.safetensors", factory="os:system")
    with pytest.raises(CheckpointError, match="allow_factory"):
        load_ticket(path)


def test_metadata_that_cannot_rebuild_the_model_is_an_error(tmp_path):
    path = make_checkpoint(tmp_path / "checkpoint.safetensors", options={"hidden": [8]})
    with pytest.raises(CheckpointError, match="weights do not fit"):
        load_ticket(path)


def test_bad_batch_sizes_are_rejected(tmp_path):
    path = make_checkpoint(tmp_path / "checkpoint.safetensors")
    with pytest.raises(BenchmarkError, match="batch sizes"):
        benchmark_checkpoint(path, data_root=None, batch_sizes=(0,), trials=2, quick=True)


def test_resolve_checkpoint_from_a_path_and_an_mlflow_run(tmp_path, sqlite_uri):
    import mlflow

    path = make_checkpoint(tmp_path / "ticket" / "checkpoint.safetensors")
    assert resolve_checkpoint(str(path)) == path
    with mlflow.start_run() as run:
        mlflow.log_artifact(str(path), artifact_path="model/artifacts")
        mlflow.log_text("x", "empty/readme.txt")
    got = resolve_checkpoint(f"runs:/{run.info.run_id}/model")
    assert got.name == "checkpoint.safetensors" and got.read_bytes() == path.read_bytes()
    assert resolve_checkpoint(f"runs:/{run.info.run_id}/model/artifacts/checkpoint.safetensors"
                              ).read_bytes() == path.read_bytes()
    with pytest.raises(CheckpointError, match="found 0"):
        resolve_checkpoint(f"runs:/{run.info.run_id}/empty")
    with pytest.raises(CheckpointError, match="cannot download"):
        resolve_checkpoint("runs:/0123456789abcdef/nothing")


def test_cli_prints_the_scorecard_and_writes_json(tmp_path, capsys):
    path = make_checkpoint(tmp_path / "checkpoint.safetensors")
    out = tmp_path / "bench.json"
    rc = main(["benchmark", "--checkpoint", str(path), "--batch-sizes", "1,4", "--trials", "2",
               "--quick", "--no-data", "--threads", "1", "--formats", "compacted,csr",
               "--output", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "compacted" in printed and "speedup" in printed
    result = json.loads(out.read_text())
    assert {r["format"] for r in result["results"]} == {"dense", "compacted", "csr"}
    assert all(r["accuracy"] is None for r in result["results"])  # --no-data
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a checkpoint")
    assert main(["benchmark", "--checkpoint", str(bad), "--output", str(out)]) == 2
    assert "error:" in capsys.readouterr().err


def test_cli_logs_to_an_active_mlflow_run(tmp_path, sqlite_uri):
    import mlflow

    path = make_checkpoint(tmp_path / "checkpoint.safetensors")
    with mlflow.start_run() as run:
        assert main(["benchmark", "--checkpoint", str(path), "--batch-sizes", "1", "--trials",
                     "2", "--quick", "--no-data", "--formats", "compacted",
                     "--output", str(tmp_path / "b.json")]) == 0
    got = mlflow.get_run(run.info.run_id)
    assert "speedup_compacted_bs1" in got.data.metrics
    assert got.data.metrics["speedup_dense_bs1"] == 1.0
    local = mlflow.artifacts.download_artifacts(f"runs:/{run.info.run_id}/benchmark/benchmark.json")
    assert json.loads(Path(local).read_text())["model"]["name"] == "mlp"


def test_benchmark_experiment_writes_one_json_per_level_and_reuses_it(tmp_path, data):
    root = tmp_path / "abc123"
    records = []
    for level, variant in ((0, "dense"), (1, "ticket"), (2, "ticket")):
        ck = root / "replicate_0" / f"level_{level}" / variant / "checkpoint.safetensors"
        make_checkpoint(ck, fraction=1 - 0.5 ** level if level else 0.0, level=level,
                        variant=variant)
        records += [{"replicate": 0, "level": level, "variant": variant},
                    {"replicate": 0, "level": level, "variant": "random_reinit"}]
    results = benchmark_experiment(root, records, data=data, batch_sizes=(1, 8), trials=2)
    assert [r["model"]["level"] for r in results] == [r["level"] for r in results] == [0, 1, 2]
    assert [r["variant"] for r in results] == ["dense", "ticket", "ticket"]
    sparsity = [r["model"]["sparsity"] for r in results]
    assert sparsity == sorted(sparsity) and sparsity[0] == 0.0
    files = [root / "replicate_0" / f"level_{lv}" / v / "benchmark.json"
             for lv, v in ((0, "dense"), (1, "ticket"), (2, "ticket"))]
    assert all(f.is_file() for f in files)
    assert [r["path"] for r in results] == [str(f) for f in files]
    stamp = files[2].stat().st_mtime_ns
    again = benchmark_experiment(root, records, levels=[2], data=data, batch_sizes=(1, 8),
                                 trials=2)
    assert len(again) == 1 and files[2].stat().st_mtime_ns == stamp  # reused, not re-run
    assert again[0]["results"] == results[2]["results"]


class NoisyClock(Clock):
    """The wall clock, read as on a machine whose cores other work takes now and then: every
    other turn of timed calls reads 10x slow. Dense timed against itself then strays far
    beyond 2x, which is what the benchmark's noise check reacts to."""

    def __init__(self):
        self.turns = 0

    def seconds(self, marks: list) -> list[float]:
        self.turns += 1
        return [m * (10 if self.turns % 2 else 1) for m in marks]


def test_a_noisy_measurement_at_several_threads_is_measured_again_at_one(tmp_path, data,
                                                                        caplog):
    """The pipeline's noise branch: the noise floor strays, so the level is measured again at
    one thread; the figures kept are the second measurement's, and the first is recorded."""
    root = tmp_path / "abc123"
    make_checkpoint(root / "replicate_0" / "level_1" / "ticket" / "checkpoint.safetensors",
                    level=1)
    records = [{"replicate": 0, "level": 1, "variant": "ticket"}]
    # One thread before the call, whatever an earlier test in this process left (a loaded plan
    # sets torch's threads to its own): the run at 2 threads must put the 1 back.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with caplog.at_level(logging.WARNING, logger="ticketsmith.benchmark"):
            (result,) = benchmark_experiment(root, records, threads=2, data=data,
                                             formats=["compacted"], clock=NoisyClock(), **FAST)
        after = torch.get_num_threads()
    finally:
        torch.set_num_threads(before)
    env = result["environment"]
    assert env["first_attempt"]["threads"] == 2
    assert env["first_attempt"]["warning"].startswith(
        "WARNING: noisy machine: dense against itself ranged")
    assert env["threads"] == 1  # the kept figures were measured at one thread
    assert json.loads(Path(result["path"]).read_text())["environment"] == env
    assert "level 1: WARNING: noisy machine" in caplog.text
    assert "measuring again at 1 thread" in caplog.text
    assert after == 1  # the test process's thread count is restored


def test_traffic_model_counts_weights_indices_and_activations():
    torch.manual_seed(0)
    w = torch.randn(20, 50) * (torch.rand(20, 50) < 0.1)
    dense = torch.nn.Linear(50, 20)
    with torch.no_grad():
        dense.weight.copy_(w)
    csr = CSRLinear(w, dense.bias)
    x = torch.randn(3, 50)
    moved, macs = traffic(dense, x)
    assert moved == (20 * 50 + 20) * 4 + 3 * 50 * 4 + 3 * 20 * 4 and macs == 3 * 20 * 50
    nnz = int((w != 0).sum())
    moved, macs = traffic(csr, x)
    assert moved == nnz * 8 + 21 * 4 + 20 * 4 + 3 * 50 * 4 + 3 * 20 * 4 and macs == 3 * nnz


def test_a_noisy_noise_floor_is_said_plainly():
    from ticketsmith.serving.benchmark import busy_warning

    quiet = {"noise_floor": {"1": {"speedup": 1.0, "speedup_min": 0.8, "speedup_max": 1.3}},
             "threads": 2, "cpu_count": 2, "load_average": [0.4, 0.5, 0.6]}
    assert busy_warning(quiet) is None
    noisy = {**quiet, "noise_floor": {**quiet["noise_floor"], "256": {
        "speedup": 0.9, "speedup_min": 0.02, "speedup_max": 41.3}}, "load_average": [4.2, 3, 2]}
    said = busy_warning(noisy)
    assert said.startswith("WARNING: noisy machine: dense against itself ranged 0.02-41.30x at "
                           "batch 256 (load average 4.2 on 2 cores at the start) with 2 threads")
    assert "batch 1" not in said and "--threads 1" in said


def test_a_multi_threaded_baseline_slower_than_one_thread_is_said_plainly():
    from ticketsmith.serving.benchmark import busy_warning

    floor = {"speedup": 1.0, "speedup_min": 0.9, "speedup_max": 1.1}
    env = {"noise_floor": {"1": {**floor, "one_thread_ratio": 0.6},
                           "256": {**floor, "one_thread_ratio": 350.0}},
           "threads": 2, "cpu_count": 2}
    said = busy_warning(env)
    assert "dense at 2 threads was 350.0x slower than at one thread at batch 256" in said
    assert "batch 1" not in said
    assert busy_warning({**env, "noise_floor": {"1": {**floor, "one_thread_ratio": 1.5}}}) is None
