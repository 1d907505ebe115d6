"""`MemoryBank`: the store, codec, embedder and retrieval index of one bank folder, behind one API.

    bank = MemoryBank.open("bank")
    rows, scores = bank.retrieve(["text of a 64-token chunk", ...], k=5)   # (Q, k), -1 = none
    mem = bank.memories(rows, device="cuda", dtype=torch.bfloat16)       # kv (Q, k, L_mem, 2, G, K, D)
    bank.references(rows[0])                                            # provenance

Warm and cold memories (SPEC 1, "Retrieval"): `add(references, memories)` stores references with
their memories ("warm"); `add(references)` alone stores them indexed and retrievable but without
a memory ("cold"). With an encoder attached (`attach_encoder`), `memories()` encodes a cold row on
first use, returns it, and writes it back to the bank, so the bank grows as it is used.

Staleness: every memory record names the encoder (checkpoint) that made it. A memory made by
another encoder than the attached one is stale (`stale(rows)`); `reencode(rows)` encodes it again
and appends the new record, which supersedes the old. Stale memories are still served, since
re-encoding is a cost the caller decides on.

Reads go through an LRU cache of decoded memories (`cache_size` memories): neighbouring chunks
often retrieve the same references. Cold-start write-backs are buffered and committed every
`flush_every` memories, on `flush()`, `close()` and at the end of a `with` block.

One process writes a bank at a time (store.py's write.lock, taken on the first write); any number
may read it.
"""
from __future__ import annotations

import hashlib
import json
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from memory3.config import ModelConfig
from memory3.data.tokenizer import PAD_ID, REF_BOS_ID
from memory3.files import no_space_as
from memory3.memory.codec import Codec, FaissCodec, RawCodec, load_codec, make_codec
from memory3.memory.embedders import (Embedder, check_embedder, embedder_from_spec,
                                      make_embedder, unfitted)
from memory3.memory.encoder import EncodedMemories, MemoryEncoder
from memory3.memory.index import ReferenceIndex, choose_factory
from memory3.memory.references import Reference, pack_references
from memory3.memory.store import (MANIFEST_FILE, BankError, MemoryLayout, MemoryStore,
                                  SegmentData, key_bytes)

WRITER = "w"
INDEX_ADD_CHUNK = 100_000  # rows read from disk per step when (re)building the index


@dataclass(frozen=True)
class ReferenceRecord:
    """A bank row: the reference and where it came from, plus who encoded its memory."""
    row: int
    key: str
    doc_id: str
    start: int
    end: int
    text: str
    tokens: tuple[int, ...]
    encoder_id: str | None  # None: no memory yet (cold)


# Fields that change no memory: the preset's name is a label, the init scale is gone once there
# are weights, the longest sequence only sizes rotary tables (a warmup at 512 tokens and its
# continual run at 256 read the same bank), and how the context reads memories (its chunks, how
# many memories each, what it queries with) is the reader's choice.
_NOT_IN_MEMORIES = ("name", "init_std", "max_seq_len", "chunk_len", "memories_per_chunk",
                    "retrieval_query")


