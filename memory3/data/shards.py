"""Token shards: a tokenized corpus as flat binary files listed by a manifest.

Layout of a data folder:
  manifest.json        the only record of what is done; a shard not listed in it does not exist
  train-00000.bin ...  raw little-endian uint16 (uint32 for vocabularies over 65535) token arrays
  valid-00000.bin ...
  train-00000.crc ...  uint32 CRC32 of each block of BLOCK_TOKENS tokens of its shard
  write.lock           held (flock) by the one process preparing the folder; names it

Checks on read: opening checks every shard's size and the sha256 of its (small) .crc file; each
block is checked against its CRC32 the first time a reader touches it, so a flipped byte stops
training with an error naming the shard and the tokens, at the cost of one pass of CRC32 over
the data per process. `verify=True` (and resuming a preparation) hashes whole shards too.

Every document becomes [bos] + tokens + [eos] and lies whole in one shard of its split. A shard is
closed as soon as it holds >= shard_tokens tokens, so shards run a little over shard_tokens.

Splits: a document goes to "valid" when a hash of (seed, its text) falls below valid_fraction.
Hashing the text rather than its file name keeps the split the same wherever the corpus lives, and
sends exact duplicates to the same split, so validation never scores copies of training text.
When valid_fraction > 0 but no document hashes into valid (a tiny corpus), the last document goes
to valid instead, as long as there are at least two documents.

Resume: documents are numbered by their position in the input stream. Each split records
`next_document`: every document of that split before it is in a committed shard. A commit writes
the shard file (temp, fsync, rename), then the manifest (same). A re-run reads the input from the
start, skips without tokenizing every document below the smaller `next_document`, then skips the
documents whose split already has them, so it rebuilds exactly the open shards a kill lost. The
last document is only placed once the input has ended, and the end (last documents, final partial
shards, `complete: true`) is committed by a single manifest write, so the move of the last document
to valid never has to be undone. The manifest holds no timestamps: a resumed run ends byte-identical
to an unbroken one. A run that runs out of space stops with a DataError naming the shard or the
manifest it was writing; its temp file is gone, the last committed manifest and its shards are as
they were, and the same command resumes from them once space is freed.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import time
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from tqdm import tqdm

from memory3.data.text import (DataError, Glob, PathLike, ReadStats, globs, iter_documents,
                               list_files, require_documents)
from memory3.data.tokenizer import BOS_ID, EOS_ID, Tokenizer
from memory3.files import (file_sha256, hold_write_lock, no_space_as, read_manifest,
                           write_atomic)

MANIFEST_FILE = "manifest.json"
FORMAT = "memory3-token-shards"
VERSION = 1
SPLITS = ("train", "valid")
SHARD_NAME = re.compile(r"(train|valid)-\d{5}\.(bin|crc)")
TEMP_NAME = re.compile(r"(manifest\.json|(train|valid)-\d{5}\.(bin|crc))\.tmp")
BLOCK_TOKENS = 1 << 16  # tokens per CRC32 block: 128 KiB of uint16, checked in ~0.1 ms
# Documents are tokenized in batches of about this many characters, on the tokenizer's threads.
BATCH_CHARS = 1 << 20
# Test-only: seconds to sleep after each mid-run shard commit, so a test can kill the run mid-way.
SLOW_SHARD_ENV = "MEMORY3_TEST_SLOW_SHARD_SECONDS"


def token_dtype(vocab_size: int) -> str:
    return "uint16" if vocab_size <= 65535 else "uint32"


def load_manifest(data_dir: PathLike) -> dict:
    return read_manifest(Path(data_dir), FORMAT, VERSION, DataError,
                         missing=f"{data_dir} holds no prepared data (make it with prepare_data)",
                         outdated="prepare the data again")


def block_crcs(data: bytes | np.ndarray, itemsize: int) -> np.ndarray:
    """uint32 CRC32 of each block of BLOCK_TOKENS tokens (the last one may be shorter)."""
    data = memoryview(data).cast("B")
    step = BLOCK_TOKENS * itemsize
    return np.array([zlib.crc32(data[i:i + step]) for i in range(0, len(data), step)],
                    dtype="<u4")


def _crc_path(path: Path) -> Path:
    return path.with_suffix(".crc")


def _check_shard(path: Path, shard: dict, itemsize: int, verify: bool) -> np.ndarray | None:
    """Check a shard against its manifest entry; its block CRCs (None for data prepared before
    they existed)."""
    if not path.is_file():
        raise DataError(f"shard {path} listed in the manifest does not exist")
    size, expected = path.stat().st_size, shard["tokens"] * itemsize
    if size != expected:
        raise DataError(f"shard {path} has {size} bytes, the manifest says {shard['tokens']} "
                        f"tokens = {expected} bytes")
    if verify and file_sha256(path) != shard["sha256"]:
        raise DataError(f"shard {path} does not match its sha256 in the manifest: it is corrupt")
    if "crc_sha256" not in shard:
        return None
    crc_path = _crc_path(path)
    data = crc_path.read_bytes() if crc_path.is_file() else None
    if data is None or hashlib.sha256(data).hexdigest() != shard["crc_sha256"]:
        raise DataError(f"block checksums {crc_path} missing or not matching their sha256 in "
                        f"the manifest: prepare the data again")
    return np.frombuffer(data, dtype="<u4")


def _is_valid(text: str, seed: int, valid_fraction: float) -> bool:
    digest = hashlib.blake2b(f"{seed}\0{text}".encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") < valid_fraction * 2**64


class _SplitWriter:
    """One split's open shard, plus the committed shards recorded in `entry` (manifest)."""

    def __init__(self, name: str, entry: dict, out_dir: Path, dtype: str, shard_tokens: int):
        self.name, self.entry, self.out_dir = name, entry, out_dir
        self.dtype, self.shard_tokens = np.dtype(dtype).newbyteorder("<"), shard_tokens
        self.buffer: list[np.ndarray] = []
        self.buffered_tokens = 0

    def add(self, tokens: list[int]) -> bool:
        """Buffer one document; True when the open shard is full."""
        self.buffer.append(np.asarray(tokens, dtype=self.dtype))
        self.buffered_tokens += len(tokens)
        return self.buffered_tokens >= self.shard_tokens

    def write_shard(self, next_document: int) -> None:
        """Write the open shard to disk; it counts once the manifest is committed."""
        data = np.concatenate(self.buffer).tobytes()
        file = f"{self.name}-{len(self.entry['shards']):05d}.bin"
        crcs = block_crcs(data, self.dtype.itemsize).tobytes()
        write_atomic(self.out_dir / file, data)
        write_atomic(_crc_path(self.out_dir / file), crcs)
        self.entry["shards"].append({"file": file, "tokens": self.buffered_tokens,
                                     "documents": len(self.buffer),
                                     "sha256": hashlib.sha256(data).hexdigest(),
                                     "crc_sha256": hashlib.sha256(crcs).hexdigest()})
        self.entry["tokens"] += self.buffered_tokens
        self.entry["documents"] += len(self.buffer)
        self.entry["next_document"] = next_document
        self.buffer, self.buffered_tokens = [], 0


