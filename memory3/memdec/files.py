"""On-disk conventions shared by the datastore and the kNN targets.

Both are folders holding fixed-size binary arrays (memory-mapped) and a `manifest.json` that is the
only record of what is done. The arrays are allocated whole at the start; the manifest records how
many leading positions are written (`done_positions`). A commit flushes the arrays, then replaces
the manifest atomically (temp, fsync, rename), so a kill at any point leaves a manifest that only
claims positions that are really on disk, and a re-run continues from there.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np

from memory3 import files
from memory3.data import DataError, load_manifest

MANIFEST_FILE = "manifest.json"
# Test-only: seconds to sleep after each commit, so a test can kill a build mid-way.
SLOW_COMMIT_ENV = "MEMORY3_TEST_SLOW_COMMIT_SECONDS"


class MemDecError(DataError):
    """A datastore, targets folder or Memory Decoder setting that cannot be used; the message
    names it. A DataError, so `memory3` reports it as a user error (exit status 2)."""


def read_manifest(folder: Path, fmt: str, version: int, what: str) -> dict:
    return files.read_manifest(folder, fmt, version, MemDecError, missing=f"{folder} is not a {what}",
                               outdated="build it again")


def open_array(path: Path, dtype: str, shape: tuple[int, ...], mode: str) -> np.memmap:
    """A little-endian array file of exactly `shape`; mode "w" creates it (sparse) if missing."""
    dt = np.dtype(dtype).newbyteorder("<")
    size = int(np.prod(shape)) * dt.itemsize
    if mode == "w":
        if not path.exists() or path.stat().st_size != size:
            with open(path, "wb") as f:
                f.truncate(size)
        return np.memmap(path, dtype=dt, mode="r+", shape=shape)
    if not path.is_file():
        raise MemDecError(f"{path} is missing")
    if path.stat().st_size != size:
        raise MemDecError(f"{path} has {path.stat().st_size} bytes, expected {size} for an array "
                          f"{shape} of {dtype}: it is truncated or from another build")
    return np.memmap(path, dtype=dt, mode="r", shape=shape)


def data_identity(data_dir: str | Path, split: str) -> dict[str, Any]:
    """What identifies the tokens of a split wherever the folder lives: the tokenizer and the
    sha256 of every shard, hashed into one fingerprint."""
    manifest = load_manifest(data_dir)
    if split not in manifest["splits"]:
        raise MemDecError(f"{Path(data_dir) / 'manifest.json'} has no split {split!r}")
    shards = [s["sha256"] for s in manifest["splits"][split]["shards"]]
    tokenizer = manifest["tokenizer"]["sha256"]
    digest = hashlib.sha256(json.dumps([tokenizer, shards]).encode()).hexdigest()
    return {"path": str(Path(data_dir).resolve()), "split": split, "fingerprint": digest,
            "tokenizer_sha256": tokenizer, "vocab_size": manifest["tokenizer"]["vocab_size"]}


def checkpoint_identity(path: str | Path) -> dict[str, Any]:
    """The step folder, step and model config of a checkpoint, as recorded by a datastore."""
    from memory3.checkpoints import read_info, resolve

    ckpt_dir, tag = resolve(path)
    info = read_info(ckpt_dir / tag)
    return {"checkpoint": str((ckpt_dir / tag).resolve()), "step": info["step"],
            "model": info["recipe"]["model"]}


def checkpoint_tokenizer(path: str | Path) -> str | None:
    """sha256 of the tokenizer a checkpoint was trained with, when its training data is still
    where its recipe says (checkpoints do not carry the tokenizer itself); else None."""
    from memory3.checkpoints import read_info

    data_path = read_info(path)["recipe"]["data"]["path"]
    try:
        return load_manifest(data_path)["tokenizer"]["sha256"]
    except (DataError, OSError, KeyError):
        return None
