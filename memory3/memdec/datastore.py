"""The Memory Decoder datastore: (key, next token) for every position of a domain token stream.

Layout of a datastore folder:
  manifest.json   base checkpoint, data identity, window, progress, index spec (files.py)
  keys.bin        (positions, d_model) float16: the base's last-MLP input (after its norm)
  values.bin      (positions,) int32: the next token
  index.faiss     FAISS index over the keys (index.py), written once all keys are in
  keys.bin.crc, values.bin.crc   CRC32 of each block of rows, written when the build completes

Checks on read (issue 14; files.py): the manifest's own sha256, every array's size and the sha256
of its .crc file on open, each block of rows against its CRC32 when first read, and the index's
size and sha256 on open (FAISS reads it whole anyway, so hashing it is one more pass of the same).

Alignment with the token stream: entry i is position i of the split, the tokens of its shards in
order as `TokenShards.read` returns them. Its key comes from the base reading the window of
`window` tokens that holds i (windows tile the stream without overlap: w*W .. (w+1)*W - 1), so the
key of i sees tokens w*W .. i; its value is token i + 1. Positions are thus stream offsets, exactly
the input positions of `PackedLoader`'s sequences whatever their length, and targets built from
the store line up with training batches by position. `--max-tokens N` keeps positions 0..N-1.

Resume: windows are read in batches of `batch_size` from window 0 and commits fall on batch
boundaries, so a resumed build runs the very batches an unbroken one would (same bytes). The index
is built in one go once every key is on disk; a kill during it redoes only the index.
"""
from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from memory3.data import TokenShards
from memory3.memdec.files import (MANIFEST_FILE, SLOW_COMMIT_ENV, CheckedArray, MemDecError,
                                  check_file, checkpoint_identity, checksum_array, checksum_file,
                                  data_identity, open_array, read_manifest, seal)
from memory3.files import no_space_as, write_json_atomic
from memory3.memdec.index import build_index, choose_index, load_index
from memory3.memdec.keys import capture_keys

FORMAT = "memory3-memdec-datastore"
VERSION = 2  # 2: checksums (issue 14)
KEYS_FILE, VALUES_FILE = "keys.bin", "values.bin"
KEY_DTYPE, VALUE_DTYPE = "float16", "int32"
# Recorded in the manifest for whoever reads the files without this code.
ALIGNMENT = ("entry i = position i of data.split (its shards' tokens in order); value = token i+1; "
             "key = last-MLP input of the base reading tokens (i // window) * window .. i")
# Exact distances gather k keys per query: bound the gathered block to ~64 MB of fp32.
EXACT_BLOCK_FLOATS = 1 << 24


@no_space_as(MemDecError)  # names the file being written
def build_datastore(base: str | Path, data: str | Path, out: str | Path, *, split: str = "train",
                    max_tokens: int | None = None, window: int | None = None,
                    batch_size: int = 8, index: str = "auto", nlist: int | None = None,
                    code_bytes: int = 64, nprobe: int = 32, commit_positions: int = 1 << 16,
                    device: str | torch.device | None = None, progress: bool = True) -> "Datastore":
    """Run checkpoint `base` over split `split` of token shards `data`; write the store to `out`.

    Resumable: after an interruption, run it again with the same arguments.
    """
    from memory3.checkpoints import load_model

    out = Path(out)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    base_id = checkpoint_identity(base)
    model_cfg = base_id["model"]
    window = window or model_cfg["max_seq_len"]
    if not 0 < window <= model_cfg["max_seq_len"]:
        raise MemDecError(f"--window {window} must be in 1..{model_cfg['max_seq_len']} (the base "
                          f"model's max_seq_len)")
    if batch_size <= 0:
        raise MemDecError(f"--batch-size must be positive, got {batch_size}")
    shards = TokenShards(data, split)
    if shards.vocab_size > model_cfg["vocab_size"]:
        raise MemDecError(f"tokenizer of {data} has {shards.vocab_size} tokens but the base model "
                          f"{base} has vocab_size {model_cfg['vocab_size']}: not its tokenizer")
    n = len(shards) - 1
    if max_tokens is not None:
        if max_tokens <= 0:
            raise MemDecError(f"--max-tokens must be positive, got {max_tokens}")
        n = min(n, max_tokens)
    if n <= 0:
        raise MemDecError(f"split {split!r} of {data} has no position with a next token")
    dim = model_cfg["d_model"]
    settings = {"base": base_id, "data": data_identity(data, split), "positions": n,
                "window": window, "batch_size": batch_size, "key_dim": dim,
                "index": choose_index(n, dim, index, nlist, code_bytes, nprobe)}
    manifest = _start_or_resume(out, settings)
    if manifest["complete"]:
        if progress:
            print(f"{out} is already complete; nothing to do")
        return Datastore(out)

    done = manifest["done_positions"]
    keys = open_array(out / KEYS_FILE, KEY_DTYPE, (n, dim), "w", done)
    values = open_array(out / VALUES_FILE, VALUE_DTYPE, (n,), "w", done)
    if done < n:
        model, _, _ = load_model(base, device)
        _fill(model, shards, keys, values, manifest, out, commit_positions, progress)
    index_path = out / settings["index"]["file"]
    build_index(keys, settings["index"], index_path, progress)
    manifest["checksums"] = {KEYS_FILE: checksum_array(out / KEYS_FILE, keys),
                             VALUES_FILE: checksum_array(out / VALUES_FILE, values),
                             index_path.name: checksum_file(index_path)}
    manifest["complete"] = True
    write_json_atomic(out / MANIFEST_FILE, seal(manifest))
    return Datastore(out)


