"""`memory3 bank verify BANK`: every file and every record of a bank checked, every problem listed.

Opening a bank checks sizes, and each read checks the records it touches (store.py); this reads
everything once: each file's sha256 against the manifest, each row's and memory's CRC32, the
codec, the index (its sha256 and its row count against the manifest) and a lexical embedder's
document frequencies (their sha256).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from memory3.memory.codec import load_codec
from memory3.memory.embedders import LexicalEmbedder
from memory3.memory.index import ReferenceIndex
from memory3.memory.store import (EMBEDDING_DTYPE, KEY_BYTES, MANIFEST_FILE, MEMORY_FILES,
                                  RECORD_DTYPE, BankError, MemoryStore, _Segment, crc_rows,
                                  load_manifest)


def verify_bank(path: str | Path) -> tuple[list[str], dict[str, int]]:
    """(problems, counts checked). An empty problem list means the bank is intact."""
    path = Path(path)
    store = MemoryStore(path, load_manifest(path))
    problems: list[str] = []
    counts = {"files": 0, "rows": 0, "memories": 0}
    for entry in store.manifest["segments"]:
        segment = _Segment(store._segment_folder(entry), entry)
        counts["files"] += len(entry["files"])
        if store._check_segment(entry, "full", problems):  # records need every file's size
            problems += _check_records(store, segment, entry, counts)
        segment.close()
    problems += _check_codec_and_index(store)
    return problems, counts


def _check_records(store: MemoryStore, segment: _Segment, entry: dict,
                   counts: dict[str, int]) -> list[str]:
    problems = []
    files = entry["files"]
    if entry["rows"] and "rowsum" in files:
        sums = segment.array("rowsum", "<u4", (3,))
        lines = segment.path("refs.jsonl").read_bytes().splitlines(keepends=True)
        keys = segment.array("keys", np.uint8, (KEY_BYTES,))
        emb = segment.array("emb", EMBEDDING_DTYPE, (store.embedding_dim,))
        if len(lines) != entry["rows"]:
            problems.append(f"{segment.path('refs.jsonl')}: {len(lines)} lines for "
                            f"{entry['rows']} rows")
        else:
            for col, (kind, part) in enumerate((("refs.jsonl", lines), ("keys", keys),
                                                ("emb", emb))):
                problems += _bad(segment, kind, "rowsum", crc_rows(part) != sums[:, col], "row")
        counts["rows"] += entry["rows"]
    if entry["memories"] and "memsum" in files:
        sums = segment.array("memsum", "<u4", (3,))
        parts = {"kv": segment.array("kv", np.uint8, (store.kv_bytes,)),
                 "pos": segment.array("pos", store.layout.positions_dtype,
                                      store.layout.positions_shape),
                 "rec": np.fromfile(segment.path("rec"), dtype=RECORD_DTYPE)}
        for kind, part in parts.items():
            bad = crc_rows(part) != sums[:, MEMORY_FILES.index(kind)]
            problems += _bad(segment, kind, "memsum", bad, "memory record")
        counts["memories"] += entry["memories"]
    return problems


def _bad(segment: _Segment, kind: str, sums: str, bad: np.ndarray, what: str) -> list[str]:
    if not bad.any():
        return []
    first = np.flatnonzero(bad)[:5].tolist()
    return [f"{segment.path(kind)}: {int(bad.sum())} {what}(s) do not match their checksums in "
            f"{segment.path(sums)} (first: {first})"]


def _check_codec_and_index(store: MemoryStore) -> list[str]:
    manifest, problems = store.manifest, []
    try:
        load_codec(store.path, store.layout, manifest["storage"], manifest["model"]["rope_theta"],
                   verify=True)
    except BankError as e:
        problems.append(str(e))
    if manifest["embedder"]["name"] == "lexical":
        try:
            LexicalEmbedder.load(store.path, manifest["embedder"])
        except BankError as e:
            problems.append(str(e))
    if manifest["index"] is not None:
        try:
            index = ReferenceIndex.load(store.path, manifest["index"], "full")
            if index.ntotal != manifest["index"]["rows"]:
                problems.append(f"{store.path / manifest['index']['file']} holds {index.ntotal} "
                                f"rows, {store.path / MANIFEST_FILE} says "
                                f"{manifest['index']['rows']}")
        except BankError as e:
            problems.append(str(e))
    return problems
