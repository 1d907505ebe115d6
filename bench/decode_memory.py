"""Decoding speed with memory: plain decoding vs explicit memory vs text RAG, one model, one run.

    python bench/decode_memory.py             # small preset, 64 + 256 tokens, fp32, 1 thread
    python bench/decode_memory.py --dtype bf16 --reps 9
    python bench/decode_memory.py --profile   # + cProfile of one generation of each

Setup (cached in --cache, built once): a generated world (memory3.data.synthetic) -> tokenizer ->
token shards -> a `small` warmup checkpoint (a couple of steps: this is about speed, not text)
-> a memory bank of the world's knowledge built by that checkpoint (`build_bank`, hashing
embedder, FAISS index). Knowledge records are joined --facts-per-doc at a time so references run
to ~100 tokens (--facts-per-doc 12: the full 128, as the reference model's did). The checkpoint's
max_seq_len is raised to 1024 (--max-seq-len) so that rag gets all 5 references *and* the whole
context (5 x ~100 + 320 tokens): with 512 its prefix would be cut and rag would look cheaper than
it is.

Contenders, each a call of `memory3.generate.generate` on the same prompt (64 tokens of held-out
text), greedy, exactly --new-tokens new tokens (no stop at EOS), timed as a whole (prefill,
retrievals, memory loading, decoding):
  none    no bank: plain KV-cache decoding.
  memory  the bank: memories of 5 references swapped in every 64 tokens (retrieval, RAM cache).
  rag     the same retrieval schedule, references as text in front of the context: the KV cache
          is rebuilt (references + context prefilled again) at every chunk boundary.
  memory_concat  `memory` with a KV cache that has no memory slots (model.new_cache(...,
          memory_slots=0)): every layer concatenates the chunk's block with the whole cache at
          every token, as decoding did before the slots; shows what the slots are worth.
Repetitions run all three in an order that flips every repetition, so load hits all alike.
Prints tokens/s (median) and the ratios memory/none (goal >= 0.95; the reference paper: 0.65)
and memory/rag (goal >= 2.0), also as the median of the per-repetition ratios (the figure to
read on a loaded machine) and as the ratio of the minima (the quiet-machine figure).
"""
from __future__ import annotations

import argparse
import cProfile
import functools
import io
import os
import platform
import pstats
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from memory3.config import Recipe  # noqa: E402
from memory3.generate import generate  # noqa: E402
from memory3.model import Transformer  # noqa: E402
from worlds import world_inputs  # noqa: E402

SIDES = ("none", "memory", "rag", "memory_concat")
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="small")
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--reps", type=int, default=7, help="timed generations per contender")
    p.add_argument("--warmup", type=int, default=1, help="untimed generations per contender first")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    # One thread: on a shared 2-core machine, 2 OpenMP threads wait at every barrier for a
    # descheduled partner and a decoding step takes ~15x longer (74 vs 4.9 ms, measured).
    p.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    p.add_argument("--entities", type=int, default=2000, help="size of the generated world")
    p.add_argument("--facts-per-doc", type=int, default=8,
                   help="knowledge records per reference document (12: every reference runs to "
                        "the full 128 tokens, as the reference model's did)")
    p.add_argument("--max-seq-len", type=int, default=1024,
                   help="the model's window (2048: the reference model's)")
    p.add_argument("--cache", default=os.path.join(tempfile.gettempdir(), "memory3_bench_decode"))
    p.add_argument("--profile", action="store_true",
                   help="after timing, cProfile one generation of each and print the top functions")
    return p.parse_args(argv)


def setup(args) -> tuple[Path, Path, Path]:
    """(checkpoint run, bank, held-out text), made once per setting and kept in args.cache."""
    from memory3.memory.build import build_bank
    from memory3.train.trainer import train

    root = Path(args.cache) / f"{args.preset}-{args.entities}-{args.facts_per_doc}" \
        f"{'' if args.max_seq_len == 1024 else f'-{args.max_seq_len}'}"
    run, bank, heldout = root / "warm", root / "bank", root / "world" / "heldout.txt"
    if (bank / "manifest.json").exists():
        return run, bank, heldout
    _, knowledge, _ = world_inputs(root, args.entities, args.facts_per_doc, 8192)
    recipe = Recipe.from_name(f"{args.preset}-warmup").override([
        f"data.path={root / 'shards'}", f"model.max_seq_len={args.max_seq_len}",
        "train.max_steps=2",
        "train.micro_batch_size=2", "train.grad_accum=1", "train.precision=fp32",
        "train.eval_every=1000000", "train.save_every=1000000", "train.log_every=1000000"])
    train(recipe, run, progress=False)
    build_bank(run, [knowledge], bank, embedder="hashing:512", progress=False)
    return run, bank, heldout


