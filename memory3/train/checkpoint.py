"""Writing checkpoints (every rank, through the DeepSpeed engine) and the RNG state they carry.

The layout and everything that reads a checkpoint live in memory3/checkpoints.py, below the
trainer, so memory, eval and export read checkpoints without importing training code; the reading
names are re-exported here for the trainer's convenience.
"""
from __future__ import annotations

import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from memory3.checkpoints import (  # noqa: F401  (re-exported)
    EXPORT_FORMAT, EXPORT_TOKENIZER, EXPORT_VERSION, EXPORT_WEIGHTS, INFO_FILE, MODEL_STATES,
    TAG_PREFIX, CheckpointError, carried_tokenizer, check_files, exported, latest_tag, load_model,
    load_state_dict, load_tokenizer, model_config, read_info, resolve, tag_for)
from memory3.checkpoints import list_files
from memory3.files import write_json_atomic
from memory3.train.distributed import barrier


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]):
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save(engine, ckpt_dir: Path, step: int, client_state: dict[str, Any], keep_last: int,
         info: dict[str, Any]):
    """Save a checkpoint tagged by step on all ranks; rank 0 then prunes all but the last few."""
    tag = tag_for(step)
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=client_state)
    barrier()
    if engine.global_rank == 0:
        folder = ckpt_dir / tag
        files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != INFO_FILE)
        info = {**info, "files": list_files(folder, files)}
        write_json_atomic(folder / INFO_FILE, info)
        tags = sorted(p.name for p in ckpt_dir.glob(f"{TAG_PREFIX}*") if p.is_dir())
        for old in tags[:-keep_last]:
            shutil.rmtree(ckpt_dir / old, ignore_errors=True)