class _ShardBuilder:
    """Routes documents to their split's writer, tokenizing them in batches, and commits."""

    def __init__(self, out_dir: Path, manifest: dict, tokenizer: Tokenizer, shard_tokens: int):
        self.out_dir, self.manifest, self.tokenizer = out_dir, manifest, tokenizer
        self.writers = {s: _SplitWriter(s, manifest["splits"][s], out_dir, manifest["dtype"],
                                        shard_tokens) for s in SPLITS}
        self.batch: list[tuple[int, str, str]] = []  # (position, text, split)
        self.batch_chars = 0
        self.slow_seconds = float(os.environ.get(SLOW_SHARD_ENV, "0"))

    def commit(self) -> None:
        write_atomic(self.out_dir / MANIFEST_FILE,
                      (json.dumps(self.manifest, indent=1) + "\n").encode())

    def place(self, position: int, text: str, split: str) -> None:
        self._queue(position, text, split)
        if self.batch_chars >= BATCH_CHARS:
            self.flush(final=False)

    def _queue(self, position: int, text: str, split: str) -> None:
        if position >= self.writers[split].entry["next_document"]:  # else an earlier run has it
            self.batch.append((position, text, split))
            self.batch_chars += len(text)

    def flush(self, final: bool) -> None:
        """Tokenize the batch into the open shards. Shards it closes are committed one by one,
        except in the final flush, whose shards are committed together with the end."""
        token_lists = self.tokenizer.encode_batch([text for _, text, _ in self.batch])
        for (position, _, split), ids in zip(self.batch, token_lists):
            if self.writers[split].add([BOS_ID, *ids, EOS_ID]):
                self.writers[split].write_shard(position + 1)
                if not final:
                    self.commit()
                    time.sleep(self.slow_seconds)
        self.batch, self.batch_chars = [], 0

    def finish(self, last: tuple[int, str, str] | None, n_documents: int,
               stats: ReadStats) -> None:
        """Place the last document (position, text, split) and commit everything left."""
        if last:
            self._queue(*last)
        self.flush(final=True)
        for writer in self.writers.values():
            if writer.buffer:
                writer.write_shard(n_documents)
        self.manifest["read_stats"] = stats.to_dict()
        self.manifest["complete"] = True
        self.commit()


