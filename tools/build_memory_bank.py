"""Script form of `memory3 build-bank` (same arguments; see `memory3 build-bank --help`)."""
import sys

from memory3.memory.cli import main

if __name__ == "__main__":
    main(sys.argv[1:])
