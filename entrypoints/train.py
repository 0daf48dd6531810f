"""MLproject entry point `train`: the same code as `ticketsmith train`."""
import sys

from ticketsmith.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
