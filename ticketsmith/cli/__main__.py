"""`python -m ticketsmith.cli`: the same as the `ticketsmith` console script."""
import sys

from ticketsmith.cli import main

sys.exit(main())