def _start_or_resume(out_dir: Path, settings: dict, tokenizer: Tokenizer) -> dict:
    """The manifest to continue from, with the data folder cleaned of uncommitted files."""
    fresh = {"format": FORMAT, "version": VERSION, "complete": False,
             "tokenizer": {"path": str(tokenizer.path.resolve()), "sha256": tokenizer.sha256,
                           "vocab_size": tokenizer.vocab_size},
             "dtype": token_dtype(tokenizer.vocab_size), "settings": settings,
             "splits": {s: {"tokens": 0, "documents": 0, "next_document": 0, "shards": []}
                        for s in SPLITS},
             "read_stats": None}
    manifest_path = out_dir / MANIFEST_FILE
    if not manifest_path.exists():
        out_dir.mkdir(parents=True, exist_ok=True)
        manifest = fresh
    else:
        manifest = load_manifest(out_dir)
        old = {"tokenizer sha256": manifest["tokenizer"]["sha256"], **manifest["settings"]}
        new = {"tokenizer sha256": tokenizer.sha256, **settings}
        # Both ways: a setting only recorded when used (glob) must not vanish unnoticed.
        changed = [k for k in {**old, **new} if old.get(k) != new.get(k)]
        if changed:
            raise DataError(f"{out_dir} was prepared with a different {', '.join(changed)} "
                            f"(see {manifest_path}); use a fresh output directory")
        if manifest["complete"]:
            return manifest
        manifest["tokenizer"] = fresh["tokenizer"]  # the same model, maybe found at a new path
        itemsize = np.dtype(manifest["dtype"]).itemsize
        for split in manifest["splits"].values():
            for shard in split["shards"]:
                try:
                    _check_shard(out_dir / shard["file"], shard, itemsize, verify=True)
                except DataError as e:
                    raise DataError(f"cannot resume: {e}; use a fresh output directory") from e
    committed = {name for split in manifest["splits"].values() for s in split["shards"]
                 for name in (s["file"], _crc_path(Path(s["file"])).name)}
    for path in out_dir.iterdir():
        if TEMP_NAME.fullmatch(path.name) or (SHARD_NAME.fullmatch(path.name)
                                              and path.name not in committed):
            path.unlink()
    return manifest


