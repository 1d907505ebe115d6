"""Retrieval: queries/s and recall@5 of the bank's approximate index vs exact search, same run.

Data: `--n` synthetic reference embeddings (default 1M x 384, the size of MiniLM vectors), drawn
as a clustered Gaussian so that the task is not trivially uniform: n/500 cluster centres with a
decaying spectrum (variance exp(-2i/64) along dimension i), points = centre + noise of the same
spectrum scaled by --spread (1.0: a point's nearest neighbours are often in other clusters), all
L2-normalised (cosine = inner product). Queries are fresh draws from the same mixture.

Exact: brute-force inner product over all n vectors (faiss.knn, what "IDMap2,Flat" computes).
Approximate: the index `ReferenceIndex.new(dim, n)` chooses for a bank of this size (index.py),
built with row ids through the bank's own code, searched at several efSearch (or nprobe) values.
recall@5 = |approximate top-5 & exact top-5| / 5, averaged over the queries.

    python bench/retrieval.py                 # 1M x 384, 2 threads (the SPEC's goal setting)
    python bench/retrieval.py --n 100000      # a quick look
"""
from __future__ import annotations

import argparse
import os
import time

import faiss
import numpy as np

from memory3.memory.index import ReferenceIndex


def make_data(n: int, dim: int, spread: float, seed: int, chunk: int = 100_000):
    """(n, dim) float32 normalised vectors and a sampler of queries from the same mixture."""
    rng = np.random.default_rng(seed)
    n_centres = max(100, n // 500)
    spectrum = np.exp(-np.arange(dim) / 64.0).astype(np.float32)
    centres = rng.standard_normal((n_centres, dim)).astype(np.float32) * spectrum

    def draw(m: int, r: np.random.Generator) -> np.ndarray:
        x = centres[r.integers(0, n_centres, m)]
        x += r.standard_normal((m, dim)).astype(np.float32) * spectrum * spread
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        return x

    data = np.empty((n, dim), dtype=np.float32)
    for i, start in enumerate(range(0, n, chunk)):
        data[start:start + chunk] = draw(min(chunk, n - start), np.random.default_rng([seed, i]))
    return data, lambda m: draw(m, np.random.default_rng([seed, 1 << 30]))


def timed_search(search, queries: np.ndarray, k: int, threads: int, repeats: int = 2):
    """(wall seconds, CPU seconds / threads, results), each time the best of `repeats`.

    On a shared machine the wall time measures the neighbours too; the process's CPU time over
    the thread count is what the search would take on `threads` idle cores (an upper bound:
    OpenMP threads spinning while they wait count as busy)."""
    best_wall = best_cpu = float("inf")
    result = None
    for _ in range(repeats):
        wall, cpu = time.perf_counter(), time.process_time()
        result = search(queries, k)
        best_wall = min(best_wall, time.perf_counter() - wall)
        best_cpu = min(best_cpu, (time.process_time() - cpu) / threads)
    return best_wall, best_cpu, result


def recall_at(approx: np.ndarray, exact: np.ndarray) -> float:
    k = exact.shape[1]
    return float(np.mean([len(set(a) & set(e)) / k for a, e in zip(approx, exact)]))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=1_000_000, help="reference embeddings")
    p.add_argument("--dim", type=int, default=384)
    p.add_argument("--queries", type=int, default=10_000, help="queries for the approximate qps")
    p.add_argument("--exact-queries", type=int, default=1_000,
                   help="queries searched exactly (ground truth and exact qps)")
    p.add_argument("--k", type=int, default=5)
    p.add_argument("--spread", type=float, default=1.0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--factory", default=None, help="override the index the bank would choose")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    faiss.omp_set_num_threads(args.threads)

    start = time.perf_counter()
    data, draw_queries = make_data(args.n, args.dim, args.spread, args.seed)
    queries = draw_queries(args.queries)
    print(f"data: {args.n:,} x {args.dim} clustered Gaussian (spread {args.spread}), "
          f"{args.queries:,} queries, {args.threads} threads; made in "
          f"{time.perf_counter() - start:.1f} s; load average {os.getloadavg()[0]:.1f} "
          f"on {os.cpu_count()} cores")

    def exact_search(q, k):
        return faiss.knn(q, data, k, metric=faiss.METRIC_INNER_PRODUCT)[1]

    exact_q = queries[:args.exact_queries]
    exact_s, exact_cpu, truth = timed_search(exact_search, exact_q, args.k, args.threads,
                                             repeats=1)
    exact_qps, exact_cpu_qps = len(exact_q) / exact_s, len(exact_q) / exact_cpu
    print(f"exact (brute-force inner product): {exact_qps:,.0f} queries/s wall, "
          f"{exact_cpu_qps:,.0f} per {args.threads} cores of CPU time "
          f"({len(exact_q):,} queries in {exact_s:.1f} s)")

    index = ReferenceIndex.new(args.dim, args.n, args.factory)
    start = time.perf_counter()
    if not index.is_trained:
        index.train(data)
    index.add(data, np.arange(args.n))
    print(f"approximate: {index.factory} ({index.search_params or 'default parameters'}) built "
          f"in {time.perf_counter() - start:.1f} s")

    knob, values = ("efSearch", (64, 96, 192)) if "HNSW" in index.factory else (
        ("nprobe", (16, 32, 64)) if "IVF" in index.factory else ("-", (None,)))
    print(f"{knob:>9} {'recall@' + str(args.k):>9} {'queries/s':>10} {'x exact':>8} "
          f"{'CPU-time q/s':>12} {'x exact':>8}")
    for value in values:
        if value is not None:
            faiss.ParameterSpace().set_index_parameters(index.index, f"{knob}={value}")
        seconds, cpu, (_, ids) = timed_search(index.search, queries, args.k, args.threads)
        recall = recall_at(ids[:args.exact_queries], truth)
        qps, cpu_qps = len(queries) / seconds, len(queries) / cpu
        chosen = " <- the bank's setting" if f"{knob}={value}" == index.search_params else ""
        print(f"{str(value or '-'):>9} {recall:>9.3f} {qps:>10,.0f} {qps / exact_qps:>7.0f}x "
              f"{cpu_qps:>12,.0f} {cpu_qps / exact_cpu_qps:>7.0f}x{chosen}")
    print(f"load average {os.getloadavg()[0]:.1f} at the end")


if __name__ == "__main__":
    main()
