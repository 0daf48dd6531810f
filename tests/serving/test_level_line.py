"""What `prune` prints per benchmarked level: one short line, the route that ships and its
speedup at each measured batch size (every format's figures stay in benchmark.json), and
the noise warning on a line of its own when it fired; on a tiny experiment trained and
benchmarked for real."""
from __future__ import annotations

import logging
from pathlib import Path

from ticketsmith.base.config import load_config
from ticketsmith.engine.lottery import run_experiment
from ticketsmith.serving.benchmark import benchmark_experiment, level_line
from ticketsmith.serving.plan.layout import shipped

REPO = Path(__file__).resolve().parents[2]


def test_one_short_line_per_level_says_what_ships(tmp_path, caplog):
    cfg = load_config(REPO / "configs" / "tiny.yaml",
                      [f"experiment.output_dir={tmp_path}", "prune.levels=1",
                       "experiment.variants=[ticket]"])
    result = run_experiment(cfg, progress=False, echo=lambda _: None)
    with caplog.at_level(logging.INFO, logger="ticketsmith.benchmark"):
        benches = benchmark_experiment(result.run_root, result.records, data=result.data,
                                       batch_sizes=(1, 8), trials=2, threads=1,
                                       formats=["compacted", "onnxruntime", "numpy"])
    lines = [r.getMessage() for r in caplog.records if r.name == "ticketsmith.benchmark"]
    assert len(lines) == len(benches) == 2, lines  # level 0 (dense) and level 1
    for bench, line in zip(benches, lines):
        ships = shipped(bench["serving"])
        speed = bench["serving"]["speedup"]
        want = (f"level {bench['level']} {bench['variant']}: ships "
                f"{ships[1]} {speed['1']:.2f}x at batch 1, {ships[8]} {speed['8']:.2f}x at batch 8")
        warning = bench["environment"].get("warning")  # a loaded machine may add one
        assert line.split("\n") == [want, *([f"  {warning}"] if warning else [])], line
    noisy = dict(benches[1], environment={**benches[1]["environment"],
                                          "warning": "WARNING: noisy machine: test"})
    first, second = level_line(1, "ticket", noisy).split("\n")
    assert first == lines[1] and second == "  WARNING: noisy machine: test"
