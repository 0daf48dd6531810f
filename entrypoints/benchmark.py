"""MLproject entry point `benchmark`: the same code as `ticketsmith benchmark`."""
import sys

from ticketsmith.cli import main

if __name__ == "__main__":
    sys.exit(main(["benchmark", *sys.argv[1:]]))
