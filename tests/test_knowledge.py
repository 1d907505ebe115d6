"""The test that proves memory is read in the shipped format: facts nobody can guess, held out of
all training text.

The fact world of memory3.eval.facts: a tiny model is warmed up on entities that are nowhere in
the bank (it learns the format), the bank is built, and continual training reads it through the
real trainer with the shipped memory format (64-token chunks, the first half of the layers, top-8
of each reference, 1 new reference per chunk read by the next 5 chunks: nothing overridden). On
held-out entities, whose facts are only in the bank, the value after "=" must then be predicted
far better with memory than without (without it nothing beats log(40) nats).
"""
from __future__ import annotations

import math

import pytest

from memory3.config import Recipe
from memory3.data import Tokenizer, prepare_data, train_tokenizer
from memory3.eval.facts import FACT_DATA, VALUES, fact_losses, write_facts
from memory3.memory.bank import MemoryBank
from memory3.memory.build import build_bank
from memory3.train.checkpoint import load_model
from memory3.train.trainer import train

TRAIN = [*FACT_DATA, "train.micro_batch_size=16", "train.eval_every=1000", "optim.lr=5e-3"]

# ~2 minutes on 2 cores: the shipped format is learnt in ~400 steps of 16 x 256 tokens.
@pytest.mark.timeout(900)
def test_continual_training_learns_to_read_facts_from_memory(tmp_path):
    data = write_facts(tmp_path / "facts")
    tok = train_tokenizer([data["train"], data["warm"], data["knowledge"]], tmp_path / "tok", 512,
                          progress=False)
    for split in ("warm", "train"):
        prepare_data([data[split]], tok.path, tmp_path / f"shards_{split}", valid_fraction=0.02,
                     progress=False)
    warm = Recipe.from_name("tiny-warmup").override(
        [*TRAIN, f"data.path={tmp_path / 'shards_warm'}", "train.max_steps=100"])
    train(warm, tmp_path / "warm", progress=False)
    build_bank(tmp_path / "warm", [data["knowledge"]], tmp_path / "bank", progress=False)

    continual = Recipe.from_name("tiny-continual").override(
        [*TRAIN, f"data.path={tmp_path / 'shards_train'}",
         f"continual.bank={tmp_path / 'bank'}", f"train.init_from={tmp_path / 'warm'}",
         "train.max_steps=400", "train.save_every=400", "schedule.warmup_steps=20"])
    train(continual, tmp_path / "continual", progress=False)

    tokenizer, bank = Tokenizer(tok.path), MemoryBank.open(tmp_path / "bank")
    before = fact_losses(load_model(tmp_path / "warm")[0], bank, tokenizer, data["heldout"])
    after = fact_losses(load_model(tmp_path / "continual")[0], bank, tokenizer, data["heldout"],
                        reads_sink=True)
    guess = math.log(len(VALUES))
    print(f"held-out fact loss (nats; guessing = {guess:.2f}): warmup {before}, "
          f"continual {after}")
    # The warmup model has never read memories: they do not help it yet.
    assert before["memory"] > before["none"] - 0.3
    # Without memory the facts stay unguessable; with it they are read (a value's tokens cost
    # together at least a nat less: its probability e times higher or more).
    assert after["none"] > 0.8 * guess
    assert after["memory"] < after["none"] - 1.0
