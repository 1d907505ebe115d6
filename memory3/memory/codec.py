"""How a memory's key/value vectors are stored: raw bf16 (default) or a trained FAISS codec.

A codec turns kv (N, layers, 2, KV heads, top_k, head_dim) into fixed-size byte records
(N, kv_bytes) and back, on the CPU (decode before moving to the device).

- `RawCodec("bf16")`: the bit patterns of bf16 (or fp16 / fp32) numbers, exact for bf16 input.
  At the 2.4b shape (22, 2, 8, 8, 80) that is 22*2*8*8*80*2 = 450,560 bytes per memory.
- `FaissCodec(factory)`: one FAISS vector codec per memory layer and per keys/values (they have
  different distributions), each trained on a sample of that layer's head-dim vectors from
  occupied slots; vectors are coded with `sa_encode`. Keys are coded *without* their rotary
  rotation (undone with the stored positions, redone on decode): rotary turns each key by an
  angle that depends on its position, which spreads one key distribution over all positions and
  costs a product quantizer much of its accuracy (bench/memory_storage.py: relative error of the
  keys ~5x lower this way). The rotation is orthogonal, so the error norm is unchanged by it. Any factory string
  with standalone codes works, e.g. "SQ8" (1 byte per dimension), "OPQ14_84,PQ14" (14 bytes per
  vector, the reference's rate: 39,424 bytes per memory at the 2.4b shape). "opq<M>" is shorthand
  for OPQ + PQ with M bytes per vector at any head dim.

OPQ rotations are fitted in closed form, by the OPQ paper's parametric solution (PCA, then
"eigenvalue allocation": principal directions dealt to the PQ sub-spaces so that the products of
their variances balance), not by faiss' iterative OPQ, which costs minutes per codec on 2 cores;
on the benchmark's data the closed form is also the more accurate one (bench/memory_storage.py).

Error bounds (tests/test_memory_bank.py checks them): RawCodec("bf16") is exact for bf16 input and
within bf16 rounding (relative 2^-8) for fp32 input; "SQ8" is within one quantization step per
dimension, (max - min) / 255 of the range seen in training, so a vector inside that range has an
error norm of at most the norm of the steps; "opq<M>" has no worst-case bound, its relative
squared error sum|x - x'|^2 / sum|x|^2 is measured (bench/memory_storage.py) and tested on a fixed
distribution. Empty slots (position 0) decode to zeros whatever the codec.
"""
from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import torch

from memory3.files import file_sha256, write_atomic
from memory3.memory.store import BankError, MemoryLayout
from memory3.model.layers import apply_rotary, rotary_tables

RAW_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# Vectors per codec used for training; more barely helps 8-bit sub-quantizers (256 centroids).
TRAIN_VECTORS = 16384
CODEC_DIR = "codec"


def _as_numpy_bytes(t: torch.Tensor) -> np.ndarray:
    """Raw bytes of a contiguous CPU tensor as uint8 (N, bytes per item); bf16 has no numpy dtype,
    so go through a same-width integer view."""
    t = t.contiguous()
    int_view = {2: torch.int16, 4: torch.int32}[t.element_size()]
    return t.view(int_view).numpy().view(np.uint8).reshape(t.shape[0], -1)


class RawCodec:
    """Uncompressed storage in a float dtype ("bf16", "fp16" or "fp32")."""

    def __init__(self, layout: MemoryLayout, dtype: str = "bf16"):
        if dtype not in RAW_DTYPES:
            raise BankError(f"raw memory dtype must be one of {sorted(RAW_DTYPES)}, got {dtype!r}")
        self.layout, self.name, self.dtype = layout, dtype, RAW_DTYPES[dtype]
        self.kv_bytes = math.prod(layout.kv_shape) * self.dtype.itemsize
        self.trained = True

    @property
    def spec(self) -> dict[str, Any]:
        return {"codec": "none", "dtype": self.name, "kv_bytes": self.kv_bytes}

    def encode(self, kv: torch.Tensor, positions: torch.Tensor | None = None) -> np.ndarray:
        return _as_numpy_bytes(kv.detach().to("cpu", self.dtype).reshape(kv.shape[0], -1))

    def decode(self, codes: np.ndarray, positions: torch.Tensor | None = None) -> torch.Tensor:
        """(N, kv_bytes) uint8 -> (N, *kv_shape) in the stored dtype (no copy for fp32/bf16 views)."""
        int_view = {2: np.int16, 4: np.int32}[self.dtype.itemsize]
        flat = torch.from_numpy(np.ascontiguousarray(codes).view(int_view)).view(self.dtype)
        return flat.reshape(len(codes), *self.layout.kv_shape)

    def save(self, bank: Path) -> dict[str, Any]:
        return self.spec


