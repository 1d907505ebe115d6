"""The on-disk memory bank: fixed-size memory records and reference rows in immutable segments,
listed by one manifest.

Layout of a bank folder:
  manifest.json              the only record of what is committed; a file it does not list does
                             not exist (leftovers of a killed writer are deleted on the next write)
  write.lock                 held (flock) by the one process that may write the bank
  index-<rows>.faiss         the retrieval index (see index.py); derived, rebuildable from *.emb
  codec/                     the trained vector codec, when memories are compressed (codec.py)
  shards/<writer>-<n>.*      one segment = up to six files written together:
      .refs.jsonl   rows: one JSON object per reference (key, doc_id, start, end, text, tokens)
      .keys         rows: the 20-byte sha1 of each reference, for fast de-duplication on open
      .emb          rows: float16 (rows, dim) reference embeddings, so the index can be rebuilt
      .kv           memories: uint8 (memories, kv_bytes) - bf16 bit patterns, or codec codes
      .pos          memories: (memories, memory layers, KV heads, top-k) token positions, 0 = empty
      .rec          memories: per record (row, encoder index, reference key)
      .rowsum       rows: uint32 (rows, 3) CRC32s of each row's refs line, key and embedding
      .memsum       memories: uint32 (memories, 3) CRC32s of each memory's kv, pos and rec rows

Checks on read (issue 14): sizes are checked on every open and the sha256 of every file by
verify="full" (or `memory3 bank verify`, which also checks every record). Hashing terabytes on
each open is no answer, so every read of a row or a memory checks its CRC32s instead: a flipped
byte stops the reader with an error naming the file and the record, never reaches a model. The
small .rec files are read whole on open and always hashed. (Banks written before the .rowsum and
.memsum files existed are read without per-record checks.)

A segment may carry new rows, memories, or both. Row ids are global and dense: a segment's rows
are `row_base .. row_base + rows - 1`, in manifest order. A memory record names its row as
`row_base + rec.row` (row_base is 0 for a segment without rows), so a writer that does not know
its final row ids yet (one rank of a multi-rank build) writes rows relative to its segment and the
committing rank fills in row_base. Segments are never modified: a memory encoded again (cold start,
or re-encoding a stale one) is appended in a later segment and the latest record of a row wins.

Commit protocol (as in data/shards.py): every file of a segment is written to a temp name, fsynced
and renamed; the manifest is written last (temp + fsync + rename + fsync of the folder). A kill at
any point leaves the previous manifest and therefore the previous bank intact. So does running out
of space: the write that fails raises BankError naming its file (files.no_space_as), its temp file
removed; what it leaves uncommitted is deleted by the next writer.

Segments live under shards/ by default; an entry may name another folder ("dir", absolute, or
relative to the bank) so segments can be spread over disks or mounted from other nodes.

Multi-writer: one process writes at a time (write.lock). A multi-rank build (build.py) lets every
rank write its own segments (writer "r<rank>") and gathers their entries to rank 0, which alone
assigns row_base and commits the manifest.
"""
from __future__ import annotations

import hashlib
import json
import re
import zlib
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from memory3.files import file_sha256, hold_write_lock, no_space_as, read_manifest, write_atomic

MANIFEST_FILE = "manifest.json"
SHARDS_DIR = "shards"
FORMAT = "memory3-memory-bank"
VERSION = 1
KEY_BYTES = 20  # sha1
ROW_FILES = ("refs.jsonl", "keys", "emb", "rowsum")
MEMORY_FILES = ("kv", "pos", "rec", "memsum")
SEGMENT_NAME = re.compile(r"[A-Za-z0-9]+-\d{6}")
SEGMENT_FILE = re.compile(
    r"[A-Za-z0-9]+-\d{6}\.(refs\.jsonl|keys|emb|kv|pos|rec|rowsum|memsum)(\.tmp)?")
INDEX_FILE = re.compile(r"index-\d{12}\.faiss")
RECORD_DTYPE = np.dtype([("row", "<i8"), ("encoder", "<i4"), ("key", "u1", (KEY_BYTES,))])
EMBEDDING_DTYPE = np.dtype("<f2")
# Segments are opened lazily and at most this many stay mapped (each map holds a file descriptor).
OPEN_SEGMENTS = 64


