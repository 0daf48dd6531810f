"""Handlers of the experiment commands: train, prune, gate. Each imports its library code
when called, so `--help` and a config error never wait for torch or MLflow."""
from __future__ import annotations

import argparse

from ticketsmith.cli.args import add_config_args, load
from ticketsmith.base.errors import ConfigError


def cmd_train(args: argparse.Namespace) -> int:
    """Train one dense model and report its test accuracy."""
    from ticketsmith.engine.lottery import train_dense

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
    p.add_argument("--inline-tracking", action="store_true",
                   help="track in the training process (default on a CPU: in a second process "
                   "beside training, see docs/architecture.md)")
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
    from ticketsmith.engine.selection import VARIANT_NAMES, Selection

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
        unknown = [v for v in chosen if v not in VARIANT_NAMES]
        if unknown:
            raise ConfigError(f"--variants: unknown {unknown}; choose from {sorted(VARIANT_NAMES)}")
    return Selection(first, last, chosen)


def cmd_prune(args: argparse.Namespace) -> int:
    """Run (or resume) the IMP experiment: dense, then pruned levels with every variant."""
    cfg = load(args)
    selection = parse_selection(args.levels, args.variants)
    if args.no_tracking:
        from ticketsmith.engine.lottery import run_experiment

        result = run_experiment(cfg, progress=not args.quiet, selection=selection)
        print(f"done: {len(result.records)} runs ({len(result.trained)} trained now) "
              f"in {result.run_root}")
        return 0
    options = dict(progress=not args.quiet, legacy_stages=args.legacy_stages, selection=selection,
                   report_dir=None if args.no_report else args.report_dir)
    if args.inline_tracking:
        from ticketsmith.pipeline import run_prune

        out = run_prune(cfg, **options)
    else:
        from ticketsmith.sidecar import run_prune_beside

        out = run_prune_beside(cfg, **options)
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


def cmd_gate(args: argparse.Namespace) -> int:
    """Print the quality-gate table of a tracked experiment; exit 1 if the release check fails."""
    from ticketsmith.gates import label
    from ticketsmith.tracking.regate import gate_experiment

    registry: list[str] = []
    exp_hash, table, ok, reason = gate_experiment(args.experiment, args.config, args.overrides,
                                                  update_registry=args.update_registry,
                                                  echo=registry.append)
    print(f"experiment {exp_hash}: quality gates (mean over replicates)")
    print(table)
    for line in registry or (["registry: unchanged"] if args.update_registry else []):
        print(line)
    print(f"release check: {label(ok)} ({reason})")
    return 0 if ok else 1
