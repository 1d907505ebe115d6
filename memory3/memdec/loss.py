"""The Memory Decoder's training loss: beta * KL(p_kNN || p_dec) + (1 - beta) * CE."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from memory3.model import IGNORE_INDEX


def memdec_loss(logits: torch.Tensor, targets: torch.Tensor, knn_ids: torch.Tensor,
                knn_probs: torch.Tensor, beta: float) -> torch.Tensor:
    """logits (B, T, V), targets (B, T), sparse p_kNN as knn_ids / knn_probs (B, T, S).

    KL(p || q) = sum_y p(y) (log p(y) - log q(y)) over the stored tokens only: the rest have
    p = 0 and contribute nothing (0 log 0 = 0). Both terms are means over the positions whose
    target is not IGNORE_INDEX; in fp32 whatever the logits' dtype.
    """
    logits = logits.float()
    ce = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX)
    log_q = F.log_softmax(logits, dim=-1).gather(-1, knn_ids.long())
    p = knn_probs.float()
    kl = (torch.xlogy(p, p) - p * log_q).sum(-1)
    kl = kl[targets != IGNORE_INDEX].mean()
    return beta * kl + (1 - beta) * ce
