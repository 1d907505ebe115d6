"""Training phases: what a batch is and how its loss is computed.

The trainer owns the engine, schedule, checkpoints and logging; a phase owns its data stream and
loss. `warmup` is plain next-token pretraining; later phases (continual training with memory,
Memory Decoder distillation) plug in through PHASES without touching the loop.
"""
from __future__ import annotations

import dataclasses
import importlib
from pathlib import Path
from typing import Any, Iterator

import torch

from memory3.config import PHASES, ConfigError, Recipe
from memory3.data import DataError, PackedLoader, TokenShards, iter_eval_batches
from memory3.data.shards import load_manifest
from memory3.model import ModelOutput

Batch = dict[str, torch.Tensor]

# PHASES (memory3/config.py) maps a phase name to "module:Class", imported on use so a phase's
# dependencies load only when needed.


# A vocabulary sized to the data is rounded up to this: embedding and output matmuls with a row
# count a multiple of 64 tile evenly on GPUs (the spare rows are never targets).
VOCAB_MULTIPLE = 64


def fit_vocab_to_data(recipe: Recipe) -> tuple[Recipe, str | None]:
    """Size model.vocab_size to what the run reads, unless the recipe file or an override set it.

    A newcomer pointing a shipped recipe at shards of their own tokenizer expects the model to
    follow the data, not the preset's vocabulary. With train.init_from (a run or an exported
    folder) the weights decide: the vocabulary is the source's, so a continual run started from a
    warmup that followed the data follows it too. Otherwise it is the shards' tokenizer size
    rounded up to VOCAB_MULTIPLE. Returns the recipe to train (a copy when changed) and the line
    to log (None when nothing changed). What cannot be read is left to the checks that open it
    later (they name the file).
    """
    if recipe.vocab_size_explicit or recipe.train.init_from.startswith("hf:"):
        return recipe, None  # hf: imports take the Llama's vocabulary (memory3/hf/llama_import.py)
    if recipe.train.init_from:
        from memory3.checkpoints import CheckpointError, model_config
        try:
            vocab = model_config(recipe.train.init_from).vocab_size
        except (CheckpointError, ConfigError, OSError, KeyError, ValueError):
            return recipe, None
        source = f"the weights of train.init_from={recipe.train.init_from}"
    elif recipe.data.path:
        try:
            tokens = load_manifest(recipe.data.path)["tokenizer"]["vocab_size"]
        except (DataError, KeyError):
            return recipe, None
        vocab = -(-tokens // VOCAB_MULTIPLE) * VOCAB_MULTIPLE
        source = (f"the {tokens}-token tokenizer of {recipe.data.path}, rounded up to a multiple "
                  f"of {VOCAB_MULTIPLE}")
    else:
        return recipe, None
    if vocab == recipe.model.vocab_size:
        return recipe, None
    fitted = dataclasses.replace(recipe, model=dataclasses.replace(recipe.model, vocab_size=vocab))
    return fitted, (f"model.vocab_size {vocab} (preset {recipe.model.name!r} has "
                    f"{recipe.model.vocab_size}) follows {source}; set model.vocab_size to "
                    f"choose it")


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
                          f"is {recipe.model.vocab_size} (set in the recipe or an override); "
                          f"raise model.vocab_size, or leave it unset to follow the tokenizer")
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
