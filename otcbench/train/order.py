"""Deterministic randomness of a training run: per-step seeds and each epoch's row order.

Shared by the trainer and the defenses that need the order an epoch will visit rows in; randomness inside a
step depends only on ``(seed, step)``, so a resumed run replays exactly what an uninterrupted run would do.
"""

from __future__ import annotations

import torch


def step_seed(seed: int, step: int) -> int:
    """A per-step seed: randomness inside a step depends only on (seed, step), so resume is exact."""
    return (seed * 1_000_003 + step * 7_919 + 17) % (2**63 - 1)


def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The deterministic shuffled row order of an epoch."""
    g = torch.Generator().manual_seed(step_seed(seed, 10_000_000 + epoch))
    return torch.randperm(n, generator=g)
