"""On-disk conventions shared by the datastore and the kNN targets.

Both are folders holding fixed-size binary arrays (memory-mapped) and a `manifest.json` that is the
only record of what is done. The arrays are allocated whole at the start; the manifest records how
many leading positions are written (`done_positions`). A commit flushes the arrays, then replaces
the manifest atomically (temp, fsync, rename), so a kill at any point leaves a manifest that only
claims positions that are really on disk, and a re-run continues from there.

Checks on read (issue 14), as for token shards: the manifest carries the sha256 of its own
content (`seal`), checked on every read. The arrays can be terabytes, so hashing them whole on
every open is out: opening checks their sizes and the sha256 of their small `<array>.crc` file
(uint32 CRC32 of each block of `block_rows` rows, about BLOCK_BYTES each), and every read checks
the blocks it touches against their CRC32 the first time this process touches them (one CRC pass
over the data at most per process). The checksums are taken when a build completes, from the bytes
on disk; a byte damaged before that (during an interrupted build) is only caught by its size.
A resumed build refuses an array whose size is no longer the one it allocated rather than
reallocating it over positions the manifest says are done.

Out of space (issue 14): arrays are allocated with their disk blocks reserved, so a full disk
stops the build when it starts, with an error naming the array, never with a SIGBUS mid-way; the
index and the manifest are written atomically, so a full disk there leaves the last commit intact
(MemDecError naming the file; the same command resumes once space is freed).
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from memory3 import files
from memory3.data import DataError, load_manifest

MANIFEST_FILE = "manifest.json"
# Test-only: seconds to sleep after each commit, so a test can kill a build mid-way.
SLOW_COMMIT_ENV = "MEMORY3_TEST_SLOW_COMMIT_SECONDS"
# Arrays are checksummed in blocks of about this many bytes (whole rows): small enough that the
# first read of a random row checks little, large enough that the .crc file stays small (4 bytes
# per MiB).
BLOCK_BYTES = 1 << 20
SEAL_KEY = "manifest_sha256"
# posix_fallocate errors that mean "not on this file system" (len 0 included): fall back to sparse.
UNSUPPORTED = (errno.EINVAL, errno.EOPNOTSUPP, errno.ENOSYS)


class MemDecError(DataError):
    """A datastore, targets folder or Memory Decoder setting that cannot be used; the message
    names it. A DataError, so `memory3` reports it as a user error (exit status 2)."""


def _content_sha256(manifest: dict) -> str:
    rest = {k: v for k, v in manifest.items() if k != SEAL_KEY}
    return hashlib.sha256(json.dumps(rest, sort_keys=True).encode()).hexdigest()


def seal(manifest: dict) -> dict:
    """A copy of `manifest` carrying the sha256 of its content, as written to disk."""
    return {**manifest, SEAL_KEY: _content_sha256(manifest)}


def read_manifest(folder: Path, fmt: str, version: int, what: str) -> dict:
    """folder/manifest.json, its seal checked (and removed)."""
    manifest = files.read_manifest(folder, fmt, version, MemDecError,
                                   missing=f"{folder} is not a {what}", outdated="build it again")
    if manifest.get(SEAL_KEY) != _content_sha256(manifest):
        raise MemDecError(f"{Path(folder) / MANIFEST_FILE}: its content does not match the "
                          f"sha256 it carries ({SEAL_KEY}): the file is corrupt; build the "
                          f"{what} again in a fresh folder")
    del manifest[SEAL_KEY]
    return manifest


def open_array(path: Path, dtype: str, shape: tuple[int, ...], mode: str,
               done_rows: int = 0) -> np.memmap:
    """A little-endian array file of exactly `shape`; mode "w" creates it (sparse) if missing,
    unless `done_rows` > 0: rows a commit recorded as written must still be there."""
    dt = np.dtype(dtype).newbyteorder("<")
    size = int(np.prod(shape)) * dt.itemsize
    if mode == "w":
        if not path.exists() or path.stat().st_size != size:
            if done_rows > 0:
                found = f"has {path.stat().st_size} bytes" if path.exists() else "is missing"
                raise MemDecError(f"{path} {found}, expected {size} bytes for an array {shape} "
                                  f"of {dtype} whose first {done_rows} rows the manifest records "
                                  f"as written: it was damaged; build again in a fresh folder")
            with files.no_space_as(MemDecError, path):
                _allocate(path, size)
        return np.memmap(path, dtype=dt, mode="r+", shape=shape)
    if not path.is_file():
        raise MemDecError(f"{path} is missing")
    if path.stat().st_size != size:
        raise MemDecError(f"{path} has {path.stat().st_size} bytes, expected {size} for an array "
                          f"{shape} of {dtype}: it is truncated or from another build")
    return np.memmap(path, dtype=dt, mode="r", shape=shape)


def _allocate(path: Path, size: int) -> None:
    """Make `path` `size` bytes of zeros with its disk blocks reserved (posix_fallocate) where the
    system can: a disk that fills up then fails here, with an error, rather than when a write
    through the memory map meets a hole it cannot fill, which kills the process with SIGBUS."""
    try:
        with open(path, "wb") as f:
            try:
                os.posix_fallocate(f.fileno(), 0, size)
            except (AttributeError, OSError) as e:  # no posix_fallocate here: a sparse file
                if isinstance(e, OSError) and e.errno not in UNSUPPORTED:
                    raise
                f.truncate(size)
    except OSError:
        path.unlink(missing_ok=True)
        raise


def _crc_path(path: Path) -> Path:
    return path.with_name(path.name + ".crc")


def _block_crcs(array: np.ndarray, rows: int, start: int = 0, stop: int | None = None):
    stop = len(array) if stop is None else stop
    return np.array([zlib.crc32(memoryview(np.ascontiguousarray(array[s:s + rows])).cast("B"))
                     for s in range(start * rows, min(stop * rows, len(array)), rows)],
                    dtype="<u4")


def checksum_array(path: Path, array: np.ndarray) -> dict[str, Any]:
    """Write path.crc (CRC32 of each block of rows of `array`, the content of `path`); the
    manifest entry that CheckedArray checks against."""
    row_bytes = max(1, array.itemsize * int(np.prod(array.shape[1:])))
    rows = max(1, BLOCK_BYTES // row_bytes)
    crcs = _block_crcs(array, rows).tobytes()
    files.write_atomic(_crc_path(path), crcs)
    return {"bytes": array.nbytes, "block_rows": rows,
            "crc_sha256": hashlib.sha256(crcs).hexdigest()}


def checksum_file(path: Path) -> dict[str, Any]:
    """Size and sha256 of a file that readers load whole (the FAISS index)."""
    return {"bytes": path.stat().st_size, "sha256": files.file_sha256(path)}


def check_file(path: Path, entry: dict[str, Any], manifest: Path) -> None:
    """Refuse a file loaded whole whose size or sha256 is not the one in its manifest."""
    if not path.is_file():
        raise MemDecError(f"{path} is missing")
    if (size := path.stat().st_size) != entry["bytes"]:
        raise MemDecError(f"{path} has {size} bytes, {manifest} says {entry['bytes']}: it is "
                          f"truncated or was replaced; build it again")
    if files.file_sha256(path) != entry["sha256"]:
        raise MemDecError(f"{path} does not match its sha256 in {manifest}: the file is corrupt; "
                          f"build it again")


class CheckedArray:
    """A read-only array file (see open_array) whose blocks of rows are checked against their
    CRC32 (path.crc, itself checked whole against the manifest) the first time they are read.
    Index it like the array (the first index picks rows); np.asarray reads and checks it all."""

    def __init__(self, path: Path, dtype: str, shape: tuple[int, ...], entry: dict[str, Any],
                 manifest: Path):
        self.path = path
        self.array = open_array(path, dtype, shape, "r")
        self.shape, self.dtype, self.rows = self.array.shape, self.array.dtype, entry["block_rows"]
        crc_path = _crc_path(path)
        if not crc_path.is_file():
            raise MemDecError(f"{crc_path} is missing: the block checksums of {path}; build it "
                              f"again")
        data = crc_path.read_bytes()
        if hashlib.sha256(data).hexdigest() != entry["crc_sha256"]:
            raise MemDecError(f"{crc_path} does not match its sha256 in {manifest}: the block "
                              f"checksums of {path} are corrupt; build it again")
        self.crcs = np.frombuffer(data, dtype="<u4")
        self.checked = np.zeros(len(self.crcs), dtype=bool)
        if len(self.crcs) != -(-len(self.array) // self.rows):
            raise MemDecError(f"{crc_path} has {len(self.crcs)} checksums, {path} has "
                              f"{-(-len(self.array) // self.rows)} blocks; build it again")

    def __len__(self) -> int:
        return len(self.array)

    def _blocks(self, index) -> np.ndarray:
        rows = index[0] if isinstance(index, tuple) else index
        n = len(self.array)
        if isinstance(rows, slice):
            start, stop, step = rows.indices(n)
            if step == 1:
                return np.arange(start // self.rows, -(-stop // self.rows)) if stop > start \
                    else np.zeros(0, dtype=np.int64)
            rows = np.arange(start, stop, step)
        rows = np.asarray(rows)
        if rows.dtype == bool:
            rows = np.flatnonzero(rows)
        return np.unique(rows.astype(np.int64) % max(n, 1) // self.rows)

    def check(self, blocks: np.ndarray) -> None:
        """Check the given blocks (each once per process)."""
        blocks = blocks[~self.checked[blocks]]
        for b in blocks:
            if _block_crcs(self.array, self.rows, b, b + 1)[0] != self.crcs[b]:
                end = min((b + 1) * self.rows, len(self.array))
                raise MemDecError(f"{self.path}: rows {b * self.rows}..{end - 1} do not match "
                                  f"their checksum in {_crc_path(self.path)}: the file is "
                                  f"corrupt; build it again")
            self.checked[b] = True

    def __getitem__(self, index):
        self.check(self._blocks(index))
        return self.array[index]

    def __array__(self, dtype=None, copy=None):
        self.check(np.arange(len(self.crcs)))
        return np.asarray(self.array, dtype=dtype)


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
