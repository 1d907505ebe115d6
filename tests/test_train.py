"""Training: loss goes down, resume after a real kill reproduces, ranks split the batch, dry run."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import run_memory3, writer_holding
from memory3.config import ConfigError, Recipe
from memory3.train.checkpoint import CheckpointError, load_model, read_info
from memory3.train.metrics import read_metrics
from memory3.train.trainer import train


def train_losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run_dir / "metrics.jsonl")
            if r["kind"] == "train"}


@pytest.fixture(scope="module")
def tiny_run(tiny_data, tmp_path_factory):
    recipe = Recipe.from_name("tiny-warmup").override(
        [f"data.path={tiny_data}", "train.max_steps=30", "train.eval_every=30",
         "train.save_every=10", "train.keep_last=2"])
    run_dir = tmp_path_factory.mktemp("tiny_run")
    return recipe, run_dir, train(recipe, run_dir, progress=False)


def test_tiny_run_learns_and_checkpoints(tiny_run, tiny_data):
    recipe, run_dir, result = tiny_run
    losses = train_losses(run_dir)
    assert sorted(losses) == list(range(1, 31))
    first, last = sum(losses[s] for s in (1, 2, 3)) / 3, sum(losses[s] for s in (28, 29, 30)) / 3
    assert last < first - 1.5, (first, last)
    assert result["val_ppl"] < 100  # from ~512 (uniform over the vocabulary) at the start

    tags = sorted(p.name for p in (run_dir / "checkpoints").glob("step-*"))
    assert tags == ["step-00000020", "step-00000030"]  # keep_last=2 pruned step 10
    info = read_info(run_dir)
    assert info["step"] == 30 and info["recipe"]["model"]["name"] == "tiny"
    # The checkpoint loads without DeepSpeed and reproduces the logged validation loss.
    model, loaded_recipe, _ = load_model(run_dir)
    assert loaded_recipe.model == recipe.model
    from memory3.data import TokenShards, iter_eval_batches
    valid = TokenShards(tiny_data, "valid")
    total = count = 0.0
    for x, y in iter_eval_batches(valid, recipe.data.seq_len, recipe.train.micro_batch_size,
                                  recipe.train.eval_batches):
        with torch.no_grad():
            total += model(x, y).loss.item() * y.numel()
        count += y.numel()
    assert abs(total / count - result["val_loss"]) < 1e-4


def test_init_from_starts_where_the_source_run_ended(tiny_run, tmp_path):
    recipe, run_dir, result = tiny_run
    follow = recipe.override([f"train.init_from={run_dir}", "train.max_steps=2",
                              "train.eval_every=100"])
    train(follow, tmp_path / "follow", progress=False)
    first = train_losses(tmp_path / "follow")[1]
    assert first < train_losses(run_dir)[1] - 1.5  # not a fresh init
    other = recipe.override([f"train.init_from={run_dir}", "model.d_mlp=64"])
    with pytest.raises(ConfigError, match="config differs .* in d_mlp"):
        train(other, tmp_path / "other", progress=False)
    # How memories are read is not in the weights: a continual run may change it.
    reading = recipe.override([f"train.init_from={run_dir}", "train.max_steps=1",
                               "train.eval_every=100", "model.memory_top_k=16",
                               "model.chunk_len=32"])
    train(reading, tmp_path / "reading", progress=False)
    assert train_losses(tmp_path / "reading")[1] == pytest.approx(first, abs=1e-4)


@pytest.mark.skipif(not (shutil.which("g++") or shutil.which("c++")),
                    reason="torch.compile on CPU needs a C++ compiler")
def test_compiled_training_follows_eager_and_checkpoints_plain_weights(tiny_run, tmp_path):
    from torch._dynamo.utils import counters
    recipe, run_dir, result = tiny_run
    counters.clear()
    compiled = train(recipe.override(["train.compile=true"]), tmp_path / "compiled",
                     progress=False)
    assert counters["stats"]["unique_graphs"] >= 1  # dynamo did capture the model
    eager, fused = train_losses(run_dir), train_losses(tmp_path / "compiled")
    assert sorted(fused) == sorted(eager)
    for step in eager:  # fp32: the same curve up to the order of fused reductions
        assert fused[step] == pytest.approx(eager[step], rel=1e-3), step
    assert compiled["val_loss"] == pytest.approx(result["val_loss"], rel=1e-3)
    # The engine compiles in place: the checkpoint's parameter names are the eager model's.
    model, loaded, _ = load_model(tmp_path / "compiled")
    assert loaded.train.compile is True
    reference, _, _ = load_model(run_dir)
    assert model.state_dict().keys() == reference.state_dict().keys()


def shm_buffers(port: str = "*") -> set[Path]:
    return set(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_{os.getuid()}_*_{port}_*"))


def _train_args(data: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--recipe", "tiny-warmup", "--out", str(out), "--no-progress",
            f"data.path={data}", "train.max_steps=40", "train.save_every=5",
            "train.eval_every=1000", "train.keep_last=3", *extra]


def test_resume_after_sigkill_reproduces_losses(tiny_data, tmp_path):
    run_memory3(*_train_args(tiny_data, tmp_path / "unbroken"))
    expected = train_losses(tmp_path / "unbroken")

    killed = tmp_path / "killed"
    shm_before = shm_buffers()
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK",
                                                            "MASTER_ADDR", "MASTER_PORT")}
    proc = subprocess.Popen([sys.executable, "-m", "memory3", *_train_args(tiny_data, killed)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    deadline = time.time() + 120
    while not list((killed / "checkpoints").glob("step-*/memory3.json")):
        assert proc.poll() is None and time.time() < deadline, "run ended before a checkpoint"
        time.sleep(0.01)
    assert proc.poll() is None, "run finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert shm_buffers() <= shm_before  # DeepSpeed's CPU all-reduce file: unlinked at start
    before = train_losses(killed)
    assert max(before) < 40

    out = run_memory3(*_train_args(tiny_data, killed)).stdout
    assert "resumed from" in out
    resumed = train_losses(killed)
    assert sorted(resumed) == sorted(expected)
    for step in expected:
        assert resumed[step] == pytest.approx(expected[step], rel=1e-6, abs=1e-6), step


@pytest.mark.distributed
def test_two_ranks_under_deepspeed_launcher_match_one_rank(tiny_data, tmp_path):
    """2 ranks x micro batch 4 see the same global batches as 1 rank x 8: same losses."""
    common = ["train.max_steps=6", "train.save_every=3", "train.eval_every=6", "train.zero_stage=2"]
    for stale in shm_buffers("29617"):  # left by a run before the fix; only this test's port
        stale.unlink()
    run_memory3(*_train_args(tiny_data, tmp_path / "two", *common, "train.micro_batch_size=4"),
                launcher=["deepspeed", "--num_gpus", "2", "--master_port", "29617"])
    assert not shm_buffers("29617")  # both ranks unlinked DeepSpeed's CPU all-reduce files
    run_memory3(*_train_args(tiny_data, tmp_path / "one", *common, "train.micro_batch_size=8"))
    two, one = train_losses(tmp_path / "two"), train_losses(tmp_path / "one")
    assert sorted(two) == list(range(1, 7))
    for step in one:
        assert two[step] == pytest.approx(one[step], rel=1e-4), step
    ckpt = tmp_path / "two" / "checkpoints" / "step-00000006"
    assert {p.name for p in ckpt.glob("zero_pp_rank_*_optim_states.pt")} == {
        "zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"}
    assert read_info(ckpt)["world_size"] == 2
    model, _, _ = load_model(tmp_path / "two")
    assert model(torch.zeros(1, 4, dtype=torch.long)).logits.shape == (1, 4, 512)


def test_dry_run_2p4b_reports_reference_size():
    out = run_memory3("train", "--recipe", "2.4b-warmup", "--dry-run", "--world-size", "64").stdout
    assert "non-embedding parameters: 2,433,308,800" in out
    assert "tokens per optimizer step: 4,194,304" in out
    config = json.loads(out[out.index("{"):])
    assert config["bf16"] == {"enabled": True} and config["zero_optimization"]["stage"] == 2
    assert config["train_batch_size"] == 4 * 8 * 64


def test_dry_run_2p4b_continual_counts_memory_reading():
    from memory3.config import Recipe
    from memory3.train.dry_run import dry_run, format_report
    warmup = dry_run(Recipe.from_name("2.4b-warmup"), world_size=64)
    continual = Recipe.from_name("2.4b-continual")
    report = dry_run(continual, world_size=64)
    assert "memory_reading" not in warmup["memory_per_rank_gib"]
    reading = report["memory_per_rank_gib"]["memory_reading"]
    # Blocks, masks, encodings and kv-grad inputs of 2 x 2048 tokens at the 2.4b shape: GiBs,
    # small next to the step's activations.
    assert 1 < reading < report["memory_per_rank_gib"]["activations"]
    assert "memory_reading" in format_report(report)
    continual.train.micro_batch_size *= 2   # everything it counts is per sequence
    doubled = dry_run(continual, world_size=64)["memory_per_rank_gib"]["memory_reading"]
    assert doubled == pytest.approx(2 * reading)


def test_train_without_data_path_is_a_clear_error(tmp_path):
    proc = run_memory3("train", "--recipe", "tiny-warmup", "--out", str(tmp_path), check=False)
    assert proc.returncode == 2
    assert "data.path is empty" in proc.stderr


def test_a_damaged_checkpoint_is_refused_by_load_and_resume(tiny_run, tmp_path):
    import shutil
    recipe, run_dir, _ = tiny_run
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    step = run / "checkpoints" / "step-00000030"
    assert set(read_info(step)["files"]) == {p.name for p in step.iterdir()} - {"memory3.json"}
    weights = step / "mp_rank_00_model_states.pt"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 1  # same size, one bit: only the checksum can tell
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"mp_rank_00_model_states\.pt does not match its "
                                              r"sha256 in .*memory3\.json"):
        load_model(run)
    with pytest.raises(CheckpointError, match=r"mp_rank_00_model_states\.pt does not match"):
        train(recipe.override(["train.max_steps=40"]), run, progress=False)


def test_a_second_run_on_the_same_directory_is_refused(tiny_data, tmp_path):
    with writer_holding(tmp_path) as pid:
        proc = run_memory3(*_train_args(tiny_data, tmp_path), check=False)
    assert proc.returncode == 2
    assert (f"write.lock is locked: another process is writing {tmp_path} (pid {pid} on"
            in proc.stderr)


def test_vocab_too_small_for_tokenizer_is_refused(tiny_data, tmp_path):
    proc = run_memory3(*_train_args(tiny_data, tmp_path, "model.vocab_size=256"), check=False)
    assert proc.returncode == 2 and "model.vocab_size" in proc.stderr


def test_vocab_follows_the_tokenizer_unless_set(tiny_data, tmp_path, capsys):
    """tiny-warmup (preset vocabulary 512) on shards of a 700-token tokenizer trains a 704-token
    model (the next multiple of 64) and says so; a run started from it keeps 704 on other data;
    a model.vocab_size set below the tokenizer is still refused."""
    from memory3.data import prepare_data, train_tokenizer
    from memory3.data.synthetic import make_world, write_world
    files = write_world(make_world(seed=1, n_entities=60), tmp_path / "corpus")
    tok = train_tokenizer([files["corpus"]], tmp_path / "tokenizer", 700, progress=False)
    assert tok.vocab_size == 700
    shards = tmp_path / "shards"
    prepare_data([files["corpus"]], tok.path, shards, valid_fraction=0.05, progress=False)

    short = ["train.max_steps=2", "train.eval_every=100", "train.save_every=100"]
    recipe = Recipe.from_name("tiny-warmup").override([f"data.path={shards}", *short])
    assert recipe.model.vocab_size == 512  # the preset's, until training reads the data
    train(recipe, tmp_path / "run", progress=False)
    assert ("model.vocab_size 704 (preset 'tiny' has 512) follows the 700-token tokenizer of "
            f"{shards}, rounded up to a multiple of 64" in capsys.readouterr().out)
    model, trained, _ = load_model(tmp_path / "run")
    assert trained.model.vocab_size == 704 and model.lm_head.weight.shape[0] == 704
    assert recipe.model.vocab_size == 512  # the caller's recipe is left as it was

    # A continual-style start from that run on the 512-token shards: the weights decide.
    follow = Recipe.from_name("tiny-warmup").override(
        [f"data.path={tiny_data}", f"train.init_from={tmp_path / 'run'}", *short])
    train(follow, tmp_path / "follow", progress=False)
    assert "follows the weights of train.init_from" in capsys.readouterr().out
    assert read_info(tmp_path / "follow")["recipe"]["model"]["vocab_size"] == 704

    explicit = recipe.override(["model.vocab_size=640"])
    with pytest.raises(ConfigError, match=r"has 700 tokens but model.vocab_size is 640 \(set in "
                                          r"the recipe or an override\)"):
        train(explicit, tmp_path / "explicit", progress=False)
