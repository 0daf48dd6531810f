"""Arguments shared by commands, and the config they name."""
from __future__ import annotations

import argparse
import shlex


def add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", help="experiment YAML (see configs/)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set train.lr=0.001 (repeatable)")
    p.add_argument("--overrides", dest="override_string", default="",
                   help="several overrides in one string, space separated (for MLproject)")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bars")


def load(args: argparse.Namespace):
    from ticketsmith.base.config import load_config

    overrides = list(args.overrides) + shlex.split(args.override_string or "")
    return load_config(args.config, overrides)