class BankError(ValueError):
    """A memory bank, a bank file or a bank setting that cannot be used; the message names it."""


@dataclass(frozen=True)
class MemoryLayout:
    """Shape of one memory: (memory layers, 2 [k, v], KV heads, top-k tokens, head dim)."""
    n_layers: int
    n_kv_heads: int
    top_k: int
    head_dim: int
    reference_len: int

    @classmethod
    def from_model_config(cls, cfg) -> "MemoryLayout":
        return cls(len(cfg.memory_layer_ids), cfg.n_kv_heads, cfg.memory_top_k, cfg.head_dim,
                   cfg.reference_len)

    @property
    def kv_shape(self) -> tuple[int, int, int, int, int]:
        return (self.n_layers, 2, self.n_kv_heads, self.top_k, self.head_dim)

    @property
    def positions_shape(self) -> tuple[int, int, int]:
        return (self.n_layers, self.n_kv_heads, self.top_k)

    @property
    def n_vectors(self) -> int:
        """Head-dim vectors per memory (keys and values)."""
        return 2 * self.n_layers * self.n_kv_heads * self.top_k

    @property
    def positions_dtype(self) -> np.dtype:
        return np.dtype("u1" if self.reference_len <= 256 else "<u2")

    @property
    def positions_bytes(self) -> int:
        return int(np.prod(self.positions_shape)) * self.positions_dtype.itemsize

    def to_dict(self) -> dict[str, int]:
        return {"n_layers": self.n_layers, "n_kv_heads": self.n_kv_heads, "top_k": self.top_k,
                "head_dim": self.head_dim, "reference_len": self.reference_len}


# -- files -----------------------------------------------------------------------------------

def key_bytes(key: str) -> bytes:
    return bytes.fromhex(key)


def crc_rows(*parts: np.ndarray | list[bytes]) -> np.ndarray:
    """uint32 (n,): CRC32 of each record, the concatenation of its row in every part (arrays
    with one row per record, or lists of byte strings)."""
    n = len(parts[0])
    out = np.empty(n, dtype="<u4")
    for i in range(n):
        crc = 0
        for part in parts:
            crc = zlib.crc32(part[i] if isinstance(part, list) else part[i].tobytes(), crc)
        out[i] = crc
    return out


class _Growing:
    """A 1-d numpy array that grows by doubling (row maps of a bank that grows by segments)."""

    def __init__(self, dtype, fill):
        self.data = np.full(1024, fill, dtype=dtype)
        self.size, self.fill = 0, fill

    def extend_to(self, size: int) -> None:
        if size > len(self.data):
            grown = np.full(max(size, 2 * len(self.data)), self.fill, dtype=self.data.dtype)
            grown[:self.size] = self.data[:self.size]
            self.data = grown
        self.size = max(self.size, size)

    @property
    def view(self) -> np.ndarray:
        return self.data[:self.size]


# -- segments --------------------------------------------------------------------------------

@dataclass
class SegmentData:
    """What a writer hands to `MemoryStore.write_segment` (rows and/or memories)."""
    references: list[dict[str, Any]]     # rows: key, doc_id, start, end, text, tokens
    embeddings: np.ndarray | None        # rows: float (rows, dim)
    memory_rows: np.ndarray | None       # memories: int64 rows relative to row_base
    kv_codes: np.ndarray | None          # memories: uint8 (memories, kv_bytes)
    positions: np.ndarray | None         # memories: (memories, *layout.positions_shape)
    encoders: np.ndarray | None          # memories: int32 index into the manifest's encoders
    memory_keys: list[str] | None = None  # memories: key of each memory's reference


