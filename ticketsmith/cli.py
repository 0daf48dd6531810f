"""The one command-line interface. `python -m ticketsmith.<cmd>`, the `ticketsmith` console
script and the MLproject entry points all end up in `main`.

Commands parse arguments and call the library; nothing else happens here.
"""
from __future__ import annotations

import argparse
import logging
import shlex
import sys
from typing import Callable

from .config import ConfigError, load_config

COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {}


def _command(name: str):
    def register(fn):
        COMMANDS[name] = fn
        return fn
    return register


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", help="experiment YAML (see configs/)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set train.lr=0.001 (repeatable)")
    p.add_argument("--overrides", dest="override_string", default="",
                   help="several overrides in one string, space separated (for MLproject)")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bars")


def _load(args: argparse.Namespace):
    overrides = list(args.overrides) + shlex.split(args.override_string or "")
    return load_config(args.config, overrides)


@_command("train")
def cmd_train(args: argparse.Namespace) -> int:
    """Train one dense model and report its test accuracy."""
    from .data import load_dataset
    from .models import build_model
    from .train import resolve_device, train
    import torch

    cfg = _load(args)
    device = resolve_device(cfg.train.device)
    data = load_dataset(cfg.data.name, root=cfg.data.root, val_size=cfg.data.val_size,
                        split_seed=cfg.experiment.seed, device=device,
                        factory=cfg.data.factory, options=cfg.data.options)
    torch.manual_seed(cfg.experiment.seed)
    model = build_model(cfg.model.name, data.input_shape, data.num_classes,
                        cfg.model.factory, cfg.model.options)
    res = train(model, data, cfg.train, seed=cfg.experiment.seed, progress=not args.quiet,
                desc="dense")
    print(f"{cfg.model.name} on {data.name}: test accuracy {res.test_accuracy:.2%}, "
          f"test loss {res.test_loss:.4f}, best val accuracy {res.best_val_accuracy:.2%}, "
          f"early-stop iteration {res.early_stop_iteration}/{res.iterations}, "
          f"{res.wall_time_s:.1f}s on {device}")
    return 0


@_command("prune")
def cmd_prune(args: argparse.Namespace) -> int:
    """Run (or resume) the IMP experiment: dense, then pruned levels with every variant."""
    from .lottery import run_experiment

    cfg = _load(args)
    result = run_experiment(cfg, progress=not args.quiet)
    print(f"done: {len(result.records)} runs ({len(result.trained)} trained now) in {result.run_root}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ticketsmith", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, fn in COMMANDS.items():
        p = sub.add_parser(name, help=(fn.__doc__ or "").strip().splitlines()[0],
                           description=(fn.__doc__ or "").strip())
        _add_config_args(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: finished levels are kept; run the same command again to resume",
              file=sys.stderr)
        return 130


def run_module(command: str) -> None:
    """Entry for `python -m ticketsmith.<command>`."""
    sys.exit(main([command, *sys.argv[1:]]))


if __name__ == "__main__":
    sys.exit(main())
