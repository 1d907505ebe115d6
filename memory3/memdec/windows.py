"""Sliding windows for perplexity: every next token of a stream scored exactly once.

Window j scores input positions j*stride .. (j+1)*stride - 1 and reads up to `window - stride`
positions before them as context only (their targets are IGNORE_INDEX). The first window has no
context; with stride == window the windows tile the stream (no overlap, the cheapest setting).

Rows (`iter_row_batches`) cut the stream as `memory3 eval` cuts held-out text
(eval/perplexity.text_sequences): rows of seq_len + 1 tokens, each scored from its own start. A
row's first token is input only, so one token per row boundary is never scored and no context
crosses rows: what lets the Memory Decoder and kNN-LM be scored on exactly the tokens, with
exactly the contexts, that `memory3 eval` scores (bench/compare_memories.py).
"""
from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from memory3.memdec.files import MemDecError
from memory3.model import IGNORE_INDEX


def iter_window_batches(tokens: np.ndarray, window: int, stride: int,
                        batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(inputs, targets) int64 batches (b <= batch_size, <= window) over the 1-D stream `tokens`;
    shorter rows are padded at the end (causal attention: padding never affects real positions)."""
    if not 0 < stride <= window:
        raise MemDecError(f"need 0 < stride ({stride}) <= window ({window})")
    if batch_size <= 0:
        raise MemDecError(f"batch size must be positive, got {batch_size}")
    n = len(tokens) - 1  # positions with a next token
    if n <= 0:
        raise MemDecError("need at least two tokens to score one")
    spans = []  # (first input position, first scored position, end)
    for scored in range(0, n, stride):
        end = min(scored + stride, n)
        spans.append((max(0, end - window), scored, end))
    for b in range(0, len(spans), batch_size):
        chunk = spans[b:b + batch_size]
        length = max(end - first for first, _, end in chunk)
        inputs = torch.zeros(len(chunk), length, dtype=torch.long)
        targets = torch.full((len(chunk), length), IGNORE_INDEX, dtype=torch.long)
        for row, (first, scored, end) in enumerate(chunk):
            inputs[row, :end - first] = torch.from_numpy(tokens[first:end])
            targets[row, scored - first:end - first] = torch.from_numpy(tokens[scored + 1:end + 1])
        yield inputs, targets


def iter_row_batches(tokens: np.ndarray, seq_len: int, batch_size: int,
                     max_rows: int | None = None
                     ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(inputs, targets) int64 batches (b <= batch_size, seq_len) of the stream cut into whole
    rows of seq_len + 1 tokens (the remainder dropped), at most max_rows of them."""
    if seq_len <= 0 or batch_size <= 0:
        raise MemDecError(f"need seq_len > 0 and batch size > 0, got {seq_len} and {batch_size}")
    n = len(tokens) // (seq_len + 1)
    if max_rows is not None:
        n = min(n, max_rows)
    if n == 0:
        raise MemDecError(f"{len(tokens)} tokens, fewer than one row of {seq_len + 1} (seq_len "
                          f"{seq_len} + 1 target): give more tokens or a smaller seq_len")
    rows = torch.from_numpy(np.array(tokens[:n * (seq_len + 1)], dtype=np.int64))
    rows = rows.view(n, seq_len + 1)
    for b in range(0, n, batch_size):
        yield rows[b:b + batch_size, :-1], rows[b:b + batch_size, 1:]
