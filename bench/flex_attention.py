"""FlexAttention vs today's masked SDPA for memory attention in training (issue 13 section 4).

    python bench/flex_attention.py                        # continual_step shape, bf16, 2 threads
    python bench/flex_attention.py --dtype fp32 --steps 10
    python bench/flex_attention.py --shape cpu            # the cpu preset, memory_top_k 32
    python bench/flex_attention.py --layer sink           # a layer that reads only the sink

One memory-attention call as the model makes it in a training step: queries (B, H, T, D) at
positions 0..T-1 over [their chunk's block: sink + M*K memory slots, masked by `valid`] + [causal
context] (memory3/model/memory_attention.py). Memories are random but laid out as the model's
(`ChunkMemories` -> `layer_memory`), with a random number of kept tokens per memory (compacted,
so `valid` masks the tail of some memories) and no gradient, as in continual training (memories
are encoded under no_grad); gradients flow to q, k and v.

Shapes (--shape):
  small   the continual_step shape: small preset (H 6, G 2, D 64), batch 4 x 512, chunk 64,
          5 memories x memory_top_k 8 per chunk -> 8 chunks x 41 slots + 512 context keys.
  cpu     the cpu preset (H 8, G 8, D 32), batch 4 x 256, chunk 64, 5 memories x top_k 32
          -> 4 chunks x 161 slots + 256 context keys.
  tiny    a few queries, for tests.

Rows, each fwd+bwd of the attention alone (block rotation excluded: both paths share it):
  sdpa eager       memory_attention_torch as the model runs it (the reference)
  sdpa compiled    the same function under torch.compile (inductor)
  flex inductor    torch.compile(flex_attention), the fused kernel: not available for training on
                   CPU in this PyTorch (inference only); the error is printed, no time
  flex aot_eager   flex_attention with the same visibility as a BlockMask, compiled with
                   aot_eager (flex's unfused math path, the only one with a CPU backward); the
                   public API refuses requires_grad on CPU, so its device check is bypassed here
  block mask       create_block_mask (_compile=True) for one batch: the flex rows reuse one, as a
                   step would for all its memory layers; the sdpa rows build their mask per call
and, forward only under no_grad (evaluation on CPU): sdpa eager vs flex inductor (the CPU C++
template, which does compile for inference).

Repetitions are interleaved (each step runs every row once, the order rotating); medians in ms.
Max abs differences of the output and of dq, dk, dv, flex vs the sdpa reference, in fp32 and bf16.
"""
from __future__ import annotations

import argparse
import logging
import os
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn.attention.flex_attention as flex_module
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from memory3.config import MODEL_PRESETS  # noqa: E402
from memory3.model.memory_attention import (ChunkMemories, LayerMemory, compact_slots,  # noqa: E402
                                            layer_memory, memory_attention_torch)

# (preset, batch, seq_len, overrides of the preset's memory fields)
SHAPES = {
    "small": ("small", 4, 512, {}),
    "small-2048": ("small", 4, 2048, {"max_seq_len": 2048}),  # the reference's length
    "cpu": ("cpu", 4, 256, {"memory_top_k": 32}),
    "tiny": ("tiny", 2, 24, {"chunk_len": 8, "memories_per_chunk": 2, "memory_top_k": 3}),
}
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", choices=sorted(SHAPES), default="small")
    p.add_argument("--layer", choices=["memory", "sink"], default="memory",
                   help="a memory layer (sink + memories) or one that reads only the sink")
    p.add_argument("--steps", type=int, default=10, help="timed steps per row")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per row first")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--block-size", type=int, default=128, help="the BlockMask's block size")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def model_config(shape: str):
    import dataclasses
    preset, batch, seq_len, memory = SHAPES[shape]
    return dataclasses.replace(MODEL_PRESETS[preset], **memory), batch, seq_len


def make_inputs(cfg, batch: int, seq_len: int, layer: str, dtype: torch.dtype, seed: int = 0):
    """q (B, H, T, D), k, v (B, G, T, D) and the LayerMemory of one layer, at positions 0..T-1.

    Each memory keeps a random number of tokens (1..K, a few rows all K), as `compact_slots`
    leaves them: valid slots first. Every other row of chunk 0 keeps none (a chunk with only the
    sink, as the first chunk of a sequence reads in training)."""
    g = torch.Generator().manual_seed(seed)
    B, T, C = batch, seq_len, seq_len // cfg.chunk_len
    M, K, G, D = cfg.memories_per_chunk, cfg.memory_top_k, cfg.n_kv_heads, cfg.head_dim
    L_mem = len(cfg.memory_layer_ids)
    kv = torch.randn(B, C, M, L_mem, 2, G, K, D, generator=g)
    kept = torch.randint(1, K + 1, (B, C, M), generator=g)
    kept[:, :, 0] = K
    kept[::2, 0] = 0
    positions = (torch.arange(K) < kept[..., None]).long()                # (B, C, M, K)
    positions = positions[:, :, :, None, None, :].expand(B, C, M, L_mem, G, K)
    kv, valid = compact_slots(kv, positions)
    sink = torch.randn(cfg.n_layers, 2, G, D, generator=g)
    mem = ChunkMemories(kv=kv.to(dtype), valid=valid, sink=sink.to(dtype))
    layer_idx = cfg.memory_layer_ids[0] if layer == "memory" else next(
        i for i in range(cfg.n_layers) if i not in cfg.memory_layer_ids)
    with torch.no_grad():
        lm = layer_memory(mem, layer_idx, cfg, q_start=0)
    q = torch.randn(B, cfg.n_heads, T, D, generator=g).to(dtype)
    k = torch.randn(B, G, T, D, generator=g).to(dtype)
    v = torch.randn(B, G, T, D, generator=g).to(dtype)
    return q, k, v, lm


