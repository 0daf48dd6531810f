"""`python -m ticketsmith.sweep`: the door to `ticketsmith sweep`."""
from ticketsmith.cli import run_module

run_module("sweep")
