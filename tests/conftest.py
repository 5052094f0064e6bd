"""Shared fixtures: one tiny synthetic world and one short training run per test session.

The world and the run are built once (session scope) and must be treated as read-only by tests that
use them (evaluating into the run directory's ``metrics.json`` is fine; checkpoints are never touched).
Tests that need their own world call :func:`otcbench.data.synth.write_world` themselves.

CPU budget: CI has 2 cores. The tiny models are too small to gain from intra-op parallelism, so torch
runs single-threaded (``train.threads=1`` in every job, so that a run in a subprocess does exactly the
same float arithmetic as one in this process).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from otcbench.config import EvalConfig, SynthConfig, TrainConfig, TrainJob
from otcbench.data.synth import write_world

#: The tiny world every train/eval/CLI test shares: 384 pairs (6 steps of 64 per epoch), 12 classes.
TINY_WORLD = dict(n_train=384, probe_train_per_class=6, probe_val_per_class=3, test_per_class=6, seed=0)

#: The training options of the shared run (and of every run compared with it).
BASE_TRAIN: dict[str, Any] = dict(epochs=2, batch_size=64, threads=1, log_every=1, device="cpu", seed=0)


@pytest.fixture(scope="session", autouse=True)
def _quiet_and_single_threaded() -> Iterator[None]:
    """No progress bars (CLI and subprocesses inherit the env var), one torch thread, quiet datasets."""
    import datasets

    before = torch.get_num_threads()
    datasets.disable_progress_bars()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OTCBENCH_NO_PROGRESS", "1")
        yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shared pair dataset (with its eval set in ``tiny_world / "eval"``)."""
    out = tmp_path_factory.mktemp("tiny") / "world"
    write_world(out, SynthConfig(**TINY_WORLD))
    return out


@pytest.fixture(scope="session")
def make_job(tiny_world: Path) -> Callable[..., TrainJob]:
    """``make_job(**train_options)`` → a TrainJob on the tiny world (BASE_TRAIN overridden by the options).

    ``data=`` and ``model=`` may be passed too.
    """

    def make(data: Path | str | None = None, model: str = "otc-rn-nano", **train: Any) -> TrainJob:
        return TrainJob.model_validate(
            {
                "data": str(data or tiny_world),
                "model": {"name": model},
                "train": TrainConfig(**{**BASE_TRAIN, **train}).model_dump(mode="json"),
            }
        )

    return make


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory: pytest.TempPathFactory, make_job: Callable[..., TrainJob]) -> Iterator[Path]:
    """A finished 2-epoch run of otc-rn-nano on the tiny world (seed 0, batch 64, per-epoch checkpoints)."""
    from otcbench.train.loop import Trainer

    out = tmp_path_factory.mktemp("runs") / "base"
    Trainer(make_job(), out, show_progress=False).fit()
    yield out
    shutil.rmtree(out, ignore_errors=True)  # 300 MB of checkpoints; pytest keeps old temp dirs


@pytest.fixture(scope="session")
def trained_metrics(trained_run: Path, tiny_world: Path) -> dict[str, Any]:
    """``evaluate`` of the shared run on the tiny world (all metrics), written to a separate file."""
    from otcbench.eval.run import evaluate

    return evaluate(trained_run, tiny_world, EvalConfig(device="cpu"), out=trained_run / "metrics-base.json")


def pytest_report_header(config: pytest.Config) -> str:
    return f"otcbench tests: torch {torch.__version__}, {os.cpu_count()} cpus"


@pytest.fixture
def count_fits(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """The run directory of every ``Trainer.fit`` call of the test, in order: which runs a grid really trained
    (a cached run is not fitted)."""
    from otcbench.train.loop import Trainer

    calls: list[Path] = []
    real = Trainer.fit

    def fit(self: Trainer) -> Path:
        calls.append(self.out)
        return real(self)

    monkeypatch.setattr(Trainer, "fit", fit)
    return calls
