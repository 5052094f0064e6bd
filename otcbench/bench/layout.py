"""The layout of a results directory (``otcbench run --out DIR``): which file holds what, and a run's state.

::

    DIR/results.json            marks a results directory: the recipe's name, otcbench version, recipe file
                                (never absolute), command line, the invoking process's provenance, and the
                                ``runs`` block (finished runs by code fingerprint, commit, CPU, threads)
    DIR/recipe.yaml             the recipe as run
    DIR/data/world-<hash>/      the synthetic world (an imported dataset is used in place)
    DIR/data/poison-<hash>/     one poisoned copy per (attack entry, seed)
    DIR/runs/<run_id>/          one run: the trainer's run directory + run.json (status, attempts and the
                                ``provenance`` block that keys the cache by code) (+ error.log when it failed)
    DIR/summary.csv             one row per run: the source of every table and plot (with provenance columns)
    DIR/match_precision.csv     match precision per matching (kept so that it survives without the run logs)
    DIR/table.md, table.tex     the tables
    DIR/plots/                  the PNGs

The runner writes it, the report reads it; both take names and paths from here, never from each other.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

MARKER = "results.json"  # identifies a results directory and the recipe it belongs to
RECIPE_COPY = "recipe.yaml"
RUN_FILE = "run.json"
ERROR_FILE = "error.log"
METRICS_FILE = "metrics.json"
SUMMARY = "summary.csv"
MATCH_FILE = "match_precision.csv"
TABLE_MD = "table.md"
TABLE_TEX = "table.tex"
PLOTS_DIR = "plots"


def run_dir(results_dir: str | Path, run_id: str) -> Path:
    """The directory of run ``run_id``."""
    return Path(results_dir) / "runs" / str(run_id)


def world_dir(results_dir: Path, key: str) -> Path:
    """Where the recipe's synthetic world of content hash ``key`` is written."""
    return results_dir / "data" / f"world-{key}"


def poison_dir(results_dir: Path, key: str) -> Path:
    """Where the poisoned dataset of content hash ``key`` is written."""
    return results_dir / "data" / f"poison-{key}"


def run_state(run_dir: Path) -> str:
    """Whether a run directory is ``done`` (``run.json`` says so and ``metrics.json`` exists), ``partial``
    (interrupted or failed: resumable) or ``new``."""
    if not run_dir.exists():
        return "new"
    info = read_run_info(run_dir)
    if info.get("status") == "done" and (run_dir / METRICS_FILE).is_file():
        return "done"
    return "partial"


def read_run_info(run_dir: Path) -> dict[str, Any]:
    """A run's ``run.json`` ({} when absent or torn by an interruption)."""
    f = run_dir / RUN_FILE
    if not f.is_file():
        return {}
    try:
        return json.loads(f.read_text())
    except json.JSONDecodeError:
        return {}  # torn by an interruption: the run is simply not done


def write_run_info(run_dir: Path, info: dict[str, Any]) -> None:
    """Write a run's ``run.json`` atomically."""
    from otcbench.train.checkpoint import write_json

    write_json(run_dir / RUN_FILE, info)


def recipe_name(results_dir: Path) -> str:
    """The recipe name a results directory's marker records ("" when it has none)."""
    try:
        return str(json.loads((results_dir / MARKER).read_text()).get("recipe", ""))
    except (OSError, json.JSONDecodeError):
        return ""
