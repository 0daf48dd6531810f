"""`python -m ticketsmith ...` is the `ticketsmith` console script."""
import sys

from .cli import main

sys.exit(main())
