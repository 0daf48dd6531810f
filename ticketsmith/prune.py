"""`python -m ticketsmith.prune`: the door to `ticketsmith prune`."""
from ticketsmith.cli import run_module

if __name__ == "__main__":
    run_module("prune")
