"""train.loggers (TensorBoard event files, W&B offline runs continued on resume), MFU and peak
memory in the train metrics, read back from the files the loggers write."""
from __future__ import annotations

import shutil

import pytest

from memory3.config import ConfigError, ModelConfig, Recipe
from memory3.train.metrics import read_metrics
from memory3.train.trainer import train


def _recipe(tiny_data, steps, *extra):
    return Recipe.from_name("tiny-warmup").override(
        [f"data.path={tiny_data}", f"train.max_steps={steps}", "train.eval_every=4",
         "train.save_every=4", *extra])


def _scalars(run_dir) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)]
            for tag in events.Tags()["scalars"]}


def test_tensorboard_holds_what_metrics_jsonl_holds_once_per_step_across_a_resume(tiny_data,
                                                                                  tmp_path):
    run = tmp_path / "run"
    train(_recipe(tiny_data, 6, "train.loggers=[\"tensorboard\"]"), run, progress=False)
    # As after a kill between saves: the resumed run restarts from step 4 and logs 5-6 again.
    shutil.rmtree(run / "checkpoints" / "step-00000006")
    train(_recipe(tiny_data, 8, "train.loggers=tensorboard", "train.peak_flops=1e12"), run,
          progress=False)
    scalars = _scalars(run)
    jsonl = read_metrics(run / "metrics.jsonl")
    loss = [(r["step"], r["loss"]) for r in jsonl if r["kind"] == "train"]
    assert [s for s, _ in scalars["train/loss"]] == list(range(1, 9))
    assert scalars["train/loss"] == pytest.approx(loss)
    assert [s for s, _ in scalars["eval/val_loss"]] == [4, 8]
    assert "train/peak_memory_gb" in scalars and "train/mfu" in scalars


def test_mfu_and_peak_memory_in_train_metrics(tiny_data, tmp_path):
    train(_recipe(tiny_data, 2, "train.peak_flops=1e12"), tmp_path, progress=False)
    rows = [r for r in read_metrics(tmp_path / "metrics.jsonl") if r["kind"] == "train"]
    recipe = _recipe(tiny_data, 2)
    flops = recipe.model.flops_per_token(recipe.data.seq_len) * recipe.tokens_per_step()
    for r in rows:
        assert r["mfu"] == pytest.approx(flops * r["tokens_per_s"] / recipe.tokens_per_step()
                                         / 1e12, rel=0.05)
        assert 0.05 < r["peak_memory_gb"] < 64  # this process's peak RSS: torch alone is >50 MB


def test_flops_per_token_counts_every_matmul_and_attention():
    cfg = ModelConfig(vocab_size=100, n_layers=2, d_model=8, n_heads=2, n_kv_heads=1, head_dim=4,
                      d_mlp=16, tie_embeddings=True)
    per_layer = 8 * 4 * (2 + 2) + 2 * 4 * 8 + 3 * 8 * 16   # q, k, v; out; gate, up, down
    head = 100 * 8
    assert cfg.flops_per_token(32) == 6 * (2 * per_layer + head) + 12 * 2 * 2 * 4 * 32


def test_wandb_offline_run_is_continued_on_resume(tiny_data, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run = tmp_path / "run"
    train(_recipe(tiny_data, 4, "train.loggers=[\"wandb\"]"), run, progress=False)
    first = sorted(p.name for p in (run / "wandb").glob("offline-run-*"))
    train(_recipe(tiny_data, 8, "train.loggers=[\"wandb\"]"), run, progress=False)
    runs = sorted(p.name for p in (run / "wandb").glob("offline-run-*"))
    ids = {name.rsplit("-", 1)[1] for name in runs}
    assert len(first) == 1 and len(ids) == 1, runs  # the same W&B run id, from the checkpoint


def test_unknown_logger_is_refused():
    with pytest.raises(ConfigError, match="train.loggers must be a list of"):
        Recipe.from_name("tiny-warmup").override(["train.loggers=[\"mlflow\"]"])
    assert Recipe.from_name("tiny-warmup").train.loggers == ["jsonl"]
    assert Recipe.from_name("tiny-warmup").override(
        ["train.loggers=tensorboard,wandb"]).train.loggers == ["jsonl", "tensorboard", "wandb"]
