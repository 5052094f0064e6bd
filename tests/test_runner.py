"""The recipe runner end to end on a tiny world: outputs, cache, dependencies, resume, failures, CLI.

Every run trains otc-rn-nano for one epoch of 6 steps on a 384-pair world, so a run takes seconds.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import torch
import yaml
from run_helpers import TINY_RECIPE_TRAIN, write_recipe
from typer.testing import CliRunner

from otcbench.bench.recipe import load_recipe
from otcbench.bench.runner import execute_plan, plan_recipe, run_state
from otcbench.cli import app
from otcbench.config import Options, SynthConfig
from otcbench.data.format import read_meta
from otcbench.defenses import DEFENSES, Defense
from otcbench.defenses.cleanclip import world_config
from otcbench.errors import UserError
from otcbench.train.loop import Trainer

pytestmark = pytest.mark.slow  # every test here trains (pytest -m "not slow": the quick loop)

SYNTH = dict(n_train=384, probe_train_per_class=6, probe_val_per_class=3, test_per_class=6, seed=0)
cli = CliRunner()


def recipe_file(tmp_path: Path, **over: Any) -> Path:
    raw: dict[str, Any] = {
        "name": "tiny",
        "data": {"synth": dict(SYNTH)},
        "attacks": ["none", {"badnet": {"rate": 0.05}}],
        "defenses": ["none", {"name": "none", "label": "ft", "init_from": "none", "data": "clean",
                              "train": {"lr": 1e-12, "weight_decay": 0.0}}],
        "train": dict(TINY_RECIPE_TRAIN),
        "eval": {"linear_probe": False},
        "seeds": [0],
    }
    return write_recipe(tmp_path, raw, **over)


def run(path: Path, out: Path, *, resume: bool = False, overrides: list[str] | None = None, **kw: Any):
    recipe, f = load_recipe(path, overrides)
    plan = plan_recipe(recipe, out, resume=resume)
    return execute_plan(plan, show_progress=False, recipe_file=f, **kw)


def test_grid_outputs_dependencies_and_cache(tmp_path: Path, count_fits: list[Path],
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    out = Path("res")  # relative, as `--out results/x` usually is
    res = run(recipe_file(tmp_path), out, plots=True)
    assert [o.action for o in res.outcomes] == ["trained"] * 4
    assert len(count_fits) == 4

    # one world and one poisoned dataset (shared by both defenses)
    assert len(list((out / "data").glob("world-*"))) == 1
    assert len(list((out / "data").glob("poison-*"))) == 1
    # provenance a defense can follow from the poisoned set to the world it came from (cleanclip renders
    # clean pairs from it): an absolute source path and a world made by `data synth`
    poison_dir = next((out / "data").glob("poison-*"))
    meta = read_meta(poison_dir)
    assert Path(meta.poison["source"]["path"]).is_absolute()
    assert world_config(meta, poison_dir) == SynthConfig(**SYNTH)
    df = pd.read_csv(out / "summary.csv")
    assert list(df.columns[:6]) == ["run_id", "attack", "defense", "seed", "status", "seconds"]
    assert list(zip(df["attack"], df["defense"], strict=True)) == [("clean", "none"), ("clean", "ft"),
                                                                   ("badnet", "none"), ("badnet", "ft")]
    assert (df["status"] == "done").all() and (df["seconds"] > 0).all()
    for key in ("zeroshot_top1", "zeroshot_top5", "asr_backdoor", "asr_backdoor_n", "eval_seconds", "model"):
        assert key in df.columns
    assert df["asr_backdoor"].isna().tolist() == [True, True, False, False]  # ASR only where there is an attack
    for _, r in df.iterrows():
        metrics = json.loads((out / "runs" / r["run_id"] / "metrics.json").read_text())
        assert metrics["zeroshot_top1"] == r["zeroshot_top1"]
        # only the final checkpoint is kept
        assert [p.name for p in (out / "runs" / r["run_id"] / "checkpoints").iterdir()] == ["last.pt"]

    # the fine-tune starts from its parent's final weights (lr 1e-12: it ends where it started) and trains
    # on the clean data while ASR is measured against the attack
    for attack in ("clean", "badnet"):
        parent, child = (df[(df["attack"] == attack) & (df["defense"] == d)]["run_id"].item() for d in ("none", "ft"))
        a = torch.load(out / "runs" / parent / "checkpoints" / "last.pt", weights_only=True)["model"]
        b = torch.load(out / "runs" / child / "checkpoints" / "last.pt", weights_only=True)["model"]
        params = [k for k in a if "running_" not in k and "num_batches" not in k]  # BN statistics do move
        assert len(params) > 50 and all(torch.allclose(a[k].float(), b[k].float(), atol=1e-6) for k in params)
        cfg = yaml.safe_load((out / "runs" / child / "config.yaml").read_text())
        assert cfg["model"]["init"] == str((out / "runs" / parent / "checkpoints" / "last.pt").resolve())
        assert "world-" in cfg["data"]
        assert json.loads((out / "runs" / child / "run.json").read_text())["parent"] == parent

    assert (out / "results.json").is_file() and yaml.safe_load((out / "recipe.yaml").read_text())["name"] == "tiny"
    table = (out / "table.md").read_text()
    assert table == res.table_md and "ASR backdoor (%) ↓" in table
    assert re.search(r"\| badnet \| ft( †)? \| 1/1 \|", table)  # † when the 1-epoch model is at chance
    assert (out / "table.tex").read_text().startswith("% tiny")
    for png in ("asr_vs_accuracy.png", "curves.png"):
        assert (out / "plots" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # second run: everything from the cache, no training, nothing rewritten
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*.pt")}
    count_fits.clear()
    again = run(recipe_file(tmp_path), out)
    assert [o.action for o in again.outcomes] == ["cached"] * 4 and count_fits == []
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.pt")} == stamps
    assert pd.read_csv(out / "summary.csv").equals(df)

    # `report` rebuilds identical tables from summary.csv alone
    md, tex = (out / "table.md").read_text(), (out / "table.tex").read_text()
    (out / "table.md").unlink()
    (out / "table.tex").unlink()
    r = cli.invoke(app, ["report", str(out)])
    assert r.exit_code == 0, r.output
    assert (out / "table.md").read_text() == md and (out / "table.tex").read_text() == tex
    assert md in r.output

    # a changed option gives new runs beside the cached ones (the clean runs keep their ids)
    count_fits.clear()
    more = run(recipe_file(tmp_path), out, overrides=["attacks.badnet.options.rate=0.1"])
    assert [o.action for o in more.outcomes] == ["cached", "cached", "trained", "trained"]
    assert len(list((out / "data").glob("poison-*"))) == 2


def test_interrupted_run_resumes_without_redoing_finished_runs(tmp_path: Path, count_fits: list[Path]) -> None:
    path = recipe_file(tmp_path, attacks=["none"],
                       train={**TINY_RECIPE_TRAIN, "epochs": 2, "checkpoint_every_steps": 2},
                       defenses=["none", {"name": "none", "label": "ft", "init_from": "none",
                                          "train": {"lr": 1e-4}}])
    out = tmp_path / "res"

    def interrupt(trainer: Trainer) -> None:
        if trainer.job.model.init and trainer.global_step == 9:  # the fine-tune, after its step-8 checkpoint
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run(path, out, on_step=interrupt)
    recipe, _ = load_recipe(path)
    plan = plan_recipe(recipe, out, resume=True)
    first, second = plan.runs
    assert run_state(first.dir) == "done" and run_state(second.dir) == "partial"
    assert pd.read_csv(out / "summary.csv")["status"].tolist() == ["done", "interrupted"]
    done_stamp = (first.dir / "checkpoints" / "last.pt").stat().st_mtime_ns

    # without --resume: a clear error before any work
    with pytest.raises(UserError, match=r"1 interrupted or failed run.*pass --resume"):
        plan_recipe(recipe, out)
    r = cli.invoke(app, ["run", str(path), "--out", str(out)])
    assert r.exit_code == 2 and "pass --resume" in r.output

    count_fits.clear()
    res = run(path, out, resume=True)
    assert [o.action for o in res.outcomes] == ["cached", "resumed"]
    assert count_fits == [second.dir]
    assert (first.dir / "checkpoints" / "last.pt").stat().st_mtime_ns == done_stamp
    info = json.loads((second.dir / "run.json").read_text())
    assert info["status"] == "done" and info["attempts"][-1]["start_step"] == 8
    assert [a["resumed"] for a in info["attempts"]] == [False, True]
    steps = [json.loads(line)["step"] for line in (second.dir / "log.jsonl").read_text().splitlines()
             if json.loads(line)["type"] == "step"]
    assert steps == list(range(1, 13))  # every step logged exactly once across the interruption


class _ExplodeOptions(Options):
    at_step: int = 2


class _Explode(Defense):
    """A defense that fails mid-training (the injected failure)."""

    Options = _ExplodeOptions

    def batch_loss(self, trainer: Trainer, batch: Any) -> tuple[torch.Tensor, dict[str, float]]:
        if trainer.global_step >= self.options.at_step:
            raise RuntimeError("boom: injected failure")
        return trainer.clip_batch_loss(batch), {}


def test_failed_run_is_recorded_and_the_grid_goes_on(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(DEFENSES._items, "explode", _Explode)
    path = recipe_file(tmp_path, attacks=["none"], defenses=[
        {"explode": {"at_step": 3}}, {"name": "none", "label": "after", "init_from": "explode"}, "none"])
    out = tmp_path / "res"
    r = cli.invoke(app, ["run", str(path), "--out", str(out), "--no-plots"])
    assert r.exit_code == 1, r.output
    df = pd.read_csv(out / "summary.csv", keep_default_na=False)
    assert df["defense"].tolist() == ["explode", "after", "none"]
    assert df["status"].tolist() == ["failed", "failed", "done"]
    assert df["error"][0] == "RuntimeError: boom: injected failure"
    assert df["error"][1] == f"starts from run {df['run_id'][0]}, which failed"
    assert df["zeroshot_top1"][2] != ""
    run_dir = out / "runs" / df["run_id"][0]
    assert json.loads((run_dir / "run.json").read_text())["status"] == "failed"
    assert "Traceback" in (run_dir / "error.log").read_text()
    table = (out / "table.md").read_text()
    # at_step=3 is not _Explode's default: the row carries its variant label
    assert re.search(r"\| clean \| explode \(at_step=3\)( †)? \| 0/1 \(1 failed\) \|", table)
    assert "- failed: clean × explode (at_step=3)" in table
    assert "FAILED" in r.output and "1 trained" in r.output

    # a fixed option gives a new run id; with --resume the old failure is not in the grid any more
    r = cli.invoke(app, ["run", str(path), "--out", str(out), "--no-plots", "--resume",
                         "--set", "defenses.explode.options.at_step=100"])
    assert r.exit_code == 0, r.output
    assert pd.read_csv(out / "summary.csv")["status"].tolist() == ["done"] * 3


def test_cli_run_prints_the_table_and_rejects_bad_recipes(tmp_path: Path, tiny_world: Path) -> None:
    # data from an existing dataset (as `data import` writes), used in place
    path = recipe_file(tmp_path, data={"path": str(tiny_world)}, attacks=["none"], defenses=["none"])
    out = tmp_path / "res"
    r = cli.invoke(app, ["run", str(path), "--out", str(out), "--no-plots"])
    assert r.exit_code == 0, r.output
    assert re.search(r"\| clean \| none( †)? \| 1/1 \|", r.output) and "1 runs (1 trained)" in r.output
    assert not (out / "data").exists()  # nothing copied
    r = cli.invoke(app, ["run", str(path), "--out", str(out), "--no-plots"])
    assert r.exit_code == 0 and "1 runs (1 cached)" in r.output
    r = cli.invoke(app, ["run", str(path), "--out", str(out), "--dry-run"])
    assert r.exit_code == 0 and "done" in r.output and "1 at a time" in r.output
    # the recipe's `jobs` is the default of --jobs, and --jobs overrides it
    r = cli.invoke(app, ["run", str(path), "--out", str(out), "--dry-run", "--set", "jobs=2"])
    assert r.exit_code == 0 and "2 at a time" in r.output
    r = cli.invoke(app, ["run", str(path), "--out", str(out), "--dry-run", "--set", "jobs=2", "--jobs", "3"])
    assert r.exit_code == 0 and "3 at a time" in r.output
    r = cli.invoke(app, ["run", str(path), "--out", str(out), "--dry-run", "--set", "jobs=0"])
    assert r.exit_code == 2 and "jobs" in r.output

    bad = recipe_file(tmp_path, defenses=["roclipp"])
    r = cli.invoke(app, ["run", str(bad), "--out", str(tmp_path / "bad")])
    assert r.exit_code == 2 and "error: unknown defense 'roclipp'" in r.output
    assert not (tmp_path / "bad").exists()
    r = cli.invoke(app, ["run", str(path), "--out", str(tmp_path / "bad"), "--set", "train.epochs=zero"])
    assert r.exit_code == 2 and "train.epochs: Input should be a valid integer" in r.output
    r = cli.invoke(app, ["run", "no-such-recipe"])
    assert r.exit_code == 2 and "neither a file nor a shipped recipe" in r.output
    # another recipe's results directory
    other = recipe_file(tmp_path, name="other", data={"path": str(tiny_world)}, attacks=["none"], defenses=["none"])
    r = cli.invoke(app, ["run", str(other), "--out", str(out)])
    assert r.exit_code == 2 and "holds the results of recipe 'tiny', not 'other'" in r.output


def test_list_recipes_shows_the_shipped_ones() -> None:
    r = cli.invoke(app, ["list", "recipes"])
    assert r.exit_code == 0, r.output
    for name in ("quickstart", "synthetic-full", "otcclip-ablations", "cc3m-rn50"):
        assert name in r.output


def test_parallel_jobs_give_the_same_results_in_dependency_order(tmp_path: Path) -> None:
    path = recipe_file(tmp_path, attacks=["none"], defenses=[
        "none", {"name": "none", "label": "ft", "init_from": "none", "train": {"lr": 1e-4}},
        {"name": "none", "label": "slow", "train": {"lr": 1e-3}}])
    serial = run(path, tmp_path / "serial")
    parallel = run(path, tmp_path / "parallel", jobs=2)
    assert [o.action for o in parallel.outcomes] == ["trained"] * 3
    a, b = (pd.read_csv(tmp_path / d / "summary.csv") for d in ("serial", "parallel"))
    assert a["run_id"].tolist() == b["run_id"].tolist()
    assert a["zeroshot_top1"].tolist() == b["zeroshot_top1"].tolist()  # same threads (1): same numbers
    # the fine-tune started only after its parent finished
    ft, parent = (json.loads((tmp_path / "parallel" / "runs" / i / "run.json").read_text()) for i in b["run_id"][1::-1])
    assert ft["parent"] == parent["run_id"] and ft["attempts"][0]["started"] >= parent["attempts"][0]["finished"]
    assert serial.table_md == parallel.table_md
    with pytest.raises(UserError, match="--jobs 0"):
        execute_plan(plan_recipe(load_recipe(path)[0], tmp_path / "x"), jobs=0)


def test_parallel_runs_start_parents_then_the_longest_first(tmp_path: Path) -> None:
    from otcbench.bench.runner import _start_priority

    path = recipe_file(tmp_path, attacks=["none"], defenses=[
        {"name": "none", "label": "short", "train": {"epochs": 1}},
        {"name": "none", "label": "ft", "init_from": "none", "train": {"epochs": 1}},
        "none", "otcclip"], train={**TINY_RECIPE_TRAIN, "epochs": 2})
    plan = plan_recipe(load_recipe(path)[0], tmp_path / "out")
    order = sorted(plan.runs, key=lambda r: _start_priority(r, plan.runs), reverse=True)
    # `none` is started from by `ft`: first; then otcclip (costlier per epoch than plain CLIP); then by epochs
    assert [r.defense.label for r in order] == ["none", "otcclip", "short", "ft"]
    # a defense sweep's value counts: cross_aug doubles SafeCLIP's CLIP passes (phase B and the safe share of C;
    # the unimodal loss on the risky 15 % encodes two views either way)
    path = recipe_file(tmp_path, attacks=["none"], defenses=[
        {"name": "safeclip", "options": {"unimodal_epochs": 0, "slow_epochs": 1},
         "sweep": {"options.cross_aug": [False, True]}}], train={**TINY_RECIPE_TRAIN, "epochs": 2})
    runs = plan_recipe(load_recipe(path)[0], tmp_path / "sweep").runs
    costs = {r.defense.label: _start_priority(r, runs)[1] for r in runs}
    assert costs == pytest.approx({"safeclip cross_aug=False": 1 + (0.85 + 0.15 * 2),
                                   "safeclip cross_aug=True": 2 + (0.85 * 2 + 0.15 * 2)})
