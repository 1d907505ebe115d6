"""Script form of `memory3 prepare-data` (same arguments; see `memory3 prepare-data --help`)."""
import sys

from memory3.cli import main

if __name__ == "__main__":
    main(["prepare-data", *sys.argv[1:]])
