"""Metrics of a run: JSON lines (metrics.jsonl, read by tools/plot_metrics.py) always, and the
loggers a recipe adds (`train.loggers`): TensorBoard event files, Weights & Biases."""
from __future__ import annotations

import contextlib
import json
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any

import torch

from memory3.config import ConfigError

TENSORBOARD_DIR = "tensorboard"
TAIL_BYTES = 1 << 16  # a record is far shorter


class MetricsLog:
    """One record per event (`kind` "train" or "eval", `step`, numbers), written by rank 0 only
    (`enabled`) to every logger. A resumed run keeps appending to metrics.jsonl; TensorBoard drops
    what an earlier attempt logged after `resumed_at` (the checkpoint's step); W&B continues the
    run whose id `state` holds (what `state()` returned when the checkpoint was saved)."""

    def __init__(self, run_dir: str | Path, loggers: list[str] = ("jsonl",), *,
                 enabled: bool = True, resumed_at: int | None = None,
                 state: dict[str, Any] | None = None, config: dict[str, Any] | None = None):
        run_dir = Path(run_dir)
        self.path = run_dir / "metrics.jsonl"
        self.enabled = enabled
        self._file = self._tensorboard = self._wandb = None
        if not enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        drop_torn_record(self.path)
        self._file = open(self.path, "a", buffering=1)
        if "tensorboard" in loggers:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:
                raise ConfigError("train.loggers names 'tensorboard' but the tensorboard package "
                                  "is not installed: pip install tensorboard") from e
            # Events of an earlier attempt from the first step this one logs on are hidden.
            self._tensorboard = SummaryWriter(
                str(run_dir / TENSORBOARD_DIR),
                purge_step=None if resumed_at is None else resumed_at + 1)
        if "wandb" in loggers:
            try:
                import wandb
            except ImportError as e:
                raise ConfigError("train.loggers names 'wandb' but the wandb package is not "
                                  "installed: pip install wandb") from e
            run_id = (state or {}).get("wandb_id")  # None: W&B makes a new run and its id
            self._wandb = wandb.init(
                project=os.environ.get("WANDB_PROJECT", "memory3"), name=run_dir.name,
                dir=str(run_dir), id=run_id, resume="allow" if run_id else None, config=config,
                mode=os.environ.get("WANDB_MODE", "offline"))

    def log(self, **record: Any):
        if self._file is None:
            return
        record.setdefault("time", round(time.time(), 3))
        try:
            self._file.write(json.dumps(record) + "\n")
        except OSError as e:  # disk full: name the file; drop what the buffer still holds
            with contextlib.suppress(OSError):
                self._file.close()
            self._file = None
            raise OSError(e.errno, e.strerror, str(self.path)) from e
        step, kind = record.get("step"), record.get("kind", "metrics")
        scalars = {f"{kind}/{k}": v for k, v in record.items()
                   if k not in ("kind", "step", "time") and isinstance(v, (int, float))
                   and not isinstance(v, bool)}
        if self._tensorboard is not None:
            for tag, value in scalars.items():
                self._tensorboard.add_scalar(tag, value, step)
        if self._wandb is not None:
            self._wandb.log(scalars, step=step)

    def state(self) -> dict[str, Any]:
        """What a checkpoint keeps so that a resumed run logs to the same places."""
        return {"wandb_id": self._wandb.id} if self._wandb is not None else {}

    def close(self):
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tensorboard is not None:
            self._tensorboard.close()
            self._tensorboard = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None


def drop_torn_record(path: Path) -> None:
    """Cut a last line without its newline off `path`: half a record, written when the disk
    filled up, which would make the next record appended unreadable."""
    if not path.is_file() or path.stat().st_size == 0:
        return
    with open(path, "rb+") as f:
        size = f.seek(0, os.SEEK_END)
        f.seek(max(0, size - TAIL_BYTES))
        tail = f.read()
        if tail.endswith(b"\n") or (b"\n" not in tail and size > TAIL_BYTES):
            return
        f.truncate(size - len(tail) + tail.rfind(b"\n") + 1)


def peak_memory_gb(device: torch.device) -> float:
    """Peak memory of this process so far: CUDA's max allocated on a GPU, else the peak RSS."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 1e9 if sys.platform == "darwin" else rss * 1024 / 1e9  # bytes there, KiB here


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """All records; where a resumed run logged a step again, the later record wins."""
    latest: dict[tuple, dict] = {}
    for line in Path(path).read_text().splitlines():
        if line.strip():
            r = json.loads(line)
            latest[(r.get("kind"), r.get("step"))] = r
    return sorted(latest.values(), key=lambda r: (r.get("step", 0), r.get("kind", "")))
