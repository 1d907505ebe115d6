"""The datastore key of a position: the input of the last block's MLP, after its norm.

Captured with a forward pre-hook on `model.blocks[-1].mlp`, so the model's forward stays as it is
and the logits of the same pass come for free (kNN-LM needs both).
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from memory3.model import Transformer


@contextmanager
def capture_keys(model: Transformer) -> Iterator[list[torch.Tensor]]:
    """Within the block, each forward of `model` appends its keys (B, T, d_model) to the list."""
    captured: list[torch.Tensor] = []

    def hook(_module, args):
        captured.append(args[0].detach())

    handle = model.blocks[-1].mlp.register_forward_pre_hook(hook)
    try:
        yield captured
    finally:
        handle.remove()

