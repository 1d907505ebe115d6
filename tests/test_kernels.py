"""The fused Triton kernel equals the PyTorch memory attention, in fp32 and in bf16.

Where a CUDA GPU is present the kernel is compiled and every case runs on it; elsewhere Triton's
interpreter runs it on CPU tensors (how CI checks it) and the cases marked `cuda` skip. The
kernel is forward only: with autograd, memory_attention() takes the PyTorch path, so there is no
kernel backward to compare; the `cuda` cases check that dispatch and the PyTorch path's bf16
backward on the GPU instead. `bench/gpu_check.sh` runs this file on the first GPU.

Tolerances. fp32: 1e-4 against the PyTorch path in fp32 (Triton's TF32 default would miss it by
~1e-3, hence the kernel's IEEE dots). bf16: the kernel reads bf16, computes in fp32 and rounds its
output to bf16 once, so it must lie within one bf16 ulp (2^-7 relative) of the PyTorch path run in
fp32 on the same bf16 values; atol 1e-3 covers outputs near zero.
"""
from __future__ import annotations

import os

import pytest
import torch

CUDA = torch.cuda.is_available()
if not CUDA:  # before Triton decorates the kernel (it reads the variable then): CPU tensors
    os.environ.setdefault("TRITON_INTERPRET", "1")

from memory3.model.memory_attention import (ChunkMemories, LayerMemory,  # noqa: E402
                                            chunk_blocks, memory_attention,
                                            memory_attention_torch)

kernels = pytest.importorskip("memory3.kernels.memory_attention")
if not kernels.available():
    pytest.skip("triton not installed", allow_module_level=True)

DEVICE = "cuda" if CUDA else "cpu"
# With TRITON_INTERPRET=1 set by hand on a GPU machine the kernel is interpreted, not compiled.
COMPILED = CUDA and type(kernels._memory_attention_fwd).__name__ != "InterpretedFunction"
cuda = pytest.mark.skipif(not COMPILED, reason="needs a CUDA GPU (the kernel compiled, "
                                               "TRITON_INTERPRET unset)")
TOLERANCE = {torch.float32: dict(atol=1e-4, rtol=1e-4),
             torch.bfloat16: dict(atol=1e-3, rtol=2 ** -7)}


def case(B, H, G, T, D, q_start, chunk_len, M, K, first_chunk, seed=0, dtype=torch.float32,
         device=DEVICE):
    """q (B, H, T, D), k/v (B, G, S, D) and the LayerMemory of random memories, in dtype."""
    g = torch.Generator().manual_seed(seed)
    C = (q_start + T - 1) // chunk_len - first_chunk + 1
    kv = torch.randn(B, C, M, 1, 2, G, K, D, generator=g)
    valid = torch.rand(B, C, M, K, generator=g) > 0.25
    valid[:, -1] = False  # a chunk whose memories are all missing: only sink + context
    mem = ChunkMemories(kv=kv, valid=valid, sink=torch.randn(1, 2, G, D, generator=g),
                        first_chunk=first_chunk)
    blocks = chunk_blocks(mem, 0, 0, chunk_len, 2 * K, 10000.0)
    layer = LayerMemory(*(b.to(device, dtype) if b.is_floating_point() else b.to(device)
                          for b in blocks), q_start, first_chunk, chunk_len)
    S = q_start + T
    q = torch.randn(B, H, T, D, generator=g).to(device, dtype)
    k = torch.randn(B, G, S, D, generator=g).to(device, dtype)
    v = torch.randn(B, G, S, D, generator=g).to(device, dtype)
    return q, k, v, layer


def reference(q, k, v, layer):
    """The PyTorch path in fp32 on the same (possibly bf16) values."""
    layer32 = layer._replace(k=layer.k.float(), v=layer.v.float())
    return memory_attention_torch(q.float(), k.float(), v.float(), layer32)


