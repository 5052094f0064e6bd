"""Learning-rate schedule: linear warm-up then cosine decay to zero (as open_clip and the baselines)."""

from __future__ import annotations

import math


def warmup_steps(warmup: float, total_steps: int) -> int:
    """``warmup`` < 1 is a fraction of ``total_steps``; otherwise a number of steps."""
    n = int(round(warmup * total_steps)) if warmup < 1 else int(warmup)
    return max(0, min(n, total_steps))


def cosine_lr(step: int, base_lr: float, warmup: int, total: int) -> float:
    """Learning rate at optimiser step ``step`` (0-based)."""
    if warmup > 0 and step < warmup:
        return base_lr * (step + 1) / warmup
    span = max(1, total - warmup)
    progress = min(1.0, (step - warmup) / span)
    return 0.5 * base_lr * (1 + math.cos(math.pi * progress))
