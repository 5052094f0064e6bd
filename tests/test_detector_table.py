"""Tests for the detector table of a results directory (otcbench.bench.detector_table, `otcbench detect`)."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from otcbench.attacks.poison import poison_dataset
from otcbench.bench.detector_table import (
    DETECTOR_CSV,
    DETECTOR_MD,
    detector_markdown,
    run_detector_grid,
    steps_for,
    write_detector_report,
)
from otcbench.cli import app
from otcbench.defenses.defend import PAIR_SCORES
from otcbench.errors import UserError
from otcbench.eval.detection import auroc


@pytest.fixture(scope="module")
def results_dir(tiny_world: Path, trained_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A results directory as the runner leaves it: one finished undefended run on a two-attack poisoned set
    (its model is the shared tiny run's last checkpoint), and one run of another defense that must be skipped."""
    out = tmp_path_factory.mktemp("results") / "r"
    poison_dataset(tiny_world, out / "data" / "poison-abc", [("badnet", {"count": 16}), ("yellow", {"count": 8,
                   "target": "square"})], seed=0)
    for run_id, defense in (("run0", "none"), ("run1", "roclip")):
        d = out / "runs" / run_id
        (d / "checkpoints").mkdir(parents=True)
        (d / "checkpoints" / "last.pt").symlink_to(trained_run / "checkpoints" / "last.pt")
        (d / "metrics.json").write_text("{}")
        (d / "run.json").write_text(json.dumps({"run_id": run_id, "attack": "badnet+yellow", "defense": defense,
                                                "defense_name": defense, "seed": 0, "status": "done",
                                                "resolved": {"poison": "abc"}}))
    return out


@pytest.mark.slow
def test_detector_grid_table_and_plot(results_dir: Path) -> None:
    # safeclip alone: its GMM posterior and its own-pair cosine (the global score), beside the detector
    assert steps_for(["safeclip"]) == [("safeclip", ("cosine", "p_clean"))]
    df = run_detector_grid(results_dir, steps=steps_for(["safeclip"]), detectors=[("knn", {"k": 4})],
                           device="cpu", log=lambda *_: None)
    # the roclip run is skipped; one row per (attack incl. "all", score)
    assert set(df["run_id"]) == {"run0"}
    assert set(zip(df["attack"], df["score"], strict=True)) == {
        (a, s) for a in ("badnet", "yellow", "all") for s in ("safeclip:cosine", "safeclip:p_clean", "knn")}
    # the numbers are the defend output's scores judged on the clean rows plus that attack's rows
    scores = pd.read_parquet(results_dir / "detect" / "run0-safeclip" / PAIR_SCORES)
    rows = scores["poison"].isin(["", "badnet"])
    s = torch.tensor(scores.loc[rows, "score_knn"].to_numpy())
    clean = torch.tensor((scores.loc[rows, "poison"] == "").to_numpy())
    got = df.loc[(df["attack"] == "badnet") & (df["score"] == "knn")].iloc[0]
    assert got["auroc"] == pytest.approx(auroc(s, clean)) and got["n_poison"] == 16
    md = (results_dir / DETECTOR_MD).read_text() if (results_dir / DETECTOR_MD).exists() else ""
    assert md == ""  # run_detector_grid writes the csv; rendering is write_detector_report's
    md = write_detector_report(results_dir)
    assert "| knn |" in md and "badnet+yellow: badnet" in md and "AUROC" in md
    assert (results_dir / "plots" / "detectors.png").stat().st_size > 1000
    # re-rendering from the csv alone gives the same table; a second grid reuses the defend outputs
    assert detector_markdown(pd.read_csv(results_dir / DETECTOR_CSV)) == md
    mtime = (results_dir / "detect" / "run0-safeclip" / "defend.json").stat().st_mtime
    run_detector_grid(results_dir, steps=[("safeclip", ("p_clean",))], detectors=[("knn", {"k": 4})],
                      device="cpu", log=lambda *_: None)
    assert (results_dir / "detect" / "run0-safeclip" / "defend.json").stat().st_mtime == mtime


def test_steps_for() -> None:
    assert steps_for(["otcclip", "roclip"]) == [("otcclip", ("ot", "global")), ("roclip", ("cosine",))]
    assert steps_for(["otcclip+filter"]) == [("otcclip+filter", ())]  # unlisted: every score it has
    with pytest.raises(UserError, match="twice"):
        steps_for(["safeclip", "safeclip"])


def test_detector_grid_without_runs_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="no finished undefended run"):
        run_detector_grid(tmp_path)
    res = CliRunner().invoke(app, ["detect", str(tmp_path), "--detector", "knm"])
    assert res.exit_code == 2 and "unknown detector 'knm'" in res.output


def test_list_detectors_and_help() -> None:
    runner = CliRunner()
    res = runner.invoke(app, ["list", "detectors"], env={"COLUMNS": "200"})
    assert res.exit_code == 0 and {"knn", "dao"} <= set(res.stdout.split())
    res = runner.invoke(app, ["detect", "--help"], env={"COLUMNS": "160"})
    assert res.exit_code == 0 and "Example: otcbench detect results/peers" in res.stdout
