"""`memory3 train`'s step (the DeepSpeed engine) against a plain PyTorch loop: what the engine costs.

Issue 15 asks that CPU recipes train through `memory3 train` at >= 0.9x the tokens/s of a plain
loop over the same model, batches and precision. At a few million parameters a step is short, so
the engine's per-step work (its optimizer wrapper, bf16 master weights, gradient clipping, the
trainer's bookkeeping) is a visible share of it.

engine: `Trainer.train_step()` exactly as `memory3 train` runs it (phase batch from the shards,
        engine forward/backward/step; DeepSpeed bf16 = bf16 weights with fp32 master weights in its
        optimizer), no evaluation or checkpoint inside the timed steps.
loop:   the same Transformer and initial weights, torch AdamW (same hyperparameters and groups),
        bf16 autocast over fp32 weights (the plain loop of bench/copy_emergence.py, whose
        ~14,700 tokens/s the issue quotes), gradient clipping, the same batches in the same order.
Steps are interleaved (A B B A ...), so machine noise hits both sides alike; prints median
tokens/s of each and the ratio engine/loop.

    python bench/engine_throughput.py --data SHARDS [--steps 30] [--model d_model=256 ...]

Default model: the copy-probe shape of issue 15 (2 layers, d_model 256, 8 heads of 32, d_mlp 512,
sequences of 256, batch 32); the vocabulary follows the shards' tokenizer.
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
from memory3.model import Transformer  # noqa: E402
from memory3.train.phases import WarmupPhase  # noqa: E402
from memory3.train.trainer import Trainer, param_groups  # noqa: E402

SHAPE = ["model.n_layers=2", "model.d_model=256", "model.n_heads=8", "model.n_kv_heads=8",
         "model.head_dim=32", "model.d_mlp=512", "model.max_seq_len=256", "data.seq_len=256"]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="token shards (memory3 prepare-data)")
    p.add_argument("--steps", type=int, default=30, help="timed steps per side")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per side first")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--model", nargs="*", default=[], help="model fields over the default shape")
    args = p.parse_args(argv)
    recipe = Recipe.from_name("tiny-warmup").override(
        [f"data.path={args.data}", *SHAPE, *[f"model.{m}" for m in args.model],
         f"train.micro_batch_size={args.batch}", "train.precision=bf16", "train.zero_stage=1",
         f"optim.lr={args.lr}", "schedule.warmup_steps=0", "train.max_steps=1000000",
         "train.eval_every=1000000", "train.save_every=1000000"])
    with tempfile.TemporaryDirectory() as run:
        trainer = Trainer(recipe, run, progress=False)
        recipe = trainer.recipe  # the vocabulary now follows the shards
        loop = Loop(recipe, trainer.engine.module)
        print(f"model {recipe.model.n_params / 1e6:.2f}M parameters, batch {args.batch} x "
              f"{recipe.data.seq_len}, torch {torch.__version__}, {torch.get_num_threads()} "
              f"threads")
        for _ in range(args.warmup):
            trainer.train_step()
            loop.step()
        times = {"engine": [], "loop": []}
        sides = {"engine": trainer.train_step, "loop": loop.step}
        for i in range(args.steps):
            order = ("engine", "loop") if i % 2 == 0 else ("loop", "engine")
            for side in order:
                start = time.perf_counter()
                sides[side]()
                times[side].append(time.perf_counter() - start)
        trainer.close()
    tokens = args.batch * recipe.data.seq_len
    print(f"{'side':8} {'median s/step':>14} {'min s/step':>11} {'tokens/s (median)':>18}")
    for side, t in times.items():
        print(f"{side:8} {statistics.median(t):14.4f} {min(t):11.4f} "
              f"{tokens / statistics.median(t):18,.0f}")
    pairs = [b / a for a, b in zip(times["engine"], times["loop"])]
    print(f"ratio engine/loop (tokens/s): "
          f"{statistics.median(times['loop']) / statistics.median(times['engine']):.3f}x "
          f"(median of per-pair ratios: {statistics.median(pairs):.3f}x)")


class Loop:
    """A plain training loop over a copy of the engine's initial weights and its batches."""

    def __init__(self, recipe: Recipe, initial: torch.nn.Module):
        self.model = Transformer(recipe.model)
        self.model.load_state_dict({k: v.float() for k, v in initial.state_dict().items()})
        self.model.train()
        o = recipe.optim
        self.clip = o.grad_clip
        self.opt = torch.optim.AdamW(param_groups(self.model, o.weight_decay), lr=o.lr,
                                     betas=(o.beta1, o.beta2), eps=o.eps)
        # Its own phase over the same shards and seed: the engine's batches, in its order.
        self.phase = WarmupPhase(recipe, 0, 1, torch.device("cpu"))

    def step(self):
        batch = self.phase.next_batch()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = self.model(batch["inputs"], batch["targets"]).loss
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip)
        self.opt.step()
        return loss.item()


if __name__ == "__main__":
    main()
