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
    """Preallocated keys/values for every layer: (layers, B, G, max_len, D) each."""

    def __init__(self, cfg: ModelConfig, batch_size: int, max_len: int,
                 device: torch.device, dtype: torch.dtype):
        shape = (cfg.n_layers, batch_size, cfg.n_kv_heads, max_len, cfg.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.max_len = max_len
        self.length = 0  # positions filled so far, advanced by the model after all layers ran

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        start, end = self.length, self.length + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache overflow: {end} positions > max_len {self.max_len}")
        self.k[layer, :, :, start:end] = k
        self.v[layer, :, :, start:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]


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
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)
        out = self.attend(q, k, v) if memory is None else memory_attention(q, k, v, memory)
        return self.wo(out.transpose(1, 2).reshape(B, T, -1))

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Causal attention of q (B, H, T, D) over k/v (B, G, S, D), the queries being the last T.

        Without memories; memory_attention.py adds the memory blocks in front of the context.
        """
        T, S = q.shape[2], k.shape[2]
        mask = causal_mask(T, S, q.device)
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=mask is None and T > 1,
            enable_gqa=self.n_kv_heads != self.n_heads)
