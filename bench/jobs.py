"""Running the `memory3` command from benchmarks, and telling when a job's output is complete
(shared by memory_real_text.py and compare_memories.py)."""
from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_memory3(args: list[str], log: Path, threads: int, label: str = "") -> None:
    """Run `python -m memory3 ...` from the repo root, output appended to `log`; exit with its
    tail if it fails."""
    # Each job is a world of its own: a caller's process group (its port) is not inherited.
    env = {k: v for k, v in os.environ.items()
           if k not in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env |= {"OMP_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "memory3", *args]
    with open(log, "a") as f:
        f.write(f"$ {shlex.join(cmd)}\n")
        f.flush()
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=ROOT).returncode
    if rc:
        tail = "".join(log.read_text().splitlines(keepends=True)[-30:])
        sys.exit(f"{label}memory3 {args[0]} failed (exit {rc}); log {log}:\n{tail}")


def bank_complete(bank: Path) -> bool:
    """Whether `bank` was built to the end: a build killed midway leaves a manifest whose build
    is not complete (build-bank resumes it)."""
    manifest = bank / "manifest.json"
    if not manifest.exists():
        return False
    builds = json.loads(manifest.read_text())["builds"]
    return bool(builds) and all(b["complete"] for b in builds)


def last_step(run: Path) -> int:
    """The newest complete checkpoint's step (a save without memory3.json was torn)."""
    saves = (run / "checkpoints").glob("step-*/memory3.json")
    return max((int(p.parent.name.split("-")[1]) for p in saves), default=0)
