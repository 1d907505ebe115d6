"""Fused chunkwise memory attention (forward) in Triton.

Computes exactly what memory3.model.memory_attention.memory_attention computes (the PyTorch
reference it is tested against), without materialising the (T, C*Sm + S) mask or concatenating
memory blocks in front of the context: each program owns BLOCK_M queries of one (batch, head),
first folds in the blocks of the chunks its queries fall in, then streams the causal context, with
one online softmax over both (flash-attention style). Forward only: training keeps the PyTorch
path, whose backward autograd provides.

On CPU it runs under Triton's interpreter (TRITON_INTERPRET=1), which is how CI checks it.
"""
from __future__ import annotations

import inspect

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # the PyTorch path serves every device without Triton
    triton = None


def available() -> bool:
    return triton is not None


if triton is not None:
    # Every dot here multiplies fp32 tiles (operands are upcast on load) and must be IEEE fp32:
    # left to its default, tl.dot on NVIDIA rounds fp32 operands to TF32 (10-bit mantissa), which
    # puts the output ~1e-3 off the PyTorch path (tests/test_kernels.py holds fp32 to 1e-4).
    # Triton >= 3.0 says so with input_precision="ieee" (which also overrides the
    # TRITON_F32_DEFAULT environment variable); older Triton only has allow_tf32=False.
    if "input_precision" in inspect.signature(tl.dot).parameters:
        @triton.jit
        def _dot_fp32(a, b):
            return tl.dot(a, b, input_precision="ieee")
    else:
        @triton.jit
        def _dot_fp32(a, b):
            return tl.dot(a, b, allow_tf32=False)

    @triton.jit
    def _online_softmax_step(q, k, v, allowed, m_i, l_i, acc):
        """Fold one tile of keys/values into the running (max, sum, output) of each query row; a
        row with nothing allowed yet keeps max -inf and contributes nothing."""
        s = tl.where(allowed, _dot_fp32(q, tl.trans(k)), float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp(s - m_safe[:, None])
        alpha = tl.exp(m_i - m_safe)
        return (m_new, l_i * alpha + tl.sum(p, 1),
                acc * alpha[:, None] + _dot_fp32(p, v))

    @triton.jit
    def _memory_attention_fwd(
        Q, K, V, MK, MV, MVALID, OUT,
        sq_b, sq_h, sq_t, sk_b, sk_g, sk_s, smk_b, smk_g, smk_c, smk_s, smv_b, smv_c,
        so_b, so_h, so_t,
        T, S, C, SM, D, q_start, first_chunk, chunk_len, group, scale,
        H: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        BLOCK_SM: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        pid_m = tl.program_id(0)
        pid_bh = tl.program_id(1)
        b = pid_bh // H
        h = pid_bh % H
        g = h // group
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < T
        dims = tl.arange(0, BLOCK_D)
        dim_ok = dims < D
        q = tl.load(Q + b * sq_b + h * sq_h + rows[:, None] * sq_t + dims[None, :],
                    mask=row_ok[:, None] & dim_ok[None, :], other=0.0).to(tl.float32)
        q = q * scale
        pos = q_start + rows
        row_chunk = pos // chunk_len - first_chunk

        m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
        l_i = tl.zeros((BLOCK_M,), tl.float32)
        acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)

        # 1. the blocks of the chunks this tile's queries fall in (usually one, two at a boundary)
        c_lo = (q_start + pid_m * BLOCK_M) // chunk_len - first_chunk
        last_row = tl.minimum(pid_m * BLOCK_M + BLOCK_M, T) - 1
        c_hi = (q_start + last_row) // chunk_len - first_chunk
        slots = tl.arange(0, BLOCK_SM)
        slot_ok = slots < SM
        for c in range(c_lo, c_hi + 1):
            base = b * smk_b + g * smk_g + c * smk_c
            mk = tl.load(MK + base + slots[:, None] * smk_s + dims[None, :],
                         mask=slot_ok[:, None] & dim_ok[None, :], other=0.0).to(tl.float32)
            mv = tl.load(MV + base + slots[:, None] * smk_s + dims[None, :],
                         mask=slot_ok[:, None] & dim_ok[None, :], other=0.0).to(tl.float32)
            valid = tl.load(MVALID + b * smv_b + c * smv_c + slots, mask=slot_ok, other=0)
            allowed = (row_chunk[:, None] == c) & (valid[None, :] != 0) & slot_ok[None, :]
            m_i, l_i, acc = _online_softmax_step(q, mk, mv, allowed, m_i, l_i, acc)

        # 2. the causal context: keys 0 .. last query position of the tile
        cols = tl.arange(0, BLOCK_N)
        hi = tl.minimum(q_start + last_row + 1, S)
        for start in range(0, hi, BLOCK_N):
            kpos = start + cols
            k_ok = kpos < S
            k = tl.load(K + b * sk_b + g * sk_g + kpos[:, None] * sk_s + dims[None, :],
                        mask=k_ok[:, None] & dim_ok[None, :], other=0.0).to(tl.float32)
            v = tl.load(V + b * sk_b + g * sk_g + kpos[:, None] * sk_s + dims[None, :],
                        mask=k_ok[:, None] & dim_ok[None, :], other=0.0).to(tl.float32)
            allowed = (kpos[None, :] <= pos[:, None]) & k_ok[None, :]
            m_i, l_i, acc = _online_softmax_step(q, k, v, allowed, m_i, l_i, acc)

        out = acc / l_i[:, None]
        tl.store(OUT + b * so_b + h * so_h + rows[:, None] * so_t + dims[None, :],
                 out.to(OUT.dtype.element_ty), mask=row_ok[:, None] & dim_ok[None, :])


def fused_memory_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mem,
                           block_m: int = 16, block_n: int = 32) -> torch.Tensor:
    """Same contract as memory_attention(q, k, v, mem): q (B, H, T, D), k/v (B, G, S, D)."""
    if triton is None:
        raise RuntimeError("Triton is not installed")
    B, H, T, D = q.shape
    G, S = k.shape[1], k.shape[2]
    C, Sm = mem.k.shape[2], mem.k.shape[3]
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    mk, mv = mem.k.contiguous(), mem.v.contiguous()
    valid = mem.valid.to(torch.int8).contiguous()
    out = torch.empty_like(q)
    grid = (triton.cdiv(T, block_m), B * H)
    _memory_attention_fwd[grid](
        q, k, v, mk, mv, valid, out,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        mk.stride(0), mk.stride(1), mk.stride(2), mk.stride(3), valid.stride(0), valid.stride(1),
        out.stride(0), out.stride(1), out.stride(2),
        T, S, C, Sm, D, mem.q_start, mem.first_chunk, mem.chunk_len, H // G, D ** -0.5,
        H=H, BLOCK_M=block_m, BLOCK_N=block_n,
        BLOCK_SM=max(16, triton.next_power_of_2(Sm)), BLOCK_D=max(16, triton.next_power_of_2(D)),
    )
    return out
