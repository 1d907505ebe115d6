"""Training phase "memdec": distil kNN targets into a small decoder (SPEC section 2, step 3).

Batches are PackedLoader's sequences of the domain shards (data.path, data.train_split) with, for
every input position, the sparse p_kNN of that stream position (memdec.targets). Sequence i holds
stream positions i*seq_len .. (i+1)*seq_len - 1, so its targets are those rows of the targets
folder. Order, rank split and resume are PackedLoader's own; only sequences fully covered by the
targets are used (all of them unless the datastore was built with --max-tokens).
Validation is plain next-token CE on data.valid_split, i.e. the decoder's own domain perplexity.
"""
from __future__ import annotations

import numpy as np
import torch

from memory3.config import ConfigError, Recipe
from memory3.data import PackedLoader, TokenShards
from memory3.memdec.loss import memdec_loss
from memory3.memdec.targets import KnnTargets
from memory3.train.phases import WarmupPhase, open_shards

Batch = dict[str, torch.Tensor]


class TokenPrefix:
    """The first `length` tokens of a split, readable where PackedLoader reads TokenShards."""

    def __init__(self, shards: TokenShards, length: int):
        self.shards, self.length = shards, length
        self.split, self.data_dir = shards.split, shards.data_dir

    def __len__(self) -> int:
        return self.length

    def read(self, start: int, length: int) -> np.ndarray:
        if start + length > self.length:
            raise IndexError(f"read({start}, {length}) beyond the {self.length} tokens covered")
        return self.shards.read(start, length)


class KnnTargetLoader(PackedLoader):
    """PackedLoader batches plus the kNN targets of their positions."""

    def __init__(self, shards: TokenShards, targets: KnnTargets, seq_len: int,
                 micro_batch_size: int, *, rank: int = 0, world_size: int = 1, seed: int = 0):
        # Position p needs token p + 1, so positions 0..P-1 need the first P + 1 tokens.
        super().__init__(TokenPrefix(shards, targets.positions + 1), seq_len, micro_batch_size,
                         rank=rank, world_size=world_size, seed=seed)
        self.targets = targets

    def next_batch(self) -> Batch:
        inputs, targets = super().next_batch()
        # The sequences super() just read: same slice of the same epoch permutation.
        start = (self.batch_in_epoch - 1) * self.global_batch + self.rank * self.micro_batch_size
        sequence_ids = self._epoch_permutation()[start:start + self.micro_batch_size]
        positions = sequence_ids[:, None] * self.seq_len + np.arange(self.seq_len)
        knn_ids, knn_probs = self.targets.rows(positions)
        return {"inputs": inputs, "targets": targets, "knn_ids": torch.from_numpy(knn_ids),
                "knn_probs": torch.from_numpy(knn_probs)}


class MemDecPhase(WarmupPhase):
    """kNN-distillation batches and loss; forward (CE), eval_batches (the validation split) and
    state_dict / load_state_dict (the loader's position) are WarmupPhase's."""

    def __init__(self, recipe: Recipe, rank: int, world_size: int, device: torch.device):
        m = recipe.memdec
        if not m.targets:
            raise ConfigError("memdec.targets is empty: point it at a folder made by `memory3 "
                              "memdec build-targets` (e.g. memdec.targets=DIR)")
        if not 0 <= m.beta <= 1:
            raise ConfigError(f"memdec.beta must be in [0, 1], got {m.beta}")
        self.recipe, self.rank, self.world_size, self.device = recipe, rank, world_size, device
        self.train_data = open_shards(recipe, recipe.data.train_split)
        self.valid_data = open_shards(recipe, recipe.data.valid_split, required=False)
        self.knn_targets = KnnTargets(m.targets)
        self.knn_targets.check_aligned(self.train_data)
        self.loader = KnnTargetLoader(self.train_data, self.knn_targets, recipe.data.seq_len,
                                      recipe.train.micro_batch_size, rank=rank,
                                      world_size=world_size, seed=recipe.data.seed)

    def next_batch(self) -> Batch:
        return {k: v.to(self.device) for k, v in self.loader.next_batch().items()}

    def train_loss(self, engine, batch: Batch) -> torch.Tensor:
        logits = engine(batch["inputs"]).logits
        return memdec_loss(logits, batch["targets"], batch["knn_ids"], batch["knn_probs"],
                           self.recipe.memdec.beta)
