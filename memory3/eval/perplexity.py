"""Perplexity of held-out text without memory, with memory, and with the same references as text.

Modes (all score exactly the same target tokens of the same sequences):
  none     the model alone: no references. A model trained with memory (`reads_sink`) reads its
           reference-BOS sink alone, as it does wherever retrieval finds nothing, so that none
           and memory differ only by the references read (reading.sink_only).
  memory   each chunk reads the memories of the references retrieved with the previous chunk's
           text, or the head of the document under way (model.retrieval_query; causal retrieval,
           SPEC 1b); references overlapping the evaluated sequence by more than 2/3 are skipped.
           The headline number.
  rag      the same references as `memory` (same queries, same filter), given as plain text in
           front of the chunk's context instead of as memories: the two differ only in how the
           references are read. One forward per chunk, so it shows what text retrieval costs.
  memory_own_chunk  an upper bound, clearly not causal: each chunk's own query (its text, or its
           document's head as of its end).
"""
from __future__ import annotations

import math
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from memory3.data import DataError, Tokenizer, iter_documents, require_documents
from memory3.data.text import Glob, ReadStats
from memory3.memory.encoder import MemoryEncoder
from memory3.memory.overlap import EVAL_OVERLAP
from memory3.generate import rag_inputs, rag_references
from memory3.memory.reading import chunk_memories, retrieve_for_chunks, sink_only
from memory3.model import Transformer

MODES = ("none", "memory", "rag", "memory_own_chunk")


def text_sequences(paths: Sequence[str | Path], tokenizer: Tokenizer, seq_len: int, *,
                   max_sequences: int | None = None, text_field: str = "text",
                   glob: Glob = None, context: int = 0) -> torch.Tensor:
    """Documents of the inputs (memory3.data.text) as [BOS] doc [EOS] ..., cut into
    (N, seq_len + 1) rows: back to back, or, with `context`, each starting `seq_len - context`
    tokens after the one before, so that scoring every row's targets from position `context`
    (`evaluate(..., context=)`) scores each token once, after at least `context` tokens of its
    text (sliding-window perplexity)."""
    if not 0 <= context < seq_len:
        raise DataError(f"the scoring context ({context} tokens) must be within [0, seq_len "
                        f"{seq_len})")
    stats = ReadStats()
    stream: list[int] = []
    need = None if max_sequences is None else max_sequences * (seq_len + 1)  # >= any stride's
    for doc in iter_documents(paths, text_field=text_field, stats=stats, glob=glob):
        stream += [tokenizer.bos_id, *tokenizer.encode(doc.text), tokenizer.eos_id]
        if need is not None and len(stream) >= need:
            break
    require_documents(stats, paths)
    stride = seq_len - context if context else seq_len + 1
    n = (len(stream) - (seq_len + 1)) // stride + 1 if len(stream) > seq_len else 0
    if n == 0:
        raise DataError(f"{', '.join(map(str, paths))}: {len(stream)} tokens (BOS and EOS "
                        f"included), fewer than one sequence of {seq_len + 1} (seq_len "
                        f"{seq_len} + 1 target): give more held-out text or a smaller --seq-len")
    if max_sequences is not None:
        n = min(n, max_sequences)
    return torch.tensor(stream).unfold(0, seq_len + 1, stride)[:n].contiguous()


