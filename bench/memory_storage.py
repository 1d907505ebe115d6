"""Storage: bytes per memory at the 2.4b shape, bf16 and compressed, and what compression costs.

Memories have the 2.4b shape (22 memory layers, 2, 8 KV heads, 8 tokens, head dim 80). No 2.4b
model exists here, so the vectors are synthetic but shaped like real ones: per memory layer, keys
and values each follow their own Gaussian with a decaying spectrum (variance exp(-2i/16) along
dimension i of a random rotation, plus a random mean), and keys are then rotated by rotary at
their token position (1..127), as the encoder stores them. The codec trains on `--train` memories
and is measured on `--test` others, through a real bank (MemoryBank.create / add / memories).

Reported: kv bytes per memory (the SPEC's measure: 450,560 in bf16, goal <= 39,424 compressed),
the bytes a record takes on disk (+ positions and the record's row/encoder/key), the relative
squared error of the vectors, and the relative error of an attention read over the decoded keys
and values (softmax(q.K/sqrt(D)).V for random queries, per layer and head): what the model sees.

    python bench/memory_storage.py                      # opq14: 14 bytes per 80-dim vector
    python bench/memory_storage.py --codec SQ8
"""
from __future__ import annotations

import argparse
import math
import os
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np
import torch

from memory3.config import ModelConfig
from memory3.memory import EncodedMemories, MemoryBank, MemoryLayout, Reference
from memory3.memory.references import reference_key
from memory3.model.layers import apply_rotary, rotary_tables


def synthetic_memories(layout: MemoryLayout, n: int, seed: int) -> EncodedMemories:
    """n memories (see the module docstring); the distributions depend on layout only, the
    draws on seed."""
    shape_rng = torch.Generator().manual_seed(1234)  # same distributions for train and test
    draw = torch.Generator().manual_seed(seed)
    D, L = layout.head_dim, layout.n_layers
    spectrum = torch.exp(-torch.arange(D) / 16.0)
    kv = torch.empty(n, *layout.kv_shape)
    for layer in range(L):
        for kind in range(2):
            rotation, _ = torch.linalg.qr(torch.randn(D, D, generator=shape_rng))
            mean = torch.randn(D, generator=shape_rng) * spectrum
            z = torch.randn(n, layout.n_kv_heads, layout.top_k, D, generator=draw)
            kv[:, layer, kind] = (z * spectrum + mean) @ rotation.T
    positions = torch.randint(1, layout.reference_len,
                              (n, L, layout.n_kv_heads, layout.top_k), generator=draw)
    positions = positions.sort(dim=-1).values
    cos, sin = rotary_tables(D, layout.reference_len, 10000.0)
    kv[:, :, 0] = apply_rotary(kv[:, :, 0], cos[positions], sin[positions])
    return EncodedMemories(kv, positions)


