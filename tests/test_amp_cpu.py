"""The mixed-precision path on CPU: a tiny ``train.amp=bf16`` run trains, learns and resumes exactly.

No other test trains through the trainer with autocast on; CUDA defaults to bf16 (``amp=auto``), so this
path is what every GPU run takes, and the CPU is where CI can check it.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from run_helpers import interrupt_at

from otcbench.config import TrainJob
from otcbench.train.loop import Trainer

pytestmark = pytest.mark.slow  # trains

INTERRUPT_STEP = 6 + 3  # the middle of the second epoch (6 steps of 64 per epoch on the tiny world)


def _last(run: Path) -> dict[str, Any]:
    return torch.load(run / "checkpoints" / "last.pt", weights_only=True)


def test_bf16_run_learns_and_resumes_exactly(tmp_path: Path, make_job: Callable[..., TrainJob]) -> None:
    job = make_job(amp="bf16")
    straight = tmp_path / "straight"
    trainer = Trainer(job, straight, show_progress=False)
    assert trainer.amp_dtype == torch.bfloat16  # autocast really is on, on the CPU
    trainer.fit()

    resumed = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        Trainer(job, resumed, show_progress=False, on_step=interrupt_at(INTERRUPT_STEP)).fit()
    Trainer(job, resumed, resume=True, show_progress=False).fit()

    a, b = _last(straight), _last(resumed)
    assert a["global_step"] == b["global_step"] == 12
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k  # bit for bit, as in full precision
    assert all(v.dtype != torch.bfloat16 for v in a["model"].values())  # master weights stay full precision
    losses = [r["loss"] for r in _epochs(straight)]
    assert len(losses) == 2 and all(map(torch.isfinite, torch.tensor(losses)))
    assert losses[1] < losses[0]  # the second epoch's mean loss is lower: it learns under autocast


def _epochs(run: Path) -> list[dict[str, Any]]:
    import json

    return [r for r in map(json.loads, (run / "log.jsonl").read_text().splitlines()) if r["type"] == "epoch"]
