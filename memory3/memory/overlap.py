"""The overlap filter: a reference that largely copies the text being predicted is not read.

overlap(ref, text) = LCS(ref, text) / len(ref), on token ids. Continual training drops references
above 0.9 (the model must not learn to copy its target), evaluation above 2/3 (SPEC 1).

Fast enough for every retrieved reference of every batch: a token-count bound rejects most pairs
without any DP (an LCS cannot exceed the multiset intersection), and the rest use bit-parallel LCS
(Hyyrö 2004): one big-integer add/or/and per token of the text, O(len(text)) word operations.
`exceeding` computes the bound of many references against one text in a few numpy calls.
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import numpy as np

EVAL_OVERLAP = 2 / 3  # the reference's threshold at evaluation (training uses 0.9, a recipe field)


def lcs_length(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common subsequence of a and b (bit-parallel over a)."""
    if len(a) == 0 or len(b) == 0:
        return 0
    match: dict[int, int] = {}
    for i, tok in enumerate(a):
        match[tok] = match.get(tok, 0) | (1 << i)
    full = (1 << len(a)) - 1
    v = full
    for tok in b:
        u = v & match.get(tok, 0)
        v = ((v + u) | (v - u)) & full
    return len(a) - bin(v).count("1")


def overlap(reference: Sequence[int], text: Sequence[int]) -> float:
    """LCS(reference, text) / len(reference); 0 for an empty reference."""
    if not reference:
        return 0.0
    return lcs_length(reference, text) / len(reference)


def exceeds(reference: Sequence[int], text: Sequence[int], threshold: float,
            text_counts: Counter | None = None) -> bool:
    """overlap(reference, text) > threshold, skipping the LCS when token counts already rule it out."""
    if not reference:
        return False
    counts = text_counts if text_counts is not None else Counter(text)
    bound = sum(min(n, counts.get(tok, 0)) for tok, n in Counter(reference).items())
    if bound <= threshold * len(reference):
        return False
    return lcs_length(reference, text) > threshold * len(reference)


def exceeding(references: Sequence[Sequence[int]], text: Sequence[int],
              threshold: float) -> np.ndarray:
    """(len(references),) bool: `exceeds(ref, text, threshold)` of each reference.

    The count bound of all references at once: one sort of (reference, token) pairs gives each
    reference's count of each token, capped by the text's count of it."""
    out = np.zeros(len(references), dtype=bool)
    lengths = np.array([len(r) for r in references], dtype=np.int64)
    if not len(references) or not lengths.any():
        return out
    tokens = np.fromiter((t for r in references for t in r), dtype=np.int64, count=lengths.sum())
    text_arr = np.asarray(text, dtype=np.int64)
    vocab = int(max(tokens.max(), text_arr.max(initial=0))) + 1
    text_counts = np.bincount(text_arr, minlength=vocab)
    owner = np.repeat(np.arange(len(references)), lengths)
    pairs, counts = np.unique(owner * vocab + tokens, return_counts=True)
    common = np.minimum(counts, text_counts[pairs % vocab])
    bound = np.bincount(pairs // vocab, weights=common, minlength=len(references))
    for i in np.flatnonzero(bound > threshold * lengths).tolist():
        out[i] = lcs_length(references[i], text) > threshold * lengths[i]
    return out
