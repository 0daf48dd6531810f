"""`python -m ticketsmith.benchmark_cli`: the door to `ticketsmith benchmark`."""
from ticketsmith.cli import run_module

if __name__ == "__main__":
    run_module("benchmark")