def _start_or_resume(out: Path, settings: dict[str, Any]) -> dict[str, Any]:
    if not (out / MANIFEST_FILE).exists():
        out.mkdir(parents=True, exist_ok=True)
        manifest = {"format": FORMAT, "version": VERSION, "complete": False, **settings,
                    "alignment": ALIGNMENT, "done_positions": 0}
        write_json_atomic(out / MANIFEST_FILE, seal(manifest))
        return manifest
    manifest = read_manifest(out, FORMAT, VERSION, "Memory Decoder datastore")
    old = {**manifest, "base": _base_key(manifest["base"]), "data": _data_key(manifest["data"])}
    new = {**settings, "base": _base_key(settings["base"]), "data": _data_key(settings["data"])}
    changed = [k for k in settings if old.get(k) != new[k]]
    if changed:
        raise MemDecError(f"{out} was built with a different {', '.join(changed)} (see "
                          f"{out / MANIFEST_FILE}); use a fresh output directory")
    manifest["data"] = settings["data"]  # the same tokens, maybe found at a new path
    return manifest


def _base_key(base: dict[str, Any]) -> tuple:
    return base["checkpoint"], base["step"]


def _data_key(data: dict[str, Any]) -> tuple:
    return data["fingerprint"], data["split"]


@torch.inference_mode()
def _fill(model, shards: TokenShards, keys: np.memmap, values: np.memmap, manifest: dict,
          out: Path, commit_positions: int, progress: bool) -> None:
    n, window, batch = manifest["positions"], manifest["window"], manifest["batch_size"]
    batch_positions = window * batch
    commit_batches = max(1, commit_positions // batch_positions)
    slow = float(os.environ.get(SLOW_COMMIT_ENV, "0"))
    device = model.embed.weight.device
    bar = tqdm(total=n, initial=manifest["done_positions"], unit="tok", unit_scale=True,
               desc="datastore keys", disable=not progress)
    for i, start in enumerate(range(manifest["done_positions"], n, batch_positions)):
        end = min(start + batch_positions, n)
        tokens = shards.read(start, end - start + 1)
        inputs = np.zeros(math.ceil((end - start) / window) * window, dtype=np.int64)
        inputs[:end - start] = tokens[:-1]  # zero padding after the last position: causal
        with capture_keys(model) as captured:
            model(torch.from_numpy(inputs).view(-1, window).to(device))
        keys[start:end] = captured[0].flatten(0, 1)[:end - start].to("cpu", torch.float16).numpy()
        values[start:end] = tokens[1:]
        bar.update(end - start)
        if (i + 1) % commit_batches == 0 or end == n:
            keys.flush()
            values.flush()
            manifest["done_positions"] = end
            write_json_atomic(out / MANIFEST_FILE, seal(manifest))
            time.sleep(slow)
    bar.close()


class Datastore:
    """A complete datastore, opened read-only: keys, values and the FAISS index."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.manifest = read_manifest(self.path, FORMAT, VERSION, "Memory Decoder datastore")
        if not self.manifest["complete"]:
            raise MemDecError(f"{self.path / MANIFEST_FILE} is incomplete: the build was "
                              f"interrupted; run build-datastore again with the same arguments")
        m = self.manifest
        self.positions, self.window, self.key_dim = m["positions"], m["window"], m["key_dim"]
        self.base, self.data = m["base"], m["data"]
        where = self.path / MANIFEST_FILE
        self.keys = CheckedArray(self.path / KEYS_FILE, KEY_DTYPE, (self.positions, self.key_dim),
                                 m["checksums"][KEYS_FILE], where)
        self.values = CheckedArray(self.path / VALUES_FILE, VALUE_DTYPE, (self.positions,),
                                   m["checksums"][VALUES_FILE], where)
        index_path = self.path / m["index"]["file"]
        check_file(index_path, m["checksums"][index_path.name], where)
        self.index = load_index(index_path, m["index"])

    def __len__(self) -> int:
        return self.positions

    def search(self, queries: np.ndarray, k: int, *, exclude_ids: np.ndarray | None = None,
               exact: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """Nearest entries of queries (n, d): squared L2 distances (n, k') and ids (n, k').

        k' = min(k, entries available). `exclude_ids` (n,) drops each query's own entry: k + 1
        are searched and the query's id removed, or the farthest one where the (approximate)
        search did not return it. Missing neighbours have id -1 and distance +inf. `exact`
        recomputes distances from the stored keys (IVF-PQ's are approximate).
        """
        if k <= 0:
            raise MemDecError(f"k must be positive, got {k}")
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        searched = min(k + (exclude_ids is not None), self.positions)
        distances, ids = self.index.search(queries, searched)
        if exact:
            distances = self._exact_distances(queries, ids)
        distances[ids < 0] = np.inf
        if exclude_ids is None:
            return distances, ids
        drop = ids == np.asarray(exclude_ids)[:, None]
        drop[~drop.any(axis=1), -1] = True
        keep = ~drop
        shape = (len(ids), searched - 1)
        return distances[keep].reshape(shape), ids[keep].reshape(shape)

    def _exact_distances(self, queries: np.ndarray, ids: np.ndarray) -> np.ndarray:
        out = np.empty(ids.shape, dtype=np.float32)
        rows = max(1, EXACT_BLOCK_FLOATS // (ids.shape[1] * self.key_dim))
        for s in range(0, len(ids), rows):
            block = ids[s:s + rows]
            neighbours = self.keys[np.maximum(block, 0)].astype(np.float32)  # (r, k, d)
            out[s:s + rows] = ((neighbours - queries[s:s + rows, None]) ** 2).sum(-1)
        return out
