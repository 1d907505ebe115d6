"""The copy probe: can a model use text it has already seen in its context?

Each span (the first `length` tokens of a held-out document) is fed twice, [BOS] span span, and
the loss on the second copy is compared with the loss on the first. A model that copies from its
context (an induction head: the mechanism that reading retrieved text, or memories, builds on)
predicts the second copy far better; a model that cannot, no better: ratio ~1.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


@torch.no_grad()
def copy_probe(model, spans: Sequence[Sequence[int]], bos_id: int, *,
               batch_size: int = 16) -> dict[str, float]:
    """{first_copy_loss, second_copy_loss, ratio (second / first), spans, length} over spans of
    equal length, in nats per token. The first token of each copy is not scored: the first has
    nothing before it but BOS, and the second's is the one token that does not follow its
    predecessor in the first copy."""
    if not spans:
        raise ValueError("copy probe: no spans")
    length = len(spans[0])
    if length < 2 or any(len(s) != length for s in spans):
        raise ValueError(f"copy probe: spans must share one length >= 2, got "
                         f"{sorted({len(s) for s in spans})}")
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
