"""Training phases: what a batch is and how its loss is computed.

The trainer owns the engine, schedule, checkpoints and logging; a phase owns its data stream and
loss. `warmup` is plain next-token pretraining; later phases (continual training with memory,
Memory Decoder distillation) plug in through PHASES without touching the loop.
"""
from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any, Iterator

import torch

from memory3.config import ConfigError, Recipe
from memory3.data import DataError, PackedLoader, TokenShards, iter_eval_batches
from memory3.model import ModelOutput

Batch = dict[str, torch.Tensor]

# phase name -> "module:Class"; imported on use so a phase's dependencies load only when needed.
PHASES = {
    "warmup": "memory3.train.phases:WarmupPhase",
    "continual": "memory3.train.continual:ContinualPhase",
    "memdec": "memory3.memdec.phase:MemDecPhase",
}


def open_shards(recipe: Recipe, split: str, required: bool = True) -> TokenShards | None:
    """The split's shards; None for an optional split that is missing or too small to batch."""
    if not recipe.data.path:
        raise ConfigError("data.path is empty: point it at a folder made by `memory3 prepare-data` "
                          "(e.g. `memory3 train --recipe R data.path=DIR`)")
    path = Path(recipe.data.path)
    try:
        shards = TokenShards(path, split)
        if not required:
            iter_eval_batches(shards, recipe.data.seq_len, recipe.train.micro_batch_size, 1)
    except DataError as e:
        if required:
            raise
        print(f"warning: no validation ({e})")
        return None
    if shards.vocab_size > recipe.model.vocab_size:
        raise ConfigError(f"tokenizer of {path} has {shards.vocab_size} tokens but model.vocab_size "
                          f"is {recipe.model.vocab_size}; raise model.vocab_size")
    return shards


class WarmupPhase:
    """Next-token prediction on packed token shards, no memory."""

    def __init__(self, recipe: Recipe, rank: int, world_size: int, device: torch.device):
        self.recipe, self.rank, self.world_size, self.device = recipe, rank, world_size, device
        self.train_data = open_shards(recipe, recipe.data.train_split)
        self.valid_data = open_shards(recipe, recipe.data.valid_split, required=False)
        self.loader = PackedLoader(self.train_data, recipe.data.seq_len,
                                   recipe.train.micro_batch_size, rank=rank,
                                   world_size=world_size, seed=recipe.data.seed)

    def next_batch(self) -> Batch:
        inputs, targets = self.loader.next_batch()
        return {"inputs": inputs.to(self.device), "targets": targets.to(self.device)}

    def forward(self, engine, batch: Batch) -> ModelOutput:
        return engine(batch["inputs"], batch["targets"])

    def train_loss(self, engine, batch: Batch) -> torch.Tensor:
        return self.forward(engine, batch).loss

    # What `eval_losses` returns, in order: the trainer averages each over the validation tokens.
    eval_names: tuple[str, ...] = ("val_loss",)

    def eval_losses(self, engine, batch: Batch) -> tuple[torch.Tensor, ...]:
        return (self.forward(engine, batch).loss,)

    def eval_batches(self) -> Iterator[Batch]:
        if self.valid_data is None:
            return iter(())
        batches = iter_eval_batches(self.valid_data, self.recipe.data.seq_len,
                                    self.recipe.train.micro_batch_size,
                                    self.recipe.train.eval_batches, rank=self.rank,
                                    world_size=self.world_size)
        return ({"inputs": x.to(self.device), "targets": y.to(self.device)} for x, y in batches)

    def flush(self, step: int, run_dir: Path):
        """Called at every checkpoint and at the end: persist what the phase produced."""

    def state_dict(self) -> dict[str, Any]:
        return {"loader": self.loader.state_dict()}

    def load_state_dict(self, state: dict[str, Any]):
        self.loader.load_state_dict(state["loader"])


def make_phase(recipe: Recipe, rank: int, world_size: int, device: torch.device):
    module, _, cls = PHASES[recipe.phase].partition(":")
    return getattr(importlib.import_module(module), cls)(recipe, rank, world_size, device)
