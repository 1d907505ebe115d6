"""Compiled training (`train.compile = true`) against eager, `memory3 train`'s step, in one run.

Two Trainers from one recipe, the second with train.compile = true (torch.compile through the
DeepSpeed engine's compile hook): the same seed, so the same initial weights and the same
batches in the same order. Steps interleave (A B B A ...), so machine noise hits both sides
alike. The first --warmup steps of each side are untimed (the compiled side compiles there; its
first step's time is printed apart). Prints median tokens/s of each side and the ratio
compiled/eager, and how far the compiled side's losses drift from eager's over all steps: the
same curve up to bf16 rounding means a drift of the order of the loss's step-to-step noise,
which is printed beside it.

    python bench/compiled_training.py --data SHARDS --recipe cpu-warmup
    python bench/compiled_training.py --data SHARDS --recipe small-warmup --steps 30

The vocabulary follows the shards' tokenizer (as `memory3 train` sizes it).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from memory3.config import Recipe  # noqa: E402
from memory3.train.trainer import Trainer  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="token shards (memory3 prepare-data)")
    p.add_argument("--recipe", default="cpu-warmup", help="a warmup recipe (name or .toml)")
    p.add_argument("--set", nargs="*", default=[], metavar="SECTION.FIELD=VALUE",
                   help="overrides of the recipe, e.g. train.micro_batch_size=4")
    p.add_argument("--steps", type=int, default=50, help="steps per side, all compared for loss")
    p.add_argument("--warmup", type=int, default=5, help="of those, untimed (compilation)")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.steps <= args.warmup:
        sys.exit(f"--steps ({args.steps}) must exceed --warmup ({args.warmup})")
    base = Recipe.from_name(args.recipe).override(
        [f"data.path={args.data}", *args.set, "train.max_steps=1000000",
         "train.eval_every=1000000", "train.save_every=1000000"])
    runs = {side: tempfile.TemporaryDirectory() for side in ("eager", "compiled")}
    trainers = {side: Trainer(base.override([f"train.compile={str(side == 'compiled').lower()}"]),
                              runs[side].name, progress=False) for side in runs}
    recipe = trainers["eager"].recipe
    tokens = recipe.tokens_per_step(1)
    print(f"# compiled_training: {args.recipe}, model {recipe.model.name} "
          f"({recipe.model.n_params / 1e6:.2f}M parameters), batch "
          f"{recipe.train.micro_batch_size} x {recipe.data.seq_len}, {recipe.train.precision}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    times: dict[str, list[float]] = {side: [] for side in trainers}
    losses: dict[str, list[float]] = {side: [] for side in trainers}
    first: dict[str, float] = {}
    for i in range(args.steps):
        for side in ("eager", "compiled") if i % 2 == 0 else ("compiled", "eager"):
            start = time.perf_counter()
            losses[side].append(trainers[side].train_step()["loss"])
            elapsed = time.perf_counter() - start
            first.setdefault(side, elapsed)
            if i >= args.warmup:
                times[side].append(elapsed)
    for side, trainer in trainers.items():
        trainer.close()
        runs[side].cleanup()

    print(f"{'side':9} {'first step s':>12} {'median s/step':>14} {'tokens/s (median)':>18}")
    for side, t in times.items():
        print(f"{side:9} {first[side]:12.2f} {statistics.median(t):14.4f} "
              f"{tokens / statistics.median(t):18,.0f}")
    pairs = [e / c for e, c in zip(times["eager"], times["compiled"])]
    print(f"ratio compiled/eager (tokens/s): "
          f"{statistics.median(times['eager']) / statistics.median(times['compiled']):.3f}x "
          f"(median of per-pair ratios: {statistics.median(pairs):.3f}x)")
    drift = [c - e for e, c in zip(losses["eager"], losses["compiled"])]
    noise = statistics.median(abs(b - a) for a, b in zip(losses["eager"], losses["eager"][1:]))
    print(f"loss, {args.steps} steps: eager {losses['eager'][0]:.4f} -> {losses['eager'][-1]:.4f}, "
          f"compiled {losses['compiled'][0]:.4f} -> {losses['compiled'][-1]:.4f}; compiled - "
          f"eager: max |d| {max(map(abs, drift)):.4f}, mean {statistics.mean(drift):+.4f}, "
          f"last 10 mean {statistics.mean(drift[-10:]):+.4f} (eager's median step-to-step "
          f"change: {noise:.4f})")


if __name__ == "__main__":
    main()
