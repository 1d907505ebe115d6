"""Conversion between our Transformer and Hugging Face `LlamaForCausalLM`.

Our network is a Llama: RMSNorm (normalised in fp32, weight applied after casting back), rotate-half
rotary with the default schedule (no scaling), grouped-query attention, SwiGLU MLP, no biases. Only
the parameter layout differs:

    ours                                  Hugging Face
    embed.weight                          model.embed_tokens.weight
    blocks.{i}.attn_norm.weight           model.layers.{i}.input_layernorm.weight
    blocks.{i}.attn.wqkv.weight           model.layers.{i}.self_attn.{q,k,v}_proj.weight  (rows: q | k | v)
    blocks.{i}.attn.wo.weight             model.layers.{i}.self_attn.o_proj.weight
    blocks.{i}.mlp_norm.weight            model.layers.{i}.post_attention_layernorm.weight
    blocks.{i}.mlp.w_gate_up.weight       model.layers.{i}.mlp.{gate,up}_proj.weight      (rows: gate | up)
    blocks.{i}.mlp.w_down.weight          model.layers.{i}.mlp.down_proj.weight
    norm.weight                           model.norm.weight
    lm_head.weight                        lm_head.weight  (the embedding itself when tied)

The state-dict functions are pure tensor work; only `to_llama_config` imports transformers (a dev
dependency), lazily.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from memory3.config import ModelConfig


def to_llama_config(cfg: ModelConfig, **overrides: Any):
    """A `transformers.LlamaConfig` describing the same network as `cfg`.

    `overrides` go to LlamaConfig unchanged (e.g. `attn_implementation="eager"`, `use_cache=False`).
    """
    from transformers import LlamaConfig

    _check_convertible(cfg.validate())
    kwargs: dict[str, Any] = dict(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.d_model,
        intermediate_size=cfg.d_mlp,
        num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.n_kv_heads,
        head_dim=cfg.head_dim,  # explicit: ours need not equal d_model // n_heads
        hidden_act="silu",
        max_position_embeddings=cfg.max_seq_len,
        rms_norm_eps=cfg.norm_eps,
        # Plain rotary: no scaling (linear/dynamic/yarn/llama3 would change the frequencies).
        # rope_parameters is the transformers >= 5.0 spelling (the dev extra requires it).
        rope_parameters={"rope_type": "default", "rope_theta": float(cfg.rope_theta)},
        tie_word_embeddings=cfg.tie_embeddings,
        attention_bias=False,
        mlp_bias=False,
        attention_dropout=0.0,
        initializer_range=cfg.init_std,
        pad_token_id=None,  # no padding_idx in the embedding: ours has none
    )
    kwargs.update(overrides)
    return LlamaConfig(**kwargs)


def _check_convertible(cfg: ModelConfig) -> None:
    if cfg.token_shift:
        raise ValueError("model.token_shift has no Hugging Face Llama equivalent: a model with it "
                         "cannot be converted")


def _state_dict(model_or_state_dict) -> dict[str, torch.Tensor]:
    if isinstance(model_or_state_dict, nn.Module):
        return model_or_state_dict.state_dict()
    return dict(model_or_state_dict)


def to_llama_state_dict(model_or_state_dict, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Our Transformer (or its state dict) -> a state dict `LlamaForCausalLM` loads strictly.

    The returned tensors are views of ours (split rows of the fused weights, no copies); clone them
    if either side will be modified in place. With tied embeddings `lm_head.weight` is the same
    tensor as `model.embed_tokens.weight`, as in HF's own state dict.
    """
    _check_convertible(cfg)
    sd = _state_dict(model_or_state_dict)
    q_dim, kv_dim = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    out = {"model.embed_tokens.weight": sd["embed.weight"], "model.norm.weight": sd["norm.weight"]}
    for i in range(cfg.n_layers):
        src, dst = f"blocks.{i}.", f"model.layers.{i}."
        q, k, v = sd[src + "attn.wqkv.weight"].split((q_dim, kv_dim, kv_dim), dim=0)
        gate, up = sd[src + "mlp.w_gate_up.weight"].split((cfg.d_mlp, cfg.d_mlp), dim=0)
        out.update({
            dst + "input_layernorm.weight": sd[src + "attn_norm.weight"],
            dst + "self_attn.q_proj.weight": q,
            dst + "self_attn.k_proj.weight": k,
            dst + "self_attn.v_proj.weight": v,
            dst + "self_attn.o_proj.weight": sd[src + "attn.wo.weight"],
            dst + "post_attention_layernorm.weight": sd[src + "mlp_norm.weight"],
            dst + "mlp.gate_proj.weight": gate,
            dst + "mlp.up_proj.weight": up,
            dst + "mlp.down_proj.weight": sd[src + "mlp.w_down.weight"],
        })
    out["lm_head.weight"] = (out["model.embed_tokens.weight"] if cfg.tie_embeddings
                             else sd["lm_head.weight"])
    return out


def from_llama_state_dict(sd, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """A `LlamaForCausalLM` state dict -> ours (`Transformer(cfg).load_state_dict(...)`, strict).

    The fused weights are new tensors (concatenations); the others are HF's own. With tied
    embeddings `lm_head.weight` may be absent (as in HF checkpoints saved with tying); ours then
    points at the embedding. Biases, rotary caches and scaled rope are not supported: the keys are
    checked so a checkpoint of a different architecture fails loudly instead of loading partly.
    """
    sd = dict(sd)
    out = {"embed.weight": sd.pop("model.embed_tokens.weight"), "norm.weight": sd.pop("model.norm.weight")}
    for i in range(cfg.n_layers):
        src, dst = f"model.layers.{i}.", f"blocks.{i}."
        out.update({
            dst + "attn_norm.weight": sd.pop(src + "input_layernorm.weight"),
            dst + "attn.wqkv.weight": torch.cat([sd.pop(src + f"self_attn.{n}_proj.weight")
                                                 for n in ("q", "k", "v")], dim=0),
            dst + "attn.wo.weight": sd.pop(src + "self_attn.o_proj.weight"),
            dst + "mlp_norm.weight": sd.pop(src + "post_attention_layernorm.weight"),
            dst + "mlp.w_gate_up.weight": torch.cat([sd.pop(src + "mlp.gate_proj.weight"),
                                                     sd.pop(src + "mlp.up_proj.weight")], dim=0),
            dst + "mlp.w_down.weight": sd.pop(src + "mlp.down_proj.weight"),
        })
    lm_head = sd.pop("lm_head.weight", None)
    if cfg.tie_embeddings:
        if lm_head is not None and not torch.equal(lm_head, out["embed.weight"]):
            raise ValueError("cfg.tie_embeddings is set but lm_head.weight differs from the embedding")
        out["lm_head.weight"] = out["embed.weight"]
    elif lm_head is None:
        raise KeyError("lm_head.weight missing (a tied checkpoint? set tie_embeddings=True)")
    else:
        out["lm_head.weight"] = lm_head
    leftover = [k for k in sd if not k.endswith("rotary_emb.inv_freq")]
    if leftover:
        raise KeyError(f"unexpected Llama weights for {cfg.n_layers} layers: {sorted(leftover)[:8]}")
    return out
