"""memory_attention_chunked (the training path: one SDPA call per few chunks) computes what
memory_attention_torch (the reference: one masked call for all chunks) computes, output and
gradients, with invalid slots, sink-only chunks, grouped heads, queries that start mid-chunk and
any number of chunks per call (CPU, ~2 s)."""
from __future__ import annotations

import pytest
import torch

from memory3.model.memory_attention import (memory_attention, memory_attention_chunked,
                                            memory_attention_torch)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def bench():
    from conftest import bench_module
    return bench_module("flex_attention")


@pytest.mark.parametrize("layer", ["memory", "sink"])
@pytest.mark.parametrize("q_start", [0, 5, 8])
@pytest.mark.parametrize("group", [1, 2, 3])
def test_chunked_matches_masked(bench, layer, q_start, group):
    cfg, B, T = bench.model_config("tiny")                           # chunk 8, 3 chunks
    q, k, v, mem = bench.make_inputs(cfg, B, T, layer, torch.float32)
    assert q.shape[1] != k.shape[1]                                  # grouped query heads
    q, mem = q[:, :, q_start:], mem._replace(q_start=q_start)        # a prefill continuing
    grad_out = torch.randn(q.shape, generator=torch.Generator().manual_seed(1))
    want = bench.fwd_bwd(lambda q, k, v: memory_attention_torch(q, k, v, mem), q, k, v, grad_out)
    got = bench.fwd_bwd(lambda q, k, v: memory_attention_chunked(q, k, v, mem, group),
                        q, k, v, grad_out)
    for name, a, b in zip(["out", "dq", "dk", "dv"], want, got):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("q_start", [0, 13])
def test_the_model_path_matches_masked_over_several_calls(bench, q_start):
    """memory_attention() as training runs it: 4 chunks a call, here 6 chunks of 8 (two calls)."""
    cfg, B, _ = bench.model_config("tiny")
    q, k, v, mem = bench.make_inputs(cfg, B, 6 * cfg.chunk_len, "memory", torch.float32)
    q, mem = q[:, :, q_start:], mem._replace(q_start=q_start)
    grad_out = torch.randn(q.shape, generator=torch.Generator().manual_seed(1))
    want = bench.fwd_bwd(lambda q, k, v: memory_attention_torch(q, k, v, mem), q, k, v, grad_out)
    got = bench.fwd_bwd(lambda q, k, v: memory_attention(q, k, v, mem), q, k, v, grad_out)
    for name, a, b in zip(["out", "dq", "dk", "dv"], want, got):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5, msg=lambda m: f"{name}: {m}")


def test_chunked_rejects_queries_outside_the_memories(bench):
    cfg, B, T = bench.model_config("tiny")
    q, k, v, mem = bench.make_inputs(cfg, B, T, "memory", torch.float32)
    with pytest.raises(ValueError, match="memories cover chunks 1..3"):
        memory_attention_chunked(q, k, v, mem._replace(first_chunk=1))
