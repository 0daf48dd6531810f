"""`ticketsmith sweep`: an Optuna study over pruning schedules (`ticketsmith.sweep`)."""
from __future__ import annotations

import argparse
import os
import shlex

from ticketsmith.base.errors import ConfigError


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", required=True, help="sweep YAML (configs/sweep_*.yaml)")
    p.add_argument("--n-trials", type=int, default=None,
                   help="trials the study should hold (COMPLETE or PRUNED); default from the YAML")
    p.add_argument("--workers", type=int, default=1, help="local worker processes (default 1)")
    p.add_argument("--storage", default=None, help="Optuna storage URL (else "
                   "$TICKETSMITH_SWEEP_STORAGE, "
                   "else study.storage)")
    p.add_argument("--study-name", default=None, help="override study.name")
    p.add_argument("--overrides", default="", help="extra experiment overrides, space separated")
    p.add_argument("--create-only", action="store_true", help="create the study and its MLflow "
                   "run, then exit (the cluster's study-creation Job)")
    p.add_argument("--worker", nargs="?", const=-1, type=int, default=None, metavar="INDEX",
                   help="internal: run trials only, as worker INDEX (default $JOB_COMPLETION_INDEX)")
    p.add_argument("--quiet", "-q", action="store_true", help="accepted for symmetry; sweeps "
                   "never draw progress bars")


def cmd_sweep(args: argparse.Namespace) -> int:
    """Optuna study over pruning schedules: the sparsest ticket that passes, or a Pareto front."""
    from ticketsmith.sweep.config import load_sweep_config, resolve_storage
    from ticketsmith.sweep.study import run_sweep

    cfg = load_sweep_config(args.config, shlex.split(args.overrides or ""), storage=args.storage,
                            study_name=args.study_name, n_trials=args.n_trials)
    storage = resolve_storage(cfg, args.storage)
    if args.workers < 1:
        raise ConfigError(f"--workers: must be at least 1 (got {args.workers})")
    worker = args.worker
    if worker == -1:  # --worker without an index: an Indexed Job's pod
        worker = int(os.environ.get("JOB_COMPLETION_INDEX", "0"))

    def echo(line: str) -> None:
        print(line if worker is None else f"[worker {worker}] {line}", flush=True)

    return run_sweep(cfg, storage_url=storage, workers=args.workers, worker=worker,
                     create_only=args.create_only, config_path=args.config,
                     overrides=args.overrides, echo=echo)