def expand_factory(factory: str, head_dim: int) -> str:
    """Resolve the "opq<M>" shorthand to a FAISS factory string for this head dim."""
    m = re.fullmatch(r"opq(\d+)", factory)
    if not m:
        return factory
    n_bytes = int(m.group(1))
    width = n_bytes * math.ceil(head_dim / n_bytes)  # OPQ rotates into a width PQ can split
    return f"OPQ{n_bytes}_{width},PQ{n_bytes}"


class FaissCodec:
    """A FAISS standalone codec per (memory layer, keys|values); see the module docstring."""

    def __init__(self, layout: MemoryLayout, factory: str, rope_theta: float):
        self.layout, self.factory = layout, expand_factory(factory, layout.head_dim)
        self.rope_theta = rope_theta
        self._cos, self._sin = rotary_tables(layout.head_dim, layout.reference_len, rope_theta)
        try:
            self.codecs = [[faiss.index_factory(layout.head_dim, self.factory) for _ in range(2)]
                           for _ in range(layout.n_layers)]
        except RuntimeError as e:
            raise BankError(f"codec {factory!r} is not a FAISS factory string for "
                            f"{layout.head_dim}-dim vectors ({str(e).strip().splitlines()[-1]})"
                            ) from e
        for pair in self.codecs:
            for index in pair:
                _no_polysemous(index)
        self.code_size = self.codecs[0][0].sa_code_size()
        self.kv_bytes = layout.n_vectors * self.code_size
        self.trained = all(c.is_trained for pair in self.codecs for c in pair)

    @property
    def spec(self) -> dict[str, Any]:
        return {"codec": self.factory, "dtype": "codes", "kv_bytes": self.kv_bytes,
                "bytes_per_vector": self.code_size, "keys": "unrotated"}

    def _rotate_keys(self, kv: torch.Tensor, positions: torch.Tensor, sign: int) -> torch.Tensor:
        """kv (N, *kv_shape) float32 with keys rotated by rotary at `positions` (sign=1) or back
        (sign=-1); values unchanged."""
        pos = positions.to("cpu", torch.long)
        keys = apply_rotary(kv[:, :, 0], self._cos[pos], sign * self._sin[pos])
        return torch.stack([keys, kv[:, :, 1]], dim=2)

    def _coded_vectors(self, kv: torch.Tensor, positions: torch.Tensor) -> np.ndarray:
        """What the FAISS codecs see: float32 (N, *kv_shape), keys without rotary."""
        kv = kv.detach().to("cpu", torch.float32)
        return self._rotate_keys(kv, positions, -1).numpy()

    def train(self, kv: torch.Tensor, positions: torch.Tensor, seed: int = 0) -> None:
        """Train every codec on the occupied slots of a sample of memories (N, *kv_shape)."""
        occupied = (positions > 0).cpu().numpy()  # (N, layers, heads, top_k)
        rng = np.random.default_rng(seed)
        kv = self._coded_vectors(kv, positions)
        for layer, pair in enumerate(self.codecs):
            for kind, codec in enumerate(pair):
                vectors = kv[:, layer, kind][occupied[:, layer]]  # (occupied slots, D)
                if len(vectors) > TRAIN_VECTORS:
                    vectors = vectors[rng.choice(len(vectors), TRAIN_VECTORS, replace=False)]
                if len(vectors) == 0:
                    raise BankError("cannot train a memory codec: the sample memories have no "
                                    "occupied slots")
                try:
                    _fit_opq_rotation(codec, vectors)
                    codec.train(np.ascontiguousarray(vectors))
                except RuntimeError as e:
                    raise BankError(f"training codec {self.factory!r} on {len(vectors)} vectors "
                                    f"of layer {layer} failed (more training memories may "
                                    f"help): {str(e).strip().splitlines()[-1]}") from e
        self.trained = True

    def encode(self, kv: torch.Tensor, positions: torch.Tensor) -> np.ndarray:
        if not self.trained:
            raise BankError(f"codec {self.factory!r} is not trained")
        kv = self._coded_vectors(kv, positions)
        n = kv.shape[0]
        codes = np.empty((n, self.layout.n_layers, 2, self.layout.n_kv_heads, self.layout.top_k,
                          self.code_size), dtype=np.uint8)
        for layer, pair in enumerate(self.codecs):
            for kind, codec in enumerate(pair):
                vectors = np.ascontiguousarray(kv[:, layer, kind].reshape(-1, self.layout.head_dim))
                codes[:, layer, kind] = codec.sa_encode(vectors).reshape(n, *codes.shape[3:])
        return codes.reshape(n, -1)

    def decode(self, codes: np.ndarray, positions: torch.Tensor) -> torch.Tensor:
        n, lay = len(codes), self.layout
        codes = np.ascontiguousarray(codes).reshape(n, lay.n_layers, 2, -1, self.code_size)
        kv = np.empty((n, lay.n_layers, 2, lay.n_kv_heads * lay.top_k, lay.head_dim),
                      dtype=np.float32)
        for layer, pair in enumerate(self.codecs):
            for kind, codec in enumerate(pair):
                kv[:, layer, kind] = codec.sa_decode(
                    np.ascontiguousarray(codes[:, layer, kind]).reshape(-1, self.code_size)
                ).reshape(n, -1, lay.head_dim)
        return self._rotate_keys(torch.from_numpy(kv).reshape(n, *lay.kv_shape), positions, 1)

    def save(self, bank: Path) -> dict[str, Any]:
        """Write the trained codecs under bank/codec/ (atomically); return the manifest entry."""
        folder = bank / CODEC_DIR
        folder.mkdir(exist_ok=True)
        files = {}
        for layer, pair in enumerate(self.codecs):
            for kind, codec in enumerate(pair):
                name = f"layer{layer:03d}-{'kv'[kind]}.faiss"
                write_atomic(folder / name, faiss.serialize_index(codec).tobytes())
                files[name] = file_sha256(folder / name)
        return {**self.spec, "files": files}

    @classmethod
    def load(cls, bank: Path, layout: MemoryLayout, spec: dict[str, Any], rope_theta: float,
             verify: bool = True) -> "FaissCodec":
        codec = cls(layout, spec["codec"], rope_theta)
        for layer, pair in enumerate(codec.codecs):
            for kind in range(2):
                path = bank / CODEC_DIR / f"layer{layer:03d}-{'kv'[kind]}.faiss"
                if not path.is_file():
                    raise BankError(f"codec file {path} listed in {bank / 'manifest.json'} does "
                                    f"not exist")
                if verify and file_sha256(path) != spec["files"][path.name]:
                    raise BankError(f"codec file {path} does not match its sha256: it is corrupt")
                pair[kind] = faiss.deserialize_index(np.fromfile(path, dtype=np.uint8))
        codec.trained = True
        return codec


