"""Tokens per second and dollars per million tokens per level, during a real `prune` of a tiny
language model with `experiment.benchmark` on (SQLite store, tiny serving settings): the child
runs hold the benchmark, the parent run charts the per-level series, and the report's cost line
is made of the recorded numbers, in bits per byte, never in accuracy."""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import mlflow
import pytest
from mlflow import MlflowClient

from ticketsmith.gates import champion_level
from ticketsmith.pipeline import run_prune
from ticketsmith.report.build import build_report
from ticketsmith.report.lm_serving import usd
from ticketsmith.serving.lm_levels import dense_row, served
from ticketsmith.tracking.benchmarks import BENCHMARK_ARTIFACT, BENCHMARK_DIR

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "engine"))
from test_lm import tiny_lm  # noqa: E402

# Seconds per level: an 8-token prompt, 4 new tokens, two rounds, one thread.
SERVING = ["serving.prompt_tokens=8", "serving.new_tokens=4", "serving.trials=2",
           "serving.batch_sizes=[1, 2]", "serving.threads=1", "serving.usd_per_hour=3.0"]
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def benchmarked(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lm_tokens")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        mp.chdir(tmp)  # local artifacts (./mlruns) land in tmp
        mlflow.set_tracking_uri(uri)
        cfg = tiny_lm(tmp / "runs", "train.iterations=20", "train.eval_every=10",
                      "experiment.benchmark=true", "tracking.register_model=false", *SERVING)
        client = MlflowClient(uri)
        lines: list[str] = []
        out = run_prune(cfg, client=client, progress=False, echo=lines.append,
                        report_dir=tmp / "report")
        yield cfg, client, out, lines, tmp
        mlflow.set_tracking_uri(None)


def _runs(client: MlflowClient, cfg):
    exp = client.get_experiment_by_name(cfg.experiment.name)
    parent = client.search_runs([exp.experiment_id], "tags.`ticketsmith.role` = 'parent'")[0]
    served_runs = {}
    for level in (0, 1, 2):
        variant = "dense" if level == 0 else "ticket"
        served_runs[level] = client.search_runs(
            [exp.experiment_id], f"params.variant = '{variant}' and "
            f"tags.`ticketsmith.level` = '{level}'")[0]
    return parent, served_runs


def _recorded(client: MlflowClient, run_id: str, dest: Path) -> dict:
    path = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=BENCHMARK_ARTIFACT,
                                               dst_path=str(dest))
    return json.loads(Path(path).read_text())


def test_each_level_is_benchmarked_and_the_parent_charts_tokens_per_s_over_levels(benchmarked):
    cfg, client, out, lines, tmp = benchmarked
    assert any("tokens per second and $ per million tokens logged for 3 level(s)" in line
               for line in lines), lines
    parent, children = _runs(client, cfg)
    for key, phase, bs in (("tokens_per_s/decode_batch_1", "decode", 1),
                           ("tokens_per_s/prefill_batch_2", "prefill", 2),
                           ("usd_per_m_tokens/decode_batch_1", "usd", 1),
                           ("usd_per_m_tokens/dense_decode_batch_2", "dense_usd", 2),
                           ("speedup/decode_batch_2", "speedup", 2)):
        history = sorted(client.get_metric_history(parent.info.run_id, key), key=lambda m: m.step)
        assert [m.step for m in history] == [0, 1, 2], key
        for m in history:
            bench = _recorded(client, children[m.step].info.run_id, tmp / f"dl{m.step}")
            row = served(bench, bs)
            expected = {"decode": row["decode_tokens_per_s"],
                        "prefill": row["prefill_tokens_per_s"],
                        "usd": row["usd_per_million_tokens"],
                        "dense_usd": dense_row(bench, bs)["usd_per_million_tokens"],
                        "speedup": row["decode_speedup"]["median"]}[phase]
            assert m.value == pytest.approx(expected), (key, m.step)
    bench = _recorded(client, children[2].info.run_id, tmp / "dl")
    assert bench["settings"]["prompt_tokens"] == 8 and bench["settings"]["new_tokens"] == 4
    assert bench["cost"]["usd_per_hour"] == 3.0 and bench["model"]["variant"] == "ticket"
    child = children[2].data.metrics
    assert child["decode_tokens_per_s_dense_bs1"] > 0 and "speedup_decode_dense_bs2" in child


