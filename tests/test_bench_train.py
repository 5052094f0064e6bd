"""`bench train`: per-defense step timing through the real trainer."""

from __future__ import annotations

from pathlib import Path

import pytest

from otcbench.bench.train_bench import run_train_bench
from otcbench.errors import UserError


def test_bench_train_reports_steady_state_timings(tmp_path: Path):
    rows = run_train_bench(["none"], model="otc-rn-nano", batch_size=16, steps_per_epoch=4, epochs=2,
                           warmup_steps=2, device="cpu", threads=1, workdir=tmp_path)
    (r,) = rows
    assert r["defense"] == "none" and r["device"] == "cpu" and r["amp"] == "fp32"
    assert r["steps_timed"] == 8 - 2 and r["steps_per_epoch"] == 4
    assert r["step_ms"] > 0 and r["images_per_s"] == pytest.approx(16 / (r["step_ms"] / 1000), rel=0.01)
    # an epoch is 4 steps plus the (empty) data-side hook and a checkpoint: at least 4 median steps' worth
    # minus noise, and the reference's ratio is 1
    assert r["epoch_s"] > 2 * r["step_ms"] / 1000
    assert r["epoch_ratio"] == 1.0 and r["step_ratio"] == 1.0
    assert not any(tmp_path.iterdir())  # the temporary world and runs are cleaned up


def test_bench_train_rejects_unknown_defense_and_stray_options(tmp_path: Path):
    with pytest.raises(UserError, match="unknown defense"):
        run_train_bench(["nonee"], workdir=tmp_path)
    with pytest.raises(UserError, match="not benchmarked"):
        run_train_bench(["none"], options={"otcclip": {"alpha": 0.5}}, workdir=tmp_path)


def test_bench_train_cli_bad_set_is_one_line():
    from typer.testing import CliRunner

    from otcbench.cli import app

    res = CliRunner().invoke(app, ["bench", "train", "--defense", "none", "--set", "alpha=1"])
    assert res.exit_code == 2
    assert "use DEFENSE.option=value" in res.output and "Traceback" not in res.output
