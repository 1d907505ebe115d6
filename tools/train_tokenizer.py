"""Script form of `memory3 train-tokenizer` (same arguments; see `memory3 train-tokenizer --help`)."""
import sys

from memory3.cli import main

if __name__ == "__main__":
    main(["train-tokenizer", *sys.argv[1:]])
