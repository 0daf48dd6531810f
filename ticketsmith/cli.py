"""The one command-line interface. `python -m ticketsmith.<cmd>`, the `ticketsmith` console
script and the MLproject entry points all end up in `main`.

Commands parse arguments and call the library; nothing else happens here.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import os
import shlex
import sys
from typing import Callable

from .checkpoint import CheckpointError
from .config import ConfigError, load_config
from .data import DataError
from .gates import GateError
from .lottery import LotteryError
from .masks import MaskError
from .models import ModelError
from .reporting import TrackingError, UnknownExperiment

# Errors that describe bad input: printed as one line, no traceback, exit code 2.
USER_ERRORS = (ConfigError, DataError, ModelError, MaskError, CheckpointError, GateError,
               LotteryError, UnknownExperiment)

# name → (handler, function adding the command's arguments)
COMMANDS: dict[str, tuple[Callable[[argparse.Namespace], int],
                          Callable[[argparse.ArgumentParser], None]]] = {}


def command(name: str, add_args: Callable[[argparse.ArgumentParser], None] | None = None):
    """Register a CLI command; `add_args` defaults to the config arguments."""
    def register(fn):
        COMMANDS[name] = (fn, add_args or add_config_args)
        return fn
    return register


def add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", help="experiment YAML (see configs/)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set train.lr=0.001 (repeatable)")
    p.add_argument("--overrides", dest="override_string", default="",
                   help="several overrides in one string, space separated (for MLproject)")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bars")


def load(args: argparse.Namespace):
    overrides = list(args.overrides) + shlex.split(args.override_string or "")
    return load_config(args.config, overrides)


@command("train")
def cmd_train(args: argparse.Namespace) -> int:
    """Train one dense model and report its test accuracy."""
    from .lottery import train_dense

    cfg = load(args)
    res, data, device = train_dense(cfg, progress=not args.quiet)
    print(f"{cfg.model.name} on {data.name}: test accuracy {res.test_accuracy:.2%}, "
          f"test loss {res.test_loss:.4f}, best val accuracy {res.best_val_accuracy:.2%}, "
          f"early-stop iteration {res.early_stop_iteration}/{res.iterations}, "
          f"{res.wall_time_s:.1f}s on {device}")
    return 0


def add_prune_args(p: argparse.ArgumentParser) -> None:
    add_config_args(p)
    p.add_argument("--no-tracking", action="store_true",
                   help="run the engine only: no MLflow runs, gates or registry")
    p.add_argument("--legacy-stages", action="store_true",
                   help="also move deprecated registry stages (Production/Archived)")
    p.add_argument("--report-dir", default="reports",
                   help="where the executive report is written at the end (default: reports)")
    p.add_argument("--no-report", action="store_true", help="skip the executive report")
    p.add_argument("--levels", metavar="A:B", help="train only levels A..B (inclusive; 'A:' "
                   "or ':B' open-ended); earlier levels must be finished. Keeps the hash.")
    p.add_argument("--variants", metavar="V1,V2", help="train only these variants "
                   "(ticket, random_reinit, random_prune). Keeps the hash.")


def parse_selection(levels: str | None, variants: str | None):
    """--levels/--variants → lottery.Selection, with one-line errors naming the option."""
    from .lottery import VARIANTS, Selection

    first, last = 0, None
    if levels:
        lo, sep, hi = levels.partition(":")
        try:
            first = int(lo) if lo.strip() else 0
            last = (int(hi) if hi.strip() else None) if sep else first
        except ValueError:
            raise ConfigError(f"--levels {levels!r}: expected A:B with whole numbers") from None
        if first < 0 or (last is not None and last < first):
            raise ConfigError(f"--levels {levels!r}: expected 0 <= A <= B")
    chosen = None
    if variants:
        chosen = tuple(v.strip() for v in variants.split(",") if v.strip())
        unknown = [v for v in chosen if v not in VARIANTS]
        if unknown:
            raise ConfigError(f"--variants: unknown {unknown}; choose from {sorted(VARIANTS)}")
    return Selection(first, last, chosen)


@command("prune", add_prune_args)
def cmd_prune(args: argparse.Namespace) -> int:
    """Run (or resume) the IMP experiment: dense, then pruned levels with every variant."""
    cfg = load(args)
    selection = parse_selection(args.levels, args.variants)
    if args.no_tracking:
        from .lottery import run_experiment

        result = run_experiment(cfg, progress=not args.quiet, selection=selection)
        print(f"done: {len(result.records)} runs ({len(result.trained)} trained now) "
              f"in {result.run_root}")
        return 0
    from .pipeline import run_prune

    out = run_prune(cfg, progress=not args.quiet, legacy_stages=args.legacy_stages,
                    selection=selection, report_dir=None if args.no_report else args.report_dir)
    print(f"done: {len(out.experiment.records)} runs ({len(out.experiment.trained)} trained now) "
          f"in {out.experiment.run_root}")
    return 0


def add_gate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--experiment", "-e", required=True,
                   help="MLflow experiment NAME, config HASH, or NAME/HASH")
    p.add_argument("--config", "-c", help="take gate thresholds from this YAML instead of the "
                   "experiment's logged config")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a gate threshold, e.g. --set gate.max_accuracy_drop=1.0")
    p.add_argument("--update-registry", action="store_true",
                   help="write the new verdicts to the experiment's registered versions and "
                   "move champion/previous-champion (default: the registry is only read)")


@command("gate", add_gate_args)
def cmd_gate(args: argparse.Namespace) -> int:
    """Print the quality-gate table of a tracked experiment; exit 1 if the release check fails."""
    from .pipeline import gate_experiment

    registry: list[str] = []
    exp_hash, table, ok, reason = gate_experiment(args.experiment, args.config, args.overrides,
                                                  update_registry=args.update_registry,
                                                  echo=registry.append)
    print(f"experiment {exp_hash}: quality gates (mean over replicates)")
    print(table)
    for line in registry or (["registry: unchanged"] if args.update_registry else []):
        print(line)
    print(f"release check: {'PASS' if ok else 'FAIL'} ({reason})")
    return 0 if ok else 1


# Commands that live in modules of their own, which register them with @command when
# imported. Each is also a `python -m` door (e.g. `python -m ticketsmith.benchmark_cli`).
COMMAND_MODULES = {"benchmark": "ticketsmith.benchmark_cli", "report": "ticketsmith.report",
                   "sweep": "ticketsmith.sweep"}


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The parser; with `argv`, only the module of the command asked for is imported
    (MLflow and Optuna take seconds to import, which a config error should not wait for)."""
    first = next((a for a in argv or [] if not a.startswith("-")), None)
    for name, module in COMMAND_MODULES.items():
        if first is None or first == name or first not in {*COMMAND_MODULES, *COMMANDS}:
            importlib.import_module(module)
    parser = argparse.ArgumentParser(
        prog="ticketsmith", description="Lottery-ticket experiments: how far can a network be "
        "pruned before quality drops, and what does it save at serving time?")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (fn, add_args) in COMMANDS.items():
        p = sub.add_parser(name, help=(fn.__doc__ or "").strip().splitlines()[0],
                           description=(fn.__doc__ or "").strip())
        add_args(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    # Per-file download bars from MLflow drown the experiment's own progress output.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    # MLflow's HTTP client retries 7 times with exponential backoff (minutes) inside each of
    # our retries (tracking.retry); two inner retries keep an outage's failure prompt.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(argv).parse_args(argv)
    try:
        return COMMANDS[args.command][0](args)
    except USER_ERRORS as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except TrackingError as exc:
        print(f"error: tracking failed, nothing recorded so far is lost; rerun to resume: {exc}",
              file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted: finished levels are kept; run the same command again to resume",
              file=sys.stderr)
        return 130


def run_module(command: str) -> None:
    """Entry for `python -m ticketsmith.<command>`."""
    sys.exit(main([command, *sys.argv[1:]]))


if __name__ == "__main__":
    sys.exit(main())
