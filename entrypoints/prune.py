"""MLproject entry point `prune`: the same code as `ticketsmith prune`."""
import sys

from ticketsmith.cli import main

if __name__ == "__main__":
    sys.exit(main(["prune", *sys.argv[1:]]))