def _rewrite(client: MlflowClient, run_id: str, bench: dict, folder: Path) -> None:
    """Replace a run's recorded benchmark.json (the report reads it from there)."""
    folder.mkdir()
    (folder / "benchmark.json").write_text(json.dumps(bench))
    client.log_artifact(run_id, str(folder / "benchmark.json"), BENCHMARK_DIR)


def _cost_line(report: str) -> str:
    return next(line for line in report.splitlines() if "a million tokens cost" in line)


def test_the_answer_prices_the_champion_from_its_recorded_benchmark(benchmarked):
    cfg, client, out, _, tmp = benchmarked
    report = next((tmp / "report").rglob("executive_summary.md")).read_text()
    champion = champion_level(out.verdicts)
    assert champion is not None, "the tiny ticket no longer passes its gate: nothing to price"
    _, children = _runs(client, cfg)
    run_id = children[champion.level].info.run_id
    bench = _recorded(client, run_id, tmp / "champ")
    row, dense = served(bench, 1), dense_row(bench, 1)
    line = _cost_line(report)
    dense_bpb = out.experiment.records[0]["test_bpb"]  # level 0, the one replicate
    assert line.startswith(f"At {100 * champion.sparsity:.1f}% sparsity quality holds (test "
                           f"bits per byte {champion.ticket_bpb - dense_bpb:+.3f})"), line
    assert (f"a million tokens cost {usd(row['usd_per_million_tokens'])} instead of "
            f"{usd(dense['usd_per_million_tokens'])} on this machine" in line), line
    assert f"{row['decode_speedup']['median']:.2f}×" in line and "1 thread" in line
    # Width 32, two rounds: whatever was measured, the line says "faster" only beyond the
    # noise of dense against itself over every level of the run.
    levels = {lv: _recorded(client, run.info.run_id, tmp / f"lv{lv}")
              for lv, run in children.items()}
    noise = max(b["environment"]["noise_floor"]["decode_batch_1"]["max"] for b in levels.values())
    z = row["decode_speedup"]["median"]
    assert ("no faster than dense" in line) == (not (z >= 1.1 and z > noise)), line

    # The same line from other recorded numbers: the served format 2.5x as fast as dense
    # beyond a tight noise floor at its own level, so 1/2.5 of dense's dollars ...
    for r in bench["results"]:
        if r is not dense and r["batch_size"] == 1:
            r["decode_tokens_per_s"] = 2.5 * dense["decode_tokens_per_s"]
            r["usd_per_million_tokens"] = dense["usd_per_million_tokens"] / 2.5
            r["decode_speedup"] = {"median": 2.5, "min": 2.4, "max": 2.6}
    levels[champion.level] = bench
    tight, wide = {"median": 1.0, "min": 0.95, "max": 1.05}, {"median": 1.2, "min": 0.5, "max": 3.0}
    ref = f"{cfg.experiment.name}/{out.experiment.exp_hash}"
    for lv, b in levels.items():  # ... but dense against itself strayed to 3x at level 0:
        b["environment"]["noise_floor"]["decode_batch_1"] = wide if lv == 0 else tight
        _rewrite(client, children[lv].info.run_id, b, tmp / f"noisy{lv}")
    line = _cost_line(build_report(client, ref, tmp / "report2").read_text())
    assert "no faster than dense within this machine's noise (2.50× at batch 1; dense against " \
           "itself 0.50–3.00× over the run)" in line, line
    levels[0]["environment"]["noise_floor"]["decode_batch_1"] = tight  # a quiet machine
    _rewrite(client, children[0].info.run_id, levels[0], tmp / "quiet0")
    line = _cost_line(build_report(client, ref, tmp / "report3").read_text())
    assert "decode runs 2.50× faster" in line, line
    assert (f"cost {usd(dense['usd_per_million_tokens'] / 2.5)} instead of "
            f"{usd(dense['usd_per_million_tokens'])}" in line), line


def test_a_language_model_report_speaks_bits_per_byte_not_accuracy(benchmarked):
    _, _, _, _, tmp = benchmarked
    report = next((tmp / "report").rglob("executive_summary.md")).read_text()
    assert "bits per byte" in report and "Serving scorecard: tokens per second" in report
    assert not re.search(r"accurac", report, re.IGNORECASE), [
        line for line in report.splitlines() if re.search("accurac", line, re.IGNORECASE)]
    data = next(line for line in report.splitlines() if line.startswith("- Data set:"))
    assert "whole documents held out" in data and "validation examples" not in data, data
