"""Overlap filter: LCS against a textbook DP, thresholds at the edges."""
from __future__ import annotations

import random
from collections import Counter

import pytest

from memory3.memory.overlap import exceeding, exceeds, lcs_length, overlap


def lcs_dp(a, b):
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def test_lcs_matches_dynamic_programming():
    rng = random.Random(0)
    for _ in range(300):
        a = [rng.randrange(6) for _ in range(rng.randrange(0, 70))]
        b = [rng.randrange(6) for _ in range(rng.randrange(0, 90))]
        assert lcs_length(a, b) == lcs_dp(a, b)


def test_edges():
    assert overlap([], [1, 2]) == 0.0 and lcs_length([1, 2], []) == 0
    ref = list(range(10))
    assert overlap(ref, [99] + ref + [98]) == 1.0                # contained verbatim
    assert overlap(ref, ref[:9]) == pytest.approx(0.9)           # exactly at the threshold...
    assert not exceeds(ref, ref[:9], 0.9)                        # ...is not above it
    assert exceeds(ref, ref, 0.9)
    spread = [t for tok in ref for t in (tok, 50)]               # a subsequence, not a substring
    assert overlap(ref, spread) == 1.0 and exceeds(ref, spread, 0.9)
    assert overlap(ref, list(reversed(ref))) == pytest.approx(0.1)
    assert not exceeds(ref, list(range(100, 2000)), 2 / 3)


def test_exceeds_agrees_with_overlap_and_precomputed_counts():
    rng = random.Random(1)
    text = [rng.randrange(50) for _ in range(400)]
    counts = Counter(text)
    for _ in range(200):
        start = rng.randrange(350)
        ref = text[start:start + rng.randrange(1, 50)]
        ref = [t if rng.random() < 0.85 else rng.randrange(50) for t in ref]
        for threshold in (2 / 3, 0.9):
            assert exceeds(ref, text, threshold, counts) == (overlap(ref, text) > threshold)


def test_exceeding_many_references_agrees_with_exceeds():
    rng = random.Random(2)
    for _ in range(20):
        text = [rng.randrange(40) for _ in range(rng.randrange(0, 300))]
        refs = [[]]
        for _ in range(40):
            start = rng.randrange(max(1, len(text)))
            ref = text[start:start + rng.randrange(0, 40)]
            refs.append([t if rng.random() < 0.9 else rng.randrange(60) for t in ref])
        for threshold in (2 / 3, 0.9):
            assert exceeding(refs, text, threshold).tolist() == \
                [exceeds(r, text, threshold) for r in refs]
    assert exceeding([], [1, 2], 0.9).tolist() == []
