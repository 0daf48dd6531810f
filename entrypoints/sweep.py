"""MLproject entry point `sweep`: the same code as `ticketsmith sweep`."""
import sys

from ticketsmith.cli import main

if __name__ == "__main__":
    sys.exit(main(["sweep", *sys.argv[1:]]))
