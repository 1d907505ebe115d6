"""The training loop: a DeepSpeed engine around our plain PyTorch model.

One code path for a single process, `deepspeed --num_gpus N` and `torchrun`; every rank runs
this function and rank 0 alone writes logs and progress.
"""
from __future__ import annotations

import math
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from memory3.config import ConfigError, Recipe
from memory3.files import hold_write_lock, no_space_as, write_json_atomic
from memory3.model import IGNORE_INDEX, Transformer
from memory3.train import checkpoint
from memory3.train.deepspeed_config import build_deepspeed_config
from memory3.train.distributed import all_reduce_sum, init_distributed
from memory3.train.metrics import MetricsLog, peak_memory_gb
from memory3.train.phases import fit_vocab_to_data, make_phase
from memory3.train.schedule import lr_multiplier


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Decay matrices only: norm gains are scales, decaying them towards 0 only hurts."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def seed_everything(seed: int):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class Trainer:
    def __init__(self, recipe: Recipe, out_dir: str | Path, *, resume: bool = True,
                 progress: bool = True):
        import deepspeed

        self.imported = None  # the Hugging Face Llama of an init_from=hf:DIR
        if recipe.train.init_from.startswith("hf:"):
            from memory3.hf.llama_import import check_data_tokenizer, recipe_for
            recipe, self.imported = recipe_for(recipe)  # the model's shape is the Llama's
            check_data_tokenizer(self.imported, recipe.data.path)  # before the phase reads it
        recipe, vocab_note = fit_vocab_to_data(recipe)  # before anything is sized by it
        self.recipe = recipe.validate()
        self.out_dir = Path(out_dir)
        self.ckpt_dir = self.out_dir / "checkpoints"
        self.rank, self.world_size, self.device = init_distributed()
        self.is_main = self.rank == 0
        if vocab_note and self.is_main:
            print(vocab_note)
        self.progress = progress and self.is_main
        # One run writes a run directory: a second would interleave checkpoints and metrics.
        self._lock = (hold_write_lock(self.out_dir, checkpoint.CheckpointError) if self.is_main
                      else None)
        seed_everything(recipe.train.seed)

        self.phase = make_phase(recipe, self.rank, self.world_size, self.device)

        self.ds_config = build_deepspeed_config(recipe, self.world_size)
        model = self._build_model(resume)
        schedule = lr_multiplier(recipe.train.max_steps, recipe.optim, recipe.schedule)
        self.engine, _, _, self.scheduler = deepspeed.initialize(
            model=model, model_parameters=param_groups(model, recipe.optim.weight_decay),
            config=self.ds_config,
            lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, schedule))
        if recipe.train.compile:
            self.engine.compile()
        self.grad_accum = self.engine.gradient_accumulation_steps()
        self.tokens_per_step = recipe.tokens_per_step(self.world_size)

        self.step = 0
        self.flops_per_step = (recipe.model.flops_per_token(recipe.data.seq_len)
                               * self.tokens_per_step)
        if self.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            write_json_atomic(self.out_dir / "recipe.json", recipe.to_dict())
        client = self._resume() if resume else None
        self.metrics = MetricsLog(self.out_dir, recipe.train.loggers, enabled=self.is_main,
                                  resumed_at=self.step if client else None,
                                  state=(client or {}).get("loggers"), config=recipe.to_dict())

    def _build_model(self, resume: bool) -> Transformer:
        import deepspeed

        init_from = self.recipe.train.init_from
        if self.imported is not None and not (resume and checkpoint.latest_tag(self.ckpt_dir)):
            from memory3.hf.llama_import import import_weights
            model = Transformer(self.recipe.model)
            model.load_state_dict(import_weights(self.imported))
            if self.is_main:
                notes = "; ".join(self.imported.vocab.notes) or "vocabulary unchanged"
                print(f"initialised weights from {init_from} ({notes}; model "
                      f"{self.recipe.model.n_params / 1e6:.1f}M parameters)")
            return model
        if init_from and not (resume and checkpoint.latest_tag(self.ckpt_dir)):
            state, source, _ = checkpoint.load_state_dict(init_from)
            differ = source.model.weight_differences(self.recipe.model)
            if differ:
                shown = ", ".join(f"{k} {getattr(source.model, k)!r} there, "
                                  f"{getattr(self.recipe.model, k)!r} here" for k in differ)
                raise ConfigError(f"train.init_from={init_from} holds a {source.model.name!r} model "
                                  f"whose config differs from this recipe's model section in "
                                  f"{shown}: its weights would not fit (set the recipe's model "
                                  f"fields to the checkpoint's)")
            model = Transformer(self.recipe.model)
            model.load_state_dict(state)
            if self.is_main:
                print(f"initialised weights from {init_from}")
            return model
        if self.recipe.train.zero_stage == 3:
            # Partition parameters as they are created so a model larger than one rank fits.
            with deepspeed.zero.Init(config_dict_or_path=self.ds_config):
                return Transformer(self.recipe.model)
        return Transformer(self.recipe.model)

    # -- checkpoints -------------------------------------------------------------------------
    def _resume(self) -> dict[str, Any] | None:
        """Load the latest checkpoint, if any, and return its client state."""
        tag = checkpoint.latest_tag(self.ckpt_dir)
        if tag is None:
            return None
        info = checkpoint.read_info(self.ckpt_dir / tag)
        if info["recipe"]["model"] != self.recipe.model.to_dict():
            raise ConfigError(f"checkpoint {self.ckpt_dir / tag} was trained with a different model "
                              f"config; use a new --out directory or the same recipe")
        checkpoint.check_files(self.ckpt_dir / tag, info)
        _, client = self.engine.load_checkpoint(str(self.ckpt_dir), tag=tag)
        self.step = client["step"]
        self.phase.load_state_dict(client["phase"])
        checkpoint.set_rng_state(client["rng"])
        if self.is_main:
            print(f"resumed from {self.ckpt_dir / tag} at step {self.step}")
        return client

    def save(self):
        client = {"step": self.step, "phase": self.phase.state_dict(),
                  "rng": checkpoint.rng_state(), "recipe": self.recipe.to_dict(),
                  "loggers": self.metrics.state()}
        info = {"recipe": self.recipe.to_dict(), "step": self.step,
                "tokens": self.step * self.tokens_per_step, "world_size": self.world_size,
                "phase": self.recipe.phase}
        self.phase.flush(self.step, self.out_dir)
        checkpoint.save(self.engine, self.ckpt_dir, self.step, client,
                        self.recipe.train.keep_last, info)

    def close(self) -> None:
        """Release the run directory (the process ending does too)."""
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    # -- loop --------------------------------------------------------------------------------
    def train_step(self) -> dict[str, float]:
        start = time.perf_counter()
        lr = self.scheduler.get_last_lr()[0]
        loss_sum = 0.0
        for _ in range(self.grad_accum):
            loss = self.phase.train_loss(self.engine, self.phase.next_batch())
            self.engine.backward(loss)
            self.engine.step()
            loss_sum += loss.item()
        loss_sum, = all_reduce_sum([loss_sum], self.device)
        self.step += 1
        grad_norm = self.engine.get_global_grad_norm()
        elapsed = time.perf_counter() - start
        stats = {"loss": loss_sum / (self.grad_accum * self.world_size), "lr": lr,
                 "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
                 "tokens_per_s": self.tokens_per_step / elapsed,
                 "peak_memory_gb": peak_memory_gb(self.device)}
        if self.recipe.train.peak_flops > 0:
            stats["mfu"] = (self.flops_per_step / elapsed
                            / (self.recipe.train.peak_flops * self.world_size))
        return stats

    @torch.no_grad()
    def evaluate(self) -> dict[str, float] | None:
        self.engine.eval()
        names = self.phase.eval_names
        sums, count = [0.0] * len(names), 0.0
        for batch in self.phase.eval_batches():
            n = (batch["targets"] != IGNORE_INDEX).sum().item()
            for i, loss in enumerate(self.phase.eval_losses(self.engine, batch)):
                sums[i] += loss.item() * n
            count += n
        self.engine.train()
        *sums, count = all_reduce_sum([*sums, count], self.device)
        if count == 0:
            return None
        val = {name: s / count for name, s in zip(names, sums)}
        val["val_ppl"] = math.exp(min(val["val_loss"], 50.0))
        if "val_loss_no_memory" in val:
            val["val_memory_gain"] = val["val_loss_no_memory"] - val["val_loss"]
        return val

    def fit(self) -> dict[str, Any]:
        t = self.recipe.train
        if self.step >= t.max_steps:
            if self.is_main:
                print(f"nothing to do: checkpoint is at step {self.step} >= train.max_steps "
                      f"{t.max_steps}")
            return {"step": self.step}
        last: dict[str, Any] = {}
        bar = tqdm(total=t.max_steps, initial=self.step, disable=not self.progress,
                   desc=f"{self.recipe.name}", unit="step", dynamic_ncols=True)
        while self.step < t.max_steps:
            stats = self.train_step()
            if not math.isfinite(stats["loss"]):
                raise FloatingPointError(f"loss became {stats['loss']} at step {self.step}")
            last.update(stats)
            if self.step % t.log_every == 0 or self.step == t.max_steps:
                self.metrics.log(kind="train", step=self.step,
                                 tokens=self.step * self.tokens_per_step, **stats)
            bar.update(1)
            bar.set_postfix(loss=f"{stats['loss']:.3f}", lr=f"{stats['lr']:.2e}",
                            tok_s=f"{stats['tokens_per_s']:.0f}")
            if self.step % t.eval_every == 0 or self.step == t.max_steps:
                val = self.evaluate()
                if val:
                    last.update(val)
                    self.metrics.log(kind="eval", step=self.step, **val)
                    if self.is_main:
                        gain = val.get("val_memory_gain")
                        bar.write(f"step {self.step}: val_loss {val['val_loss']:.4f} "
                                  f"val_ppl {val['val_ppl']:.2f}" +
                                  ("" if gain is None else f" memory_gain {gain:+.4f}"))
            if self.step % t.save_every == 0 or self.step == t.max_steps:
                self.save()
        bar.close()
        self.metrics.close()
        last["step"] = self.step
        return last


def train(recipe: Recipe, out_dir: str | Path, *, resume: bool = True,
          progress: bool = True) -> dict[str, Any]:
    # Out of space: a checkpoint save cleans up and says so itself (checkpoint.save); any other
    # write of the run (metrics.jsonl, recipe.json) stops with the file named, as a
    # CheckpointError: what was saved is intact and the same command resumes from it.
    with no_space_as(checkpoint.CheckpointError, out_dir):
        trainer = Trainer(recipe, out_dir, resume=resume, progress=progress)
        try:
            return trainer.fit()
        finally:
            trainer.close()
