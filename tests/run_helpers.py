"""Small helpers the training tests share: a job with another defense, a simulated Ctrl-C, the last checkpoint."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from otcbench.config import TrainJob
from otcbench.train.loop import Trainer


def with_defense(job: TrainJob, name: str, init: Path | None = None, **options: Any) -> TrainJob:
    """``job`` with defense ``name`` and ``options``, starting from ``init`` (random initialisation if None)."""
    d = job.model_dump()
    d["defense"] = {"name": name, "options": options}
    d["model"]["init"] = str(init) if init is not None else None
    return TrainJob.model_validate(d)


def interrupt_at(step: int) -> Callable[[Trainer], None]:
    """An ``on_step`` hook that simulates Ctrl-C right after optimiser step ``step`` (1-based)."""

    def hook(trainer: Trainer) -> None:
        if trainer.global_step == step:
            raise KeyboardInterrupt

    return hook


def last_state(run: Path) -> dict[str, Any]:
    """The run's ``checkpoints/last.pt``."""
    return torch.load(run / "checkpoints" / "last.pt", map_location="cpu", weights_only=True)
