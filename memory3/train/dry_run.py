"""`memory3 train --dry-run`: size a run without allocating it.

The model is built on the meta device (no memory, no data) so even the 2.4b preset is counted
exactly on a laptop; memory per rank is an estimate from the ZeRO partitioning rules.
"""
from __future__ import annotations

import json
from typing import Any

import torch

from memory3.config import Recipe
from memory3.model import Transformer
from memory3.train.deepspeed_config import build_deepspeed_config

GIB = 2**30


def memory_estimate(recipe: Recipe, n_params: int, world_size: int) -> dict[str, float]:
    """Bytes per rank of weights, gradients, optimizer state and activations (no recomputation)."""
    m, t = recipe.model, recipe.train
    width = 2 if t.precision == "bf16" else 4
    weights, grads = n_params * width, n_params * width
    # AdamW keeps m and v in fp32, plus an fp32 master copy when training in bf16.
    optimizer = n_params * (12 if t.precision == "bf16" else 8)
    if t.zero_stage >= 1:
        optimizer /= world_size
    if t.zero_stage >= 2:
        grads /= world_size
    if t.zero_stage >= 3:
        weights /= world_size
    tokens = t.micro_batch_size * recipe.data.seq_len
    activations = tokens * m.n_layers * _layer_values_per_token(m) * width
    logits = tokens * m.vocab_size * (width + 8)  # logits, their fp32 copy and its gradient
    estimate = {"weights": weights, "gradients": grads, "optimizer": optimizer,
                "activations": activations + logits}
    if recipe.phase == "continual":
        estimate["memory_reading"] = memory_reading_estimate(recipe)
    return estimate


def memory_reading_estimate(recipe: Recipe) -> float:
    """Bytes per rank that continual training adds to a warmup step of the same shape.

    Per micro-batch, at most one encoding per new reference (B * C * new_per_chunk): the encoder's
    forward over them holds one layer's activations and its fp32 token-selection scores at a time
    (no gradient), the encoded memories are kept, and encode_grad "kv" keeps the kept tokens'
    normalised inputs for the projection's backward. Every layer's attention keeps its
    [blocks; context] keys/values (concatenated copies) and its block mask for backward: the M*K
    kept tokens plus the sink per chunk in memory layers, the sink alone in the others.
    """
    m, t, c = recipe.model, recipe.train, recipe.continual
    width = 2 if t.precision == "bf16" else 4
    B, T = t.micro_batch_size, recipe.data.seq_len
    chunks = -(-T // m.chunk_len)
    n_refs = B * chunks * c.new_per_chunk
    n_mem, G, K, D = len(m.memory_layer_ids), m.n_kv_heads, m.memory_top_k, m.head_dim
    per_layer = _layer_values_per_token(m)
    encoding = n_refs * m.reference_len * (per_layer * width + m.n_heads * m.reference_len * 4)
    memories = n_refs * n_mem * 2 * G * K * D * width
    kept_for_backward = {
        "none": 0, "kv": n_refs * n_mem * G * K * m.d_model * width,
        "full": n_refs * m.reference_len * m.n_layers * per_layer * width}[c.encode_grad]
    slots = 1 + m.memories_per_chunk * K
    reading = 0
    for layer_slots in [slots] * n_mem + [1] * (m.n_layers - n_mem):
        keys = chunks * layer_slots + T
        reading += 2 * B * G * keys * D * width + B * T * keys  # k and v copies; bool mask
    return encoding + memories + kept_for_backward + reading


def _layer_values_per_token(m) -> int:
    """Activation values one transformer layer keeps per token for backward (no recomputation)."""
    return 6 * m.d_model + (2 * m.n_heads + 2 * m.n_kv_heads) * m.head_dim + 4 * m.d_mlp


def dry_run(recipe: Recipe, world_size: int = 1) -> dict[str, Any]:
    with torch.device("meta"):
        model = Transformer(recipe.model)
    n_params = sum(p.numel() for p in model.parameters())
    embedding = sum(p.numel() for name, p in model.named_parameters()
                    if name in ("embed.weight", "lm_head.weight"))
    mem = memory_estimate(recipe, n_params, world_size)
    return {"recipe": recipe.name, "model": recipe.model.name, "world_size": world_size,
            "parameters": n_params, "non_embedding_parameters": n_params - embedding,
            "memory_layers": recipe.model.memory_layer_ids,
            "grad_accum": recipe.grad_accum_for(world_size),
            "tokens_per_step": recipe.tokens_per_step(world_size),
            "memory_per_rank_gib": {k: v / GIB for k, v in mem.items()},
            "total_memory_per_rank_gib": sum(mem.values()) / GIB,
            "deepspeed_config": build_deepspeed_config(recipe, world_size)}


def format_report(r: dict[str, Any]) -> str:
    lines = [
        f"recipe {r['recipe']} (model preset {r['model']}), world size {r['world_size']}",
        f"parameters:               {r['parameters']:,} ({r['parameters']:.3e})",
        f"non-embedding parameters: {r['non_embedding_parameters']:,} "
        f"({r['non_embedding_parameters']:.3e})",
        f"memory layers:            {r['memory_layers']}",
        f"tokens per optimizer step: {r['tokens_per_step']:,} (grad accumulation "
        f"{r['grad_accum']})",
        "estimated memory per rank (GiB):",
        *(f"  {k:<14} {v:10.2f}" for k, v in r["memory_per_rank_gib"].items()),
        f"  {'total':<14} {r['total_memory_per_rank_gib']:10.2f}",
        "deepspeed config:",
        json.dumps(r["deepspeed_config"], indent=2),
    ]
    return "\n".join(lines)
