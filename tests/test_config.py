"""Configs and recipes: presets, every shipped recipe, overrides, errors, LR schedules."""
from __future__ import annotations

import json

import pytest

from memory3.config import ConfigError, ModelConfig, Recipe, list_recipes
from memory3.config import OptimConfig, ScheduleConfig
from memory3.train.deepspeed_config import build_deepspeed_config
from memory3.train.schedule import lr_at


@pytest.mark.parametrize("name", list_recipes())
def test_every_shipped_recipe_loads_and_builds_a_deepspeed_config(name):
    recipe = Recipe.from_name(name)
    assert recipe.name == name
    world = 64 if recipe.train.global_batch_tokens else 1
    config = build_deepspeed_config(recipe, world)
    assert config["train_batch_size"] == (config["train_micro_batch_size_per_gpu"]
                                          * config["gradient_accumulation_steps"] * world)
    # The config round-trips through the dict that travels in checkpoints.
    assert Recipe.from_dict(json.loads(json.dumps(recipe.to_dict()))) == recipe


def test_shipped_recipes_exist():
    assert {"tiny-warmup", "small-warmup", "2.4b-warmup", "cpu-warmup", "cpu-continual"} \
        <= set(list_recipes())


@pytest.mark.parametrize("name", [n for n in list_recipes() if n.endswith("-continual")])
def test_every_continual_recipe_continues_its_warmup_recipes_weights(name):
    # `train.init_from` refuses weights of another shape (a token shift, a layer): a shipped
    # pair that disagreed would fail only after the warmup's hours.
    warmup = Recipe.from_name(name.replace("-continual", "-warmup"))
    continual = Recipe.from_name(name)
    assert continual.model.weight_differences(warmup.model) == []
    assert continual.data.seq_len <= warmup.model.max_seq_len


def test_presets():
    ref = ModelConfig.from_name("2.4b")
    assert (ref.n_layers, ref.n_heads, ref.n_kv_heads, ref.head_dim, ref.d_model, ref.vocab_size) \
        == (44, 40, 8, 80, 3200, 60416)
    assert ref.memory_layer_ids == list(range(22))
    assert abs(ref.n_params_non_embedding - 2.43e9) < 0.01e9
    assert 10e6 <= ModelConfig.from_name("small").n_params <= 40e6
    assert ModelConfig.from_name("tiny", memory_layers="middle_half", n_layers=8).memory_layer_ids \
        == [2, 3, 4, 5]
    assert ModelConfig.from_name("tiny", memory_layers=[1]).memory_layer_ids == [1]


def test_recipe_from_file_and_overrides(tmp_path):
    path = tmp_path / "mine.toml"
    path.write_text('[model]\npreset = "tiny"\nn_layers = 3\n[train]\nmax_steps = 7\n')
    recipe = Recipe.from_name(str(path))
    assert recipe.name == "mine" and recipe.model.n_layers == 3 and recipe.train.max_steps == 7
    recipe = recipe.override(["optim.lr=0.01", "data.path=/x", "model.memory_layers=[0, 2]",
                              "train.deepspeed.zero_optimization.offload_optimizer.device=cpu"])
    assert recipe.optim.lr == 0.01 and recipe.data.path == "/x"
    assert recipe.model.memory_layer_ids == [0, 2]
    assert build_deepspeed_config(recipe, 1)["zero_optimization"] == {
        "stage": 1, "offload_optimizer": {"device": "cpu"}}


def test_vocab_size_is_explicit_only_when_written(tmp_path):
    """Training sizes the vocabulary to the data unless the recipe file or an override wrote
    model.vocab_size (memory3/train/phases.py fit_vocab_to_data); a preset's value does not count."""
    shipped = Recipe.from_name("tiny-warmup")
    assert not shipped.vocab_size_explicit
    assert not shipped.override(["model.n_layers=3", "data.path=/x"]).vocab_size_explicit
    assert shipped.override(["model.vocab_size=640"]).vocab_size_explicit
    path = tmp_path / "mine.toml"
    path.write_text('[model]\npreset = "tiny"\nvocab_size = 640\n')
    assert Recipe.from_name(str(path)).override(["train.max_steps=3"]).vocab_size_explicit
    assert "vocab_size_explicit" not in shipped.to_dict()  # not written into checkpoints


