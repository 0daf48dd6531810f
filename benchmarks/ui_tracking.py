"""What the MLflow UI's extras cost: parent-run series, descriptions, experiment tags.

Runs an experiment for real into a fresh SQLite store (in a temporary folder) with the UI
extras timed where they run (`MlflowTracker._log_parent_series`, `_describe_experiment`, the
report's parent description, the registry's version descriptions), and prints their time as a
share of the whole `prune` pipeline measured in the same process.

    python benchmarks/ui_tracking.py                                # configs/tiny.yaml
    python benchmarks/ui_tracking.py --config configs/imp_mnist.yaml --set prune.levels=2 \
        --set train.epochs=0.5 --set experiment.benchmark=false
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def timed(owner, name: str, spent: dict[str, float]) -> None:
    original = getattr(owner, name)

    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            spent[name] = spent.get(name, 0.0) + time.perf_counter() - start

    setattr(owner, name, wrapper)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=str(REPO / "configs" / "tiny.yaml"))
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = p.parse_args(argv)

    from mlflow import MlflowClient

    from ticketsmith.report import build as report
    from ticketsmith.base.config import load_config
    from ticketsmith.pipeline import run_prune
    from ticketsmith.tracking.tracker import MlflowTracker, environment

    spent: dict[str, float] = {}
    timed(MlflowTracker, "_log_parent_series", spent)
    timed(MlflowTracker, "_describe_experiment", spent)
    timed(report, "parent_description", spent)
    timed(MlflowClient, "update_model_version", spent)   # only the version descriptions call it
    here = Path.cwd()
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(args.config, [f"experiment.output_dir={tmp}/runs", *args.overrides])
        cfg = load_config(args.config, [f"experiment.output_dir={tmp}/runs", *args.overrides,
                                        f"data.root={here / cfg.data.root}"])
        os.chdir(tmp)  # MLflow's local artifacts (./mlruns) land here
        client = MlflowClient(f"sqlite:///{tmp}/mlflow.db")
        start = time.perf_counter()
        run_prune(cfg, client=client, progress=False, report_dir=f"{tmp}/reports",
                  echo=lambda s: None)
        total = time.perf_counter() - start
    extra = sum(spent.values())
    env = environment()
    print(f"{Path(args.config).name} {' '.join(args.overrides)}: pipeline {total:.1f} s, UI extras "
          f"{extra:.2f} s = {extra / total:.1%} ({env['cpu']}, torch {env['torch']}, mlflow "
          f"{env['mlflow']}, SQLite store)")
    for name, s in sorted(spent.items(), key=lambda kv: -kv[1]):
        print(f"  {name:<22} {s:7.3f} s")
    print("  (not timed: one set_tag per parent for its description, one log_batch per "
          "benchmarked level)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
