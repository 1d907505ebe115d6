"""The FAISS index over datastore keys, chosen by size.

Flat (exact L2) for small stores: it needs no training, but searching it for every position (the
targets) costs N^2 * d: about 3 minutes for 2^17 positions of 128-dim keys on 2 CPU cores, and 64x
that at 2^20. Above 2^17 positions,
IVF-PQ as in the Memory Decoder reference: 4096 inverted lists (fewer for smaller stores: about
4 sqrt(N), so lists keep hundreds of entries), 64-byte codes (64 sub-quantizers of 8 bits),
nprobe 32.
Distances are squared L2 (what FAISS returns); IVF-PQ's are approximate, and callers may recompute
exact ones from the stored fp16 keys.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import faiss
import numpy as np
from tqdm import tqdm

from memory3 import files
from memory3.memdec.files import MemDecError

FLAT_MAX_POSITIONS = 2**17
REFERENCE_NLIST = 4096
REFERENCE_CODE_BYTES = 64
REFERENCE_NPROBE = 32
INDEX_FILE = "index.faiss"
ADD_CHUNK = 1 << 16
SAMPLE_SEED = 0


def choose_index(n_positions: int, dim: int, kind: str = "auto", nlist: int | None = None,
                 code_bytes: int = REFERENCE_CODE_BYTES,
                 nprobe: int = REFERENCE_NPROBE) -> dict[str, Any]:
    """The index spec recorded in the datastore manifest."""
    if kind not in ("auto", "flat", "ivfpq"):
        raise MemDecError(f"index kind must be auto, flat or ivfpq, got {kind!r}")
    if kind == "auto":
        kind = "flat" if n_positions <= FLAT_MAX_POSITIONS else "ivfpq"
    if kind == "flat":
        return {"kind": "flat", "file": INDEX_FILE}
    nlist = nlist or min(REFERENCE_NLIST, max(1, int(4 * math.sqrt(n_positions))))
    if not 0 < nlist <= n_positions:
        raise MemDecError(f"--nlist {nlist} must be in 1..{n_positions} (the datastore size)")
    if code_bytes <= 0 or dim % code_bytes:
        raise MemDecError(f"--code-bytes {code_bytes} must divide the key dimension {dim} "
                          f"(one 8-bit sub-quantizer per byte)")
    if nprobe <= 0:
        raise MemDecError(f"--nprobe must be positive, got {nprobe}")
    return {"kind": "ivfpq", "file": INDEX_FILE, "nlist": nlist, "code_bytes": code_bytes,
            "nprobe": min(nprobe, nlist)}


def build_index(keys: np.ndarray, spec: dict[str, Any], out: Path, progress: bool) -> None:
    """Train (IVF-PQ) and fill an index with `keys` (N, d) fp16; written atomically to `out`."""
    n, dim = keys.shape
    if spec["kind"] == "flat":
        index = faiss.IndexFlatL2(dim)
    else:
        index = faiss.IndexIVFPQ(faiss.IndexFlatL2(dim), dim, spec["nlist"], spec["code_bytes"], 8)
        # FAISS samples at most 256 points per centroid anyway; a sorted sample reads the memmap
        # sequentially.
        sample_size = min(n, max(64 * spec["nlist"], 1 << 16))
        sample = np.sort(np.random.default_rng(SAMPLE_SEED).choice(n, sample_size, replace=False))
        if progress:
            print(f"training IVF-PQ ({spec['nlist']} lists, {spec['code_bytes']}-byte codes) on "
                  f"{sample_size:,} keys")
        index.train(np.ascontiguousarray(keys[sample], dtype=np.float32))
    for start in tqdm(range(0, n, ADD_CHUNK), desc="index", unit="chunk", disable=not progress):
        index.add(np.ascontiguousarray(keys[start:start + ADD_CHUNK], dtype=np.float32))
    write_index(index, out)


def write_index(index: faiss.Index, out: Path) -> None:
    """Write `index` to `out` atomically (files.write_streamed). FAISS's own file writer ignores
    an error when it closes the file, so a full disk could leave a truncated index renamed into
    place; here every write is Python's, and its OSError (disk full, file size limit) reaches
    the caller, the temp file removed."""
    failed: list[OSError] = []

    def write(f) -> None:
        def chunk(data: bytes) -> int:
            try:
                return f.write(data)
            except OSError as e:
                failed.append(e)  # older FAISS turns it into a RuntimeError
                raise
        try:
            faiss.write_index(index, faiss.PyCallbackIOWriter(chunk))
        except RuntimeError:
            if failed:
                raise failed[0] from None
            raise

    files.write_streamed(out, write)


def load_index(path: Path, spec: dict[str, Any]) -> faiss.Index:
    if not path.is_file():
        raise MemDecError(f"{path} is missing: the datastore's index was deleted")
    index = faiss.read_index(str(path))
    if spec["kind"] == "ivfpq":
        faiss.extract_index_ivf(index).nprobe = spec["nprobe"]
    return index