class _Segment:
    """Read access to one committed segment; files are mapped on first use."""

    def __init__(self, folder: Path, entry: dict[str, Any]):
        self.folder, self.entry = folder, entry
        self.name = entry["name"]
        self._maps: dict[str, np.ndarray] = {}
        self._line_offsets: np.ndarray | None = None

    def path(self, kind: str) -> Path:
        return self.folder / f"{self.name}.{kind}"

    def array(self, kind: str, dtype, shape_tail: tuple[int, ...]) -> np.ndarray:
        if kind not in self._maps:
            count = self.entry["rows"] if kind in ROW_FILES else self.entry["memories"]
            if count == 0:
                return np.empty((0, *shape_tail), dtype=dtype)
            self._maps[kind] = np.memmap(self.path(kind), dtype=dtype, mode="r",
                                         shape=(count, *shape_tail))
        return self._maps[kind]

    def reference_lines(self, local_rows: np.ndarray) -> list[dict[str, Any]]:
        path = self.path("refs.jsonl")
        if self._line_offsets is None:
            data = np.fromfile(path, dtype=np.uint8)
            ends = np.flatnonzero(data == ord("\n")) + 1
            if len(ends) != self.entry["rows"]:
                raise BankError(f"{path} has {len(ends)} lines, the manifest says "
                                f"{self.entry['rows']} rows: it is corrupt")
            self._line_offsets = np.concatenate([[0], ends]).astype(np.int64)
        lines = []
        with open(path, "rb") as f:
            for r in local_rows:
                start, end = self._line_offsets[r], self._line_offsets[r + 1]
                f.seek(int(start))
                lines.append(f.read(int(end - start)))
        self.check_rows(np.asarray(local_rows), lines)
        out = []
        for r, line in zip(local_rows, lines):
            try:
                out.append(json.loads(line))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise BankError(f"{path}: row {r} is not valid JSON ({e}): the file is "
                                f"corrupt") from e
        return out

    def check_rows(self, local_rows: np.ndarray, lines: list[bytes] | None = None,
                   embedding_dim: int | None = None) -> None:
        """Compare rows with their CRC32s: the refs lines given, or (lines=None) keys and
        embeddings only (the index is built from those alone)."""
        if "rowsum" not in self.entry["files"] or not len(local_rows):
            return
        sums = self.array("rowsum", "<u4", (3,))[local_rows]
        if lines is not None:
            bad = crc_rows(lines) != sums[:, 0]
            kind = "refs.jsonl"
        else:
            keys = self.array("keys", np.uint8, (KEY_BYTES,))[local_rows]
            emb = self.array("emb", EMBEDDING_DTYPE, (embedding_dim,))[local_rows]
            bad_keys = crc_rows(keys) != sums[:, 1]
            bad = bad_keys | (crc_rows(emb) != sums[:, 2])
            kind = "keys" if bad_keys.any() else "emb"
        if bad.any():
            raise BankError(f"{self.path(kind)}: row {int(local_rows[np.argmax(bad)])} does not "
                            f"match its checksum in {self.path('rowsum')}: the bank is corrupt "
                            f"(`memory3 bank verify` checks it all)")

    def check_memories(self, records: np.ndarray, parts: tuple[np.ndarray, ...],
                       kinds: tuple[str, ...]) -> None:
        """Compare memory records with their CRC32s (columns of .memsum: kv, pos, rec)."""
        if "memsum" not in self.entry["files"] or not len(records):
            return
        sums = self.array("memsum", "<u4", (3,))[records]
        for part, kind in zip(parts, kinds):
            bad = crc_rows(part) != sums[:, MEMORY_FILES.index(kind)]
            if bad.any():
                raise BankError(f"{self.path(kind)}: memory record {int(records[np.argmax(bad)])}"
                                f" does not match its checksum in {self.path('memsum')}: the bank "
                                f"is corrupt (`memory3 bank verify` checks it all)")

    def close(self) -> None:
        self._maps.clear()


# -- the store -------------------------------------------------------------------------------

