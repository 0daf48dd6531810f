"""`python -m ticketsmith.train`: the door to `ticketsmith train`."""
from ticketsmith.cli import run_module

if __name__ == "__main__":
    run_module("train")
