"""bench/flex_attention.py: its flex_attention path computes what memory_attention_torch computes,
output and gradients, at a tiny shape with invalid slots and sink-only chunks (CPU, ~10 s)."""
from __future__ import annotations

import pytest
import torch

from memory3.model.memory_attention import memory_attention_torch

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def bench():
    from conftest import bench_module
    return bench_module("flex_attention")


@pytest.mark.parametrize("layer", ["memory", "sink"])
def test_flex_matches_masked_sdpa(bench, layer):
    cfg, B, T = bench.model_config("tiny")
    q, k, v, mem = bench.make_inputs(cfg, B, T, layer, torch.float32)
    if layer == "memory":
        assert not mem.valid.all(), "the inputs should hold invalid slots"
        assert not mem.valid[0, 0, 1:].any(), "row 0 should read only the sink in chunk 0"
        assert mem.valid[1, 0, 1:].any()
    grad_out = torch.randn(q.shape, generator=torch.Generator().manual_seed(1))
    want = bench.fwd_bwd(lambda q, k, v: memory_attention_torch(q, k, v, mem), q, k, v, grad_out)
    try:
        block_mask = bench.memory_block_mask(mem, T, T)
        flex = torch.compile(bench.flex_attention, backend="aot_eager")
        with bench.cpu_backward_allowed():
            got = bench.fwd_bwd(
                lambda q, k, v: bench.flex_memory_attention(q, k, v, mem, block_mask, flex),
                q, k, v, grad_out)
    except (NotImplementedError, RuntimeError) as e:  # a PyTorch without flex on CPU
        pytest.skip(f"flex_attention does not run on this CPU build: {type(e).__name__}: {e}")
    for name, a, b in zip(["out", "dq", "dk", "dv"], want, got):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5, msg=lambda m: f"{name}: {m}")


def test_bench_help(bench, capsys):
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["--help"])
    assert exit_info.value.code == 0
    assert "--shape" in capsys.readouterr().out
