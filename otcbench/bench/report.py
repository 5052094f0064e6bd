"""Results of a recipe: ``summary.csv`` (one row per run), ``table.md`` / ``table.tex`` and plots, all at once.

``summary.csv`` (:mod:`otcbench.bench.summary`) is the source of truth: the runner writes it from the run
directories, and every table (:mod:`otcbench.bench.tables`) and plot (:mod:`otcbench.bench.plots`) is rebuilt
from it alone (plus each run's ``log.jsonl`` for training curves), so ``otcbench report DIR`` reproduces exactly
what ``otcbench run`` wrote.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd

from otcbench.bench.layout import MARKER, MATCH_FILE, SUMMARY, TABLE_MD, TABLE_TEX, recipe_name
from otcbench.bench.summary import (
    HEAD,
    META,
    fill_variants,
    lower_is_better,
    made_by,
    metric_names,
    provenance_counts,
    read_summary,
    shown_labels,
    summary_rows,
    variant_notes,
    write_summary,
)
from otcbench.bench.tables import (
    aggregate,
    latex_table,
    markdown_table,
    match_precision_table,
    offline_picks_table,
    overview_table,
    table_metrics,
)

if TYPE_CHECKING:
    from otcbench.bench.plan import Plan

#: The offline caption picks of every finished model (``benchmarks/match_scores.py --csv``), when present
OFFLINE_PICKS = "match_scores.csv"


def write_report(out: str | Path, *, plan: Plan | None = None, plots: bool = True) -> str:
    """(Re)write summary.csv (from the run directories when ``plan`` is given), table.md, table.tex and,
    with ``plots``, the PNGs; returns the markdown table.

    Every table is followed by what made its runs (:func:`otcbench.bench.summary.made_by`), and results.json's
    ``runs`` block counts the finished runs by code fingerprint, commit, CPU and thread count.
    """
    from otcbench.train.checkpoint import atomic_write_text

    out = Path(out)
    title = ""
    if plan is not None:
        df = write_summary(summary_rows(plan), out / SUMMARY)
        title = plan.recipe.name
    else:
        df, title = _read(out)
    lines = made_by(df)
    footer = _footer(lines)
    md = markdown_table(df, title) + footer
    overview = overview_table(df, title)
    if overview:
        md += "\n" + overview + footer
    matching = match_precision_table(_match_curves(df, out))
    if matching:
        md += "\n" + matching + footer
    picks = out / OFFLINE_PICKS
    if picks.is_file():  # `benchmarks/match_scores.py --csv` (benchmarks/finegrained.sh)
        md += "\n" + offline_picks_table(pd.read_csv(picks)) + footer
    atomic_write_text(out / TABLE_MD, md)
    atomic_write_text(out / TABLE_TEX, latex_table(df, title) + "".join(f"% {line}\n" for line in lines))
    _record_runs(out, df)
    if plots:
        from otcbench.bench.plots import write_plots

        write_plots(df, out)
    from otcbench.bench.detector_table import write_detector_report

    write_detector_report(out, plots=plots)  # detectors.md from detectors.csv (`otcbench detect`), if any
    return md


def main_table(out: str | Path) -> str:
    """A results directory's main table as the README quotes it: the per-(attack, defense) table of ``table.md``
    without its title, then what made its runs; recomputed from ``summary.csv`` alone, so a quoted table that
    no longer equals its results is caught (tests/test_readme_table.py)."""
    df, title = _read(Path(out))
    body = markdown_table(df, title).split("\n", 1)[1].strip()  # the title line is the README's
    return body + "\n" + _footer(made_by(df))


def _read(out: Path) -> tuple[pd.DataFrame, str]:
    """A results directory's summary (with its variant labels) and its recipe's name, the tables' title."""
    return fill_variants(read_summary(out), out), recipe_name(out)


def _footer(lines: list[str]) -> str:
    """The lines under a markdown table (:func:`made_by`), one paragraph each."""
    return "".join(f"\n{line}\n" for line in lines)


def _record_runs(out: Path, df: pd.DataFrame) -> None:
    """results.json's ``runs`` block (only where results.json marks the directory)."""
    import json

    from otcbench.train.checkpoint import write_json

    marker = out / MARKER
    try:
        info = json.loads(marker.read_text())
    except (OSError, json.JSONDecodeError):
        return
    if isinstance(info, dict):
        write_json(marker, {**info, "runs": provenance_counts(df)})


def _match_curves(df: pd.DataFrame, out: Path) -> pd.DataFrame:
    """Match precision per matching from the runs' logs, kept in ``match_precision.csv`` so that a results
    directory committed without its run logs still reports it."""
    from otcbench.bench.logs import MATCH_COLUMNS, match_curves
    from otcbench.train.checkpoint import atomic_write_text

    curves = match_curves(df, out)
    path = out / MATCH_FILE
    if not curves.empty:
        atomic_write_text(path, curves.to_csv(index=False))
        return curves
    if path.is_file():
        return pd.read_csv(path)
    return pd.DataFrame(columns=MATCH_COLUMNS)


# the parts of a report, re-exported from their historical import path
__all__ = ["HEAD", "MATCH_FILE", "META", "SUMMARY", "aggregate", "fill_variants", "latex_table",
           "lower_is_better", "made_by", "markdown_table", "match_precision_table", "metric_names", "overview_table",
           "read_summary", "shown_labels", "summary_rows", "table_metrics", "variant_notes", "write_report",
           "write_summary"]
