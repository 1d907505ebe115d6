"""Grouped-query self-attention with rotary positions and an optional KV cache.

Shapes: B batch, T query length, S key length, H query heads, G KV heads, D head dim.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from memory3.config import ModelConfig
from memory3.model.layers import apply_rotary
from memory3.model.memory_attention import LayerMemory, memory_attention


class KVCache:
    """Preallocated keys/values for every layer: (layers, B, G, memory_slots + max_len, D) each.

    Context position p lives at index memory_slots + p. The memory_slots in front hold the memory
    block (sink + memories) of the chunk being decoded, written once per chunk by `hold`, packed
    against the context: a decoding step then attends one contiguous slice [block; context], as
    plain attention does, instead of concatenating the block with the whole cache in every layer
    at every token (a copy of the cache per token).
    """

    def __init__(self, cfg: ModelConfig, batch_size: int, max_len: int,
                 device: torch.device, dtype: torch.dtype, memory_slots: int = 0):
        shape = (cfg.n_layers, batch_size, cfg.n_kv_heads, memory_slots + max_len, cfg.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.max_len, self.memory_slots = max_len, memory_slots
        self.length = 0  # positions filled so far, advanced by the model after all layers ran
        self.previous: torch.Tensor | None = None  # (B,) the last token fed (model.token_shift)
        # Per layer: slots held in front of the context, and (B, n) validity when the rows of
        # the batch hold different numbers (None: all n are valid in every row).
        self.held = [0] * cfg.n_layers
        self.held_valid: list[torch.Tensor | None] = [None] * cfg.n_layers
        self.held_key = None    # what the slots hold, set by the model
        self.reading = False    # whether this forward reads the held block (set by the model)

    def reset(self):
        """Forget everything: the next forward starts again at position 0."""
        self.length, self.previous = 0, None
        self.held_key, self.reading = None, False

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Store k, v (B, G, T, D) at the current positions; return the keys/values to attend:
        [held block;] context positions 0..length+T-1."""
        start, end = self.length, self.length + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache overflow: {end} positions > max_len {self.max_len}")
        P = self.memory_slots
        self.k[layer, :, :, P + start:P + end] = k
        self.v[layer, :, :, P + start:P + end] = v
        first = P - self.held[layer] if self.reading else P
        return self.k[layer, :, :, first:P + end], self.v[layer, :, :, first:P + end]

    def hold(self, layer: int, k: torch.Tensor | None, v: torch.Tensor | None,
             valid: torch.Tensor | None) -> None:
        """Put one chunk's block k, v (B, G, Sm, D), valid (B, Sm) in the layer's slots (None:
        the layer reads no block). Valid slots are packed last, against the context."""
        if k is None:
            self.held[layer], self.held_valid[layer] = 0, None
            return
        B, G, _, D = k.shape
        order = torch.argsort(valid.to(torch.int8), dim=-1, stable=True)  # valid slots last
        n = valid.sum(-1)
        n_max = int(n.max())
        if n_max > self.memory_slots:
            raise ValueError(f"a memory block of {n_max} slots does not fit in the cache's "
                             f"{self.memory_slots}")
        P = self.memory_slots
        if n_max:
            idx = order[:, None, -n_max:, None].expand(B, G, n_max, D)
            self.k[layer, :, :, P - n_max:P] = torch.gather(k, 2, idx)
            self.v[layer, :, :, P - n_max:P] = torch.gather(v, 2, idx)
        self.held[layer] = n_max
        self.held_valid[layer] = (None if bool((n == n_max).all()) else
                                  torch.arange(n_max, device=n.device) >= (n_max - n)[:, None])


def causal_mask(q_len: int, k_len: int, device: torch.device) -> torch.Tensor | None:
    """Boolean mask (T, S), True = may attend, for queries that are the last T of S positions.

    None means SDPA's own `is_causal` (square case) or no mask (single query) is exact.
    """
    if q_len == 1 or q_len == k_len:
        return None
    q_pos = torch.arange(k_len - q_len, k_len, device=device)
    return q_pos[:, None] >= torch.arange(k_len, device=device)[None, :]


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        q_dim, kv_dim = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
        self.split_sizes = (q_dim, kv_dim, kv_dim)
        self.wqkv = nn.Linear(cfg.d_model, q_dim + 2 * kv_dim, bias=False)
        self.wo = nn.Linear(q_dim, cfg.d_model, bias=False)

    def project_qkv(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """x (B, T, d_model) -> q (B, H, T, D), k and v (B, G, T, D), rotary applied to q and k."""
        B, T, _ = x.shape
        q, k, v = self.wqkv(x).split(self.split_sizes, dim=-1)
        q = q.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = k.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin), v

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cache: KVCache | None = None, memory: LayerMemory | None = None) -> torch.Tensor:
        B, T, _ = x.shape
        q, k, v = self.project_qkv(x, cos, sin)
        held_valid = None
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)
            held_valid = cache.held_valid[self.layer_idx] if cache.reading else None
        out = (self.attend(q, k, v, held_valid) if memory is None
               else memory_attention(q, k, v, memory))
        return self.wo(out.transpose(1, 2).reshape(B, T, -1))

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               held_valid: torch.Tensor | None = None) -> torch.Tensor:
        """Causal attention of q (B, H, T, D) over k/v (B, G, S, D), the queries being the last T.

        The keys may start with a memory block held by the cache (all of it visible to every
        query, which the causal mask gives since the block comes first); held_valid (B, n) masks
        its first n slots where rows hold fewer. Otherwise memory_attention.py reads memories.
        """
        T, S = q.shape[2], k.shape[2]
        mask = causal_mask(T, S, q.device)
        if held_valid is not None:
            rest = torch.ones(*held_valid.shape[:1], S - held_valid.shape[1], dtype=torch.bool,
                              device=q.device)
            keep = torch.cat([held_valid, rest], dim=1)[:, None, None, :]   # (B, 1, 1, S)
            mask = keep if mask is None else keep & mask
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=mask is None and T > 1,
            enable_gqa=self.n_kv_heads != self.n_heads)
