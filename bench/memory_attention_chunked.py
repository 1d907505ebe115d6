"""Memory attention in training: one masked SDPA call vs one call per few chunks (fwd+bwd).

    python bench/memory_attention_chunked.py                      # small, 512 and 2048; cpu, 256
    python bench/memory_attention_chunked.py --shapes small-2048 --dtype fp32

`memory_attention_torch` (the reference path) scores every query against all C chunk blocks and
all T context keys under one mask; `memory_attention_chunked` gives each group of --groups
chunks only their blocks and the context up to the group's end. Same inputs as
bench/flex_attention.py (random memories laid out as the model's, gradients to q, k, v, none to
the memories), repetitions in rotating order, medians in ms, and the max abs difference of the
output and gradients of each chunked path against the single call.

The model's training path since 2026-12-04 (4 chunks a call; bench/RESULTS.md, continual_step at
the reference's length): --groups 1,4 shows why 4, not 1.
"""
from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from flex_attention import (DTYPES, SHAPES, fwd_bwd, make_inputs, max_diffs,  # noqa: E402
                            model_config)
from memory3.model.memory_attention import (memory_attention_chunked,  # noqa: E402
                                            memory_attention_torch)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", default="small,small-2048,cpu",
                   help=f"comma list of {', '.join(SHAPES)}")
    p.add_argument("--groups", default="1,4",
                   help="comma list: chunks per call of each chunked row")
    p.add_argument("--layer", choices=["memory", "sink"], default="memory")
    p.add_argument("--steps", type=int, default=10, help="timed repetitions per path")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    args.groups = [int(g) for g in args.groups.split(",") if g]
    if not args.groups or min(args.groups) < 1:
        p.error(f"--groups: positive integers, got {args.groups}")
    args.shapes = [s for s in args.shapes.split(",") if s]
    unknown = set(args.shapes) - set(SHAPES)
    if unknown or not args.shapes:
        p.error(f"--shapes: unknown {sorted(unknown)}; known: {', '.join(SHAPES)}")
    return args


def paths(groups: list[int]) -> dict:
    return {"masked": memory_attention_torch,
            **{f"chunked g{g}": lambda q, k, v, mem, g=g: memory_attention_chunked(q, k, v, mem, g)
               for g in groups}}


def measure(shape: str, args) -> dict:
    cfg, batch, seq_len = model_config(shape)
    q, k, v, mem = make_inputs(cfg, batch, seq_len, args.layer, DTYPES[args.dtype])
    grad = torch.randn_like(q)
    rows = paths(args.groups)
    results = {name: fwd_bwd(lambda q, k, v, f=f: f(q, k, v, mem), q, k, v, grad)
               for name, f in rows.items()}
    times = {name: [] for name in rows}
    names = list(rows)
    for i in range(args.warmup + args.steps):
        for name in names[i % len(names):] + names[:i % len(names)]:   # the order rotates
            t0 = time.perf_counter()
            fwd_bwd(lambda q, k, v, f=rows[name]: f(q, k, v, mem), q, k, v, grad)
            if i >= args.warmup:
                times[name].append(time.perf_counter() - t0)
    B, G, C, Sm, D = mem.k.shape
    med = {name: statistics.median(t) * 1e3 for name, t in times.items()}
    return {"shape": shape, "desc": f"{cfg.name} B{batch} H{cfg.n_heads} G{G} D{D} T{seq_len} "
                                    f"({C}x{Sm}+{seq_len} keys)",
            "ms": med, "diffs": {name: max_diffs(results["masked"], results[name])
                                 for name in names[1:]}}


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"# memory_attention_chunked: {args.layer} layer, {args.dtype}, fwd+bwd, "
          f"{args.threads} threads, {args.steps} steps after {args.warmup}; torch "
          f"{torch.__version__}, {platform.machine()}")
    print("shape, then ms per path (masked / chunked, ratio) and the chunked paths' max |diff| "
          "of out / dq / dk / dv against masked")
    reports = []
    for shape in args.shapes:
        r = measure(shape, args)
        reports.append(r)
        ms = r["ms"]
        print(f"{r['desc']}: masked {ms['masked']:.1f} ms; " + "; ".join(
            f"{name} {ms[name]:.1f} ms ({ms['masked'] / ms[name]:.2f}x, diff "
            + "/".join(f"{d:.0e}" for d in r["diffs"][name]) + ")"
            for name in list(ms)[1:]), flush=True)
    return reports


if __name__ == "__main__":
    main()