def _no_polysemous(index) -> None:
    """IndexPQ by default also reorders its codes for polysemous search, which only costs
    training time here (codes are decoded, never compared)."""
    index = faiss.downcast_index(index)
    if isinstance(index, faiss.IndexPreTransform):
        index = faiss.downcast_index(index.index)
    if isinstance(index, faiss.IndexPQ):
        index.do_polysemous_training = False


def _fit_opq_rotation(index, vectors: np.ndarray) -> None:
    """Set the OPQ rotation of an "OPQ<M>_<width>,..." chain in closed form (module docstring)."""
    index = faiss.downcast_index(index)
    if not isinstance(index, faiss.IndexPreTransform):
        return
    opq = faiss.downcast_VectorTransform(index.chain.at(0))
    if not isinstance(opq, faiss.OPQMatrix):
        return
    x = vectors.astype(np.float64)
    x -= x.mean(axis=0)
    variances, directions = np.linalg.eigh(x.T @ x / len(x))
    order = np.argsort(variances)[::-1]
    variances, directions = variances[order], directions[:, order]
    # Greedy balance of log-variance products, on a scale where every log is >= 0 so that adding
    # a direction never makes a sub-space look emptier than it is.
    logs = np.log(np.maximum(variances, 1e-12) / max(variances.min(), 1e-12))
    width = opq.d_out // opq.M
    filled, load = [[] for _ in range(opq.M)], np.zeros(opq.M)
    for j in range(len(variances)):
        b = min((b for b in range(opq.M) if len(filled[b]) < width), key=lambda b: load[b])
        filled[b].append(j)
        load[b] += logs[j]
    rotation = np.zeros((opq.d_out, opq.d_in), dtype=np.float32)  # rows past d_in stay zero
    for b, dims in enumerate(filled):
        for slot, j in enumerate(dims):
            rotation[b * width + slot] = directions[:, j]
    faiss.copy_array_to_vector(rotation.ravel(), opq.A)
    opq.is_trained = True
    opq.is_orthonormal = True  # orthonormal rows (plus zero rows): decoding applies A^T


Codec = RawCodec | FaissCodec


def make_codec(spec: str | None, layout: MemoryLayout, rope_theta: float = 10000.0) -> Codec:
    """"none"/"bf16" (default), "fp16", "fp32", or a FAISS factory string / "opq<M>" shorthand.
    rope_theta: the model's, to take rotary off the keys before coding them."""
    spec = spec or "none"
    if spec == "none":
        return RawCodec(layout, "bf16")
    if spec in RAW_DTYPES:
        return RawCodec(layout, spec)
    return FaissCodec(layout, spec, rope_theta)


def load_codec(bank: Path, layout: MemoryLayout, spec: dict[str, Any], rope_theta: float,
               verify: bool) -> Codec:
    """The codec a bank's manifest describes (an untrained FAISS codec if none is saved yet)."""
    if spec["codec"] == "none":
        return RawCodec(layout, spec["dtype"])
    if spec.get("files") is None:
        return FaissCodec(layout, spec["codec"], rope_theta)
    return FaissCodec.load(bank, layout, spec, rope_theta, verify)
