"""The one command-line interface. `python -m ticketsmith.<cmd>`, the `ticketsmith` console
script and the MLproject entry points all end up in `main`.

One table of commands; each handler parses nothing itself and imports its library code when
called, so `--help` and a config error never wait for torch or MLflow. One place maps errors
to exit codes: 0 done, 1 tracking failure / failed release check / a sweep that cannot go on,
2 bad input, 130 interrupted (Ctrl-C), 143 stopped by SIGTERM (a pod's eviction or
preemption), both after closing the open runs as KILLED.
"""
from __future__ import annotations

import argparse
import sys
from typing import Callable

from ticketsmith.cli import benchmark, data, experiment, export, generate, report, sweep
from ticketsmith.cli.args import add_config_args
from ticketsmith.base.errors import USER_ERRORS, SweepError, TrackingError
from ticketsmith.base.interrupts import Terminated, stop_on_sigterm
from ticketsmith.base.output import quiet_libraries

Handler = Callable[[argparse.Namespace], int]
AddArgs = Callable[[argparse.ArgumentParser], None]

# name → (handler, function adding the command's arguments)
COMMANDS: dict[str, tuple[Handler, AddArgs]] = {
    "train": (experiment.cmd_train, add_config_args),
    "prune": (experiment.cmd_prune, experiment.add_prune_args),
    "gate": (experiment.cmd_gate, experiment.add_gate_args),
    "benchmark": (benchmark.cmd_benchmark, benchmark.add_args),
    "export": (export.cmd_export, export.add_args),
    "generate": (generate.cmd_generate, generate.add_args),
    "report": (report.cmd_report, report.add_args),
    "sweep": (sweep.cmd_sweep, sweep.add_args),
    "data": (data.cmd_data, add_config_args),
}


def build_parser() -> argparse.ArgumentParser:
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
    # First: from here a SIGTERM is a clean stop at the next safe point, like Ctrl-C (exit
    # 143). Before (interpreter start-up) it ends the process, nothing opened yet.
    stop_on_sigterm()
    quiet_libraries()
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command][0](args)
    except USER_ERRORS as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except TrackingError as exc:
        print(f"error: tracking failed, nothing recorded so far is lost; rerun to resume: {exc}",
              file=sys.stderr)
        return 1
    except SweepError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except Terminated:
        print("terminated (SIGTERM): finished levels and the level's progress are kept; run "
              "the same command again to resume", file=sys.stderr)
        return 143
    except KeyboardInterrupt:
        print("interrupted: finished levels are kept; run the same command again to resume",
              file=sys.stderr)
        return 130


def run_module(command: str) -> None:
    """Entry for `python -m ticketsmith.<command>`."""
    sys.exit(main([command, *sys.argv[1:]]))