def attention_read(kv: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
    """softmax(q.K/sqrt(D)).V of each memory's 8 slots: kv (N, L, 2, G, K, D), q (Q, D)."""
    k, v = kv[:, :, 0].float(), kv[:, :, 1].float()
    weights = torch.einsum("qd,nlgkd->nlgqk", queries, k) / math.sqrt(kv.shape[-1])
    return torch.einsum("nlgqk,nlgkd->nlgqd", weights.softmax(-1), v)


def references(n: int, offset: int) -> list[Reference]:
    out = []
    for i in range(offset, offset + n):
        tokens = (5 + i % 400,)
        out.append(Reference(reference_key("bench", i, tokens), "bench", i, i + 1, tokens,
                             f"reference {i}"))
    return out


def measure(codec: str, layout_cfg: ModelConfig, train: EncodedMemories, test: EncodedMemories,
            folder: Path) -> dict:
    bank = MemoryBank.create(folder, layout_cfg, embedder="hashing:64",
                             codec=None if codec == "none" else codec)
    start = time.perf_counter()
    bank.train_codec(train)
    train_s = time.perf_counter() - start
    start = time.perf_counter()
    bank.add(references(len(test), 0), test, "synthetic")
    encode_s = time.perf_counter() - start
    start = time.perf_counter()
    decoded = bank.memories(np.arange(len(test)), dtype=torch.float32)
    decode_s = time.perf_counter() - start
    shard = bank.manifest["segments"][0]["files"]
    x, y = test.kv, decoded.kv
    g = torch.Generator().manual_seed(7)
    queries = torch.randn(16, layout_cfg.head_dim, generator=g) * 2
    read_x, read_y = attention_read(x, queries), attention_read(y, queries)
    stats = bank.stats()
    bank.close()
    return {"codec": stats["codec"], "kv_bytes": stats["kv_bytes_per_memory"],
            "disk_kv_bytes": shard["kv"]["bytes"] / len(test),
            "disk_record_bytes": sum(shard[k]["bytes"] for k in ("kv", "pos", "rec")) / len(test),
            "rel_sq_err": float(((y - x) ** 2).sum() / (x ** 2).sum()),
            "rel_sq_err_keys": float(((y - x)[:, :, 0] ** 2).sum() / (x[:, :, 0] ** 2).sum()),
            "rel_sq_err_values": float(((y - x)[:, :, 1] ** 2).sum() / (x[:, :, 1] ** 2).sum()),
            "read_rel_err": float((read_y - read_x).norm() / read_x.norm()),
            "cosine_min": float(torch.nn.functional.cosine_similarity(
                y.reshape(-1, layout_cfg.head_dim), x.reshape(-1, layout_cfg.head_dim)).min()),
            "train_s": train_s, "encode_per_s": len(test) / encode_s,
            "decode_per_s": len(test) / decode_s}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--codec", default="opq14", help="compressed codec (FAISS factory or opq<M>)")
    p.add_argument("--train", type=int, default=256,
                   help="training memories (x 64 vectors per layer and kind)")
    p.add_argument("--test", type=int, default=64, help="memories measured")
    p.add_argument("--faiss-threads", type=int, default=1,
                   help="1 avoids OpenMP spinning on a busy 2-core machine")
    args = p.parse_args()
    faiss.omp_set_num_threads(args.faiss_threads)
    cfg = ModelConfig.from_name("2.4b")
    layout = MemoryLayout.from_model_config(cfg)
    train = synthetic_memories(layout, args.train, seed=1)
    test = synthetic_memories(layout, args.test, seed=2)
    print(f"2.4b memory shape {layout.kv_shape} = {layout.n_vectors:,} vectors of "
          f"{layout.head_dim} dims; synthetic keys/values; {args.train} training and {args.test} "
          f"test memories; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for codec in ("none", args.codec):
            rows.append(measure(codec, cfg, train, test, Path(tmp) / codec))
    print(f"{'codec':<16} {'kv B/memory':>12} {'on disk':>9} {'+pos+rec':>9} {'x smaller':>9} "
          f"{'rel sq err':>10} {'keys':>8} {'values':>8} {'read err':>8} {'min cos':>7} "
          f"{'train s':>7} {'enc/s':>6} {'dec/s':>6}")
    for r in rows:
        print(f"{r['codec']:<16} {r['kv_bytes']:>12,} {r['disk_kv_bytes']:>9,.0f} "
              f"{r['disk_record_bytes']:>9,.0f} {rows[0]['kv_bytes'] / r['kv_bytes']:>9.1f} "
              f"{r['rel_sq_err']:>10.2e} {r['rel_sq_err_keys']:>8.2e} "
              f"{r['rel_sq_err_values']:>8.2e} {r['read_rel_err']:>8.2e} {r['cosine_min']:>7.3f} "
              f"{r['train_s']:>7.1f} {r['encode_per_s']:>6.0f} {r['decode_per_s']:>6.0f}")
    goal = 39_424
    compressed = rows[1]["kv_bytes"]
    print(f"goal: <= {goal:,} kv bytes per memory compressed: "
          f"{'met' if compressed <= goal else 'NOT met'} ({compressed:,}; "
          f"{compressed + layout.positions_bytes:,} with the {layout.positions_bytes:,} bytes of "
          f"positions)")


if __name__ == "__main__":
    main()