def memory_mask_mod(mem: LayerMemory):
    """mask_mod over the key layout of memory_attention_torch: [C blocks of Sm slots; context]."""
    C, Sm = mem.k.shape[2], mem.k.shape[3]
    n_mem = C * Sm
    valid = mem.valid.flatten(1)                                          # (B, C*Sm)
    q_start, chunk_len, first_chunk = mem.q_start, mem.chunk_len, mem.first_chunk

    def mask_mod(b, h, q_idx, kv_idx):
        pos = q_idx + q_start
        slot = torch.clamp(kv_idx, max=n_mem - 1)
        own = (slot // Sm) == (pos // chunk_len - first_chunk)
        in_block = own & valid[b, slot]
        causal = pos >= kv_idx - n_mem
        return torch.where(kv_idx < n_mem, in_block, causal)
    return mask_mod


def memory_block_mask(mem: LayerMemory, T: int, S: int, block_size: int = 128,
                      compiled: bool = False):
    """One BlockMask per batch (valid differs by row), shared by all heads and memory layers."""
    B, _, C, Sm, _ = mem.k.shape
    return create_block_mask(memory_mask_mod(mem), B, None, T, C * Sm + S, device=mem.k.device,
                             BLOCK_SIZE=block_size, _compile=compiled)


def flex_memory_attention(q, k, v, mem: LayerMemory, block_mask, flex=flex_attention):
    """What memory_attention_torch computes, as one flex_attention call over the same keys."""
    keys = torch.cat([mem.k.flatten(2, 3), k], dim=2)
    values = torch.cat([mem.v.flatten(2, 3), v], dim=2)
    return flex(q, keys, values, block_mask=block_mask, enable_gqa=q.shape[1] != k.shape[1])


class cpu_backward_allowed:
    """flex_attention refuses inputs that require grad on CPU (its fused CPU kernel is forward
    only); its unfused path has a backward. This lifts that check while active."""

    def __enter__(self):
        self.saved = flex_module._validate_device
        flex_module._validate_device = lambda q, k, v: None

    def __exit__(self, *exc):
        flex_module._validate_device = self.saved


def fwd_bwd(fn, q, k, v, grad_out):
    q, k, v = (x.detach().requires_grad_() for x in (q, k, v))
    out = fn(q, k, v)
    out.backward(grad_out)
    return out.detach(), q.grad, k.grad, v.grad


def max_diffs(a, b) -> list[float]:
    return [(x.float() - y.float()).abs().max().item() for x, y in zip(a, b)]


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch._logging.set_logs(dynamo=logging.ERROR)   # graph-break notes (check_covers' int())
    warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile")
    warnings.filterwarnings("ignore", message="_compile flag on create_block_mask")
    cfg, B, T = model_config(args.shape)
    dtype = DTYPES[args.dtype]

    # Agreement, fp32 and bf16: flex (aot_eager) vs the sdpa reference, same inputs.
    flex_aot = torch.compile(flex_attention, backend="aot_eager")
    diffs = {}
    for name, dt in DTYPES.items():
        q, k, v, mem = make_inputs(cfg, B, T, args.layer, dt, args.seed)
        grad_out = torch.randn(q.shape, generator=torch.Generator().manual_seed(1)).to(dt)
        bm = memory_block_mask(mem, T, T, args.block_size)
        ref = fwd_bwd(lambda q, k, v: memory_attention_torch(q, k, v, mem), q, k, v, grad_out)
        with cpu_backward_allowed():
            got = fwd_bwd(lambda q, k, v: flex_memory_attention(q, k, v, mem, bm, flex_aot),
                          q, k, v, grad_out)
        diffs[name] = max_diffs(ref, got)
        if name == "bf16":  # for scale: the bf16 reference against fp32 on the same inputs
            q32, k32, v32, mem32 = make_inputs(cfg, B, T, args.layer, torch.float32, args.seed)
            ref32 = fwd_bwd(lambda q, k, v: memory_attention_torch(q, k, v, mem32),
                            q32, k32, v32, grad_out.float())
            diffs["bf16 sdpa vs fp32"] = max_diffs(ref32, ref)

    # Timing, in --dtype.
    q, k, v, mem = make_inputs(cfg, B, T, args.layer, dtype, args.seed)
    grad_out = torch.randn(q.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    sdpa_compiled = torch.compile(memory_attention_torch)
    flex_inductor = torch.compile(flex_attention)
    bm = memory_block_mask(mem, T, T, args.block_size)
    inductor_error = None
    try:
        with cpu_backward_allowed():
            fwd_bwd(lambda q, k, v: flex_memory_attention(q, k, v, mem, bm, flex_inductor),
                    q, k, v, grad_out)
    except Exception as e:  # noqa: BLE001 - reported, it is the finding
        inductor_error = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:160]}"
    if inductor_error is None:
        print("# flex inductor fwd+bwd ran on CPU: add it to the timed rows")

    def flex_step(q, k, v):
        with cpu_backward_allowed():
            return fwd_bwd(lambda q, k, v: flex_memory_attention(q, k, v, mem, bm, flex_aot),
                           q, k, v, grad_out)

    def no_grad(fn):
        def run(q, k, v):
            with torch.no_grad():
                return fn(q, k, v)
        return run

    rows = {
        "sdpa eager": lambda q, k, v: fwd_bwd(
            lambda q, k, v: memory_attention_torch(q, k, v, mem), q, k, v, grad_out),
        "sdpa compiled": lambda q, k, v: fwd_bwd(
            lambda q, k, v: sdpa_compiled(q, k, v, mem), q, k, v, grad_out),
        "flex aot_eager": flex_step,
        "block mask": lambda q, k, v: memory_block_mask(mem, T, T, args.block_size, True),
        "fwd: sdpa eager": no_grad(lambda q, k, v: memory_attention_torch(q, k, v, mem)),
        "fwd: flex inductor": no_grad(lambda q, k, v: flex_memory_attention(
            q, k, v, mem, bm, flex_inductor)),
    }
    with torch.no_grad():
        fwd_out = flex_memory_attention(q, k, v, mem, bm, flex_inductor)
        diffs["fwd inductor"] = max_diffs([memory_attention_torch(q, k, v, mem)], [fwd_out])
    times: dict[str, list[float]] = {name: [] for name in rows}
    names = list(rows)
    for i in range(args.warmup + args.steps):
        for name in names[i % len(names):] + names[:i % len(names)]:
            t0 = time.perf_counter()
            rows[name](q, k, v)
            dt = time.perf_counter() - t0
            if i >= args.warmup:
                times[name].append(dt * 1e3)

    C, Sm = mem.k.shape[2], mem.k.shape[3]
    print(f"# flex_attention: shape={args.shape} ({cfg.name} preset) layer={args.layer} "
          f"B={B} H={cfg.n_heads} G={cfg.n_kv_heads} D={cfg.head_dim} T={T} keys={C}x{Sm}+{T} "
          f"dtype={args.dtype} threads={torch.get_num_threads()} steps={args.steps} "
          f"block={args.block_size}")
    print(f"# torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs")
    med = {name: statistics.median(t) for name, t in times.items()}
    ref, ref_fwd = med["sdpa eager"], med["fwd: sdpa eager"]
    for name in names:
        base = ref_fwd if name.startswith("fwd") else ref
        print(f"{name:20s} median {med[name]:9.2f} ms  min {min(times[name]):9.2f} ms  "
              f"x{med[name] / base:.2f} of {'fwd: sdpa eager' if name.startswith('fwd') else 'sdpa eager'}")
    print(f"{'flex inductor':20s} fwd+bwd: {inductor_error or 'ran'}")
    flex, mask = med["flex aot_eager"], med["block mask"]
    print(f"ratios (flex / sdpa): fwd+bwd flex aot_eager / sdpa eager {flex / ref:.2f} "
          f"({(flex + mask) / ref:.2f} with a block mask built per call), / sdpa compiled "
          f"{flex / med['sdpa compiled']:.2f}; fwd only flex inductor / sdpa eager "
          f"{med['fwd: flex inductor'] / ref_fwd:.2f} ({(med['fwd: flex inductor'] + mask) / ref_fwd:.2f})")
    for name, d in diffs.items():
        labels = ["out"] if len(d) == 1 else ["out", "dq", "dk", "dv"]
        print(f"max |diff| {name:18s} " + "  ".join(f"{a} {x:.2e}" for a, x in zip(labels, d)))
    return {"median_ms": med, "diffs": diffs, "inductor_error": inductor_error}


if __name__ == "__main__":
    main()
