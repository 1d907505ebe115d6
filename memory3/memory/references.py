"""Knowledge base -> references: token windows of a document, with provenance, packed for encoding.

A reference is what one explicit memory is made of (SPEC section 1): at most `reference_len - 1`
tokens of one document, encoded behind a reference-BOS, so `reference_len` positions in all.

Splitting: consecutive, non-overlapping windows that cover the document's tokens exactly (cut at
token boundaries, never re-tokenized, so offsets index the document's own token sequence). A window
ends at a sentence end when one lies in its last quarter, so a memory holds whole sentences where
the text allows; otherwise it is cut at full length. A sentence end is a cut after a token whose
text ends with a newline, or after a token ending in ".", "!" or "?" when the next token starts with
whitespace. A hard cut may split a character that the tokenizer spelled as several byte tokens:
the tokens stay exact, only `Reference.text` shows a replacement character at that edge.
"""
from __future__ import annotations

import functools
import hashlib
import itertools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from memory3.data.text import (Document, Glob, PathLike, ReadStats, iter_documents,
                               require_documents)
from memory3.data.tokenizer import Tokenizer

SENTENCE_MARKS = (".", "!", "?")


@dataclass(frozen=True)
class Reference:
    key: str                 # hex sha1 of (doc_id, start, tokens): same input => same key
    doc_id: str              # f"{Document.source}#{Document.index}"
    start: int               # token offsets of this reference within its document's tokens
    end: int
    tokens: tuple[int, ...]  # without the reference-BOS; 1 <= len <= reference_len - 1
    text: str                # tokenizer.decode(tokens)


def reference_key(doc_id: str, start: int, tokens: Sequence[int]) -> str:
    # NUL cannot occur in a path, so the fields cannot run into each other; surrogatepass keeps
    # paths with undecodable bytes (surrogate-escaped by Python) hashable.
    payload = f"{doc_id}\0{start}\0{','.join(map(str, tokens))}"
    return hashlib.sha1(payload.encode("utf-8", "surrogatepass")).hexdigest()


@functools.lru_cache(maxsize=8)
def _sentence_tables(tokenizer: Tokenizer) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per token id (vocab,) bool: its text ends a line, ends with a sentence mark, starts with
    whitespace. Built once per tokenizer (one decode per id) so splitting is vectorised."""
    texts = [tokenizer.decode([i]) for i in range(tokenizer.vocab_size)]
    ends_line = np.array([t.endswith("\n") for t in texts])
    ends_mark = np.array([t.endswith(SENTENCE_MARKS) for t in texts])
    starts_space = np.array([t[:1].isspace() for t in texts])
    return ends_line, ends_mark, starts_space


def _sentence_cuts(ids: np.ndarray, tokenizer: Tokenizer) -> np.ndarray:
    """(n - 1,) bool: True at j if a cut between tokens j and j + 1 ends a sentence."""
    ends_line, ends_mark, starts_space = _sentence_tables(tokenizer)
    left, right = ids[:-1], ids[1:]
    return ends_line[left] | (ends_mark[left] & starts_space[right])


def split_document(doc: Document, token_ids: Sequence[int], reference_len: int = 128, *,
                   tokenizer: Tokenizer) -> list[Reference]:
    """Cut a document's tokens into references (see the module docstring for where cuts fall).

    `tokenizer` is the one that produced `token_ids`: it decodes each reference's text and tells
    where sentences end.
    """
    if reference_len < 2:
        raise ValueError(f"reference_len must be at least 2 (reference-BOS + 1 token), "
                         f"got {reference_len}")
    ids = np.asarray(token_ids, dtype=np.int64)
    n, width = len(ids), reference_len - 1
    min_width = width - width // 4
    cuts = _sentence_cuts(ids, tokenizer) if n > width else None
    doc_id = f"{doc.source}#{doc.index}"
    refs: list[Reference] = []
    start = 0
    while start < n:
        end = min(start + width, n)
        if end < n:
            # cuts[j] is a cut after token j, i.e. a window ending at j + 1.
            lo = start + min_width - 1
            found = np.flatnonzero(cuts[lo:end])
            if len(found):
                end = lo + int(found[-1]) + 1
        tokens = tuple(int(t) for t in ids[start:end])
        refs.append(Reference(reference_key(doc_id, start, tokens), doc_id, start, end, tokens,
                              tokenizer.decode(tokens)))
        start = end
    return refs


def iter_references(paths: Sequence[PathLike], tokenizer: Tokenizer, reference_len: int = 128, *,
                    text_field: str = "text", stats: ReadStats | None = None,
                    batch_size: int = 256, glob: Glob = None) -> Iterator[Reference]:
    """The references of every document in `paths` (files or folders), in reading order.

    Documents are tokenized `batch_size` at a time (sentencepiece runs a batch on several threads).
    Raises DataError, after reading everything, if the input holds no document at all.
    """
    stats = ReadStats() if stats is None else stats
    documents = iter_documents(paths, text_field, stats, glob)
    while batch := list(itertools.islice(documents, batch_size)):
        for doc, ids in zip(batch, tokenizer.encode_batch([d.text for d in batch])):
            yield from split_document(doc, ids, reference_len, tokenizer=tokenizer)
    require_documents(stats, paths)


def pack_references(refs: Sequence[Reference] | Sequence[Sequence[int]], *, ref_bos_id: int,
                    pad_id: int, reference_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """References -> tokens (N, L) long and lengths (N,) long, ready for `MemoryEncoder.encode`.

    Row i is [ref_bos_id, *tokens_i, pad_id, ...]; L is the longest row (<= reference_len) and
    lengths count the reference-BOS.
    """
    seqs = [r.tokens if isinstance(r, Reference) else tuple(r) for r in refs]
    if not seqs:
        raise ValueError("pack_references: no references to pack")
    bad = [i for i, s in enumerate(seqs) if not 1 <= len(s) <= reference_len - 1]
    if bad:
        raise ValueError(f"pack_references: reference {bad[0]} has {len(seqs[bad[0]])} tokens, "
                         f"expected 1..{reference_len - 1} (reference_len {reference_len} "
                         f"includes the reference-BOS)")
    lengths = torch.tensor([len(s) + 1 for s in seqs], dtype=torch.long)
    L = int(lengths.max())
    tokens = torch.full((len(seqs), L), pad_id, dtype=torch.long)
    tokens[:, 0] = ref_bos_id
    # Boolean-mask assignment fills row-major, i.e. reference after reference.
    body = (torch.arange(L) >= 1) & (torch.arange(L) < lengths[:, None])
    tokens[body] = torch.tensor(list(itertools.chain.from_iterable(seqs)), dtype=torch.long)
    return tokens, lengths
