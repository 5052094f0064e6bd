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


#: The tiny recipe's training: one epoch of 6 steps of otc-rn-nano on the 384-pair tiny world, one thread.
TINY_RECIPE_TRAIN = {"epochs": 1, "batch_size": 64, "threads": 1, "device": "cpu", "log_every": 1}


def tiny_recipe(tmp_path: Path, data: Path, **over: Any) -> Path:
    """A recipe file on the pair dataset ``data`` (used in place): the clean entry, plain CLIP and a fine-tune
    that starts from it (``ft``), one seed, no linear probe; ``over`` replaces top-level keys."""
    raw: dict[str, Any] = {
        "name": "tiny",
        "data": {"path": str(data)},
        "attacks": ["none"],
        "defenses": ["none", {"name": "none", "label": "ft", "init_from": "none", "train": {"lr": 1e-4}}],
        "train": dict(TINY_RECIPE_TRAIN),
        "eval": {"linear_probe": False},
        "seeds": [0],
    }
    return write_recipe(tmp_path, raw, **over)


def write_recipe(tmp_path: Path, raw: dict[str, Any], **over: Any) -> Path:
    """``raw`` with ``over`` replacing its top-level keys, written to ``tmp_path/recipe.yaml``."""
    import yaml

    p = tmp_path / "recipe.yaml"
    p.write_text(yaml.safe_dump({**raw, **over}, sort_keys=False))
    return p
