"""The DeepSpeed config, built from our recipe (never hand-written JSON)."""
from __future__ import annotations

import copy
from typing import Any

from memory3.config import Recipe


def build_deepspeed_config(recipe: Recipe, world_size: int) -> dict[str, Any]:
    t, o = recipe.train, recipe.optim
    grad_accum = recipe.grad_accum_for(world_size)
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": grad_accum,
        "train_batch_size": t.micro_batch_size * grad_accum * world_size,
        "gradient_clipping": o.grad_clip,
        "optimizer": {
            "type": "AdamW",
            # torch's AdamW: no fused-op build, and identical on CPU and GPU.
            "params": {"lr": o.lr, "betas": [o.beta1, o.beta2], "eps": o.eps,
                       "weight_decay": o.weight_decay, "torch_adam": True},
        },
        "bf16": {"enabled": t.precision == "bf16"},
        "zero_optimization": {"stage": t.zero_stage},
        "steps_per_print": 2**31 - 1,  # we log ourselves
        "wall_clock_breakdown": False,
    }
    return _deep_merge(config, t.deepspeed)


def _deep_merge(base: dict, extra: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in extra.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out
