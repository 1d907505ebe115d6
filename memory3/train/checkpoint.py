"""Writing checkpoints (every rank, through the DeepSpeed engine) and the RNG state they carry.

The layout and everything that reads a checkpoint live in memory3/checkpoints.py, below the
trainer, so memory, eval and export read checkpoints without importing training code; the reading
names are re-exported here for the trainer's convenience.
"""
from __future__ import annotations

import contextlib
import os
import random
import resource
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
from memory3.files import NO_SPACE, out_of_space, write_atomic, write_json_atomic
from memory3.train.distributed import barrier

# A device with less free space than this after a failed save is taken to be full.
FULL_BELOW_BYTES = 1 << 20


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
    """Save a checkpoint tagged by step on all ranks; rank 0 then prunes all but the last few.

    A save that fails for want of space (disk full, file size limit) removes its partial step
    folder and raises CheckpointError naming it; the newest complete checkpoint stays the one a
    resume starts from. (torch.save, inside DeepSpeed, reports a failed write as a RuntimeError
    without errno: `short_of_space` tells whether space was the cause.)"""
    tag = tag_for(step)
    folder = ckpt_dir / tag
    try:
        engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=client_state)
        barrier()
        if engine.global_rank == 0:
            files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != INFO_FILE)
            info = {**info, "files": list_files(folder, files)}
            write_json_atomic(folder / INFO_FILE, info)
    except (OSError, RuntimeError) as e:
        cause = os.strerror(e.errno) if out_of_space(e) else short_of_space(folder)
        shutil.rmtree(folder, ignore_errors=True)  # a partial save, never to be read
        previous = latest_tag(ckpt_dir)
        _point_latest(ckpt_dir, tag, previous)
        if cause is None:
            raise
        kept = (f"the newest checkpoint is still {ckpt_dir / previous}" if previous else
                "there is no earlier checkpoint")
        said = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise CheckpointError(f"cannot write checkpoint {folder}: {NO_SPACE} ({cause}: {said}); "
                              f"the partial save was removed and {kept}: free space, then run "
                              f"the same command again to resume") from e
    if engine.global_rank == 0:
        tags = sorted(p.name for p in ckpt_dir.glob(f"{TAG_PREFIX}*") if p.is_dir())
        for old in tags[:-keep_last]:
            shutil.rmtree(ckpt_dir / old, ignore_errors=True)


def _point_latest(ckpt_dir: Path, removed: str, previous: str | None) -> None:
    """DeepSpeed's own `latest` file (read by its zero_to_fp32.py) must not name a removed save."""
    latest = ckpt_dir / "latest"
    with contextlib.suppress(OSError):
        if latest.read_text().strip() == removed:
            if previous is None:
                latest.unlink()
            else:
                write_atomic(latest, previous.encode())


def short_of_space(folder: Path) -> str | None:
    """Why writes into `folder` failed for want of space, as far as can be told afterwards: a
    file there reached the process's file size limit (RLIMIT_FSIZE), or the device has (almost)
    no free space left; None if neither."""
    soft, _ = resource.getrlimit(resource.RLIMIT_FSIZE)
    if soft != resource.RLIM_INFINITY and folder.is_dir():
        for path in folder.rglob("*"):
            if path.is_file() and path.stat().st_size >= soft:
                return f"{path.name} reached the file size limit of {soft:,} bytes"
    try:
        stat = os.statvfs(folder if folder.is_dir() else folder.parent)
    except OSError:
        return None
    if stat.f_bavail * stat.f_frsize < FULL_BELOW_BYTES:
        return f"{stat.f_bavail * stat.f_frsize:,} bytes left on the device"
    return None
