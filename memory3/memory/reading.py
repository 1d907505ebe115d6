"""From token sequences to the memories each chunk reads: shared by training, evaluation and
generation so the three see memories the same way.

Causal retrieval (SPEC 1b): when text is being predicted, the memories of chunk c are retrieved
with the text of chunk c-1 as the query, never with chunk c itself (that would look at the answer);
chunk 0 reads none. `own_chunk=True` queries with the chunk's own text: for a prompt (known text),
or as a clearly labelled upper bound in evaluation. Retrieved references that copy the sequence
being predicted (overlap.py) are skipped in favour of the next candidates.
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
                        own_chunk: bool = False) -> np.ndarray:
    """Row ids (B, C, k) of the references each chunk of sequences (B, T) reads; -1 = none."""
    B, T = sequences.shape
    C = -(-T // chunk_len)
    rows = np.full((B, C, k), -1, dtype=np.int64)
    queries, where = [], []
    for b in range(B):
        texts = chunk_texts(sequences[b].tolist(), tokenizer, chunk_len)
        for c in range(C):
            q = c if own_chunk else c - 1
            if q >= 0:
                queries.append(texts[q])
                where.append((b, c))
    if not queries:
        return rows
    candidates, _ = bank.retrieve(queries, k + extra_candidates)
    for (b, c), cand in zip(where, candidates):
        kept = filter_overlapping(bank, cand, sequences[b].tolist(), k, overlap_threshold)
        rows[b, c, :len(kept)] = kept
    return rows


def encode_rows(encoder, bank, rows: np.ndarray, *, grad: bool = False,
                batch_size: int = 64) -> EncodedMemories:
    """Memories of rows (any shape, -1 = none) encoded now by `encoder` from the references'
    tokens, ignoring what the bank stores: real-time encoding with the current weights."""
    flat = np.asarray(rows, dtype=np.int64).reshape(-1)
    unique, inverse = np.unique(flat[flat >= 0], return_inverse=True)
    layout = bank.layout
    device = encoder.model.embed.weight.device
    kv = torch.zeros(len(flat), *layout.kv_shape, device=device,
                     dtype=encoder.model.embed.weight.dtype)
    positions = torch.zeros(len(flat), *layout.positions_shape, dtype=torch.long, device=device)
    if len(unique):
        records = bank.references(unique)
        parts = []
        for i in range(0, len(records), batch_size):
            tokens, lengths = pack_references([r.tokens for r in records[i:i + batch_size]],
                                              ref_bos_id=encoder.ref_bos_id, pad_id=PAD_ID,
                                              reference_len=layout.reference_len)
            parts.append(encoder.encode(tokens.to(device), lengths.to(device), grad=grad))
        where = torch.from_numpy(np.flatnonzero(flat >= 0)).to(device)
        pick = torch.from_numpy(inverse).to(device)
        kv = kv.index_put((where,), torch.cat([p.kv for p in parts])[pick].to(kv.dtype))
        positions[where] = torch.cat([p.positions for p in parts])[pick]
    shape = np.shape(rows)
    return EncodedMemories(kv.reshape(*shape, *layout.kv_shape),
                           positions.reshape(*shape, *layout.positions_shape))


def chunk_memories(bank, rows: np.ndarray, sink: torch.Tensor | None, *, first_chunk: int = 0,
                   device: torch.device | str | None = None, dtype: torch.dtype | None = None,
                   encoder=None) -> ChunkMemories:
    """Memories of rows (B, C, M), ready for `model(..., memory=...)`: as stored in the bank, or
    encoded now by `encoder` (for a model whose weights differ from those that filled the bank)."""
    encoded = (bank.memories(rows, device=device, dtype=dtype) if encoder is None
               else encode_rows(encoder, bank, rows).to(device, dtype))
    kv, valid = compact_slots(encoded.kv, encoded.positions)
    return ChunkMemories(kv=kv, valid=valid, sink=sink, first_chunk=first_chunk)
