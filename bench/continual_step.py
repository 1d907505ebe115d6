"""Continual-training step time vs warmup step time, same model, same batches, one run.

    python bench/continual_step.py                       # small preset, batch 4 x 512, bf16
    python bench/continual_step.py --dtype fp32 --threads 2 --steps 10
    python bench/continual_step.py --profile             # + cProfile of one continual step

Setup (cached in --cache, built once): a generated world (memory3.data.synthetic) -> tokenizer ->
token shards -> a `small` warmup checkpoint (a few steps) -> a memory bank of the world's knowledge
built by that checkpoint (`build_bank`). Knowledge records are joined --facts-per-doc at a time so
references run to ~128 tokens, as the reference model's did; --facts-per-doc 1 gives short ones.

Timing: one `Trainer` (the real DeepSpeed engine, built from a continual recipe that starts from
the checkpoint) and two phases with the same recipe, hence the same loader seed and the same batch
sequence: `WarmupPhase` and `ContinualPhase` (reading the bank). A step is `Trainer.train_step()`
with `trainer.phase` set to one or the other: batch fetch (continual: chunk texts, retrieval,
overlap filtering), forward (continual: real-time encoding of the batch's references + memory
attention), backward, optimizer step. Steps alternate W C C W W C ... so load hits both alike;
both advance the same engine, so they see the same weights' neighbourhood. Prints medians, minima
and the ratio continual/warmup (reference model: just over 2.0; our goal <= 1.5).
"""
from __future__ import annotations

import argparse
import cProfile
import io
import os
import platform
import pstats
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from memory3.config import Recipe  # noqa: E402
from worlds import world_inputs  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="small")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--steps", type=int, default=12, help="timed steps per phase")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per phase first")
    p.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    p.add_argument("--zero", type=int, default=1, help="ZeRO stage")
    p.add_argument("--threads", type=int, default=None, help="default: torch's default")
    p.add_argument("--entities", type=int, default=2000, help="size of the generated world")
    p.add_argument("--facts-per-doc", type=int, default=4)
    p.add_argument("--embedder", default="hashing:512", help="the bank's embedder spec")
    p.add_argument("--knowledge",
                   help="build the bank from this knowledge base (JSON Lines or text) instead of "
                        "the world's: a large real one (the reference's has millions of "
                        "references); retrieval then finds text unrelated to the world's")
    p.add_argument("--cache",
                   default=os.path.join(tempfile.gettempdir(), "memory3_bench_continual"))
    p.add_argument("--profile", action="store_true",
                   help="after timing, cProfile one continual step and print the top functions")
    p.add_argument("overrides", nargs="*",
                   help="recipe overrides (e.g. continual.previous_chunks=4)")
    return p.parse_args(argv)


def base_recipe(args, data: Path) -> Recipe:
    recipe = Recipe.from_name(f"{args.preset}-warmup")
    # A longer sequence than the preset's (the reference trains at 2,048): positions are rotary,
    # so max_seq_len shapes no weight.
    longer = ([f"model.max_seq_len={args.seq_len}"]
              if args.seq_len > recipe.model.max_seq_len else [])
    return recipe.override([
        *longer, f"data.path={data}", f"data.seq_len={args.seq_len}",
        f"train.micro_batch_size={args.batch}", "train.grad_accum=1",
        f"train.precision={args.dtype}", f"train.zero_stage={args.zero}",
        "train.eval_every=1000000", "train.save_every=1000000", "train.log_every=1000000"])


def setup(args) -> tuple[Path, Path, Path]:
    """(shards, warm checkpoint, bank), made once per setting and kept in args.cache."""
    from memory3.memory.build import build_bank
    from memory3.train.trainer import train

    kb = f"-{Path(args.knowledge).resolve()}" if args.knowledge else ""
    key = (f"{args.preset}-{args.entities}-{args.facts_per_doc}-{args.seq_len}-{args.embedder}"
           f"{kb}")
    root = Path(args.cache) / key.replace(":", "_").replace("/", "_")
    shards, run, bank = root / "shards", root / "warm", root / "bank"
    if (bank / "manifest.json").exists():
        return shards, run, bank
    _, knowledge, shards = world_inputs(root, args.entities, args.facts_per_doc, 4096)
    train(base_recipe(args, shards).override(["train.max_steps=3"]), run, progress=False)
    build_bank(run, [args.knowledge or knowledge], bank, embedder=args.embedder, progress=True)
    return shards, run, bank