def check_kernel(shape, dtype, **blocks):
    q, k, v, layer = case(**shape, dtype=dtype)
    got = kernels.fused_memory_attention(q, k, v, layer, **blocks)
    assert got.dtype == dtype and got.device == q.device
    torch.testing.assert_close(got.float(), reference(q, k, v, layer), **TOLERANCE[dtype])


DTYPES = pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])


@DTYPES
@pytest.mark.parametrize("shape", [
    dict(B=2, H=4, G=2, T=40, D=16, q_start=0, chunk_len=16, M=2, K=3, first_chunk=0),
    dict(B=1, H=2, G=1, T=24, D=20, q_start=9, chunk_len=8, M=3, K=2, first_chunk=1),  # unaligned
    dict(B=1, H=4, G=4, T=1, D=16, q_start=37, chunk_len=16, M=2, K=4, first_chunk=2),  # decode
], ids=["prefill", "unaligned-D20", "decode"])
def test_fused_kernel_matches_pytorch(shape, dtype):
    check_kernel(shape, dtype, block_m=16, block_n=16)


# -- CUDA only: the compiled kernel at the model's shapes, and what training takes on the GPU ----

@cuda
@DTYPES
@pytest.mark.parametrize("shape", [
    # `small`: 6 heads over 2 KV heads of 64 dims, 5 memories x 8 slots per 64-token chunk
    dict(B=2, H=6, G=2, T=512, D=64, q_start=0, chunk_len=64, M=5, K=8, first_chunk=0),
    # `2.4b`: 40 heads over 8 KV heads of 80 dims (BLOCK_D 128, masked), the 2,048-token window
    dict(B=1, H=40, G=8, T=2048, D=80, q_start=0, chunk_len=64, M=5, K=8, first_chunk=0),
    # a prefill that starts mid-chunk after 700 cached positions, and one decoding step
    dict(B=2, H=40, G=8, T=300, D=80, q_start=700, chunk_len=64, M=5, K=8, first_chunk=10),
    dict(B=4, H=40, G=8, T=1, D=80, q_start=1999, chunk_len=64, M=5, K=8, first_chunk=31),
], ids=["small-512", "2.4b-2048", "2.4b-resume", "2.4b-decode"])
def test_cuda_kernel_at_model_shapes(shape, dtype):
    check_kernel(shape, dtype)  # the block sizes memory_attention() runs it with


@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_cuda_dispatch_kernel_for_inference_pytorch_path_for_training(monkeypatch, dtype):
    """No autograd: memory_attention() runs the kernel. Autograd: the PyTorch path, whose bf16
    gradients on the GPU match fp32 gradients of the same values to bf16 precision."""
    calls = []
    fused = kernels.fused_memory_attention
    monkeypatch.setattr(kernels, "fused_memory_attention",
                        lambda *a, **kw: calls.append(1) or fused(*a, **kw))
    shape = dict(B=2, H=6, G=2, T=256, D=64, q_start=64, chunk_len=64, M=5, K=8, first_chunk=1)
    q, k, v, layer = case(**shape, dtype=dtype)
    expected = reference(q, k, v, layer)
    with torch.no_grad():
        out = memory_attention(q, k, v, layer)
    assert len(calls) == 1
    torch.testing.assert_close(out.float(), expected, **TOLERANCE[dtype])

    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    out = memory_attention(*leaves, layer)
    assert len(calls) == 1 and out.grad_fn is not None
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    (out.float() * weights).sum().backward()
    leaves32 = [t.detach().float().requires_grad_() for t in (q, k, v)]
    (reference(*leaves32, layer) * weights).sum().backward()
    bound = 1e-5 if dtype == torch.float32 else 2e-2
    for name, got, want in zip("qkv", leaves, leaves32):
        error = (got.grad.float() - want.grad).norm() / want.grad.norm()
        assert error < bound, f"d{name}: relative error {error:.2e} >= {bound:.0e} in {dtype}"
