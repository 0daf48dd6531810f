"""`python -m ticketsmith.report`: the door to `ticketsmith report`."""
from ticketsmith.cli import run_module

run_module("report")