def prepare_data(inputs: Sequence[PathLike], tokenizer_path: PathLike, out_dir: PathLike, *,
                 shard_tokens: int = 2**24, valid_fraction: float = 0.01, text_field: str = "text",
                 seed: int = 0, glob: Glob = None, workers: int | None = None,
                 progress: bool = True) -> dict:
    """Tokenize the documents of `inputs` into train/valid shards in `out_dir`; return the manifest.

    glob: file-name patterns; folders then yield the matching files, each text file one document
    (memory3.data.text). workers: sentencepiece encoding threads (default: every core). Resumable:
    after an interruption, run it again with the same arguments (any worker count).
    """
    if shard_tokens <= 0:
        raise DataError(f"shard_tokens must be positive, got {shard_tokens}")
    if not 0 <= valid_fraction < 1:
        raise DataError(f"valid_fraction must be in [0, 1), got {valid_fraction}")
    workers = (os.cpu_count() or 1) if workers is None else workers
    if workers < 1:
        raise DataError(f"workers must be at least 1, got {workers}")
    out_dir = Path(out_dir)
    # Each document is encoded on its own and batches are cut by characters, never by thread
    # count, so the shards are the same bytes for any `workers`; it is therefore not a setting
    # (not in the manifest, not compared on resume): a run may resume with another count.
    tokenizer = Tokenizer(tokenizer_path, num_threads=workers)
    patterns = globs(glob)
    files = list_files(inputs, patterns)
    probe = ReadStats()
    next(iter_documents(files, text_field, probe, patterns), None)
    require_documents(probe, inputs)
    settings = {"inputs": [{"path": str(f.resolve()), "bytes": f.stat().st_size} for f in files],
                "text_field": text_field, "shard_tokens": shard_tokens,
                "valid_fraction": valid_fraction, "seed": seed}
    if patterns:  # recorded only when used, so manifests made before globs existed still resume
        settings["glob"] = list(patterns)

    # Before anything is read or cleaned up: a second writer would delete the first's open shards.
    # Out of space: the shard or manifest being written is named, the committed ones are intact.
    with no_space_as(DataError, out_dir), hold_write_lock(out_dir, DataError):
        return _prepare(files, tokenizer, out_dir, settings, progress)


def _prepare(files: list[Path], tokenizer: Tokenizer, out_dir: Path, settings: dict,
             progress: bool) -> dict:
    shard_tokens, valid_fraction = settings["shard_tokens"], settings["valid_fraction"]
    text_field, seed = settings["text_field"], settings["seed"]
    manifest = _start_or_resume(out_dir, settings, tokenizer)
    if manifest["complete"]:
        print(f"{out_dir} is already complete; nothing to do")
        return manifest

    builder = _ShardBuilder(out_dir, manifest, tokenizer, shard_tokens)
    builder.commit()
    splits = manifest["splits"]
    start = min(splits[s]["next_document"] for s in SPLITS)
    # An incomplete manifest never holds a moved last document: its valid documents hashed there.
    valid_seen = splits["valid"]["documents"] > 0
    stats = ReadStats()
    held: tuple[int, str, str] | None = None  # the latest document, placed when the next comes
    n_documents = 0
    documents = iter_documents(files, text_field, stats, settings.get("glob"))
    for position, doc in enumerate(tqdm(documents, unit=" docs", desc=f"prepare {out_dir}",
                                        disable=not progress)):
        n_documents = position + 1
        if position < start:
            continue
        split = "valid" if _is_valid(doc.text, seed, valid_fraction) else "train"
        valid_seen |= split == "valid"
        if held:
            builder.place(*held)
        held = (position, doc.text, split)
    if held and valid_fraction > 0 and not valid_seen and n_documents > 1:
        held = (*held[:2], "valid")
    builder.finish(held, n_documents, stats)
    _print_summary(out_dir, manifest, stats, progress)
    return manifest


def _print_summary(out_dir: Path, manifest: dict, stats: ReadStats, progress: bool) -> None:
    if not (progress or stats.skipped_anything()):
        return
    splits = ", ".join(f"{name} {s['tokens']:,} tokens in {len(s['shards'])} shards "
                       f"({s['documents']:,} documents)" for name, s in manifest["splits"].items())
    print(f"prepared {out_dir}: {splits}")
    if stats.undecodable_lines:
        print(f"skipped {stats.undecodable_lines} undecodable lines")
    if stats.bad_json_lines:
        print(f"skipped {stats.bad_json_lines} JSON lines without a string "
              f"{manifest['settings']['text_field']!r} field")
    if stats.null_texts:
        print(f"skipped {stats.null_texts} null Parquet texts")
    if stats.binary_files:
        print(f"skipped {stats.binary_files} binary files (they hold NUL bytes): "
              f"{', '.join(stats.binary_file_names[:3])}")


