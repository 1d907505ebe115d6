"""From token sequences to the memories each chunk reads: shared by training, evaluation and
generation so the three see memories the same way.

Causal retrieval (SPEC 1b): when text is being predicted, the memories of chunk c are retrieved
with the query that the text up to the end of chunk c-1 makes (chunk_queries: that chunk's text, or
the head of the document under way), never with chunk c's (that would look at the answer); chunk 0
reads none. `own_chunk=True` takes chunk c's own query: for a prompt (known text), or as a clearly
labelled upper bound in evaluation. Retrieved references that copy the sequence being predicted
(overlap.py) are skipped in favour of the next candidates.
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import numpy as np
import torch

from memory3.data.tokenizer import PAD_ID
from memory3.memory.encoder import EncodedMemories
from memory3.memory.overlap import exceeds
from memory3.memory.references import pack_references
from memory3.model import ChunkMemories, compact_slots


def chunk_texts(tokens: Sequence[int], tokenizer, chunk_len: int) -> list[str]:
    return [tokenizer.decode(list(tokens[i:i + chunk_len]))
            for i in range(0, len(tokens), chunk_len)]


def chunk_queries(tokens: Sequence[int], tokenizer, chunk_len: int, rule: str = "chunk"
                  ) -> list[str | None]:
    """Entry c: the query known once chunk c of `tokens` is complete (so chunk c + 1's, causally).

    rule "chunk": the chunk's own text. rule "document": the first chunk_len tokens of the
    document under way at the chunk's end (it starts after the last BOS or EOS; at the sequence's
    start if there is none), so a whole document retrieves with its head; None where that document
    has no text yet (the chunk ended with EOS): nothing of it is known to retrieve with.
    """
    if rule == "chunk":
        return chunk_texts(tokens, tokenizer, chunk_len)
    if rule != "document":
        raise ValueError(f"unknown retrieval query rule {rule!r}")
    tokens = [int(t) for t in tokens]
    boundaries = (tokenizer.bos_id, tokenizer.eos_id)
    queries, start = [], 0
    for lo in range(0, len(tokens), chunk_len):
        hi = min(lo + chunk_len, len(tokens))
        for p in range(lo, hi):
            if tokens[p] in boundaries:
                start = p + 1
        queries.append(tokenizer.decode(tokens[start:min(start + chunk_len, hi)]) or None)
    return queries


def retrieve_queries(bank, queries: Sequence[str | None], k: int) -> np.ndarray:
    """Rows (Q, k) the bank retrieves for each query, best first; all -1 for a None query
    (chunk_queries: nothing known to retrieve with), which the bank is not asked."""
    rows = np.full((len(queries), k), -1, dtype=np.int64)
    asked = [i for i, q in enumerate(queries) if q is not None]
    if asked:
        rows[asked] = bank.retrieve([queries[i] for i in asked], k)[0]
    return rows


def filter_overlapping(bank, candidates: np.ndarray, sequence: Sequence[int], k: int,
                       threshold: float | None, exclude: set[int] = frozenset()) -> list[int]:
    """The first k candidate rows (best first) not in `exclude` whose reference does not overlap
    `sequence` by more than `threshold`; fewer if the candidates run out."""
    rows = [int(r) for r in candidates if r >= 0 and int(r) not in exclude]
    if threshold is None:
        return rows[:k]
    counts = Counter(sequence)
    kept = []
    for row, record in zip(rows, bank.references(rows)):
        if not exceeds(record.tokens, sequence, threshold, counts):
            kept.append(row)
            if len(kept) == k:
                break
    return kept


def retrieve_for_chunks(bank, tokenizer, sequences: torch.Tensor, *, chunk_len: int, k: int,
                        overlap_threshold: float | None, extra_candidates: int = 5,
                        own_chunk: bool = False, query: str = "chunk") -> np.ndarray:
    """Row ids (B, C, k) of the references each chunk of sequences (B, T) reads; -1 = none.
    query: the chunk_queries rule."""
    B, T = sequences.shape
    C = -(-T // chunk_len)
    rows = np.full((B, C, k), -1, dtype=np.int64)
    queries, where = [], []
    for b in range(B):
        texts = chunk_queries(sequences[b].tolist(), tokenizer, chunk_len, query)
        for c in range(C):
            q = c if own_chunk else c - 1
            if q >= 0 and texts[q] is not None:
                queries.append(texts[q])
                where.append((b, c))
    if not queries:
        return rows
    candidates, _ = bank.retrieve(queries, k + extra_candidates)
    for (b, c), cand in zip(where, candidates):
        kept = filter_overlapping(bank, cand, sequences[b].tolist(), k, overlap_threshold)
        rows[b, c, :len(kept)] = kept
    return rows


def encode_distinct(encoder, bank, rows: np.ndarray, *, grad: str = "none",
                    batch_size: int = 64) -> tuple[np.ndarray, np.ndarray, EncodedMemories]:
    """Each distinct row of rows (any shape, -1 = none) encoded once, now, by `encoder` from the
    references' tokens, ignoring what the bank stores: real-time encoding with the current weights.

    Returns (distinct rows (U,) ascending, index (rows' shape) into them with -1 kept,
    memories (U, ...)).
    """
    flat = np.asarray(rows, dtype=np.int64).reshape(-1)
    distinct, inverse = np.unique(flat[flat >= 0], return_inverse=True)
    index = np.full(flat.shape, -1, dtype=np.int64)
    index[flat >= 0] = inverse
    layout = bank.layout
    weight = encoder.model.embed.weight
    if not len(distinct):
        return distinct, index.reshape(np.shape(rows)), EncodedMemories(
            torch.zeros(0, *layout.kv_shape, device=weight.device, dtype=weight.dtype),
            torch.zeros(0, *layout.positions_shape, dtype=torch.long, device=weight.device))
    records = bank.references(distinct)
    parts = []
    for i in range(0, len(records), batch_size):
        tokens, lengths = pack_references([r.tokens for r in records[i:i + batch_size]],
                                          ref_bos_id=encoder.ref_bos_id, pad_id=PAD_ID,
                                          reference_len=layout.reference_len)
        parts.append(encoder.encode(tokens.to(weight.device), lengths.to(weight.device),
                                    grad=grad))
    memories = parts[0] if len(parts) == 1 else EncodedMemories(
        torch.cat([p.kv for p in parts]), torch.cat([p.positions for p in parts]))
    return distinct, index.reshape(np.shape(rows)), memories


def _with_empty(x: torch.Tensor, index: np.ndarray) -> torch.Tensor:
    """x (U, ...) indexed by index (any shape, -1 = an all-zero entry) -> index.shape + (...)."""
    padded = torch.cat([x, x.new_zeros(1, *x.shape[1:])])
    where = torch.from_numpy(np.where(index >= 0, index, len(x))).to(x.device)
    return padded[where]


def encode_rows(encoder, bank, rows: np.ndarray, *, grad: str = "none",
                batch_size: int = 64) -> EncodedMemories:
    """`encode_distinct`'s memories laid out as rows: kv rows.shape + (L_mem, 2, G, K, D),
    positions rows.shape + (L_mem, G, K); -1 gives an all-empty memory."""
    _, index, memories = encode_distinct(encoder, bank, rows, grad=grad, batch_size=batch_size)
    return EncodedMemories(_with_empty(memories.kv, index), _with_empty(memories.positions, index))


def read_distinct(memories: EncodedMemories, index: np.ndarray, sink: torch.Tensor | None, *,
                  first_chunk: int = 0) -> ChunkMemories:
    """ChunkMemories for index (B, C, M) into distinct memories (U, ...), -1 = none.

    Slots are compacted per distinct memory, before the expansion to (B, C, M) that repeats each
    one up to M times; compaction is per memory, so the result equals compacting after it.
    """
    kv, valid = compact_slots(memories.kv, memories.positions)
    return ChunkMemories(kv=_with_empty(kv, index), valid=_with_empty(valid, index), sink=sink,
                         first_chunk=first_chunk)


def sink_only(sink: torch.Tensor, tokens: torch.Tensor, cfg) -> ChunkMemories:
    """What every chunk of tokens (B, T) reads when retrieval finds nothing: the reference-BOS
    sink alone.

    A model trained with memory reads the sink in every layer of every forward, so this, not
    `memory=None`, is that model without memory: scoring it without the sink puts it off the
    distribution it was trained on and credits the sink to the references (bench/RESULTS.md,
    quickstart: a memory/none of 0.954 was 0.998 against the sink alone)."""
    B, C = tokens.shape[0], -(-tokens.shape[1] // cfg.chunk_len)
    G, K, D = cfg.n_kv_heads, cfg.memory_top_k, cfg.head_dim
    kv = sink.new_zeros(B, C, 0, len(cfg.memory_layer_ids), 2, G, K, D)
    valid = torch.zeros(B, C, 0, K, dtype=torch.bool, device=sink.device)
    return ChunkMemories(kv=kv, valid=valid, sink=sink)


def chunk_memories(bank, rows: np.ndarray, sink: torch.Tensor | None, *, first_chunk: int = 0,
                   device: torch.device | str | None = None, dtype: torch.dtype | None = None,
                   encoder=None) -> ChunkMemories:
    """Memories of rows (B, C, M), ready for `model(..., memory=...)`: as stored in the bank, or
    encoded now by `encoder` (for a model whose weights differ from those that filled the bank)."""
    if encoder is None:
        encoded = bank.memories(rows, device=device, dtype=dtype)
        kv, valid = compact_slots(encoded.kv, encoded.positions)
        return ChunkMemories(kv=kv, valid=valid, sink=sink, first_chunk=first_chunk)
    _, index, encoded = encode_distinct(encoder, bank, rows)
    return read_distinct(encoded.to(device, dtype), index, sink, first_chunk=first_chunk)
