"""Reading checkpoints: DeepSpeed saves plus a small JSON that makes them self-describing.

Layout of a run directory:
    checkpoints/step-00000100/      engine state (model, optimizer, scheduler, client state)
    checkpoints/step-00000100/memory3.json   recipe (with the model config), step, tokens seen

memory3.json is written last, once every rank has finished writing: a step folder without it is
an interrupted save and is ignored, so a kill during a save resumes from the previous checkpoint.
It also lists every file of the save with its size and sha256, checked before a resume or a load
reads them: a damaged checkpoint stops with an error naming the file, never loads garbage weights.
(Checkpoints saved before the list existed are read unchecked.)

A folder written by `memory3 export` (or `memory3 import-hf`) is read as a checkpoint too: its
memory3.json holds the same recipe and step plus `"format": EXPORT_FORMAT`, its weights are
Hugging Face Llama tensors in model.safetensors and its tokenizer.model travels with it. So every
command that takes --checkpoint, and train.init_from, accept an exported folder.

This module sits below everything that reads checkpoints (train, memory, eval, memdec, hf) and
imports none of them; writing a checkpoint needs the DeepSpeed engine and lives with the trainer
(memory3/train/checkpoint.py).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from memory3.config import ModelConfig, Recipe
from memory3.files import file_sha256

TAG_PREFIX = "step-"
INFO_FILE = "memory3.json"
MODEL_STATES = "mp_rank_00_model_states.pt"  # DeepSpeed's file of the weights (ZeRO stages 0-2)
EXPORT_FORMAT, EXPORT_VERSION = "memory3-hf-export", 1
EXPORT_WEIGHTS = "model.safetensors"
EXPORT_TOKENIZER = "tokenizer.model"


class CheckpointError(ValueError):
    pass


def tag_for(step: int) -> str:
    return f"{TAG_PREFIX}{step:08d}"


def latest_tag(ckpt_dir: Path) -> str | None:
    """The newest complete checkpoint's tag (DeepSpeed's own `latest` may name a torn save)."""
    tags = sorted(p.parent.name for p in ckpt_dir.glob(f"{TAG_PREFIX}*/{INFO_FILE}"))
    return tags[-1] if tags else None


def resolve(path: str | Path) -> tuple[Path, str]:
    """A run dir, its checkpoints/ dir, or one step-* dir -> (checkpoints dir, tag)."""
    path = Path(path)
    if (path / INFO_FILE).exists():
        return path.parent, path.name
    for ckpt_dir in (path / "checkpoints", path):
        tag = latest_tag(ckpt_dir)
        if tag:
            return ckpt_dir, tag
    raise CheckpointError(f"no checkpoint found at {path} (expected a run directory, its "
                          f"checkpoints/ folder, or a {TAG_PREFIX}* folder containing {INFO_FILE})")


def list_files(folder: Path, files: list[Path]) -> dict[str, dict[str, Any]]:
    """The "files" entry of a memory3.json: each file's path under `folder`, size and sha256,
    what `check_files` checks."""
    return {str(p.relative_to(folder)): {"bytes": p.stat().st_size, "sha256": file_sha256(p)}
            for p in files}


def check_files(folder: Path, info: dict[str, Any], names: list[str] | None = None) -> None:
    """Check the files `names` (default: all) of the save in `folder` against the list in its
    memory3.json."""
    listed = info.get("files")
    if listed is None:
        return
    for name in listed if names is None else names:
        path, expected = folder / name, listed.get(name)
        if expected is None:
            raise CheckpointError(f"{path} is not listed in {folder / INFO_FILE}")
        if not path.is_file() or path.stat().st_size != expected["bytes"]:
            raise CheckpointError(f"{path} is missing or not {expected['bytes']} bytes long "
                                  f"({folder / INFO_FILE}): the checkpoint is damaged")
        if file_sha256(path) != expected["sha256"]:
            raise CheckpointError(f"{path} does not match its sha256 in {folder / INFO_FILE}: "
                                  f"the checkpoint is damaged")


def read_info(path: str | Path) -> dict[str, Any]:
    ckpt_dir, tag = resolve(path)
    return json.loads((ckpt_dir / tag / INFO_FILE).read_text())


def exported(info: dict[str, Any], folder: Path) -> bool:
    """Whether `info` (a memory3.json) describes a folder written by `memory3 export`."""
    if info.get("format") != EXPORT_FORMAT:
        return False
    if info.get("version") != EXPORT_VERSION:
        raise CheckpointError(f"{folder / INFO_FILE} has export version {info.get('version')}, "
                              f"this code reads version {EXPORT_VERSION}")
    return True


def load_state_dict(path: str | Path) -> tuple[dict[str, torch.Tensor], Recipe, dict[str, Any]]:
    """Model weights of a checkpoint, gathered on the CPU whatever the ZeRO stage."""
    ckpt_dir, tag = resolve(path)
    info = json.loads((ckpt_dir / tag / INFO_FILE).read_text())
    recipe = Recipe.from_dict(info["recipe"])
    if exported(info, ckpt_dir / tag):
        # safetensors holds tensors only: nothing in the file is executed on load.
        from safetensors.torch import load_file

        from memory3.model.hf import from_llama_state_dict
        check_files(ckpt_dir / tag, info, [EXPORT_WEIGHTS])
        hf_state = load_file(ckpt_dir / tag / EXPORT_WEIGHTS)
        return from_llama_state_dict(hf_state, recipe.model), recipe, info
    check_files(ckpt_dir / tag, info, None if recipe.train.zero_stage == 3
                else [MODEL_STATES])
    if recipe.train.zero_stage == 3:
        # Stage 3 leaves only parameter shards; DeepSpeed's converter gathers them.
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
        state = get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag)
    else:
        # A pickle (DeepSpeed's format): loading runs code from the file, so only checkpoints
        # one trusts should be read (exported folders are safetensors and need no such trust).
        states = torch.load(ckpt_dir / tag / MODEL_STATES, map_location="cpu",
                            weights_only=False)
        state = states["module"]
    return state, recipe, info


def load_model(path: str | Path, device: str | torch.device = "cpu",
               dtype: torch.dtype | None = None):
    """Load a trained model from a checkpoint without DeepSpeed engines (for eval/generation).

    Returns (model in eval mode, recipe, info dict).
    """
    from memory3.model import Transformer

    state, recipe, info = load_state_dict(path)
    model = Transformer(recipe.model)
    model.load_state_dict(state)
    return model.to(device=device, dtype=dtype).eval(), recipe, info


def carried_tokenizer(path: str | Path):
    """The tokenizer an exported folder carries (checked against its memory3.json), else None."""
    from memory3.data import Tokenizer

    ckpt_dir, tag = resolve(path)
    folder = ckpt_dir / tag
    info = json.loads((folder / INFO_FILE).read_text())
    if not exported(info, folder):
        return None
    check_files(folder, info, [EXPORT_TOKENIZER])
    return Tokenizer(folder / EXPORT_TOKENIZER)


def load_tokenizer(path: str | Path, tokenizer: str | Path | None = None):
    """The tokenizer a checkpoint was trained with (the one an exported folder carries, else found
    through its recipe's data.path), or the given one."""
    from memory3.data import DataError, Tokenizer, load_manifest

    if tokenizer is not None:
        tok = Tokenizer(tokenizer)
        check_tokenizer(path, tok, Recipe.from_dict(read_info(path)["recipe"]).model.vocab_size)
        return tok
    carried = carried_tokenizer(path)
    if carried is not None:
        return carried
    recipe = Recipe.from_dict(read_info(path)["recipe"])
    try:
        return Tokenizer(load_manifest(recipe.data.path)["tokenizer"]["path"])
    except (DataError, KeyError) as e:
        raise CheckpointError(f"cannot find the tokenizer of checkpoint {path} through its "
                              f"data.path {recipe.data.path!r} ({e}); pass --tokenizer") from e


def _own_tokenizer(path: str | Path) -> tuple[str, str] | None:
    """(sha256, where it is recorded) of the tokenizer checkpoint `path` was trained with: the
    one an exported folder carries, else the one its data.path was prepared with; None when
    neither can be read (data moved away)."""
    from memory3.data import DataError, load_manifest

    ckpt_dir, tag = resolve(path)
    info = json.loads((ckpt_dir / tag / INFO_FILE).read_text())
    if exported(info, ckpt_dir / tag):
        listed = (info.get("files") or {}).get(EXPORT_TOKENIZER)
        return (listed["sha256"], str(ckpt_dir / tag / INFO_FILE)) if listed else None
    data = Recipe.from_dict(info["recipe"]).data.path
    try:
        recorded = load_manifest(data)["tokenizer"]
        return recorded["sha256"], str(Path(data) / "manifest.json")
    except (DataError, KeyError, TypeError):
        return None


def check_tokenizer(path: str | Path, tokenizer, vocab_size: int) -> None:
    """Raise unless `tokenizer` can be checkpoint `path`'s own: no more tokens than its model's
    vocab_size, and, where the checkpoint's tokenizer is on record, the same file (sha256).
    Another tokenizer's ids are other text to the model: every loss or generation would be
    meaningless (or an index error past the embedding)."""
    if tokenizer.vocab_size > vocab_size:
        raise CheckpointError(f"tokenizer {tokenizer.path} has {tokenizer.vocab_size} tokens, more "
                              f"than the model.vocab_size {vocab_size} of checkpoint {path}: not "
                              f"its tokenizer (leave --tokenizer out to use its own)")
    own = _own_tokenizer(path)
    if own is not None and own[0] != tokenizer.sha256:
        raise CheckpointError(f"tokenizer {tokenizer.path} (sha256 {tokenizer.sha256[:12]}...) is "
                              f"not the one checkpoint {path} was trained with (sha256 "
                              f"{own[0][:12]}..., recorded in {own[1]}): its token ids would "
                              f"mean other text to the model (leave --tokenizer out to use its "
                              f"own)")


def model_config(path: str | Path) -> ModelConfig:
    return Recipe.from_dict(read_info(path)["recipe"]).model
