"""kNN next-token targets: p_kNN for every datastore position, stored sparse.

    p_kNN(y | i) = sum over the k nearest entries j of i (i itself excluded) with value_j = y
                   of softmax_j(-d(i, j) / temperature),     d = squared L2 distance of the keys

Storage: the `top` most probable tokens of each position (default 32), ids int32 and probabilities
float32, padded with id 0 / probability 0, and renormalised to sum to 1 over the tokens kept, so
the decoder's KL term compares against a proper distribution. k neighbours give at most k distinct
tokens and usually only a handful with real mass; the manifest's `mass_kept_mean` says how much
the cut dropped before renormalising. A position whose search returned no neighbour (possible
only with IVF-PQ) keeps all-zero probabilities: no kNN target, its loss is then the CE term alone.

Layout of a targets folder:
  manifest.json    the datastore's identity (data fingerprint, split, window, positions),
                   settings (k, temperature, self-exclusion, top, exact distances), progress
  ids.bin          (positions, top) int32
  probs.bin        (positions, top) float32
  next_token.bin   (positions,) int32: the true next token of each position
  ids.bin.crc, probs.bin.crc, next_token.bin.crc   CRC32 of each block of rows (at completion)

Checks on read as for the datastore (files.py): the manifest's sha256, array sizes and the .crc
files' sha256 on open, each block of rows against its CRC32 when first read.

Row i is stream position i of the datastore's split (see datastore.py), so the targets of a
training sequence starting at stream offset s are rows s .. s + seq_len - 1. `check_aligned`
verifies that against the training shards before any step: same tokens (fingerprint), same split,
and next_token equal to the shards' tokens 1 .. positions. Resume as in datastore.py: a commit per
search batch, batches fixed from position 0.
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from memory3.data import TokenShards
from memory3.memdec.datastore import Datastore
from memory3.files import no_space_as, write_json_atomic
from memory3.memdec.files import (MANIFEST_FILE, SLOW_COMMIT_ENV, CheckedArray, MemDecError,
                                  checksum_array, data_identity, open_array, read_manifest, seal)

FORMAT = "memory3-memdec-targets"
VERSION = 2  # 2: checksums (issue 14)
IDS_FILE, PROBS_FILE, NEXT_TOKEN_FILE = "ids.bin", "probs.bin", "next_token.bin"
# Aggregation scatters neighbours into dense (rows, vocab) float64 blocks of at most this size.
DENSE_BLOCK_FLOATS = 1 << 23


def knn_weights(distances: np.ndarray, temperature: float) -> np.ndarray:
    """softmax(-distance / temperature) over each row (n, k); +inf distances get weight 0, and a
    row with no finite distance is all zeros."""
    if temperature <= 0:
        raise MemDecError(f"temperature must be positive, got {temperature}")
    logits = -np.asarray(distances, dtype=np.float64) / temperature
    finite = np.isfinite(logits)
    top = np.where(finite, logits, -np.inf).max(axis=1, keepdims=True)
    weights = np.where(finite, np.exp(logits - np.where(np.isfinite(top), top, 0.0)), 0.0)
    total = weights.sum(axis=1, keepdims=True)
    return np.divide(weights, total, out=np.zeros_like(weights), where=total > 0)


def sparse_distribution(values: np.ndarray, weights: np.ndarray, vocab_size: int,
                        top: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sum neighbour weights (n, k) per value (n, k) and keep the `top` most probable tokens.

    Returns ids (n, top) int32, probs (n, top) float32 renormalised over the kept tokens (padding:
    id 0, prob 0), and the mass kept before renormalising (n,).
    """
    n = len(values)
    ids = np.zeros((n, top), dtype=np.int32)
    probs = np.zeros((n, top), dtype=np.float32)
    kept = np.zeros(n, dtype=np.float64)
    rows = max(1, DENSE_BLOCK_FLOATS // vocab_size)
    for s in range(0, n, rows):
        v = torch.from_numpy(np.maximum(values[s:s + rows], 0).astype(np.int64))
        w = torch.from_numpy(np.asarray(weights[s:s + rows], dtype=np.float64))
        dense = torch.zeros(len(v), vocab_size, dtype=torch.float64).scatter_add_(1, v, w)
        p, i = torch.topk(dense, top, dim=1)
        i[p == 0] = 0
        mass = p.sum(1, keepdim=True)
        ids[s:s + rows] = i.numpy()
        probs[s:s + rows] = torch.where(mass > 0, p / mass.clamp_min(1e-300), 0.0).numpy()
        kept[s:s + rows] = mass[:, 0].numpy()
    return ids, probs, kept


@no_space_as(MemDecError)  # names the file being written
def build_targets(datastore: str | Path, out: str | Path, *, k: int = 1024,
                  temperature: float = 1.0, exclude_self: bool = True, top: int = 32,
                  exact: bool = False, batch_size: int = 4096,
                  progress: bool = True) -> "KnnTargets":
    """p_kNN of every position of `datastore`, written sparse to `out`. Resumable: after an
    interruption, run it again with the same arguments."""
    store = Datastore(datastore)
    out = Path(out)
    for name, value in (("--k", k), ("--top", top), ("--batch-size", batch_size)):
        if value <= 0:
            raise MemDecError(f"{name} must be positive, got {value}")
    if temperature <= 0:
        raise MemDecError(f"--temperature must be positive, got {temperature}")
    if exclude_self and store.positions < 2:
        raise MemDecError(f"{datastore} has a single entry: nothing is left once a query's own "
                          f"entry is excluded")
    n, vocab = store.positions, store.base["model"]["vocab_size"]
    top = min(top, vocab)
    settings = {"k": k, "temperature": temperature, "exclude_self": exclude_self, "top": top,
                "exact_distances": exact, "batch_size": batch_size}
    manifest = _start_or_resume(out, store, settings)
    if manifest["complete"]:
        if progress:
            print(f"{out} is already complete; nothing to do")
        return KnnTargets(out)

    done = manifest["done_positions"]
    ids_out = open_array(out / IDS_FILE, "int32", (n, top), "w", done)
    probs_out = open_array(out / PROBS_FILE, "float32", (n, top), "w", done)
    next_out = open_array(out / NEXT_TOKEN_FILE, "int32", (n,), "w", done)
    slow = float(os.environ.get(SLOW_COMMIT_ENV, "0"))
    bar = tqdm(total=n, initial=done, unit="tok", unit_scale=True, desc="kNN targets",
               disable=not progress)
    for start in range(done, n, batch_size):
        end = min(start + batch_size, n)
        positions = np.arange(start, end)
        distances, neighbours = store.search(store.keys[start:end], k, exact=exact,
                                             exclude_ids=positions if exclude_self else None)
        values = np.where(neighbours >= 0, store.values[np.maximum(neighbours, 0)], 0)
        ids, probs, kept = sparse_distribution(values, knn_weights(distances, temperature),
                                               vocab, top)
        ids_out[start:end], probs_out[start:end] = ids, probs
        next_out[start:end] = store.values[start:end]
        for array in (ids_out, probs_out, next_out):
            array.flush()
        manifest["done_positions"] = end
        manifest["mass_kept_sum"] += float(kept.sum())
        manifest["empty_positions"] += int((kept == 0).sum())
        write_json_atomic(out / MANIFEST_FILE, seal(manifest))
        bar.update(end - start)
        time.sleep(slow)
    bar.close()
    manifest["checksums"] = {name: checksum_array(out / name, array) for name, array in
                             ((IDS_FILE, ids_out), (PROBS_FILE, probs_out),
                              (NEXT_TOKEN_FILE, next_out))}
    manifest["complete"] = True
    manifest["mass_kept_mean"] = manifest["mass_kept_sum"] / n
    write_json_atomic(out / MANIFEST_FILE, seal(manifest))
    return KnnTargets(out)


def _start_or_resume(out: Path, store: Datastore, settings: dict[str, Any]) -> dict[str, Any]:
    source = {"path": str(store.path.resolve()), "base": store.base, "data": store.data,
              "positions": store.positions, "window": store.window}
    if not (out / MANIFEST_FILE).exists():
        out.mkdir(parents=True, exist_ok=True)
        manifest = {"format": FORMAT, "version": VERSION, "complete": False, "datastore": source,
                    "settings": settings, "positions": store.positions, "done_positions": 0,
                    "mass_kept_sum": 0.0, "empty_positions": 0}
        write_json_atomic(out / MANIFEST_FILE, seal(manifest))
        return manifest
    manifest = read_manifest(out, FORMAT, VERSION, "kNN targets folder")
    old, new = manifest["datastore"], source
    if (old["data"]["fingerprint"], old["data"]["split"], old["positions"], old["window"],
            old["base"]["checkpoint"], old["base"]["step"]) != (
            new["data"]["fingerprint"], new["data"]["split"], new["positions"], new["window"],
            new["base"]["checkpoint"], new["base"]["step"]):
        raise MemDecError(f"{out} holds targets of another datastore ({old['path']}); use a fresh "
                          f"output directory")
    changed = [k for k in settings if manifest["settings"].get(k) != settings[k]]
    if changed:
        raise MemDecError(f"{out} was built with a different {', '.join(changed)} (see "
                          f"{out / MANIFEST_FILE}); use a fresh output directory")
    return manifest


class KnnTargets:
    """Complete kNN targets, opened read-only; row i is stream position i of the datastore's
    split."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.manifest = read_manifest(self.path, FORMAT, VERSION, "kNN targets folder")
        if not self.manifest["complete"]:
            raise MemDecError(f"{self.path / MANIFEST_FILE} is incomplete: the build was "
                              f"interrupted; run build-targets again with the same arguments")
        self.positions = self.manifest["positions"]
        self.top = self.manifest["settings"]["top"]
        self.data = self.manifest["datastore"]["data"]
        shape = (self.positions, self.top)
        sums, where = self.manifest["checksums"], self.path / MANIFEST_FILE
        self.ids = CheckedArray(self.path / IDS_FILE, "int32", shape, sums[IDS_FILE], where)
        self.probs = CheckedArray(self.path / PROBS_FILE, "float32", shape, sums[PROBS_FILE],
                                  where)
        self.next_token = CheckedArray(self.path / NEXT_TOKEN_FILE, "int32", (self.positions,),
                                       sums[NEXT_TOKEN_FILE], where)

    def check_aligned(self, shards: TokenShards) -> None:
        """Refuse targets that do not line up with the positions of `shards` (a MemDecError)."""
        where = f"kNN targets {self.path}"
        if shards.split != self.data["split"]:
            raise MemDecError(f"{where} were built for split {self.data['split']!r} but training "
                              f"reads split {shards.split!r} (data.train_split)")
        found = data_identity(shards.data_dir, shards.split)
        if found["fingerprint"] != self.data["fingerprint"]:
            raise MemDecError(f"{where} were built from the tokens of {self.data['path']} "
                              f"(split {self.data['split']!r}), not those of {shards.data_dir}: "
                              f"other shards or another tokenizer; point data.path at the "
                              f"datastore's data or rebuild the datastore and targets")
        if len(shards) < self.positions + 1:
            raise MemDecError(f"{where} cover {self.positions} positions but split "
                              f"{shards.split!r} of {shards.data_dir} has only {len(shards)} "
                              f"tokens")
        expected = shards.read(1, self.positions)
        mismatch = np.flatnonzero(expected != self.next_token[:])
        if len(mismatch):
            raise MemDecError(f"{where} are misaligned with {shards.data_dir}: the next token of "
                              f"position {mismatch[0]} is {self.next_token[mismatch[0]]} in "
                              f"{self.path / NEXT_TOKEN_FILE} but {expected[mismatch[0]]} in the "
                              f"shards ({len(mismatch)} positions differ)")

    def rows(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """ids and probs (*positions.shape, top) of stream positions."""
        flat = positions.reshape(-1)
        shape = (*positions.shape, self.top)
        return self.ids[flat].reshape(shape), self.probs[flat].reshape(shape)