def read_counts(reads: list) -> tuple[float, float, float]:
    """(mean memories read per chunk, mean distinct references per batch, share of chunks reading
    a full set) over batches of rows (B, C, M), -1 = none; chunk 0 reads nothing by design."""
    per_chunk = np.concatenate([(r[:, 1:] >= 0).sum(-1).ravel() for r in reads])
    distinct = [len(np.unique(r[r >= 0])) for r in reads]
    M = reads[0].shape[-1]
    return float(per_chunk.mean()), float(np.mean(distinct)), float((per_chunk == M).mean())


def timed(fn, into: list[float]):
    def wrapper(*a, **kw):
        t0 = time.perf_counter()
        out = fn(*a, **kw)
        into.append(time.perf_counter() - t0)
        return out
    return wrapper


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from memory3.memory.bank import MemoryBank
    from memory3.train.phases import WarmupPhase
    from memory3.train.trainer import Trainer

    shards, run, bank_dir = setup(args)
    recipe = base_recipe(args, shards).override(
        ["phase=continual", f"continual.bank={bank_dir}", f"train.init_from={run}",
         "train.max_steps=1000000", *args.overrides])
    with tempfile.TemporaryDirectory() as out:
        trainer = Trainer(recipe, out, resume=False, progress=False)
        continual = trainer.phase
        phases = {"warmup": WarmupPhase(recipe, trainer.rank, trainer.world_size, trainer.device),
                  "continual": continual}
        times: dict[str, list[float]] = {name: [] for name in phases}
        fetch: dict[str, list[float]] = {name: [] for name in phases}  # of which next_batch
        losses: dict[str, list[float]] = {name: [] for name in phases}
        for name, phase in phases.items():
            phase.next_batch = timed(phase.next_batch, fetch[name])
        reads = []  # the continual batches' rows (B, C, M): what the step's memories hold
        fetch_continual = continual.next_batch

        def next_batch_recorded():
            batch = fetch_continual()
            reads.append(batch["rows"].numpy())
            return batch
        continual.next_batch = next_batch_recorded
        for i in range(args.warmup + args.steps):
            order = ("warmup", "continual") if i % 2 == 0 else ("continual", "warmup")
            for name in order:
                trainer.phase = phases[name]
                t0 = time.perf_counter()
                stats = trainer.train_step()
                dt = time.perf_counter() - t0
                losses[name].append(stats["loss"])
                if i >= args.warmup:
                    times[name].append(dt)
                else:
                    fetch[name].pop()
        if args.profile:
            trainer.phase = continual
            prof = cProfile.Profile()
            prof.enable()
            trainer.train_step()
            prof.disable()

    cfg, c = recipe.model, recipe.continual
    stats = MemoryBank.open(bank_dir, verify="size").stats()
    print(f"# continual_step: preset={cfg.name} ({cfg.n_params / 1e6:.1f}M params) "
          f"batch={args.batch} seq_len={recipe.data.seq_len} dtype={args.dtype} zero={args.zero} "
          f"threads={torch.get_num_threads()} steps={args.steps} warmup={args.warmup}")
    print(f"# memory layers {cfg.memory_layer_ids}, chunk {cfg.chunk_len}, "
          f"{c.new_per_chunk} new x {c.previous_chunks} previous chunks, bank {stats['rows']} "
          f"references ({args.embedder}), facts/doc {args.facts_per_doc}; engine: DeepSpeed "
          f"(Trainer.train_step)")
    print(f"# torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs")
    print(f"# first losses: warmup {losses['warmup'][0]:.4f}  "
          f"continual {losses['continual'][0]:.4f}")
    print(f"{'phase':<10}{'median s/step':>15}{'min s/step':>12}{'next_batch median s':>21}")
    med = {}
    for name in phases:
        med[name] = statistics.median(times[name])
        print(f"{name:<10}{med[name]:>15.4f}{min(times[name]):>12.4f}"
              f"{statistics.median(fetch[name][:args.steps]):>21.4f}")
    used, distinct, full = read_counts(reads)
    M = cfg.memories_per_chunk
    print(f"memories read per chunk (chunks >= 1): mean {used:.2f} of {M}, {full:.0%} of chunks "
          f"read all {M}; distinct references per batch: {distinct:.1f} of "
          f"{args.batch * (-(-recipe.data.seq_len // cfg.chunk_len) - 1) * M} reads")
    paired = statistics.median(cs / w for w, cs in zip(times["warmup"], times["continual"]))
    print(f"ratio continual/warmup: {med['continual'] / med['warmup']:.3f}x "
          f"(median of per-pair ratios: {paired:.3f}x; of minima: "
          f"{min(times['continual']) / min(times['warmup']):.3f}x)")
    if args.profile:
        text = io.StringIO()
        pstats.Stats(prof, stream=text).sort_stats("cumulative").print_stats(40)
        print("\n## cProfile: one continual step (cumulative)\n" + text.getvalue())


if __name__ == "__main__":
    main()
