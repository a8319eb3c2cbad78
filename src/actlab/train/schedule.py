"""Learning-rate schedule as a pure function of the step (nothing to checkpoint, nothing to drift)."""
from __future__ import annotations

import math


def lr_at(step: int, base_lr: float, total_steps: int, warmup_steps: int = 0, min_lr: float = 0.0,
          warmup_lr: float = 0.0, cooldown_steps: int = 0) -> float:
    """Linear warmup to base_lr (from ``warmup_lr``, or from base_lr / warmup_steps when it is 0), cosine
    decay to ``min_lr`` at ``total_steps - cooldown_steps``, then ``min_lr`` (timm's cooldown epochs)."""
    if warmup_steps and step < warmup_steps:
        if warmup_lr:
            return warmup_lr + (base_lr - warmup_lr) * step / warmup_steps
        return base_lr * (step + 1) / warmup_steps
    decay_steps = total_steps - cooldown_steps - warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, decay_steps))
    return min_lr + 0.5 * (base_lr - min_lr) * (1 + math.cos(math.pi * progress))
