"""Provenance: the code fingerprint, what every run and results directory records, the run cache keyed by the
code that made a run, threads from options only, and the lines under every table.

The tests that run a grid train otc-rn-nano for one epoch of 6 steps on the shared tiny world (seconds each).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from run_helpers import TINY_RECIPE_TRAIN, interrupt_at, tiny_recipe
from typer.testing import CliRunner

from otcbench.bench.layout import MARKER, RUN_FILE
from otcbench.bench.plan import OTHER_CODE, PARENT_RERUN, plan_recipe
from otcbench.bench.recipe import load_recipe
from otcbench.bench.report import write_report
from otcbench.bench.runner import RunResult, execute_plan
from otcbench.bench.summary import HEAD, META, made_by
from otcbench.cli import app
from otcbench.config import TrainConfig
from otcbench.provenance import (
    FINGERPRINT_EXCLUDED,
    PACKAGE_DIR,
    code_fingerprint,
    command_line,
    cpu_info,
    normalise_source,
    provenance,
)

cli = CliRunner()
PROVENANCE_KEYS = {"otcbench", "commit", "dirty", "code", "python", "torch", "open_clip", "pot", "cpu",
                   "capability", "isa", "gpu", "cuda", "threads"}


def strings(obj: Any) -> Iterator[str]:
    """Every string value (and key) of a JSON document."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield str(k)
            yield from strings(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from strings(v)
    elif isinstance(obj, str):
        yield obj


def assert_portable(doc: Any, tmp_path: Path) -> None:
    for s in strings(doc):
        assert not s.startswith("/") and str(tmp_path) not in s and str(Path.cwd()) not in s, s


def one_line(text: str) -> str:
    """CLI output with rich's line wrapping undone."""
    return " ".join(text.split())


# ------------------------------------------------------------------------------------------------------------
# the code fingerprint


def test_normalise_source_drops_comments_docstrings_and_blank_lines() -> None:
    src = ('"""Module doc."""\n\nimport os  # why\n\n\nclass A:\n    """Class doc, é."""\n\n'
           '    def f(self) -> str:   \n        """Doc ü."""; y = 1\n        x = "é # not a comment"  # note ü\n'
           '        return x\r\n')
    assert normalise_source(src) == ('import os\nclass A:\n    def f(self) -> str:\n        ; y = 1\n'
                                     '        x = "é # not a comment"\n        return x')
    assert normalise_source("def broken(:\n  # kept as text   \n\n") == "def broken(:\n  # kept as text"


def test_fingerprint_follows_code_not_comments_docstrings_or_presentation(tmp_path: Path) -> None:
    root = tmp_path / "otcbench"
    shutil.copytree(PACKAGE_DIR, root, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    base = code_fingerprint(root)
    assert len(base) == 12 and int(base, 16) >= 0
    assert code_fingerprint() == code_fingerprint()  # cached per process

    losses = root / "train" / "losses.py"
    text = losses.read_text()
    first = text.index('"""') + 3
    edited = text[:first] + "Reworded, and longer.\n\nStill the docstring. " + text[first:]
    edited = edited.replace("\n\n", "\n\n\n# a new comment line\n\n", 1).replace("\n", "   \n", 3)
    losses.write_text(edited + "\n\n# trailing comment\n")
    assert code_fingerprint(root) == base

    tables = root / "bench" / "tables.py"  # presentation only: never re-runs a grid
    tables.write_text(tables.read_text() + "\nPRESENTATION_ONLY = 1\n")
    assert "bench/tables.py" in FINGERPRINT_EXCLUDED and code_fingerprint(root) == base

    losses.write_text(edited + "\nCHANGED = 1\n")
    changed = code_fingerprint(root)
    assert changed != base
    config = root / "models" / "configs" / "otc-rn-nano.json"
    config.write_text(config.read_text().replace("{", '{"extra": 1, ', 1))
    assert code_fingerprint(root) not in (base, changed)


def test_provenance_fields_hold_no_absolute_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    info = provenance("cpu", threads=3)
    assert set(info) == PROVENANCE_KEYS
    assert info["code"] == code_fingerprint() and info["threads"] == 3 and info["gpu"] is None
    assert info["isa"] in ("AMX", "AVX-512", "AVX2", info["capability"]) and info["cpu"]
    assert cpu_info()["capability"] == info["capability"]
    assert_portable(info, tmp_path)
    assert TrainConfig().threads == 1  # from options, never from the host

    monkeypatch.chdir(tmp_path)
    (tmp_path / "r").mkdir()
    line = command_line(["run", str(tmp_path / "r" / "x.yaml"), "--set", "data.path=/elsewhere/world",
                         "--out", "/elsewhere/res"])
    assert line == "otcbench run r/x.yaml --set data.path=world --out res"


# ------------------------------------------------------------------------------------------------------------
# the lines under every table


def _summary_row(run_id: str, **over: Any) -> dict[str, Any]:
    row: dict[str, Any] = {"run_id": run_id, "attack": "clean", "defense": "none", "seed": 0, "status": "done",
                           "seconds": 1.0, "code": "9f8e7d6c5b4a", "commit": "1a2b3c4", "otcbench": "0.1.0",
                           "torch": "2.5.1", "cpu": "Intel Xeon", "isa": "AVX-512", "threads": 1, "wall_s": 1.0,
                           "cpu_s": 1.0, "other_code": "", "zeroshot_top1": 0.5}
    row.update(over)
    return row


def test_made_by_line_and_the_mixed_provenance_flag() -> None:
    df = pd.DataFrame([_summary_row("a"), _summary_row("b", seed=1), _summary_row("c", status="failed", code="x")])
    assert made_by(df) == ["made by otcbench 0.1.0 at 1a2b3c4 (code 9f8e7d6c5b4a), torch 2.5.1, Intel Xeon "
                           "(AVX-512), 1 thread per run, 2 runs"]  # the failed run made nothing
    mixed = pd.DataFrame([_summary_row("a"), _summary_row("b", seed=1),
                          _summary_row("c", seed=2, code="0123456789ab", threads=2, other_code="yes")])
    lines = made_by(mixed)
    assert lines[0].startswith("made by otcbench 0.1.0 at 1a2b3c4 (code 9f8e7d6c5b4a / 0123456789ab)")
    assert lines[0].endswith("1 / 2 threads per run, 3 runs")
    assert lines[1].startswith("**warning: mixed provenance**: 2 code fingerprints (9f8e7d6c5b4a: 2 runs, "
                               "0123456789ab: 1 run); 2 thread counts (1: 2 runs, 2: 1 run).")
    assert lines[2].startswith("‡ made by other code")
    legacy = pd.DataFrame([{k: v for k, v in _summary_row("a").items() if k not in ("code", "commit")}])
    assert made_by(legacy) == ["made by: not recorded (summary.csv has no provenance for its 1 run)"]


def test_report_writes_the_footer_under_every_table_and_counts_runs(tmp_path: Path) -> None:
    out = tmp_path / "res"
    out.mkdir()
    rows = [_summary_row("a"), _summary_row("b", defense="roclip"),
            _summary_row("c", defense="roclip", seed=1, isa="AMX", other_code="yes")]
    pd.DataFrame(rows, columns=HEAD + META + ["zeroshot_top1"]).to_csv(out / "summary.csv", index=False)
    (out / MARKER).write_text(json.dumps({"recipe": "demo"}))
    md = write_report(out, plots=False)
    line = "made by otcbench 0.1.0 at 1a2b3c4 (code 9f8e7d6c5b4a)"
    assert md.count(line) == 2  # the full table and the overview
    assert md.count("**warning: mixed provenance**: 2 CPU classes (AVX-512: 2 runs, AMX: 1 run)") == 2
    assert "| clean | roclip ‡ |" in md and "| clean | roclip |" in md  # kept rows apart, marked
    assert "% made by otcbench 0.1.0" in (out / "table.tex").read_text()
    runs = json.loads((out / MARKER).read_text())["runs"]
    assert runs["done"] == 3 and runs["isa"] == {"AVX-512": 2, "AMX": 1} and runs["threads"] == {"1": 3}
    r = cli.invoke(app, ["report", str(out)])
    assert r.exit_code == 0 and line in r.output and "mixed provenance" in r.output


# ------------------------------------------------------------------------------------------------------------
# the run cache, keyed by the code that made a run


def run(path: Path, out: Path, *, resume: bool = False, keep_other_code: bool = False, **kw: Any) -> RunResult:
    recipe, f = load_recipe(path)
    plan = plan_recipe(recipe, out, resume=resume, keep_other_code=keep_other_code)
    return execute_plan(plan, show_progress=False, recipe_file=f, plots=False, **kw)


def set_code(run_dir: Path, code: str) -> None:
    """Pretend other code made a run: rewrite the fingerprint its run.json records."""
    info = json.loads((run_dir / RUN_FILE).read_text())
    info["provenance"]["code"] = code
    (run_dir / RUN_FILE).write_text(json.dumps(info))


@pytest.mark.slow
def test_run_made_by_other_code_is_rerun_unless_kept(tmp_path: Path, tiny_world: Path, count_fits: list[Path]) -> None:
    path = tiny_recipe(tmp_path, tiny_world)
    out = tmp_path / "res"
    first = run(path, out)
    assert [o.action for o in first.outcomes] == ["trained", "trained"]
    parent, child = first.plan.runs
    code = code_fingerprint()

    # what every run and the results directory record, with no absolute path anywhere
    info = json.loads((parent.dir / RUN_FILE).read_text())
    prov = info["provenance"]
    assert set(prov) == PROVENANCE_KEYS | {"wall_s", "cpu_s"}
    assert prov["code"] == code and prov["threads"] == 1 and prov["wall_s"] > 0 and prov["cpu_s"] > 0
    env = json.loads((parent.dir / "env.json").read_text())
    assert env["code"] == code and env["threads"] == 1 and "platform" not in env
    marker = json.loads((out / MARKER).read_text())
    assert marker["recipe"] == "tiny" and marker["recipe_file"] == "recipe.yaml"
    assert marker["command"] == "otcbench run recipe.yaml --out res"
    assert set(marker["provenance"]) == PROVENANCE_KEYS and marker["provenance"]["code"] == code
    assert marker["runs"]["done"] == 2 and marker["runs"]["code"] == {code: 2}
    for doc in (info, env, marker):
        assert_portable(doc, tmp_path)
    df = pd.read_csv(out / "summary.csv", keep_default_na=False, dtype=str)
    assert df["code"].tolist() == [code, code] and df["threads"].tolist() == ["1", "1"]
    assert (df["other_code"] == "").all() and df["cpu"].str.len().gt(0).all()
    assert "1 thread per run, 2 runs" in first.table_md and "mixed provenance" not in first.table_md

    # the same options, made by other code: --dry-run says so, for the run and the one that starts from it
    set_code(parent.dir, "000000000000")
    r = cli.invoke(app, ["run", str(path), "--out", str(out), "--dry-run"])
    assert r.exit_code == 0 and OTHER_CODE in r.output and PARENT_RERUN in r.output
    r = cli.invoke(app, ["run", str(path), "--out", str(out), "--dry-run", "--keep-other-code"])
    assert r.exit_code == 0 and r.output.count("kept)") == 2  # "done (other code, kept)", wrapped in its cell

    # kept on request: nothing trains, and the tables mark both rows and say the code is mixed
    count_fits.clear()
    kept = run(path, out, keep_other_code=True)
    assert [o.action for o in kept.outcomes] == ["cached", "cached"] and count_fits == []
    assert "| clean | none ‡" in kept.table_md and "| clean | ft ‡" in kept.table_md  # († at 1 epoch)
    assert "‡ made by other code" in kept.table_md
    assert "**warning: mixed provenance**: 2 code fingerprints" in kept.table_md
    assert pd.read_csv(out / "summary.csv", keep_default_na=False)["other_code"].tolist() == ["yes", "yes"]

    # by default (here with --resume) both are re-run from scratch, each with one log line
    r = cli.invoke(app, ["run", str(path), "--out", str(out), "--resume", "--no-plots"])
    assert r.exit_code == 0, r.output
    text = one_line(r.output)
    assert f"clean × none (seed 0): made by other code (code 000000000000, now {code}); re-running it" in text
    assert "clean × ft (seed 0): starts from clean × none (seed 0), which is re-run; re-running it" in text
    assert "2 runs (2 trained)" in text and count_fits == [parent.dir, child.dir]
    assert json.loads((parent.dir / RUN_FILE).read_text())["provenance"]["code"] == code
    assert "‡" not in (out / "table.md").read_text()
    marker = json.loads((out / MARKER).read_text())
    assert marker["command"] == "otcbench run recipe.yaml --out res --resume --no-plots"
    assert_portable(marker, tmp_path)


@pytest.mark.slow
def test_interrupted_run_of_other_code_restarts_from_scratch(tmp_path: Path, tiny_world: Path) -> None:
    path = tiny_recipe(tmp_path, tiny_world, defenses=["none"],
                       train={**TINY_RECIPE_TRAIN, "epochs": 2, "checkpoint_every_steps": 2})
    out = tmp_path / "res"
    with pytest.raises(KeyboardInterrupt):
        run(path, out, on_step=interrupt_at(9))  # after the step-8 checkpoint
    recipe, _ = load_recipe(path)
    (only,) = plan_recipe(recipe, out, resume=True).runs
    assert json.loads((only.dir / RUN_FILE).read_text())["provenance"]["code"] == code_fingerprint()
    set_code(only.dir, "000000000000")
    plan = plan_recipe(recipe, out)  # nothing resumes, so no --resume is needed
    assert plan.state(only) == OTHER_CODE
    res = run(path, out)
    assert [o.action for o in res.outcomes] == ["trained"]
    attempts = json.loads((only.dir / RUN_FILE).read_text())["attempts"]
    assert [(a["resumed"], a["start_step"]) for a in attempts] == [(False, 0)]


@pytest.mark.slow
def test_threads_come_from_options_not_the_host(tmp_path: Path, tiny_world: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    train = {k: v for k, v in TINY_RECIPE_TRAIN.items() if k != "threads"}  # the default
    path = tiny_recipe(tmp_path, tiny_world, train=train,
                       defenses=["none", {"name": "none", "label": "other", "train": {"lr": 1e-3}}])
    res = run(path, tmp_path / "res", jobs=2)
    assert [o.action for o in res.outcomes] == ["trained", "trained"]
    for r in res.plan.runs:
        assert json.loads((r.dir / RUN_FILE).read_text())["provenance"]["threads"] == 1
        assert json.loads((r.dir / "env.json").read_text())["threads"] == 1