@pytest.mark.parametrize("assignment, message", [
    ("train.max_step=3", "unknown field 'train.max_step'"),
    ("train.max_steps=abc", "train.max_steps must be a number"),
    ("train.max_steps=2.5", "train.max_steps must be an integer"),
    ("train.precision=fp16", "fp16 is not portable"),
    ("model.n_kv_heads=3", "multiple of model.n_kv_heads"),
    ("model.memory_layers=[5]", "outside 0..1"),
    ("data.seq_len=100000", "exceeds model.max_seq_len"),
    ("nosuch.field=1", "no config section 'nosuch'"),
    ("train.max_steps", "must look like section.field=value"),
])
def test_bad_overrides_name_the_field(assignment, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(".", r"\.")):
        Recipe.from_name("tiny-warmup").override([assignment])


def test_bad_recipe_files(tmp_path):
    with pytest.raises(ConfigError, match="unknown recipe 'nope'"):
        Recipe.from_name("nope")
    bad = tmp_path / "bad.toml"
    bad.write_text("[train\n")
    with pytest.raises(ConfigError, match="bad.toml is not valid TOML"):
        Recipe.from_file(bad)
    bad.write_text('[model]\npreset = "huge"\n')
    with pytest.raises(ConfigError, match="unknown model preset 'huge'"):
        Recipe.from_file(bad)


def test_global_batch_tokens_must_divide():
    recipe = Recipe.from_name("2.4b-warmup")
    assert recipe.grad_accum_for(64) == 8 and recipe.grad_accum_for(1) == 512
    with pytest.raises(ConfigError, match="global_batch_tokens"):
        recipe.grad_accum_for(3)


def test_schedules():
    optim = OptimConfig(lr=1.0, min_lr=0.1)
    wsd = ScheduleConfig(kind="wsd", warmup_steps=10, decay_fraction=0.2)
    lrs = [lr_at(s, 100, optim, wsd) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(lr == 1.0 for lr in lrs[10:80])  # stable phase
    assert lrs[99] == pytest.approx(0.1) and all(a > b for a, b in zip(lrs[80:], lrs[81:]))
    cos = ScheduleConfig(kind="cosine", warmup_steps=10)
    lrs = [lr_at(s, 100, optim, cos) for s in range(101)]
    assert lrs[10] == pytest.approx(1.0) and lrs[55] == pytest.approx(0.55)
    assert lrs[100] == pytest.approx(0.1)


def test_recipe_paths_are_made_absolute_for_the_checkpoint_to_carry(tmp_path):
    # A run launched with data.path=shards must still find its tokenizer when build-bank or eval
    # reads its checkpoint from another directory.
    recipe = Recipe.from_name("tiny-continual").override(
        ["data.path=shards", "continual.bank=/abs/bank", "train.init_from=hf:llama"])
    fixed = recipe.with_absolute_paths(tmp_path)
    assert fixed.data.path == str(tmp_path / "shards")
    assert fixed.continual.bank == "/abs/bank"
    assert fixed.train.init_from == f"hf:{tmp_path / 'llama'}"
    assert fixed.memdec.targets == ""  # unset stays unset
    assert fixed.model == recipe.model and fixed.train.max_steps == recipe.train.max_steps


@pytest.mark.parametrize("value", ["1.5", "-0.1", "true", '"all"'])
def test_own_chunk_overlap_must_be_an_lcs_ratio(value):
    with pytest.raises(ConfigError, match="continual.own_chunk_overlap must be a number within"):
        Recipe.from_name("tiny-continual").override([f"continual.own_chunk_overlap={value}"])
    assert Recipe.from_name("tiny-continual").override(
        ["continual.own_chunk_overlap=1"]).continual.own_chunk_overlap == 1