def make_prompt(tokenizer, heldout: Path, n_tokens: int) -> str:
    """Held-out text cut to n_tokens tokens with the BOS that generate() puts in front."""
    ids = tokenizer.encode(" ".join(heldout.read_text().split()))
    return tokenizer.decode(ids[:n_tokens - 1])


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from memory3.memory.bank import MemoryBank
    from memory3.train.checkpoint import load_model, load_tokenizer

    run, bank_dir, heldout = setup(args)
    model, recipe, _ = load_model(run, device="cpu")
    model = model.to(DTYPES[args.dtype]).eval()
    tok = load_tokenizer(run)
    bank = MemoryBank.open(bank_dir, verify="size")
    prompt = make_prompt(tok, heldout, args.prompt_tokens)

    def one(side: str):
        if side == "memory_concat":  # this instance only, for this call
            model.new_cache = functools.partial(Transformer.new_cache, model, memory_slots=0)
        try:
            return generate(model, tok, prompt, bank=None if side == "none" else bank,
                            mode="rag" if side == "rag" else "memory",
                            max_new_tokens=args.new_tokens, stop_at_eos=False)
        finally:
            model.__dict__.pop("new_cache", None)

    seconds: dict[str, list[float]] = {s: [] for s in SIDES}
    outputs = {}
    for i in range(args.warmup + args.reps):
        for side in (SIDES if i % 2 == 0 else SIDES[::-1]):
            t0 = time.perf_counter()
            outputs[side] = one(side)
            dt = time.perf_counter() - t0
            if i >= args.warmup:
                seconds[side].append(dt)

    cfg = model.cfg
    n_new = len(outputs["none"].tokens) - len(tok.encode(prompt)) - 1
    rag = outputs["rag"]
    ref_tokens = [sum(len(t) for t in [bank.references([r["row"]])[0].tokens
                                       for r in x.references]) for x in rag.retrievals]
    print(f"# decode_memory: preset={cfg.name} ({cfg.n_params / 1e6:.1f}M params) "
          f"dtype={args.dtype} threads={torch.get_num_threads()} prompt={args.prompt_tokens} "
          f"new={n_new} reps={args.reps} warmup={args.warmup}")
    print(f"# memory layers {cfg.memory_layer_ids}, chunk {cfg.chunk_len}, "
          f"{cfg.memories_per_chunk} memories/chunk, bank {len(bank)} references; rag prefix "
          f"{statistics.mean(ref_tokens):.0f} reference tokens on average over "
          f"{len(rag.retrievals)} rebuilds; torch {torch.__version__}, {platform.machine()}")
    tps = {s: [n_new / t for t in seconds[s]] for s in SIDES}
    print(f"{'side':14} {'median s':>9} {'min s':>8} {'tokens/s (median)':>18}")
    for s in SIDES:
        print(f"{s:14} {statistics.median(seconds[s]):9.3f} {min(seconds[s]):8.3f} "
              f"{statistics.median(tps[s]):18.1f}")
    for a, b, goal in (("memory", "none", "; goal >= 0.95"), ("memory", "rag", "; goal >= 2.0"),
                       ("memory", "memory_concat", "")):
        medians = statistics.median(tps[a]) / statistics.median(tps[b])
        pairs = statistics.median(x / y for x, y in zip(tps[a], tps[b]))
        minima = min(seconds[b]) / min(seconds[a])
        print(f"ratio {a}/{b} (tokens/s): {medians:.3f}x (median of per-rep ratios {pairs:.3f}x, "
              f"of minima {minima:.3f}x{goal})")
    print(f"bank RAM cache: {bank.cache_hits} hits, {bank.cache_misses} misses; memory and "
          f"memory_concat generated the same tokens: "
          f"{outputs['memory'].tokens == outputs['memory_concat'].tokens}")

    if args.profile:
        for side in SIDES:
            prof = cProfile.Profile()
            prof.enable()
            one(side)
            prof.disable()
            out = io.StringIO()
            pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(18)
            print(f"\n# cProfile of one `{side}` generation (by own time)")
            print("\n".join(out.getvalue().splitlines()[4:]))


if __name__ == "__main__":
    main()
