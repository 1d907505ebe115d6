"""Memory attention in training: one masked SDPA call vs one call per chunk (fwd+bwd).

    python bench/memory_attention_chunked.py                      # small, 512 and 2048; cpu, 256
    python bench/memory_attention_chunked.py --shapes small-2048 --dtype fp32

`memory_attention_torch` (the reference path) scores every query against all C chunk blocks and
all T context keys under one mask; `memory_attention_chunked` gives each chunk's queries only
their block and the context up to the chunk's end. Same inputs as bench/flex_attention.py (random
memories laid out as the model's, gradients to q, k, v, none to the memories), repetitions
interleaved, medians in ms, and the max abs difference of the output and gradients between the two.

Not adopted in the model (bench/RESULTS.md, continual_step at the reference's length): on this CPU
it wins in fp32 but barely in bf16, the training precision, and loses in sink-only layers. Kept,
tested against the model's path (tests/test_memory_attention_chunked.py), to time on a GPU.
"""
from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from flex_attention import (DTYPES, SHAPES, fwd_bwd, make_inputs, max_diffs,  # noqa: E402
                            model_config)
from memory3.model.memory_attention import (LayerMemory, check_covers,  # noqa: E402
                                            memory_attention_torch)


def memory_attention_chunked(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                             mem: LayerMemory) -> torch.Tensor:
    """memory_attention_torch's result, one SDPA call per chunk: the queries of chunk c over
    [block c; context keys up to the chunk's end]. The single masked call scores every query
    against every chunk's block and every context key, future ones included; this scores only
    what each query may read (about half the context and 1/C of the memory slots) at the price
    of C calls and of copying each chunk's keys next to its block."""
    B, G, C, Sm, D = mem.k.shape
    T = q.shape[2]
    L, start = mem.chunk_len, mem.q_start
    check_covers(start // L - mem.first_chunk, (start + T - 1) // L - mem.first_chunk,
                 mem.first_chunk, C)
    gqa = q.shape[1] != G
    outs = []
    lo = start
    while lo < start + T:
        hi = min((lo // L + 1) * L, start + T)                      # this chunk's queries: lo..hi-1
        c = lo // L - mem.first_chunk
        keys = torch.cat([mem.k[:, :, c], k[:, :, :hi]], dim=2)
        values = torch.cat([mem.v[:, :, c], v[:, :, :hi]], dim=2)
        q_pos = torch.arange(lo, hi, device=q.device)
        causal = q_pos[:, None] >= torch.arange(hi, device=q.device)[None, :]
        mask = torch.cat([mem.valid[:, c, None, :].expand(B, hi - lo, Sm),
                          causal[None].expand(B, hi - lo, hi)], dim=-1)[:, None]
        outs.append(F.scaled_dot_product_attention(q[:, :, lo - start:hi - start], keys, values,
                                                   attn_mask=mask, enable_gqa=gqa))
        lo = hi
    return torch.cat(outs, dim=2)


PATHS = {"masked": memory_attention_torch, "chunked": memory_attention_chunked}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", default="small,small-2048,cpu",
                   help=f"comma list of {', '.join(SHAPES)}")
    p.add_argument("--layer", choices=["memory", "sink"], default="memory")
    p.add_argument("--steps", type=int, default=10, help="timed repetitions per path")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    args.shapes = [s for s in args.shapes.split(",") if s]
    unknown = set(args.shapes) - set(SHAPES)
    if unknown or not args.shapes:
        p.error(f"--shapes: unknown {sorted(unknown)}; known: {', '.join(SHAPES)}")
    return args


def measure(shape: str, args) -> dict:
    cfg, batch, seq_len = model_config(shape)
    q, k, v, mem = make_inputs(cfg, batch, seq_len, args.layer, DTYPES[args.dtype])
    grad = torch.randn_like(q)
    results = {name: fwd_bwd(lambda q, k, v, f=f: f(q, k, v, mem), q, k, v, grad)
               for name, f in PATHS.items()}
    times = {name: [] for name in PATHS}
    for i in range(args.warmup + args.steps):
        for name in (list(PATHS) if i % 2 == 0 else list(PATHS)[::-1]):
            t0 = time.perf_counter()
            fwd_bwd(lambda q, k, v, f=PATHS[name]: f(q, k, v, mem), q, k, v, grad)
            if i >= args.warmup:
                times[name].append(time.perf_counter() - t0)
    B, G, C, Sm, D = mem.k.shape
    med = {name: statistics.median(t) * 1e3 for name, t in times.items()}
    return {"shape": shape, "desc": f"{cfg.name} B{batch} H{cfg.n_heads} G{G} D{D} T{seq_len} "
                                    f"({C}x{Sm}+{seq_len} keys)",
            "ms": med, "ratio": med["masked"] / med["chunked"],
            "diffs": max_diffs(results["masked"], results["chunked"])}


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"# memory_attention_chunked: {args.layer} layer, {args.dtype}, fwd+bwd, "
          f"{args.threads} threads, {args.steps} steps after {args.warmup}; torch "
          f"{torch.__version__}, {platform.machine()}")
    print(f"{'shape':<44} {'masked ms':>10} {'chunked ms':>11} {'masked/chunked':>15}  "
          f"max |diff| out / dq / dk / dv")
    rows = []
    for shape in args.shapes:
        r = measure(shape, args)
        rows.append(r)
        print(f"{r['desc']:<44} {r['ms']['masked']:>10.1f} {r['ms']['chunked']:>11.1f} "
              f"{r['ratio']:>15.2f}  " + " / ".join(f"{d:.1e}" for d in r["diffs"]), flush=True)
    return rows


if __name__ == "__main__":
    main()