class TokenShards:
    """The tokens of one split as a single read-only sequence over memory-mapped shards.

    Opening checks every shard's size (cheap); `verify=True` also checks their sha256. Every
    block a read touches is checked against its CRC32 the first time (module docstring).
    """

    def __init__(self, data_dir: PathLike, split: str = "train", *, verify: bool = False):
        self.data_dir = Path(data_dir)
        manifest = load_manifest(self.data_dir)
        manifest_path = self.data_dir / MANIFEST_FILE
        if not manifest["complete"]:
            raise DataError(f"{manifest_path} is incomplete: prepare_data was interrupted; run it "
                            f"again with the same arguments to finish")
        if split not in manifest["splits"]:
            raise DataError(f"{manifest_path} has no split {split!r}; it has "
                            f"{', '.join(manifest['splits'])}")
        entry = manifest["splits"][split]
        if not entry["shards"]:
            raise DataError(f"split {split!r} of {manifest_path} is empty (prepared with "
                            f"valid_fraction={manifest['settings']['valid_fraction']})")
        self.split = split
        self.tokenizer_sha256 = manifest["tokenizer"]["sha256"]
        self.vocab_size = manifest["tokenizer"]["vocab_size"]
        self.dtype = np.dtype(manifest["dtype"]).newbyteorder("<")
        self._arrays: list[np.ndarray] = []
        self._paths: list[Path] = []
        self._crcs: list[np.ndarray | None] = []
        self._checked: list[np.ndarray] = []  # per shard: blocks already checked
        for shard in entry["shards"]:
            path = self.data_dir / shard["file"]
            crcs = _check_shard(path, shard, self.dtype.itemsize, verify)
            self._arrays.append(np.memmap(path, dtype=self.dtype, mode="r"))
            self._paths.append(path)
            self._crcs.append(crcs)
            self._checked.append(np.zeros(0 if crcs is None else len(crcs), dtype=bool))
        self._offsets = np.cumsum([0] + [len(a) for a in self._arrays])

    def __len__(self) -> int:
        return int(self._offsets[-1])

    def read(self, start: int, length: int) -> np.ndarray:
        """Tokens [start, start + length) as int64, across shard boundaries."""
        if start < 0 or length < 0 or start + length > len(self):
            raise IndexError(f"read({start}, {length}) outside the {len(self)} tokens of "
                             f"split {self.split!r} in {self.data_dir}")
        out = np.empty(length, dtype=np.int64)
        shard = int(np.searchsorted(self._offsets, start, side="right")) - 1
        done = 0
        while done < length:
            lo = start + done - int(self._offsets[shard])
            n = min(len(self._arrays[shard]) - lo, length - done)
            self._check_blocks(shard, lo, lo + n)
            out[done:done + n] = self._arrays[shard][lo:lo + n]
            done += n
            shard += 1
        return out

    def _check_blocks(self, shard: int, lo: int, hi: int) -> None:
        """Check the blocks holding tokens [lo, hi) of a shard that no read has checked yet."""
        crcs, checked = self._crcs[shard], self._checked[shard]
        if crcs is None:
            return
        array = self._arrays[shard]
        for b in range(lo // BLOCK_TOKENS, (hi - 1) // BLOCK_TOKENS + 1):
            if checked[b]:
                continue
            block = array[b * BLOCK_TOKENS:(b + 1) * BLOCK_TOKENS]
            if zlib.crc32(memoryview(block).cast("B")) != crcs[b]:
                first, path = b * BLOCK_TOKENS, self._paths[shard]
                raise DataError(f"shard {path}: tokens {first}..{first + len(block) - 1} do not "
                                f"match their checksum in {_crc_path(path)}: the data is corrupt "
                                f"(prepare it again)")
            checked[b] = True
