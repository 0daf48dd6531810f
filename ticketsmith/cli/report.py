"""`ticketsmith report`: the executive summary of one experiment (`ticketsmith.report`)."""
from __future__ import annotations

import argparse


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--experiment", "-e", help="MLflow experiment name or config hash (with "
                   "--runs-prefix: the hash folder inside it, if it holds several)")
    p.add_argument("--output-dir", default="reports",
                   help="where <experiment>-<hash>/executive_summary.md is written")
    p.add_argument("--runs-prefix", metavar="PATH", help="build from a local run folder "
                   "(runs/<hash>, from `prune --no-tracking`) instead of MLflow")


def cmd_report(args: argparse.Namespace) -> int:
    """Write the executive summary (markdown, HTML, figures) of an experiment."""
    from ticketsmith.report.build import build_report

    md = build_report(None, args.experiment, args.output_dir, runs_prefix=args.runs_prefix)
    print(f"report: {md}\n        {md.with_suffix('.html')}")
    return 0

