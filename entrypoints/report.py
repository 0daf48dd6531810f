"""MLproject entry point `report`: the same code as `ticketsmith report`."""
import sys

from ticketsmith.cli import main

if __name__ == "__main__":
    sys.exit(main(["report", *sys.argv[1:]]))
