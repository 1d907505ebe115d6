"""`memory3 export`: a checkpoint as a Hugging Face Llama folder, plus what Llama cannot express.

    DIR/config.json               LlamaConfig (architectures: LlamaForCausalLM)
    DIR/generation_config.json    bos 2, eos 3, pad 0
    DIR/model.safetensors         the weights, in the checkpoint's dtype (no pickle)
    DIR/tokenizer.json, tokenizer_config.json, special_tokens_map.json
                                  a fast tokenizer encoding exactly as ours (hf/tokenizer.py)
    DIR/tokenizer.model           our sentencepiece model itself (what our commands read)
    DIR/memory3.json              format, recipe (ModelConfig with the memory layers, memory_top_k,
                                  chunk_len, reference_len, ...), step, provenance, special token
                                  ids, and every file's size and sha256

What Hugging Face computes: our plain forward (no memory). A model trained with memory (phase
"continual") also reads its reference-BOS sink in every forward, which Llama cannot express, so
its Hugging Face logits are ours without the sink (`memory3 eval` mode none keeps the sink); our
commands read the folder back with its memory3.json and behave as with the checkpoint.
`model.token_shift` has no Llama equivalent: such a model is refused, not exported approximately
(a Llama that silently computes other logits would be worse than none).

The folder is written under a temporary name beside DIR and renamed at the end, so DIR is either
absent, the previous export (with --force) or complete.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import torch

from memory3.config import Recipe
from memory3.checkpoints import (EXPORT_FORMAT, EXPORT_TOKENIZER, EXPORT_VERSION, EXPORT_WEIGHTS,
                                 INFO_FILE, list_files)
from memory3.files import fsync_dir, write_json_atomic
from memory3.hf import HFError


class ExportError(HFError):
    pass


def _require_transformers():
    try:
        import transformers
    except ImportError as e:
        raise ExportError("writing a Hugging Face folder needs the transformers package "
                          "(pip install -e '.[dev]')") from e
    return transformers


def _check_target(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise ExportError(f"{out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise ExportError(f"{out} is not empty; pass --force to replace it")


def write_hf_folder(out: str | Path, state: dict[str, torch.Tensor], recipe: Recipe,
                    tokenizer_model: bytes, provenance: dict[str, Any], *, step: int = 0,
                    tokens: int = 0, force: bool = False) -> Path:
    """Write our model (state dict `state` of `recipe.model`) and sentencepiece tokenizer as an
    exported folder at `out`; see the module docstring for what goes in."""
    from safetensors.torch import save_file

    from memory3.data.tokenizer import (BOS_ID, EOS_ID, MODEL_FILE, PAD_ID, REF_BOS_ID, UNK_ID,
                                        Tokenizer)
    from memory3.hf.tokenizer import hf_tokenizer_files
    from memory3.model.hf import to_llama_config, to_llama_state_dict

    transformers = _require_transformers()
    cfg = recipe.model
    if cfg.token_shift:
        raise ExportError("model.token_shift is set: Hugging Face Llama has no previous-token "
                          "shift, so its logits would differ from ours; such a model is not "
                          "exported")
    out = Path(out)
    _check_target(out, force)
    files = hf_tokenizer_files(tokenizer_model, model_max_length=cfg.max_seq_len)
    dtype = next(iter(state.values())).dtype
    tmp = out.with_name(f".{out.name}.tmp-export")
    shutil.rmtree(tmp, ignore_errors=True)  # a killed export's leftovers
    tmp.mkdir(parents=True)
    try:
        config = to_llama_config(cfg, bos_token_id=BOS_ID, eos_token_id=EOS_ID)
        config.architectures = ["LlamaForCausalLM"]
        config.dtype = str(dtype).removeprefix("torch.")
        config.save_pretrained(tmp)
        transformers.GenerationConfig(bos_token_id=BOS_ID, eos_token_id=EOS_ID,
                                      pad_token_id=PAD_ID).save_pretrained(tmp)
        # safetensors refuses tensors sharing storage: the q/k/v and gate/up rows are views of our
        # fused weights (cloned apart), and with tied embeddings lm_head is left out, as in
        # Hugging Face's own tied checkpoints (tie_word_embeddings restores it on load).
        tensors = {k: v.detach().to("cpu").clone().contiguous()
                   for k, v in to_llama_state_dict(state, cfg).items()
                   if not (cfg.tie_embeddings and k == "lm_head.weight")}
        save_file(tensors, str(tmp / EXPORT_WEIGHTS), metadata={"format": "pt"})
        del tensors
        for name, text in files.items():
            (tmp / name).write_text(text, encoding="utf-8")
        (tmp / MODEL_FILE).write_bytes(tokenizer_model)
        tok = Tokenizer(tmp / EXPORT_TOKENIZER)  # refuses one without our special ids
        if tok.vocab_size > cfg.vocab_size:
            raise ExportError(f"the tokenizer has {tok.vocab_size} pieces, more than the "
                              f"model's vocab_size {cfg.vocab_size}: not this model's tokenizer")
        listed = sorted(p for p in tmp.iterdir() if p.is_file())
        write_json_atomic(tmp / INFO_FILE, {
            "format": EXPORT_FORMAT, "version": EXPORT_VERSION,
            "recipe": recipe.to_dict(), "step": step, "tokens": tokens, "phase": recipe.phase,
            "provenance": provenance,
            "special_tokens": {"pad": PAD_ID, "unk": UNK_ID, "bos": BOS_ID, "eos": EOS_ID,
                               "ref_bos": REF_BOS_ID},
            "hugging_face": {
                "architecture": "LlamaForCausalLM",
                "computes": "the plain forward: no memory"
                            + (", and not the reference-BOS sink this model was trained to "
                               "read in every forward" if recipe.phase == "continual" else ""),
                "memory_layers": cfg.memory_layer_ids,
            },
            "files": list_files(tmp, listed),
        })
        for p in tmp.iterdir():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
        fsync_dir(tmp)
        # The swap: an old export (checked above: empty, or --force) is moved aside first.
        old = out.with_name(f".{out.name}.old-export")
        if out.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(out, old)
        os.replace(tmp, out)
        fsync_dir(out.parent)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def export_checkpoint(checkpoint: str | Path, out: str | Path, *, force: bool = False,
                      tokenizer: str | Path | None = None) -> Path:
    """`memory3 export`: the checkpoint (run dir, checkpoints/ or step folder) -> folder `out`."""
    from memory3.checkpoints import load_state_dict, load_tokenizer, resolve

    _check_target(Path(out), force)  # before the (possibly long) weight load
    state, recipe, info = load_state_dict(checkpoint)
    tok = load_tokenizer(checkpoint, tokenizer)
    ckpt_dir, tag = resolve(checkpoint)
    provenance = {"checkpoint": str((ckpt_dir / tag).resolve()), "step": info.get("step"),
                  "tokenizer_sha256": tok.sha256, **({"provenance": info["provenance"]}
                                                     if "provenance" in info else {})}
    return write_hf_folder(out, state, recipe, tok.path.read_bytes(), provenance,
                           step=info.get("step", 0), tokens=info.get("tokens", 0), force=force)
