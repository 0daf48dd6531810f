"""`python -m ticketsmith.prune`: the CLI's prune command (run or resume an IMP experiment).

Pruning itself lives in `ticketsmith.masks`; the experiment driver in `ticketsmith.lottery`.
"""
from .cli import run_module

if __name__ == "__main__":
    run_module("prune")
