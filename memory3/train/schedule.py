"""Learning-rate schedules as a multiplier of the peak LR, for torch's LambdaLR."""
from __future__ import annotations

import math

from memory3.config import OptimConfig, ScheduleConfig


def lr_at(step: int, max_steps: int, optim: OptimConfig, sched: ScheduleConfig) -> float:
    """LR used by optimizer step `step` (0-based)."""
    lr, min_lr = optim.lr, optim.min_lr
    if step < sched.warmup_steps:
        return lr * (step + 1) / sched.warmup_steps
    if sched.kind == "constant":
        return lr
    if sched.kind == "cosine":
        span = max(1, max_steps - sched.warmup_steps)
        progress = min(1.0, (step - sched.warmup_steps) / span)
        return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * progress))
    # Warmup-stable-decay: flat at the peak, then a linear decay over the last steps. The stable
    # phase can be extended (or branched from) without re-running a schedule tied to the end.
    decay_steps = int(round(sched.decay_fraction * max_steps))
    decay_start = max_steps - decay_steps
    if step < decay_start or decay_steps == 0:
        return lr
    progress = min(1.0, (step - decay_start + 1) / decay_steps)
    return lr + (min_lr - lr) * progress


def lr_multiplier(max_steps: int, optim: OptimConfig, sched: ScheduleConfig):
    return lambda step: lr_at(step, max_steps, optim, sched) / optim.lr
