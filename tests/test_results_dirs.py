"""The committed results directories: each says what made it, with no path of the machine that made it.

A results directory with provenance (``results.json``'s ``provenance`` block, written by ``otcbench run``)
names one commit and one code fingerprint, and every run in its ``summary.csv`` carries that fingerprint: a
directory mixing code versions is refused here. A directory made before otcbench recorded provenance says so
in ``made_by`` (with the command that regenerates it) instead of claiming a commit.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

RESULTS = Path(__file__).resolve().parent.parent / "results"
DIRS = sorted(p for p in RESULTS.iterdir() if (p / "results.json").is_file()) if RESULTS.is_dir() else []


def _strings(obj: Any) -> list[str]:
    if isinstance(obj, dict):
        return [s for v in obj.values() for s in _strings(v)]
    if isinstance(obj, list):
        return [s for v in obj for s in _strings(v)]
    return [obj] if isinstance(obj, str) else []


@pytest.mark.parametrize("d", DIRS, ids=[p.name for p in DIRS])
def test_results_json_says_what_made_it(d: Path) -> None:
    info = json.loads((d / "results.json").read_text())
    assert info.get("recipe"), d
    absolute = [s for s in _strings(info) if s.startswith("/") or s[1:3] == ":\\"]
    assert not absolute, f"{d.name}/results.json holds absolute paths: {absolute[:3]}"
    prov = info.get("provenance")
    if prov is None:
        note = info.get("made_by", {}).get("note", "")
        assert "before otcbench recorded provenance" in note and "otcbench run" in note, d
        return
    assert prov.get("commit") and not prov.get("dirty"), f"{d.name}: made at no clean commit"
    assert prov.get("code"), d


@pytest.mark.parametrize("d", [p for p in DIRS if json.loads((p / "results.json").read_text()).get("provenance")],
                         ids=lambda p: p.name)
def test_summary_of_a_directory_with_provenance_names_no_absolute_path(d: Path) -> None:
    # the checkpoint, eval-set and poisoned-set columns are relative to the results (or working) directory
    text = (d / "summary.csv").read_text()
    absolute = [c for line in text.splitlines()[1:] for c in line.split(",") if c.startswith("/") or c[1:3] == ":\\"]
    assert not absolute, f"{d.name}/summary.csv holds absolute paths: {absolute[:3]}"


@pytest.mark.parametrize("d", [p for p in DIRS if json.loads((p / "results.json").read_text()).get("provenance")],
                         ids=lambda p: p.name)
def test_a_results_directory_holds_one_code_version(d: Path) -> None:
    prov = json.loads((d / "results.json").read_text())["provenance"]
    df = pd.read_csv(d / "summary.csv", dtype={"code": str})
    done = df[df["status"] == "done"]
    assert len(done) == len(df), f"{d.name}: runs not done: {sorted(set(df['status']))}"
    assert set(done["code"]) == {prov["code"]}, f"{d.name}: runs of code {sorted(set(done['code']))}"
    assert done["isa"].nunique() == 1 and done["threads"].nunique() == 1, d.name
