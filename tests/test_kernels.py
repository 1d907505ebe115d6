"""The fused Triton kernel equals the PyTorch memory attention (Triton's interpreter on CPU)."""
from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before Triton compiles anything: CPU tensors

import pytest  # noqa: E402
import torch  # noqa: E402

from memory3.model.memory_attention import (ChunkMemories, LayerMemory, chunk_blocks,  # noqa: E402
                                            memory_attention_torch)

kernels = pytest.importorskip("memory3.kernels.memory_attention")
if not kernels.available():
    pytest.skip("triton not installed", allow_module_level=True)


def case(B, H, G, T, D, q_start, chunk_len, M, K, first_chunk, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    C = (q_start + T - 1) // chunk_len - first_chunk + 1
    kv = torch.randn(B, C, M, 1, 2, G, K, D, generator=g)
    valid = torch.rand(B, C, M, K, generator=g) > 0.25
    valid[:, -1] = False  # a chunk whose memories are all missing: only sink + context
    mem = ChunkMemories(kv=kv, valid=valid, sink=torch.randn(1, 2, G, D, generator=g),
                        first_chunk=first_chunk)
    blocks = chunk_blocks(mem, 0, 0, chunk_len, 2 * K, 10000.0)
    layer = LayerMemory(*(b.to(dtype) if b.is_floating_point() else b for b in blocks),
                        q_start, first_chunk, chunk_len)
    S = q_start + T
    q = torch.randn(B, H, T, D, generator=g).to(dtype)
    k = torch.randn(B, G, S, D, generator=g).to(dtype)
    v = torch.randn(B, G, S, D, generator=g).to(dtype)
    return q, k, v, layer


@pytest.mark.parametrize("shape", [
    dict(B=2, H=4, G=2, T=40, D=16, q_start=0, chunk_len=16, M=2, K=3, first_chunk=0),
    dict(B=1, H=2, G=1, T=24, D=20, q_start=9, chunk_len=8, M=3, K=2, first_chunk=1),  # unaligned
    dict(B=1, H=4, G=4, T=1, D=16, q_start=37, chunk_len=16, M=2, K=4, first_chunk=2),  # decode
], ids=["prefill", "unaligned-D20", "decode"])
def test_fused_kernel_matches_pytorch(shape):
    q, k, v, layer = case(**shape)
    expected = memory_attention_torch(q, k, v, layer)
    got = kernels.fused_memory_attention(q, k, v, layer, block_m=16, block_n=16)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_fused_kernel_in_bf16_matches_pytorch_on_the_same_inputs():
    """bf16 inputs: the kernel computes in fp32 and rounds its output to bf16 once; the PyTorch
    path in fp32 on the same bf16 values must agree to bf16's rounding. (Its dots are IEEE fp32
    by request: on NVIDIA, tl.dot takes fp32 operands as TF32 by default, which the fp32 cases
    at 1e-4 would catch there; the interpreter here computes fp32 either way.)"""
    shape = dict(B=2, H=4, G=2, T=40, D=16, q_start=0, chunk_len=16, M=2, K=3, first_chunk=0)
    q, k, v, layer = case(**shape, dtype=torch.bfloat16)
    got = kernels.fused_memory_attention(q, k, v, layer, block_m=16, block_n=16)
    assert got.dtype == torch.bfloat16
    layer32 = layer._replace(k=layer.k.float(), v=layer.v.float())
    expected = memory_attention_torch(q.float(), k.float(), v.float(), layer32)
    torch.testing.assert_close(got.float(), expected, atol=1e-2, rtol=1e-2)
