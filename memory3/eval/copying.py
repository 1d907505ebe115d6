"""The copy probe: can a model use text it has already seen, in its context or in its memory?

Each span (the first `length` tokens of a held-out document) is fed twice, [BOS] span span, and
the loss on the second copy is compared with the loss on the first. A model that copies from its
context (an induction head: the mechanism that reading retrieved text, or memories, builds on)
predicts the second copy far better; a model that cannot, no better: ratio ~1.

The memory copy probe asks the same of memory: the span, encoded as a memory by the model itself,
is read by every chunk of [BOS] span. Kept dense (every token), it measures the read path: a model
that reads memories as it reads text scores the text probe's ratio (at any weights: memories are
the text's own keys and values, placed just before their chunk). At the model's memory_top_k it
measures what the sparse selection keeps of what there was to copy.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from memory3.data.tokenizer import PAD_ID
from memory3.memory.encoder import MemoryEncoder
from memory3.memory.references import pack_references
from memory3.model import ChunkMemories, compact_slots


@torch.no_grad()
def copy_probe(model, spans: Sequence[Sequence[int]], bos_id: int, *,
               batch_size: int = 16) -> dict[str, float]:
    """{first_copy_loss, second_copy_loss, ratio (second / first), spans, length} over spans of
    equal length, in nats per token. The first token of each copy is not scored: the first has
    nothing before it but BOS, and the second's is the one token that does not follow its
    predecessor in the first copy."""
    length = _span_length(spans, "copy probe")
    if 2 * length + 1 > model.cfg.max_seq_len + 1:
        raise ValueError(f"copy probe: two copies of {length} tokens exceed the model's "
                         f"max_seq_len {model.cfg.max_seq_len}")
    model.eval()
    device = model.embed.weight.device
    first = second = 0.0
    for i in range(0, len(spans), batch_size):
        half = torch.tensor([list(s) for s in spans[i:i + batch_size]], device=device)
        x = torch.cat([torch.full((len(half), 1), bos_id, device=device), half, half], dim=1)
        loss = F.cross_entropy(model(x[:, :-1]).logits.float().transpose(1, 2), x[:, 1:],
                               reduction="none")                   # loss[:, j] predicts x[:, j+1]
        first += loss[:, 1:length].sum().item()
        second += loss[:, length + 1:].sum().item()
    n = len(spans) * (length - 1)
    result = {"first_copy_loss": first / n, "second_copy_loss": second / n,
              "spans": len(spans), "length": length}
    result["ratio"] = result["second_copy_loss"] / result["first_copy_loss"]
    return result


@torch.no_grad()
def memory_copy_probe(model, spans: Sequence[Sequence[int]], bos_id: int, *,
                      top_k: int | None = None, batch_size: int = 16) -> dict[str, float]:
    """{alone_loss, memory_loss, ratio (memory / alone), top_k, spans, length}: loss on [BOS]
    span (the tokens `copy_probe` scores in the first copy) reading the sink alone, and reading
    the span's own memory (kept at top_k tokens per memory layer and KV head, default the model's
    memory_top_k) in every chunk. Spans as in `copy_probe`, shorter than reference_len."""
    cfg = model.cfg
    length = _span_length(spans, "memory copy probe")
    if length >= cfg.reference_len or length > cfg.max_seq_len:
        raise ValueError(f"memory copy probe: spans of {length} tokens do not fit a reference "
                         f"(reference_len {cfg.reference_len}, the reference-BOS included)")
    model.eval()
    encoder = MemoryEncoder(model, top_k=top_k)
    device = model.embed.weight.device
    sink = encoder.sink_kv()
    C = -(-length // cfg.chunk_len)
    alone = read = 0.0
    for i in range(0, len(spans), batch_size):
        part = [list(s) for s in spans[i:i + batch_size]]
        x = torch.tensor([[bos_id, *s] for s in part], device=device)
        own = own_memories(encoder, part, C, sink)
        nothing = ChunkMemories(kv=own.kv[:, :, :0], valid=own.valid[:, :, :0], sink=sink)
        alone += _span_nll(model, x, nothing)
        read += _span_nll(model, x, own)
    n = len(spans) * (length - 1)
    return {"alone_loss": alone / n, "memory_loss": read / n, "ratio": read / alone,
            "top_k": encoder.top_k, "spans": len(spans), "length": length}


def own_memories(encoder: MemoryEncoder, references: Sequence[Sequence[int]], n_chunks: int,
                 sink: torch.Tensor | None) -> ChunkMemories:
    """Reference b (at most reference_len - 1 tokens), encoded now, as the one memory that every
    one of the n_chunks chunks of row b reads: what a retriever that always found the row's own
    reference would hand it."""
    cfg = encoder.model.cfg
    device = encoder.model.embed.weight.device
    tokens, lengths = pack_references([list(r) for r in references], ref_bos_id=encoder.ref_bos_id,
                                      pad_id=PAD_ID, reference_len=cfg.reference_len)
    encoded = encoder.encode(tokens.to(device), lengths.to(device))
    kv, valid = compact_slots(encoded.kv, encoded.positions)          # (B, L_mem, 2, G, K, D)
    return ChunkMemories(kv=kv[:, None, None].expand(-1, n_chunks, -1, *kv.shape[1:]),
                         valid=valid[:, None, None].expand(-1, n_chunks, -1, -1), sink=sink)


def _span_length(spans: Sequence[Sequence[int]], probe: str) -> int:
    if not spans:
        raise ValueError(f"{probe}: no spans")
    length = len(spans[0])
    if length < 2 or any(len(s) != length for s in spans):
        raise ValueError(f"{probe}: spans must share one length >= 2, got "
                         f"{sorted({len(s) for s in spans})}")
    return length


def _span_nll(model, x: torch.Tensor, memory: ChunkMemories) -> float:
    """Summed loss on x[:, 2:] (the first token after BOS is not scored, as in copy_probe)."""
    logits = model(x[:, :-1], memory=memory).logits.float()
    return F.cross_entropy(logits.transpose(1, 2), x[:, 1:], reduction="none")[:, 1:].sum().item()


def document_spans(token_lists, length: int, max_spans: int) -> list[list[int]]:
    """The first `length` tokens of each document long enough, up to max_spans of them (reads
    token_lists, which may be a generator, only as far as it needs)."""
    spans: list[list[int]] = []
    if max_spans <= 0:
        return spans
    for ids in token_lists:
        if len(ids) >= length:
            spans.append(list(ids[:length]))
            if len(spans) == max_spans:
                break
    return spans