def _config_differences(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    return sorted(k for k in set(a) | set(b)
                  if k not in _NOT_IN_MEMORIES and a.get(k) != b.get(k))


def checkpoint_encoder(path: str | Path) -> dict[str, Any]:
    """The encoder record of a checkpoint: {"id", "checkpoint", "step"}.

    The id is the resolved checkpoint folder, its step, and a digest of its memory3.json plus the
    size, head and tail (1 MiB each) of its weight files (DeepSpeed's model states, or an exported
    folder's model.safetensors): cheap even for a 10 GB checkpoint, and different whenever the
    weights are (a retrained run saved at the same path and step included). A copy of the same
    checkpoint elsewhere gets another id, which only costs a re-encode.
    """
    from memory3.checkpoints import INFO_FILE, resolve

    ckpt_dir, tag = resolve(path)
    folder = (ckpt_dir / tag).resolve()
    info_bytes = (folder / INFO_FILE).read_bytes()
    digest = hashlib.sha256(info_bytes)
    for state in sorted([*folder.glob("*model_states.pt"), *folder.glob("*.safetensors")]):
        size = state.stat().st_size
        digest.update(f"{state.name}:{size}".encode())
        with open(state, "rb") as f:
            digest.update(f.read(1 << 20))
            f.seek(max(0, size - (1 << 20)))
            digest.update(f.read(1 << 20))
    step = json.loads(info_bytes)["step"]
    return {"id": f"{folder}@{step}:{digest.hexdigest()[:16]}", "checkpoint": str(folder),
            "step": step}


def checkpoint_encoder_id(path: str | Path) -> str:
    return checkpoint_encoder(path)["id"]


class MemoryBank:
    """See the module docstring. Make one with `create` or `open`."""

    def __init__(self, store: MemoryStore, codec: Codec, embedder: Embedder,
                 index: ReferenceIndex | None, *, cache_size: int, flush_every: int,
                 shard_dir: str | Path | None):
        self.store, self.codec, self.embedder = store, codec, embedder
        # Where new segments go (default BANK/shards): another disk, or a node's own mount.
        self.shard_dir = Path(shard_dir).absolute() if shard_dir is not None else None
        self.path, self.layout = store.path, store.layout
        self._index = index
        self._index_dirty = False
        self.cache_size, self.flush_every = cache_size, flush_every
        # Decoded memories, row -> (kv (L_mem, 2, G, K, D), positions (L_mem, G, K) long).
        self._cache: OrderedDict[int, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
        self.cache_hits = self.cache_misses = 0
        # Cold-start encodings not yet written: row -> (codes, positions, encoder index).
        self._pending: dict[int, tuple[np.ndarray, np.ndarray, int]] = {}
        self.encoder: MemoryEncoder | None = None
        self.encoder_id: str | None = None
        self._encoder_info: dict[str, Any] = {}
        self.encode_batch_size = 32
        # Decoded codec output is kept in bf16, what a raw bank holds: half the cache's RAM.
        self._kv_dtype = codec.dtype if isinstance(codec, RawCodec) else torch.bfloat16

    # -- making and opening ------------------------------------------------------------------
    @classmethod
    def create(cls, path: str | Path, model_cfg: ModelConfig, *,
               embedder: Embedder | str = "hashing:512", codec: str | None = None,
               index: str | None = None, tokenizer_sha256: str | None = None,
               min_relative_score: float = 0.0, cache_size: int = 4096, flush_every: int = 256,
               shard_dir: str | Path | None = None) -> "MemoryBank":
        """A new empty bank for memories of `model_cfg`'s shape.

        codec: None/"none" (bf16), "fp32", or a FAISS factory string / "opq<M>" (trained on the
        first memories added, or by `train_codec`). index: a FAISS factory string, or None to
        choose by size (index.py). shard_dir: where new segments are written (default
        BANK/shards; the manifest records other folders, absolute when outside the bank).
        min_relative_score: `retrieve` leaves out references scoring below this share of the
        query's best score (0: none left out).
        """
        if not 0.0 <= min_relative_score <= 1.0:
            raise BankError(f"min_relative_score must be from 0 to 1, got {min_relative_score}")
        if isinstance(embedder, str):
            embedder = make_embedder(embedder)
        if unfitted(embedder):
            raise BankError(f"{path}: the {embedder.spec['name']} embedder must be fitted on the "
                            f"knowledge base before a bank is made with it (build-bank does)")
        layout = MemoryLayout.from_model_config(model_cfg)
        if layout.n_layers == 0:
            raise BankError("the model has no memory layers (model.memory_layers is 'none')")
        codec_obj = make_codec(codec, layout, model_cfg.rope_theta)
        storage = codec_obj.spec
        if isinstance(codec_obj, FaissCodec):
            storage["files"] = None  # trained later
        save = getattr(embedder, "save", None)  # an embedder with state keeps it in the bank
        if save is not None and not (Path(path) / MANIFEST_FILE).exists():
            Path(path).mkdir(parents=True, exist_ok=True)
            with no_space_as(BankError, path):
                save(Path(path))
        header = {"model": model_cfg.to_dict(), "layout": layout.to_dict(), "storage": storage,
                  "embedder": embedder.spec, "index_factory": index,
                  "retrieval": {"min_relative_score": min_relative_score},
                  "tokenizer": {"sha256": tokenizer_sha256} if tokenizer_sha256 else None}
        store = MemoryStore.create(path, header)
        return cls(store, codec_obj, embedder, None, cache_size=cache_size,
                   flush_every=flush_every, shard_dir=shard_dir)

    @classmethod
    def open(cls, path: str | Path, *, embedder: Embedder | None = None, verify: str = "full",
             rebuild_index: bool = False, cache_size: int = 4096,
             flush_every: int = 256, shard_dir: str | Path | None = None) -> "MemoryBank":
        """Open a committed bank, checking its files (verify="full": sha256; "size": sizes only,
        then each row and memory against its checksum when it is read; store.py).

        `embedder` defaults to the one recorded in the bank; another one must have the same spec.
        A missing or corrupt index is an error unless rebuild_index=True, which rebuilds it from
        the stored embeddings (and saves it).
        """
        store = MemoryStore.open(path, verify=verify)
        manifest = store.manifest
        # Codec files are small and decode every memory: always hashed whole.
        codec = load_codec(store.path, store.layout, manifest["storage"],
                           manifest["model"]["rope_theta"], verify=True)
        if embedder is not None:
            check_embedder(embedder, manifest["embedder"])
        if embedder is None or unfitted(embedder):
            embedder = embedder_from_spec(manifest["embedder"], store.path)
        index = None
        if manifest["index"] is not None and not rebuild_index:
            index = ReferenceIndex.load(store.path, manifest["index"], verify)
        bank = cls(store, codec, embedder, index, cache_size=cache_size, flush_every=flush_every,
                   shard_dir=shard_dir)
        if rebuild_index:
            bank.rebuild_index()
        return bank

    def __enter__(self) -> "MemoryBank":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Commit pending write-backs and release the write lock."""
        if self._pending:
            self.flush()
        self.store.close()

    @property
    def manifest(self) -> dict[str, Any]:
        return self.store.manifest

    @property
    def model_config(self) -> ModelConfig:
        return ModelConfig.from_dict(self.manifest["model"])

    def __len__(self) -> int:
        return self.store.n_rows

    def check_model_config(self, cfg: ModelConfig, what: str = "the model") -> None:
        differ = _config_differences(cfg.to_dict(), self.manifest["model"])
        if differ:
            raise BankError(f"{what} has a different model config than the bank "
                            f"{self.path / 'manifest.json'} (fields: {', '.join(differ)}); its "
                            f"memories would not fit: use another bank folder")

    # -- retrieval ---------------------------------------------------------------------------
    @property
    def min_relative_score(self) -> float:
        return self.manifest.get("retrieval", {}).get("min_relative_score", 0.0)

    def retrieve(self, chunks: Sequence[str], k: int) -> tuple[np.ndarray, np.ndarray]:
        """The k most similar references of each text chunk: row ids (Q, k) int64 and cosine
        scores (Q, k) float32, best first. A row is -1 where the bank has fewer than k, or where
        its score is below the bank's min_relative_score times the query's best: a reference
        that matches a query much worse than the best one is most often about something else,
        and a model reads such a distractor's values as if they were the subject's
        (bench/RESULTS.md, quickstart)."""
        rows, scores = self.search(self.embedder.embed_queries(list(chunks)), k)
        if self.min_relative_score > 0:
            rows = np.where(scores >= self.min_relative_score * scores[:, :1], rows, -1)
        return rows, scores

    def search(self, vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """`retrieve` for query vectors made by the bank's embedder."""
        vectors = np.asarray(vectors, dtype=np.float32)
        if vectors.ndim != 2 or vectors.shape[1] != self.store.embedding_dim:
            raise BankError(f"query vectors must be (Q, {self.store.embedding_dim}), got "
                            f"{vectors.shape}")
        self._sync_index()
        if self._index is None:  # an empty bank
            return (np.full((len(vectors), k), -1, dtype=np.int64),
                    np.full((len(vectors), k), -np.inf, dtype=np.float32))
        scores, ids = self._index.search(vectors, k)
        return ids, scores

    def _sync_index(self) -> None:
        """Bring the in-RAM index up to the bank's rows: rows added since it was saved (or all
        rows, for a bank without one) are added from their stored embeddings."""
        n = self.store.n_rows
        auto = self.manifest["index_factory"] is None
        if self._index is not None and auto and choose_factory(n)[0] != self._index.factory:
            self._index = None  # the bank outgrew its kind of index (at most twice in its life)
        if self._index is None:
            if n == 0:
                return
            index = ReferenceIndex.new(self.store.embedding_dim, n, self.manifest["index_factory"])
            if not index.is_trained:
                sample = np.random.default_rng(0).choice(n, min(n, 1 << 20), replace=False)
                index.train(self.store.embeddings_at(np.sort(sample)))
            self._index = index
            self._index_dirty = True
        for start in range(self._index.ntotal, n, INDEX_ADD_CHUNK):
            stop = min(n, start + INDEX_ADD_CHUNK)
            self._index.add(self.store.embeddings(start, stop), np.arange(start, stop))
            self._index_dirty = True

    def rebuild_index(self, factory: str | None = None) -> None:
        """Build the index afresh from the stored embeddings, save and commit it. `factory`: a
        FAISS factory string to use from now on; None keeps the bank's choice (by size unless
        one was given)."""
        if factory is not None:
            self.manifest["index_factory"] = factory
        self._index = None
        self._sync_index()
        self.commit()

    # -- memories ----------------------------------------------------------------------------
    def memories(self, row_ids: np.ndarray | Sequence[int] | torch.Tensor,
                 device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> EncodedMemories:
        """Decoded memories of row ids of any shape S: kv S + (L_mem, 2, G, K, D), positions
        S + (L_mem, G, K). Id -1 gives an all-empty memory (zero kv, positions 0 = masked).
        Cold rows are encoded by the attached encoder (an error without one)."""
        if isinstance(row_ids, torch.Tensor):
            row_ids = row_ids.cpu().numpy()
        ids = np.asarray(row_ids, dtype=np.int64)
        flat = ids.reshape(-1)
        valid = flat >= 0
        rows, inverse = np.unique(flat[valid], return_inverse=True)
        kv, positions = self._memories_of(rows)
        out_kv = torch.zeros((len(flat), *self.layout.kv_shape), dtype=kv.dtype)
        out_pos = torch.zeros((len(flat), *self.layout.positions_shape), dtype=torch.long)
        where = torch.from_numpy(np.flatnonzero(valid))
        out_kv[where] = kv[torch.from_numpy(inverse)]
        out_pos[where] = positions[torch.from_numpy(inverse)]
        memories = EncodedMemories(out_kv.reshape(*ids.shape, *self.layout.kv_shape),
                                   out_pos.reshape(*ids.shape, *self.layout.positions_shape))
        return memories.to(device, dtype)

    def _memories_of(self, rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """kv (n, *kv_shape) and positions (n, ...) long of distinct valid rows: from the cache,
        the pending write-backs, the store, or (cold rows) the attached encoder."""
        self.store._check_rows(rows)
        found: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        for r in map(int, rows):
            if r in self._cache:
                found[r] = self._cache[r]
                self._cache.move_to_end(r)
        todo = np.array([r for r in rows if int(r) not in found], dtype=np.int64)
        self.cache_hits += len(found)
        self.cache_misses += len(todo)
        if len(todo):
            cold = self.missing(todo)
            if cold.any():
                self._encode_cold(todo[cold])  # may flush: then they are stored, not pending
            pending = np.array([int(r) in self._pending for r in todo], dtype=bool)
            stored = todo[~pending]
            parts = []
            if len(stored):
                parts.append((stored, *self.store.read_memories(stored)))
            if pending.any():
                waiting = [self._pending[int(r)] for r in todo[pending]]
                parts.append((todo[pending], np.stack([w[0] for w in waiting]),
                              np.stack([w[1] for w in waiting])))
            for part, codes, positions in parts:
                kv, pos = self._decode(codes, positions)
                for i, r in enumerate(map(int, part)):
                    found[r] = (kv[i], pos[i])
                    self._remember(r, found[r])
        if not len(rows):
            return (torch.zeros((0, *self.layout.kv_shape), dtype=self._kv_dtype),
                    torch.zeros((0, *self.layout.positions_shape), dtype=torch.long))
        return (torch.stack([found[int(r)][0] for r in rows]),
                torch.stack([found[int(r)][1] for r in rows]))

    def _decode(self, codes: np.ndarray, positions: np.ndarray) -> tuple[torch.Tensor,
                                                                         torch.Tensor]:
        pos = torch.from_numpy(positions.astype(np.int64))
        kv = self.codec.decode(codes, pos).to(self._kv_dtype)
        # Codecs do not reproduce zero vectors: empty slots are zeroed, never garbage.
        return kv.masked_fill((pos == 0)[:, :, None, :, :, None], 0), pos

    def _remember(self, row: int, value: tuple[torch.Tensor, torch.Tensor]) -> None:
        if self.cache_size <= 0:
            return
        self._cache[row] = value
        self._cache.move_to_end(row)
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)

    # -- encoders, cold start and staleness --------------------------------------------------
    def attach_encoder(self, encoder: MemoryEncoder, encoder_id: str,
                       info: dict[str, Any] | None = None, *, batch_size: int = 32) -> None:
        """Use `encoder` (its model in eval mode) for cold rows and `reencode`; its memories are
        recorded as made by `encoder_id` (see checkpoint_encoder_id)."""
        self.check_model_config(encoder.model.cfg, "the encoder's model")
        self.encoder, self.encoder_id = encoder, encoder_id
        self._encoder_info = dict(info or {})
        self.encode_batch_size = batch_size

    def _encoder_index(self, encoder_id: str, info: dict[str, Any] | None = None) -> int:
        return self.store.encoder_index({"id": encoder_id, **(info or {})})

    def encode_references(self, tokens: Sequence[Sequence[int]]) -> EncodedMemories:
        """Encode token lists (no reference-BOS) with the attached encoder, in batches."""
        if self.encoder is None:
            raise BankError("no encoder attached: call bank.attach_encoder(encoder, encoder_id)")
        parts = []
        for i in range(0, len(tokens), self.encode_batch_size):
            packed, lengths = pack_references(tokens[i:i + self.encode_batch_size],
                                              ref_bos_id=REF_BOS_ID, pad_id=PAD_ID,
                                              reference_len=self.layout.reference_len)
            device = self.encoder.model.embed.weight.device
            parts.append(self.encoder.encode(packed.to(device), lengths.to(device)).to("cpu"))
        return EncodedMemories(torch.cat([p.kv for p in parts]),
                               torch.cat([p.positions for p in parts]))

    def _encode_cold(self, rows: np.ndarray) -> None:
        if self.encoder is None:
            raise BankError(f"rows {rows[:8].tolist()} of {self.path} have no memory yet (cold): "
                            f"attach an encoder with bank.attach_encoder(...) to encode them on "
                            f"first use")
        refs = self.store.references(rows)
        encoded = self.encode_references([r["tokens"] for r in refs])
        self._ensure_codec_trained(encoded)
        codes = self.codec.encode(encoded.kv, encoded.positions)
        positions = encoded.positions.numpy().astype(self.layout.positions_dtype)
        enc = self._encoder_index(self.encoder_id, self._encoder_info)
        for i, r in enumerate(rows):
            self._pending[int(r)] = (codes[i], positions[i], enc)
        if len(self._pending) >= self.flush_every:
            self.flush()

    def flush(self) -> None:
        """Write pending cold-start memories as a segment and commit."""
        if not self._pending:
            return
        rows = np.array(sorted(self._pending), dtype=np.int64)
        waiting = [self._pending[int(r)] for r in rows]
        self._append_memories(rows, np.stack([w[0] for w in waiting]),
                              np.stack([w[1] for w in waiting]),
                              np.array([w[2] for w in waiting], dtype=np.int32))
        self._pending.clear()
        self.commit(save_index=False)

    def put_memories(self, row_ids: np.ndarray | Sequence[int], memories: EncodedMemories,
                     encoder_id: str, info: dict[str, Any] | None = None) -> None:
        """Store memories (N, ...) for existing rows (N,), made by `encoder_id` (`info` is kept
        in the bank's encoder table), superseding what the rows had; commit."""
        rows = np.asarray(row_ids, dtype=np.int64).reshape(-1)
        if len(rows) != len(memories):
            raise BankError(f"put_memories(): {len(rows)} rows but {len(memories)} memories")
        if len(np.unique(rows)) != len(rows):
            raise BankError("put_memories(): a row is given twice")
        self.store._check_rows(rows)
        self._ensure_codec_trained(memories)
        enc = self._encoder_index(encoder_id, info)
        self._append_memories(rows, self.codec.encode(memories.kv, memories.positions),
                              memories.positions.cpu().numpy(),
                              np.full(len(rows), enc, dtype=np.int32))
        self.commit(save_index=False)

    def _append_memories(self, rows: np.ndarray, codes: np.ndarray, positions: np.ndarray,
                         encoders: np.ndarray) -> None:
        """Write memories of existing rows as a segment and add it (uncommitted)."""
        self.store.lock()
        keys = [r["key"] for r in self.store.references(rows)]
        entry = self.store.write_segment(SegmentData(
            references=[], embeddings=None, memory_rows=rows, kv_codes=codes,
            positions=positions, encoders=encoders, memory_keys=keys),
            name=self.store.next_segment_name(WRITER), folder=self.shard_dir)
        self.store.append(entry)
        for r in map(int, rows):  # superseded
            self._cache.pop(r, None)
            self._pending.pop(r, None)

    def missing(self, row_ids: np.ndarray | Sequence[int]) -> np.ndarray:
        """Bool per row id: no memory yet (cold, and not encoded since)."""
        ids = np.asarray(row_ids, dtype=np.int64)
        pending = np.isin(ids, np.fromiter(self._pending, dtype=np.int64, count=len(self._pending)))
        return (self.store.memory_encoders(ids) < 0) & ~pending

    def stale(self, row_ids: np.ndarray | Sequence[int], encoder_id: str | None = None
              ) -> np.ndarray:
        """Bool per row id: its memory was made by another encoder than `encoder_id` (default:
        the attached one). Rows without a memory are not stale, they are `missing`."""
        encoder_id = encoder_id or self.encoder_id
        if encoder_id is None:
            raise BankError("stale(): attach an encoder or pass the encoder_id to compare with")
        ids = np.asarray(row_ids, dtype=np.int64)
        known = [e["id"] for e in self.manifest["encoders"]]
        current = known.index(encoder_id) if encoder_id in known else -2
        encoders = self.store.memory_encoders(ids)
        pending = np.isin(ids, np.fromiter(self._pending, dtype=np.int64, count=len(self._pending)))
        return (encoders >= 0) & (encoders != current) & ~pending

    def reencode(self, row_ids: np.ndarray | Sequence[int] | None = None, *,
                 shard_memories: int = 1024) -> int:
        """Encode rows again with the attached encoder (default: every stale row), append the new
        memories and commit; return how many were encoded."""
        if self.encoder is None:
            raise BankError("reencode(): no encoder attached")
        if row_ids is None:
            all_rows = np.arange(len(self))
            rows = all_rows[self.stale(all_rows)]
        else:
            rows = np.unique(np.asarray(row_ids, dtype=np.int64))
        for start in range(0, len(rows), shard_memories):
            part = rows[start:start + shard_memories]
            encoded = self.encode_references([r["tokens"] for r in self.store.references(part)])
            self.put_memories(part, encoded, self.encoder_id, self._encoder_info)
        return len(rows)

    # -- growing -----------------------------------------------------------------------------
    def train_codec(self, memories: EncodedMemories) -> None:
        """Train a FAISS codec on sample memories, save it and commit (before any memory is
        stored: codes from another training would not decode)."""
        if not isinstance(self.codec, FaissCodec):
            return
        if self.manifest["memories"]:
            raise BankError(f"the codec of {self.path} is trained already")
        self.codec.train(memories.kv, memories.positions)
        self.store.lock()
        with no_space_as(BankError, self.path):
            self.manifest["storage"] = self.codec.save(self.path)
        self.commit(save_index=False)

    def _ensure_codec_trained(self, memories: EncodedMemories) -> None:
        if not self.codec.trained:
            self.train_codec(memories)

    def add(self, references: Sequence[Reference], memories: EncodedMemories | None = None,
            encoder_id: str | None = None, *, embeddings: np.ndarray | None = None,
            commit: bool = True) -> np.ndarray:
        """Add references (with their memories, or cold without) and return their row ids.

        A reference whose key the bank already holds is not added again: its existing row id is
        returned (and a memory given for it is ignored). `encoder_id` names who encoded the
        memories (default: the attached encoder). With commit=False the segment is written but
        only a later `commit()` makes it part of the bank.
        """
        self.store.lock()
        entry, existing, local = self.write_references(references, memories, encoder_id,
                                                       embeddings=embeddings)
        if entry is None:
            return existing
        first_row = len(self)
        self.store.append(entry)
        if commit:
            self.commit()
        return np.where(existing >= 0, existing, first_row + local)

    def write_references(self, references: Sequence[Reference],
                         memories: EncodedMemories | None = None, encoder_id: str | None = None,
                         *, embeddings: np.ndarray | None = None, name: str | None = None,
                         skip_keys: set[bytes] | frozenset[bytes] = frozenset()
                         ) -> tuple[dict[str, Any] | None, np.ndarray, np.ndarray]:
        """Write the new references (and memories) as a segment with rows relative to itself,
        without adding it to the bank; see `add`. For the ranks of a multi-rank build, which
        hand the entry to the committing rank. Returns (manifest entry or None if nothing is new,
        existing row id per reference or -1, row within the segment per reference or -1)."""
        if memories is not None and len(memories) != len(references):
            raise BankError(f"add(): {len(references)} references but {len(memories)} memories")
        if memories is not None and encoder_id is None:
            encoder_id = self.encoder_id
            if encoder_id is None:
                raise BankError("add(): memories need an encoder_id (or an attached encoder)")
        keys = self.store.keys
        existing = np.full(len(references), -1, dtype=np.int64)
        local = np.full(len(references), -1, dtype=np.int64)
        new: list[int] = []  # indices into `references` of the ones to write
        seen: dict[bytes, int] = {}
        for i, ref in enumerate(references):
            k = key_bytes(ref.key)
            if k in keys:
                existing[i] = keys[k]
            elif k in skip_keys:
                continue
            else:
                if k not in seen:
                    seen[k] = len(new)
                    new.append(i)
                local[i] = seen[k]
        if not new:
            return None, existing, local
        new_refs = [references[i] for i in new]
        if embeddings is None:
            embeddings = self.embedder.embed([r.text for r in new_refs])
        else:
            embeddings = np.asarray(embeddings)[new]
        data = SegmentData(
            references=[{"key": r.key, "doc_id": r.doc_id, "start": r.start, "end": r.end,
                         "text": r.text, "tokens": list(r.tokens)} for r in new_refs],
            embeddings=embeddings, memory_rows=None, kv_codes=None, positions=None, encoders=None)
        if memories is not None:
            chosen = memories[new]
            self._ensure_codec_trained(chosen)
            data.memory_rows = np.arange(len(new), dtype=np.int64)
            data.kv_codes = self.codec.encode(chosen.kv, chosen.positions)
            data.positions = chosen.positions.cpu().numpy()
            data.encoders = np.full(len(new), self._encoder_index(encoder_id), dtype=np.int32)
            data.memory_keys = [r.key for r in new_refs]
        entry = self.store.write_segment(data, name=name or self.store.next_segment_name(WRITER),
                                         folder=self.shard_dir, rows_relative=True)
        return entry, existing, local

    def commit(self, save_index: bool = True) -> None:
        """Commit the manifest (and, with save_index, the index first, brought up to date)."""
        self.store.lock()
        old_index = (self.manifest["index"] or {}).get("file")
        if save_index:
            self._sync_index()
            if self._index is not None and self._index_dirty:
                with no_space_as(BankError, self.path):  # the committed index stays
                    self.manifest["index"] = self._index.save(self.path)
                self._index_dirty = False
        self.store.commit()
        new_index = (self.manifest["index"] or {}).get("file")
        if old_index and old_index != new_index:
            (self.path / old_index).unlink(missing_ok=True)

    # -- provenance and stats ----------------------------------------------------------------
    def references(self, row_ids: np.ndarray | Sequence[int]) -> list[ReferenceRecord | None]:
        """Provenance of each row id (None for -1): key, document, token offsets, text, and the
        encoder of its memory."""
        ids = np.asarray(row_ids, dtype=np.int64).reshape(-1)
        valid = ids[ids >= 0]
        records = iter(self.store.references(valid))
        encoders = iter(self.store.memory_encoders(valid))
        table = self.manifest["encoders"]
        out: list[ReferenceRecord | None] = []
        for r in ids:
            if r < 0:
                out.append(None)
                continue
            ref, enc = next(records), int(next(encoders))
            if int(r) in self._pending:
                enc = self._pending[int(r)][2]
            out.append(ReferenceRecord(int(r), ref["key"], ref["doc_id"], ref["start"],
                                       ref["end"], ref["text"], tuple(ref["tokens"]),
                                       table[enc]["id"] if enc >= 0 else None))
        return out

    def stats(self) -> dict[str, Any]:
        encoders = self.store.memory_encoders(np.arange(len(self)))
        counts = np.bincount(encoders[encoders >= 0], minlength=len(self.manifest["encoders"]))
        kv_bytes = self.codec.kv_bytes
        out = {"rows": len(self), "memories": int((encoders >= 0).sum()),
               "cold": int((encoders < 0).sum()), "memory_records": self.store.n_memory_records,
               "kv_bytes_per_memory": kv_bytes,
               # + the .rec record (32 bytes) and its .memsum checksums (12 bytes)
               "record_bytes_per_memory": kv_bytes + self.layout.positions_bytes + 32 + 12,
               "codec": self.manifest["storage"]["codec"],
               "dtype": self.manifest["storage"]["dtype"],
               "embedder": {k: self.manifest["embedder"][k] for k in ("name", "params", "dim")},
               "index": None if self._index is None else {"factory": self._index.factory,
                                                          "rows": self._index.ntotal},
               "segments": len(self.manifest["segments"]),
               "disk_bytes": self.store.file_bytes(),
               "cache": {"size": len(self._cache), "capacity": self.cache_size,
                         "hits": self.cache_hits, "misses": self.cache_misses},
               "encoders": [{"id": e["id"], "memories": int(c)}
                            for e, c in zip(self.manifest["encoders"], counts)]}
        if self.encoder_id is not None:
            out["stale"] = int(self.stale(np.arange(len(self))).sum())
        return out
