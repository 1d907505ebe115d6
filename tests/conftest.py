"""Shared fixtures: one small real dataset (generated world -> sentencepiece -> shards) per session."""
from __future__ import annotations

import contextlib
import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from memory3.data import prepare_data, train_tokenizer
from memory3.data.synthetic import make_world, write_world


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models gain nothing from a second thread, and on a 2-core machine shared with other
    jobs OpenMP's spin-waiting makes 2 threads 5-20x slower than 1; restored afterwards.
    A module opts in with `pytestmark = pytest.mark.usefixtures("one_torch_thread")`."""
    import torch
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """Token shards (train + valid) of a small generated corpus, tokenizer vocab 512 (= tiny)."""
    root = tmp_path_factory.mktemp("tiny_data")
    files = write_world(make_world(seed=0, n_entities=60), root / "corpus")
    tok = train_tokenizer([files["corpus"]], root / "tokenizer", 512, progress=False)
    prepare_data([files["corpus"]], tok.path, root / "shards", valid_fraction=0.05, progress=False)
    return root / "shards"


SHORT_CHUNK = 16  # chunk length of `short_chunk_run`: short texts cross several chunk boundaries


@pytest.fixture(scope="session")
def short_chunk_run(tiny_data, tmp_path_factory) -> tuple[Path, Path]:
    """(run, bank): 6 warmup steps of `tiny` with 16-token chunks and 3 memories per chunk, and a
    bank of the generated world's knowledge built by it (generation and lm-eval tests)."""
    from memory3.config import Recipe
    from memory3.memory.build import build_bank
    from memory3.train.trainer import train
    root = tmp_path_factory.mktemp("short_chunk")
    recipe = Recipe.from_name("tiny-warmup").override(
        [f"data.path={tiny_data}", "train.max_steps=6", "train.eval_every=100",
         f"model.chunk_len={SHORT_CHUNK}", "model.memories_per_chunk=3"])
    train(recipe, root / "run", progress=False)
    world = write_world(make_world(seed=0, n_entities=60), root / "world")
    build_bank(root / "run", [world["knowledge"]], root / "bank", progress=False)
    return root / "run", root / "bank"


BENCH = Path(__file__).resolve().parents[1] / "bench"


def bench_module(name: str):
    """bench/<name>.py imported (benchmarks are scripts, not a package)."""
    sys.path.insert(0, str(BENCH))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(BENCH))


def run_memory3(*args: str, check: bool = True, timeout: float = 300,
                launcher: list[str] | None = None) -> subprocess.CompletedProcess:
    """Run the real `memory3` command in a fresh process (optionally under a launcher)."""
    cmd = [*launcher, "--module"] if launcher else [sys.executable, "-m"]
    cmd += ["memory3", *args]
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n"
                             f"{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


@contextlib.contextmanager
def writer_holding(folder: Path):
    """Another process holding folder's write lock (as a running writer would) until the block
    ends, when it is killed (leaving its lock file behind, as a killed writer does)."""
    code = ("import sys, time; from pathlib import Path; from memory3.files import "
            "hold_write_lock; f = hold_write_lock(Path(sys.argv[1]), RuntimeError); "
            "print('held', flush=True); time.sleep(600)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(folder)], stdout=subprocess.PIPE,
                            text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        yield proc.pid
    finally:
        proc.kill()
        proc.wait()
