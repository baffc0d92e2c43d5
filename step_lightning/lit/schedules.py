"""Per-step learning-rate factors: linear warm-up, then poly or cosine decay, or constant."""

from __future__ import annotations

import math


def lr_factor(step: int, total_steps: int, warmup_steps: int, schedule: str = "poly", power: float = 1.0,
              warmup_ratio: float = 1e-6, min_ratio: float = 0.0) -> float:
    if warmup_steps > 0 and step < warmup_steps:
        return warmup_ratio + (1 - warmup_ratio) * step / warmup_steps
    progress = min(max(step - warmup_steps, 0) / max(total_steps - warmup_steps, 1), 1.0)
    if schedule == "poly":
        decay = (1 - progress) ** power
    elif schedule == "cosine":
        decay = 0.5 * (1 + math.cos(math.pi * progress))
    elif schedule == "constant":
        decay = 1.0
    else:
        raise ValueError(f"unknown schedule '{schedule}': use 'poly', 'cosine' or 'constant'")
    return min_ratio + (1 - min_ratio) * decay
