"""`python -m ticketsmith ...` is the `ticketsmith` console script."""
import sys

from ticketsmith.cli import main

sys.exit(main())
