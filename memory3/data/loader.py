"""Packed sequences of a token split, shuffled per epoch and split across data-parallel ranks.

The token stream is cut into sequences of seq_len + 1 tokens that overlap by one: sequence i is
tokens[i*seq_len : (i+1)*seq_len + 1], inputs its first seq_len tokens, targets its last seq_len.
Documents run into one another (each is bos ... eos), as in most pretraining.

Order: each epoch is a permutation of the sequences drawn from default_rng((seed, epoch)). Global
batch b of an epoch is permutation[b*G : (b+1)*G] with G = micro_batch_size * world_size, and rank
r takes the r-th slice of micro_batch_size. An incomplete last global batch is dropped. Nothing
depends on the rank beyond its slice, so the ranks together read what one process reading global
batches would, and a resumed run continues where it stopped however G is divided among ranks.
"""
from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from memory3.data.shards import TokenShards
from memory3.data.text import DataError

Batch = tuple[torch.Tensor, torch.Tensor]  # inputs, targets: (micro_batch_size, seq_len) int64


def _check_layout(seq_len: int, micro_batch_size: int, rank: int, world_size: int) -> None:
    if seq_len <= 0 or micro_batch_size <= 0 or world_size <= 0:
        raise DataError(f"seq_len ({seq_len}), micro_batch_size ({micro_batch_size}) and "
                        f"world_size ({world_size}) must be positive")
    if not 0 <= rank < world_size:
        raise DataError(f"rank {rank} outside 0..{world_size - 1}")


def _n_sequences(shards: TokenShards, seq_len: int, global_batch: int) -> int:
    n = (len(shards) - 1) // seq_len
    if n < global_batch:
        raise DataError(f"split {shards.split!r} of {shards.data_dir} has {len(shards)} tokens = "
                        f"{n} sequences of {seq_len} (+1) tokens, fewer than one global batch of "
                        f"{global_batch} sequences; use more data or a smaller seq_len/batch")
    return n


def _gather(shards: TokenShards, sequence_ids: np.ndarray, seq_len: int) -> Batch:
    rows = torch.from_numpy(np.stack([shards.read(int(i) * seq_len, seq_len + 1)
                                      for i in sequence_ids]))
    return rows[:, :-1].contiguous(), rows[:, 1:].contiguous()


class PackedLoader:
    """Endless shuffled batches for one rank; `state_dict` resumes it exactly."""

    def __init__(self, shards: TokenShards, seq_len: int, micro_batch_size: int, *,
                 rank: int = 0, world_size: int = 1, seed: int = 0):
        _check_layout(seq_len, micro_batch_size, rank, world_size)
        self.shards, self.seq_len, self.seed = shards, seq_len, seed
        self.micro_batch_size, self.rank, self.world_size = micro_batch_size, rank, world_size
        self.global_batch = micro_batch_size * world_size
        self.n_sequences = _n_sequences(shards, seq_len, self.global_batch)
        self.batches_per_epoch = self.n_sequences // self.global_batch
        self.epoch = 0
        self.batch_in_epoch = 0  # global batches of this epoch already read
        self._permutation_epoch = -1
        self._permutation = np.empty(0, dtype=np.int64)

    def _epoch_permutation(self) -> np.ndarray:
        if self._permutation_epoch != self.epoch:
            rng = np.random.default_rng((self.seed, self.epoch))
            self._permutation = rng.permutation(self.n_sequences)
            self._permutation_epoch = self.epoch
        return self._permutation

    def next_batch(self) -> Batch:
        if self.batch_in_epoch >= self.batches_per_epoch:
            self.epoch, self.batch_in_epoch = self.epoch + 1, 0
        start = self.batch_in_epoch * self.global_batch + self.rank * self.micro_batch_size
        sequence_ids = self._epoch_permutation()[start:start + self.micro_batch_size]
        self.batch_in_epoch += 1
        return _gather(self.shards, sequence_ids, self.seq_len)

    def __iter__(self) -> Iterator[Batch]:
        while True:
            yield self.next_batch()

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch, "seed": self.seed,
                "seq_len": self.seq_len, "micro_batch_size": self.micro_batch_size,
                "world_size": self.world_size, "n_sequences": self.n_sequences}

    def load_state_dict(self, state: dict) -> None:
        """Continue from `state`, also when saved with another world size or micro batch size,
        as long as the sequences read so far this epoch fill whole global batches of this loader."""
        for key in ("seed", "seq_len", "n_sequences"):
            if state[key] != getattr(self, key):
                raise DataError(f"loader state was saved with {key}={state[key]}, this loader has "
                                f"{key}={getattr(self, key)}: it would not continue the same order")
        consumed = state["batch_in_epoch"] * state["micro_batch_size"] * state["world_size"]
        if consumed % self.global_batch:
            raise DataError(f"loader state is {consumed} sequences into epoch {state['epoch']}, "
                            f"not a whole number of global batches of {self.global_batch} "
                            f"(micro_batch_size {self.micro_batch_size} x world_size "
                            f"{self.world_size}); resume with the saved global batch size "
                            f"{state['micro_batch_size'] * state['world_size']}")
        self.epoch, self.batch_in_epoch = state["epoch"], consumed // self.global_batch


def iter_eval_batches(shards: TokenShards, seq_len: int, micro_batch_size: int,
                      max_batches: int | None = None, rank: int = 0,
                      world_size: int = 1) -> Iterator[Batch]:
    """The first sequences of `shards` in order, the same on every call, split across ranks like
    PackedLoader; at most `max_batches` batches per rank, all ranks getting the same count."""
    _check_layout(seq_len, micro_batch_size, rank, world_size)
    global_batch = micro_batch_size * world_size
    n_batches = _n_sequences(shards, seq_len, global_batch) // global_batch
    if max_batches is not None:
        n_batches = min(n_batches, max_batches)
    # Checked above, not inside a generator, so bad settings fail at the call.
    starts = [b * global_batch + rank * micro_batch_size for b in range(n_batches)]
    return (_gather(shards, np.arange(s, s + micro_batch_size), seq_len) for s in starts)
