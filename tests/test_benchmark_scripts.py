"""The scripts under benchmarks/ import only names the package still has (a moved helper broke one once)."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

SCRIPTS = sorted((Path(__file__).resolve().parents[1] / "benchmarks").glob("*.py"))


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_benchmark_script_imports_resolve(script: Path) -> None:
    missing = []
    for node in ast.walk(ast.parse(script.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "otcbench":
            module = importlib.import_module(node.module)
            for alias in node.names:
                if hasattr(module, alias.name):
                    continue
                try:
                    importlib.import_module(f"{node.module}.{alias.name}")
                except ImportError:
                    missing.append(f"{node.module}.{alias.name}")
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "otcbench":
                    importlib.import_module(alias.name)
    assert not missing, f"{script.name} imports names that do not exist: {missing}"


def test_there_are_benchmark_scripts() -> None:
    assert {"openclip_trainer.py"} <= {p.name for p in SCRIPTS}


def test_match_scores_rows_and_csv(tmp_path: Path, trained_run: Path) -> None:
    """benchmarks/match_scores.py on a compositional world: one row per checkpoint and setting, the three picks'
    statistics in %, written to CSV and read back unchanged; a finished setting is read back, not recomputed."""
    import csv
    import importlib.util

    from otcbench.config import SynthConfig
    from otcbench.data.synth import write_world

    spec = importlib.util.spec_from_file_location("match_scores", SCRIPTS[0].parent / "match_scores.py")
    assert spec is not None and spec.loader is not None
    ms = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ms)

    world = tmp_path / "world"
    write_world(world, SynthConfig(n_train=96, world="compositional", probe_train_per_class=2,
                                   probe_val_per_class=1, test_per_class=2, seed=0))
    rows = ms.score_settings(world, tmp_path / "scores", [trained_run], [(0.5, 5), (0.0, 5)])
    assert [(r["checkpoint"], r["alpha"], r["top_k"]) for r in rows] == [(trained_run.name, 0.5, 5),
                                                                         (trained_run.name, 0.0, 5)]
    for r in rows:
        for _, key in ms.PICKS:
            for stat in ("exact", "binding", "shape"):
                assert 0.0 <= r[f"{stat}_{key}"] <= 100.0
            # a binding is a (shape, colour) pair: sharing one needs sharing its shape
            assert r[f"binding_{key}"] <= r[f"shape_{key}"] + 1e-6
    # the random pick does not depend on the score: the same derangement at both settings
    assert rows[0]["binding_random"] == rows[1]["binding_random"]
    out = tmp_path / "match_scores.csv"
    ms.write_csv(rows, out)
    back = list(csv.DictReader(out.open()))
    assert len(back) == 2 and back[0]["checkpoint"] == trained_run.name
    assert back[0]["defense"] == "" and ms.run_label(trained_run) == {"attack": "", "defense": "", "seed": ""}
    (tmp_path / "grid_run").mkdir()  # a grid's run names its attack, defense and seed in run.json
    (tmp_path / "grid_run" / "run.json").write_text('{"attack": "clean", "defense": "none", "seed": 2}')
    assert ms.run_label(tmp_path / "grid_run") == {"attack": "clean", "defense": "none", "seed": 2}
    assert float(back[1]["binding_global"]) == pytest.approx(rows[1]["binding_global"], abs=1e-4)
    kept = sorted(p.name for p in (tmp_path / "scores" / f"{trained_run.name}-a0.5-k5").iterdir())
    assert kept and all(name.endswith(".json") for name in kept)  # the re-paired copy of the world is gone
    stamp = (tmp_path / "scores" / f"{trained_run.name}-a0.5-k5" / "defend.json").stat().st_mtime_ns
    again = ms.score_settings(world, tmp_path / "scores", [trained_run], [(0.5, 5)])
    assert again == rows[:1]
    assert (tmp_path / "scores" / f"{trained_run.name}-a0.5-k5" / "defend.json").stat().st_mtime_ns == stamp


@pytest.mark.parametrize("script", sorted(SCRIPTS[0].parent.glob("*.sh")), ids=lambda p: p.name)
def test_benchmark_shell_scripts_parse_and_run_otcbench_commands(script: Path) -> None:
    """Every shell script under benchmarks/ parses (bash -n) and is executable; each otcbench subcommand it
    calls exists."""
    import os
    import re
    import subprocess

    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0, script.name
    assert os.access(script, os.X_OK), f"{script.name} is not executable"
    from otcbench.cli import app  # the typer app: its registered command names

    names = {c.name for c in app.registered_commands} | {g.name for g in app.registered_groups}
    for cmd in re.findall(r"\$OTC (\w+)", script.read_text()):
        assert cmd in names, f"{script.name} calls `otcbench {cmd}`, which does not exist"
