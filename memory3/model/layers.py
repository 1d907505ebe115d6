"""Building blocks: RMSNorm, rotary positions, gated MLP."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 as bf16 sums of squares lose too much precision.
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rotary_tables(head_dim: int, max_len: int, theta: float,
                  device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 cos/sin tables of shape (max_len, head_dim) in the rotate-half layout (Llama's)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=device).float() / head_dim)
    angles = torch.outer(torch.arange(max_len, device=device).float(), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (..., T, head_dim) by the angles in cos/sin (T, head_dim), broadcast over heads.

    Computed in x's dtype, as Llama/HF do: the tables are rounded to x's dtype (a no-op when the
    caller already cast them once per forward) and no fp32 copy of q/k is made. In bf16 this halves
    the cost of rotary in training; the error is that of the bf16 output itself.

    Rotations compose: rotating by position p and then by d equals rotating by p + d, which is
    what lets stored memory keys be moved to another position range at read time.
    """
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos.to(x.dtype) + rotated * sin.to(x.dtype)


class GatedMLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)), no biases. gate and up share one matmul."""

    def __init__(self, d_model: int, d_mlp: int):
        super().__init__()
        self.d_mlp = d_mlp
        self.w_gate_up = nn.Linear(d_model, 2 * d_mlp, bias=False)
        self.w_down = nn.Linear(d_mlp, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.w_gate_up(x).split(self.d_mlp, dim=-1)
        return self.w_down(F.silu(gate) * up)