@torch.no_grad()
def evaluate(model: Transformer, tokenizer: Tokenizer, sequences: torch.Tensor,
             modes: Sequence[str] = ("none",), *, bank=None, batch_size: int = 8,
             encode_now: bool = False, reads_sink: bool = False, context: int = 0,
             progress: bool = False) -> dict[str, dict]:
    """{mode: {perplexity, loss, bits_per_byte, tokens, bytes, tokens_per_s, seconds}} for
    sequences (N, T + 1), scoring each row's targets from position `context` on (the rows of
    text_sequences(..., context=): every mode reads the whole row, the first `context` tokens as
    context only). A sequence's first chunk reads no memory (causal retrieval has nothing to
    query with), so context >= chunk_len scores only tokens whose chunk does.

    reads_sink: the model was trained reading memory (a continual checkpoint, see
    `trained_with_memory`): mode none reads the sink alone.
    encode_now: encode retrieved references with this model instead of reading the bank's
    memories (needed when the bank was filled by other weights: its memories would be stale).
    """
    unknown = set(modes) - set(MODES)
    if unknown:
        raise ValueError(f"unknown eval mode(s) {sorted(unknown)}; known: {list(MODES)}")
    if bank is None and set(modes) - {"none"}:
        raise ValueError(f"modes {sorted(set(modes) - {'none'})} need a memory bank")
    model.eval()
    device = model.embed.weight.device
    sink = MemoryEncoder(model).sink_kv() if reads_sink else None
    # Bits per byte: the nats of every predicted token (document ends too) over the bytes of
    # text they decode to; comparable across tokenizers where perplexity is not.
    if not 0 <= context < sequences.shape[1] - 1:
        raise ValueError(f"context {context} must be within [0, {sequences.shape[1] - 1})")
    text_bytes = int(tokenizer.token_bytes()[sequences[:, 1 + context:].numpy()].sum())
    results = {}
    for mode in modes:
        start = time.perf_counter()
        nll = count = 0.0
        for i in range(0, len(sequences), batch_size):
            batch = sequences[i:i + batch_size]
            x, y = batch[:, :-1].to(device), batch[:, 1 + context:].to(device)
            if mode == "none":
                alone = None if sink is None else sink_only(sink, x, model.cfg)
                loss_sum = _nll(model(x, memory=alone).logits[:, context:], y)
            elif mode == "rag":
                loss_sum = sum(_nll(rag_logits(model, bank, tokenizer, x[b:b + 1], context)[None],
                                    y[b:b + 1]) for b in range(x.shape[0]))
            else:
                memory = eval_memories(model, bank, tokenizer, x,
                                       own_chunk=mode == "memory_own_chunk", encode_now=encode_now)
                loss_sum = _nll(model(x, memory=memory).logits[:, context:], y)
            nll += loss_sum
            count += y.numel()
        seconds = time.perf_counter() - start
        loss = nll / count
        results[mode] = {"perplexity": math.exp(min(loss, 50.0)), "loss": loss,
                         "bits_per_byte": nll / math.log(2) / max(text_bytes, 1),
                         "tokens": int(count), "bytes": text_bytes,
                         "tokens_per_s": count / seconds, "seconds": seconds}
        if progress:
            print(f"{mode:>17}: perplexity {results[mode]['perplexity']:.3f}  "
                  f"bits/byte {results[mode]['bits_per_byte']:.4f}  "
                  f"({results[mode]['tokens_per_s']:.0f} tokens/s)", flush=True)
    return results


def trained_with_memory(recipe) -> bool:
    """Whether a checkpoint's model was trained reading memories, and so reads its sink always."""
    return recipe.phase == "continual"


def _nll(logits: torch.Tensor, targets: torch.Tensor) -> float:
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="sum").item()


def retrieved_rows(model, bank, tokenizer, x: torch.Tensor, own_chunk: bool = False
                   ) -> np.ndarray:
    """Rows (B, C, k) each chunk of x (B, T) reads at evaluation: causal retrieval (or the
    chunk's own query) by the model's retrieval_query rule, the evaluation overlap filter."""
    cfg = model.cfg
    return retrieve_for_chunks(bank, tokenizer, x.cpu(), chunk_len=cfg.chunk_len,
                               k=cfg.memories_per_chunk, overlap_threshold=EVAL_OVERLAP,
                               own_chunk=own_chunk, query=cfg.retrieval_query)


def eval_memories(model, bank, tokenizer, x: torch.Tensor, *, own_chunk: bool = False,
                  encode_now: bool = False):
    """What x (B, T) reads in mode memory: retrieved memories, always with the sink."""
    encoder = MemoryEncoder(model)
    return chunk_memories(bank, retrieved_rows(model, bank, tokenizer, x, own_chunk),
                          encoder.sink_kv(), device=x.device, dtype=model.embed.weight.dtype,
                          encoder=encoder if encode_now else None)


def rag_logits(model, bank, tokenizer, x: torch.Tensor, first: int = 0) -> torch.Tensor:
    """Logits (T - first, V) of positions [first, T) of x (1, T) in mode rag: each chunk holding
    such positions is run after [its references as documents; as much preceding context as
    fits] (generate.rag_inputs: the same rule as rag generation)."""
    cfg = model.cfg
    L, T = cfg.chunk_len, x.shape[1]
    rows = retrieved_rows(model, bank, tokenizer, x)
    parts = []
    for c in range(first // L, rows.shape[1]):
        start, end = c * L, min((c + 1) * L, T)
        refs = rag_references(bank.references([r for r in rows[0, c] if r >= 0]),
                              tokenizer.bos_id, tokenizer.eos_id)
        inputs = rag_inputs(refs, x[0, :end].tolist(), start, end, cfg.max_seq_len)
        logits = model(torch.tensor([inputs], device=x.device)).logits[0]
        parts.append(logits[len(inputs) - (end - max(start, first)):])
    return torch.cat(parts)