class MemoryStore:
    """Manifest + segments of one bank folder, with the row and memory maps built on open.

    Knows bytes only: `MemoryBank` (bank.py) adds the codec, the index and the embedder.
    """

    def __init__(self, path: Path, manifest: dict[str, Any]):
        self.path = path
        self.manifest = manifest
        self.layout = MemoryLayout(**manifest["layout"])
        self.kv_bytes = int(manifest["storage"]["kv_bytes"])
        self.embedding_dim = int(manifest["embedder"]["dim"])
        self._segments: list[_Segment] = []
        self._open: OrderedDict[int, None] = OrderedDict()  # segments with files mapped (LRU)
        self._row_segment = _Growing(np.int32, -1)   # row -> segment holding the row
        self._memory_segment = _Growing(np.int32, -1)  # row -> segment of its latest memory
        self._memory_index = _Growing(np.int64, -1)   # row -> record in that segment
        self._memory_encoder = _Growing(np.int32, -1)  # row -> encoder index of that memory
        self._row_starts: list[int] = []
        self._keys: dict[bytes, int] | None = None
        self._lock_file = None
        self.n_rows = 0
        self.n_memory_records = 0

    # -- opening -----------------------------------------------------------------------------
    @classmethod
    def create(cls, path: str | Path, header: dict[str, Any]) -> "MemoryStore":
        """A new, empty bank at `path` (a folder that must not hold a bank yet)."""
        path = Path(path)
        if (path / MANIFEST_FILE).exists():
            raise BankError(f"{path / MANIFEST_FILE} exists: {path} already holds a memory bank "
                            f"(open it with MemoryBank.open, or use a fresh folder)")
        path.mkdir(parents=True, exist_ok=True)
        (path / SHARDS_DIR).mkdir(exist_ok=True)
        manifest = {"format": FORMAT, "version": VERSION, **header, "rows": 0, "memories": 0,
                    "encoders": [], "segments": [], "index": None, "builds": []}
        store = cls(path, manifest)
        store.lock()
        store.commit()
        return store

    @classmethod
    def open(cls, path: str | Path, *, verify: str = "full") -> "MemoryStore":
        """Open a committed bank. verify="full" checks every file's sha256 against the manifest;
        "size" only checks sizes (for banks too big to hash on every open)."""
        if verify not in ("full", "size"):
            raise BankError(f"verify must be 'full' or 'size', got {verify!r}")
        path = Path(path)
        store = cls(path, load_manifest(path))
        for entry in store.manifest["segments"]:
            store._check_segment(entry, verify)
            store._attach(entry)
        return store

    def _segment_folder(self, entry: dict[str, Any]) -> Path:
        return self.path / entry.get("dir", SHARDS_DIR)

    def _check_segment(self, entry: dict[str, Any], verify: str,
                       problems: list[str] | None = None) -> bool:
        """Check a segment's files against the manifest: sizes, and sha256 with verify="full"
        (the small .rec, which open reads whole, always). Raises on the first problem, or, given
        `problems`, appends every one there; True when every file has its listed size."""
        def report(message: str) -> None:
            if problems is None:
                raise BankError(message)
            problems.append(message)

        folder, sized = self._segment_folder(entry), True
        for kind, info in entry["files"].items():
            path = folder / f"{entry['name']}.{kind}"
            if not path.is_file():
                report(f"segment file {path} listed in {self.path / MANIFEST_FILE} does not exist")
                sized = False
            elif (size := path.stat().st_size) != info["bytes"]:
                report(f"segment file {path} has {size} bytes, the manifest says "
                       f"{info['bytes']}: it is truncated or corrupt")
                sized = False
            elif (verify == "full" or kind == "rec") and file_sha256(path) != info["sha256"]:
                report(f"segment file {path} does not match its sha256 in "
                       f"{self.path / MANIFEST_FILE}: it is corrupt")
        return sized

    def _attach(self, entry: dict[str, Any]) -> None:
        """Add a committed (or about to be committed) segment to the row and memory maps."""
        index = len(self._segments)
        segment = _Segment(self._segment_folder(entry), entry)
        self._segments.append(segment)
        self._row_starts.append(entry["row_base"])
        if entry["rows"]:
            if entry["row_base"] != self.n_rows:
                raise BankError(f"{self.path / MANIFEST_FILE}: segment {entry['name']} starts at "
                                f"row {entry['row_base']}, expected {self.n_rows}")
            self.n_rows += entry["rows"]
            for grow in (self._row_segment, self._memory_segment, self._memory_index,
                         self._memory_encoder):
                grow.extend_to(self.n_rows)
            self._row_segment.view[entry["row_base"]:self.n_rows] = index
            if self._keys is not None:
                keys = segment.array("keys", np.uint8, (KEY_BYTES,))
                for i, k in enumerate(keys):
                    self._keys[k.tobytes()] = entry["row_base"] + i
        if entry["memories"]:
            records = np.fromfile(segment.path("rec"), dtype=RECORD_DTYPE)
            rows = records["row"] + entry["row_base"]
            if len(rows) and (rows.min() < 0 or rows.max() >= self.n_rows):
                raise BankError(f"segment {segment.path('rec')} names rows outside 0.."
                                f"{self.n_rows - 1}: the bank is inconsistent")
            # Later records of the same row (within this segment too) win: assignment in order.
            self._memory_segment.view[rows] = index
            self._memory_index.view[rows] = np.arange(len(rows))
            self._memory_encoder.view[rows] = records["encoder"]
            self.n_memory_records += len(rows)

    # -- writing -----------------------------------------------------------------------------
    def lock(self) -> None:
        """Become the bank's one writer (released when the process ends or `close()`)."""
        if self._lock_file is not None:
            return
        self._lock_file = hold_write_lock(self.path, BankError)
        self._remove_uncommitted()

    def _remove_uncommitted(self) -> None:
        """Delete segment files that no committed manifest lists (left by a killed writer).

        Only inside the bank folder: a folder elsewhere may be shared with other banks, and a
        writer that resumes overwrites its own leftovers there anyway (names are deterministic)."""
        listed = {f"{e['name']}.{kind}" for e in self.manifest["segments"] for kind in e["files"]}
        folders = {self._segment_folder(e) for e in self.manifest["segments"]
                   if not Path(e.get("dir", SHARDS_DIR)).is_absolute()}
        folders.add(self.path / SHARDS_DIR)
        for folder in folders:
            if folder.is_dir():
                for p in folder.iterdir():
                    if SEGMENT_FILE.fullmatch(p.name) and p.name not in listed:
                        p.unlink()
        index = (self.manifest.get("index") or {}).get("file")
        for p in self.path.iterdir():
            if p.name.endswith(".tmp") or (INDEX_FILE.fullmatch(p.name) and p.name != index):
                p.unlink()

    def next_segment_name(self, writer: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9]+", writer):
            raise BankError(f"writer name must be alphanumeric, got {writer!r}")
        taken = [int(e["name"].rsplit("-", 1)[1]) for e in self.manifest["segments"]
                 if e["name"].rsplit("-", 1)[0] == writer]
        return f"{writer}-{max(taken, default=-1) + 1:06d}"

    def write_segment(self, data: SegmentData, *, name: str, folder: Path | None = None,
                      rows_relative: bool = False) -> dict[str, Any]:
        """Write a segment's files (durably) and return its manifest entry; nothing is
        committed. With rows_relative, memory rows count from the segment's own first row."""
        folder = folder or self.path / SHARDS_DIR
        folder.mkdir(parents=True, exist_ok=True)
        n_rows = len(data.references)
        n_mem = 0 if data.kv_codes is None else len(data.kv_codes)
        payload: dict[str, bytes | memoryview] = {}
        if n_rows:
            emb = np.ascontiguousarray(data.embeddings, dtype=EMBEDDING_DTYPE)
            if emb.shape != (n_rows, self.embedding_dim):
                raise BankError(f"segment {name}: embeddings of shape {emb.shape}, expected "
                                f"({n_rows}, {self.embedding_dim})")
            lines = [json.dumps({k: ref[k] for k in ("key", "doc_id", "start", "end", "text",
                                                     "tokens")}, ensure_ascii=False) + "\n"
                     for ref in data.references]
            encoded = [line.encode("utf-8") for line in lines]
            keys = [key_bytes(ref["key"]) for ref in data.references]
            payload["refs.jsonl"] = b"".join(encoded)
            payload["keys"] = b"".join(keys)
            payload["emb"] = emb.data
            payload["rowsum"] = np.stack([crc_rows(encoded), crc_rows(keys), crc_rows(emb)],
                                         axis=1).data
        if n_mem:
            codes = np.ascontiguousarray(data.kv_codes, dtype=np.uint8)
            positions = np.ascontiguousarray(data.positions, dtype=self.layout.positions_dtype)
            if codes.shape != (n_mem, self.kv_bytes):
                raise BankError(f"segment {name}: memory codes of shape {codes.shape}, expected "
                                f"({n_mem}, {self.kv_bytes})")
            if positions.shape != (n_mem, *self.layout.positions_shape):
                raise BankError(f"segment {name}: positions of shape {positions.shape}, expected "
                                f"({n_mem}, {', '.join(map(str, self.layout.positions_shape))})")
            records = np.zeros(n_mem, dtype=RECORD_DTYPE)
            records["row"] = data.memory_rows
            records["encoder"] = data.encoders
            if data.memory_keys is not None:
                records["key"] = np.frombuffer(b"".join(map(key_bytes, data.memory_keys)),
                                               dtype=np.uint8).reshape(n_mem, KEY_BYTES)
            payload.update(kv=codes.data, pos=positions.data, rec=records.data,
                           memsum=np.stack([crc_rows(codes), crc_rows(positions),
                                            crc_rows(records)], axis=1).data)
        if not payload:
            raise BankError(f"segment {name} would be empty")
        files = {}
        for kind, data_bytes in payload.items():
            with no_space_as(BankError):  # names the file; nothing committed is touched
                write_atomic(folder / f"{name}.{kind}", data_bytes)
            files[kind] = {"bytes": len(memoryview(data_bytes).cast("B")),
                           "sha256": hashlib.sha256(data_bytes).hexdigest()}
        entry = {"name": name, "row_base": None if rows_relative else 0, "rows": n_rows,
                 "memories": n_mem, "files": files}
        folder = folder.resolve()
        if folder != (self.path / SHARDS_DIR).resolve():
            try:  # inside the bank: relative, so the bank folder can move as a whole
                entry["dir"] = str(folder.relative_to(self.path.resolve()))
            except ValueError:  # another disk or a mount: absolute
                entry["dir"] = str(folder)
        return entry

    def append(self, entry: dict[str, Any]) -> None:
        """Add a written segment to the manifest (in RAM) and the maps; `commit` makes it count.
        A segment whose rows were written relative gets its row_base here."""
        if entry["rows"]:
            entry["row_base"] = self.n_rows
        elif entry["row_base"] is None:
            raise BankError(f"segment {entry['name']}: memory rows must be absolute in a segment "
                            f"without rows")
        self.manifest["segments"].append(entry)
        self._attach(entry)
        self.manifest["rows"] = self.n_rows
        self.manifest["memories"] = self.n_memory_records

    def commit(self) -> None:
        if self._lock_file is None:
            raise BankError(f"commit to {self.path} without holding its write lock")
        with no_space_as(BankError):  # the previous manifest stays, and so the previous bank
            write_atomic(self.path / MANIFEST_FILE,
                         (json.dumps(self.manifest, indent=1, ensure_ascii=False) + "\n").encode())

    def close(self) -> None:
        for segment in self._segments:
            segment.close()
        self._open.clear()
        if self._lock_file is not None:
            self._lock_file.close()  # releases the flock
            self._lock_file = None

    # -- encoders ----------------------------------------------------------------------------
    def encoder_index(self, encoder: dict[str, Any]) -> int:
        """Index of an encoder record ({"id": ..., ...}) in the manifest, adding it if new."""
        for i, known in enumerate(self.manifest["encoders"]):
            if known["id"] == encoder["id"]:
                return i
        self.manifest["encoders"].append(encoder)
        return len(self.manifest["encoders"]) - 1

    # -- reading rows ------------------------------------------------------------------------
    def _segment(self, index: int) -> _Segment:
        self._open[index] = None
        self._open.move_to_end(index)
        while len(self._open) > OPEN_SEGMENTS:
            old, _ = self._open.popitem(last=False)
            self._segments[old].close()
        return self._segments[index]

    def _check_rows(self, rows: np.ndarray) -> None:
        if len(rows) and (rows.min() < 0 or rows.max() >= self.n_rows):
            raise BankError(f"row ids must be in 0..{self.n_rows - 1} for the bank {self.path}, "
                            f"got {rows.min()}..{rows.max()}")

    def _by_segment(self, segments: np.ndarray):
        """(segment index, positions in the request) for each segment a request touches."""
        order = np.argsort(segments, kind="stable")
        bounds = np.flatnonzero(np.diff(segments[order])) + 1
        for group in np.split(order, bounds):
            if len(group):
                yield int(segments[group[0]]), group

    @property
    def keys(self) -> dict[bytes, int]:
        """Reference key (20 bytes) -> row, loaded on first use (only writers need it: about
        150 bytes of RAM per row, fine to 1e7 rows; 1e8 would want a sorted array instead)."""
        if self._keys is None:
            self._keys = {}
            for index, entry in enumerate(self.manifest["segments"]):
                if entry["rows"]:
                    keys = self._segment(index).array("keys", np.uint8, (KEY_BYTES,))
                    for i, k in enumerate(np.asarray(keys)):
                        self._keys[k.tobytes()] = entry["row_base"] + i
        return self._keys

    def references(self, rows: Sequence[int] | np.ndarray) -> list[dict[str, Any]]:
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        self._check_rows(rows)
        out: list[dict[str, Any]] = [{}] * len(rows)
        for seg, group in self._by_segment(self._row_segment.view[rows]):
            local = rows[group] - self._row_starts[seg]
            for i, ref in zip(group, self._segment(seg).reference_lines(local)):
                out[i] = ref
        return out

    def embeddings(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """float16 embeddings of rows start..stop-1 (for building the index)."""
        stop = self.n_rows if stop is None else stop
        parts = []
        for index, entry in enumerate(self.manifest["segments"]):
            lo, hi = entry["row_base"], entry["row_base"] + entry["rows"]
            if entry["rows"] and hi > start and lo < stop:
                segment = self._segment(index)
                local = np.arange(max(start, lo) - lo, min(stop, hi) - lo)
                segment.check_rows(local, embedding_dim=self.embedding_dim)
                emb = segment.array("emb", EMBEDDING_DTYPE, (self.embedding_dim,))
                parts.append(np.asarray(emb[local[0]:local[-1] + 1]))
        return (np.concatenate(parts) if parts
                else np.empty((0, self.embedding_dim), dtype=EMBEDDING_DTYPE))

    def embeddings_at(self, rows: np.ndarray) -> np.ndarray:
        """float16 embeddings of the given rows (a training sample for the index)."""
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        self._check_rows(rows)
        out = np.empty((len(rows), self.embedding_dim), dtype=EMBEDDING_DTYPE)
        for seg, group in self._by_segment(self._row_segment.view[rows]):
            segment, local = self._segment(seg), rows[group] - self._row_starts[seg]
            segment.check_rows(local, embedding_dim=self.embedding_dim)
            out[group] = segment.array("emb", EMBEDDING_DTYPE, (self.embedding_dim,))[local]
        return out

    # -- reading memories --------------------------------------------------------------------
    def memory_encoders(self, rows: np.ndarray) -> np.ndarray:
        """Encoder index of each row's latest memory, -1 where the row has none (cold)."""
        rows = np.asarray(rows, dtype=np.int64)
        self._check_rows(rows.reshape(-1))
        return self._memory_encoder.view[rows]

    def read_memories(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """kv codes (n, kv_bytes) and positions (n, layers, heads, top_k) of rows that all have a
        memory, read with one gather per segment."""
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        self._check_rows(rows)
        segments = self._memory_segment.view[rows]
        if (segments < 0).any():
            raise BankError(f"rows {rows[segments < 0][:5].tolist()} have no memory")
        codes = np.empty((len(rows), self.kv_bytes), dtype=np.uint8)
        positions = np.empty((len(rows), *self.layout.positions_shape),
                             dtype=self.layout.positions_dtype)
        for seg, group in self._by_segment(segments):
            segment = self._segment(seg)
            records = self._memory_index.view[rows[group]]
            order = np.argsort(records)  # ascending offsets read the file front to back
            kv = segment.array("kv", np.uint8, (self.kv_bytes,))
            pos = segment.array("pos", self.layout.positions_dtype, self.layout.positions_shape)
            read_kv, read_pos = kv[records[order]], pos[records[order]]
            segment.check_memories(records[order], (read_kv, read_pos), ("kv", "pos"))
            codes[group[order]] = read_kv
            positions[group[order]] = read_pos
        return codes, positions

    def memory_record_keys(self, rows: np.ndarray) -> list[str]:
        """The reference key stored with each row's latest memory (provenance check)."""
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        out = [""] * len(rows)
        for seg, group in self._by_segment(self._memory_segment.view[rows]):
            records = np.fromfile(self._segment(seg).path("rec"), dtype=RECORD_DTYPE)
            for i in group:
                out[i] = records["key"][self._memory_index.view[rows[i]]].tobytes().hex()
        return out

    def file_bytes(self) -> int:
        return sum(f["bytes"] for e in self.manifest["segments"] for f in e["files"].values())


def load_manifest(path: str | Path) -> dict[str, Any]:
    return read_manifest(Path(path), FORMAT, VERSION, BankError,
                         missing=f"{path} holds no memory bank (make one with `memory3 build-bank` "
                                 f"or MemoryBank.create)",
                         outdated="build the bank again")
