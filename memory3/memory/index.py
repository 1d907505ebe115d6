"""Retrieval index: reference embeddings in FAISS, cosine similarity, ids = bank row ids.

Cosine is inner product over L2-normalised vectors (embedders normalise; vectors read back from
the bank's float16 copies are normalised again). The kind of index follows the bank's size unless
a FAISS factory string is given:

- up to FLAT_LIMIT rows: "IDMap2,Flat", exact;
- up to HNSW_LIMIT rows: "IDMap2,HNSW64" searched with efSearch=EF_SEARCH: approximate, no
  training, extendable row by row, ~2 KB of RAM per 384-dim row; bench/retrieval.py measures
  its recall@5 against exact search on 1M synthetic embeddings (the SPEC's goal: >= 0.95 at
  >= 5,000 queries/s on 2 cores);
- above: "IVF<nlist>,SQ8" (nlist ~ 4 sqrt(rows), a power of two) with nprobe=NPROBE: 1 byte per
  dimension, so 1e8 rows fit in RAM where a graph would not (SPEC 1d; sharding and on-disk
  inverted lists are the next steps at that size). Trained on a sample.

The index is derived data: the bank keeps every embedding (shards/*.emb), so an index can be
rebuilt or retrained at any time, and rows added to the bank after the index was written are added
to it on the next search or commit. A bank whose index kind is chosen by size gets the next kind,
rebuilt from the stored embeddings, when it outgrows the current one. It is saved with faiss.serialize_index to a file named after the number of rows it
holds, written atomically, and committed by the manifest like everything else.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from memory3.files import file_sha256, write_atomic
from memory3.memory.store import BankError

FLAT_LIMIT = 100_000
HNSW_LIMIT = 20_000_000
EF_SEARCH = 96
NPROBE = 32
TRAIN_PER_LIST = 64  # training vectors per inverted list (faiss warns below 39)


def choose_factory(n_rows: int) -> tuple[str, str]:
    """(factory string, search parameters) for a bank of n_rows references."""
    if n_rows <= FLAT_LIMIT:
        return "IDMap2,Flat", ""
    if n_rows <= HNSW_LIMIT:
        return "IDMap2,HNSW64", f"efSearch={EF_SEARCH}"
    nlist = 1 << round(math.log2(4 * math.sqrt(n_rows)))
    return f"IVF{nlist},SQ8", f"nprobe={NPROBE}"


def normalise(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return np.ascontiguousarray(x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12))


class ReferenceIndex:
    """A FAISS index over the bank's rows; `search` returns row ids (-1 where fewer than k)."""

    def __init__(self, index: faiss.Index, factory: str, search_params: str = ""):
        self.index, self.factory, self.search_params = index, factory, search_params
        self.dim = index.d
        if search_params:
            faiss.ParameterSpace().set_index_parameters(index, search_params)

    @classmethod
    def new(cls, dim: int, n_rows: int, factory: str | None = None,
            search_params: str | None = None) -> "ReferenceIndex":
        """An empty index for a bank expected to hold n_rows (chooses the kind unless given)."""
        chosen, chosen_params = choose_factory(n_rows)
        factory = factory or chosen
        try:
            index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
        except RuntimeError as e:
            raise BankError(f"index {factory!r} is not a FAISS factory string "
                            f"({str(e).strip().splitlines()[-1]})") from e
        if not factory.startswith("IDMap") and not _takes_ids(index):
            index = faiss.IndexIDMap2(index)
        params = search_params if search_params is not None else (
            chosen_params if factory == chosen else "")
        return cls(index, factory, params)

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)

    @property
    def is_trained(self) -> bool:
        return bool(self.index.is_trained)

    def train(self, embeddings: np.ndarray, seed: int = 0) -> None:
        """Train on a sample of the embeddings (IVF centroids, quantizer ranges)."""
        ivf = faiss.try_extract_index_ivf(self.index)
        n_sample = len(embeddings) if ivf is None else TRAIN_PER_LIST * ivf.nlist
        if len(embeddings) > n_sample:
            rows = np.random.default_rng(seed).choice(len(embeddings), n_sample, replace=False)
            embeddings = embeddings[np.sort(rows)]
        if ivf is not None and len(embeddings) < ivf.nlist:
            raise BankError(f"index {self.factory!r} needs at least {ivf.nlist} references to "
                            f"train, the bank has {len(embeddings)}")
        self.index.train(normalise(embeddings))

    def add(self, embeddings: np.ndarray, row_ids: np.ndarray) -> None:
        if not self.is_trained:
            raise BankError(f"index {self.factory!r} must be trained before rows are added")
        self.index.add_with_ids(normalise(embeddings), np.asarray(row_ids, dtype=np.int64))

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Cosine scores (Q, k) float32 and row ids (Q, k) int64, best first; -1 ids pad."""
        if queries.shape[1] != self.dim:
            raise BankError(f"query vectors have dim {queries.shape[1]}, the index {self.dim}")
        scores, ids = self.index.search(normalise(queries), k)
        return scores, ids.astype(np.int64)

    def save(self, bank: Path) -> dict[str, Any]:
        """Write index-<rows>.faiss atomically; return its manifest entry (commit it after)."""
        name = f"index-{self.ntotal:012d}.faiss"
        write_atomic(bank / name, faiss.serialize_index(self.index).tobytes())
        return {"file": name, "factory": self.factory, "search_params": self.search_params,
                "rows": self.ntotal, "bytes": (bank / name).stat().st_size,
                "sha256": file_sha256(bank / name)}

    @classmethod
    def load(cls, bank: Path, entry: dict[str, Any], verify: str) -> "ReferenceIndex":
        path = bank / entry["file"]
        if not path.is_file():
            raise BankError(f"index file {path} listed in {bank / 'manifest.json'} is missing; "
                            f"rebuild it from the stored embeddings with "
                            f"MemoryBank.open({str(bank)!r}, rebuild_index=True)")
        if path.stat().st_size != entry["bytes"] or (
                verify == "full" and file_sha256(path) != entry["sha256"]):
            raise BankError(f"index file {path} does not match {bank / 'manifest.json'}: it is "
                            f"corrupt; rebuild it with MemoryBank.open({str(bank)!r}, "
                            f"rebuild_index=True)")
        index = faiss.deserialize_index(np.fromfile(path, dtype=np.uint8))
        return cls(index, entry["factory"], entry["search_params"])


def _takes_ids(index: faiss.Index) -> bool:
    """IVF indexes store ids themselves; others need an IDMap around them."""
    return faiss.try_extract_index_ivf(index) is not None
