"""argparse types shared by the commands: a size or an output path is checked where it is parsed,
so a bad one is refused (exit status 2, the message naming the flag and what it expects) before
anything is loaded or computed."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def _number(text: str, cast, ok, expected: str):
    try:
        value = cast(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
    if not ok(value):  # NaN fails every comparison, so it is refused too
        raise argparse.ArgumentTypeError(f"expected {expected}, got {value}")
    return value


def positive_int(text: str) -> int:
    return _number(text, int, lambda v: v > 0, "a positive integer")


def non_negative_int(text: str) -> int:
    return _number(text, int, lambda v: v >= 0, "an integer >= 0")


def non_negative_float(text: str) -> float:
    return _number(text, float, lambda v: v >= 0, "a number >= 0")


def fraction(text: str) -> float:
    return _number(text, float, lambda v: 0 <= v <= 1, "a number from 0 to 1")


def output_file(text: str) -> str:
    """A file to write results to: not a folder, and not below a file (its missing folders are
    made when it is written, by `write_json`)."""
    path = Path(text)
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{path} is a folder; expected the path of a file to "
                                         f"write")
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise argparse.ArgumentTypeError(f"{parent} is a file, so {path} cannot be "
                                                 f"written below it")
            break
    return text


def write_json(path: str | Path, obj: Any) -> None:
    """Write an output_file atomically (a kill leaves the previous file whole), making its
    folders."""
    from memory3.files import write_json_atomic

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, obj)
