"""Readers of the runs' training logs (``runs/<id>/log.jsonl``) for reports and notebooks.

* :func:`loss_curve` — training loss against step of one run.
* :func:`detection_curves` — for every run of a results directory whose defense logs it, the share of the
  poisoned pairs it keeps out of the contrastive loss at each of its data steps: OTCCLIP's pair filter
  (``otcclip_match`` records, ``poison_filtered``) and SafeCLIP's risky set (``safeclip`` records,
  ``risky_poison_recall``). RoCLIP only re-pairs, so it has no such curve.
* :func:`match_curves` — match precision at each matching of the caption-matching defenses (``otcclip_match``,
  ``roclip_match``): of the assignment trained on, and of the OT and global scores' own choices side by side.

A log line torn by an interruption is skipped, so a partial run still reads.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd

from otcbench.bench.layout import run_dir

#: log record type → the key holding the share of poisoned pairs kept out of the contrastive loss
DETECTION_KEYS = {"otcclip_match": "poison_filtered", "safeclip": "risky_poison_recall"}
DETECTION_COLUMNS = ["run_id", "attack", "defense", "seed", "epoch", "caught"]
#: log record types of a matching, and the score names of their match precision keys ("" = the assignment used)
MATCH_RECORDS = ("otcclip_match", "roclip_match")
MATCH_SCORES = {"": "used", "_ot": "ot", "_global": "global", "_random": "random"}
MATCH_COLUMNS = ["run_id", "attack", "defense", "seed", "epoch", "score", "precision", "n", "overlap",
                 "shape_overlap"]


def run_log(results_dir: str | Path, run_id: str) -> Path:
    """Where a results directory keeps one run's log."""
    return run_dir(results_dir, run_id) / "log.jsonl"


def _records(path: Path) -> Iterator[dict[str, Any]]:
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line torn by an interruption
        if isinstance(rec, dict):
            yield rec


def _run_records(df: pd.DataFrame, results_dir: str | Path) -> Iterator[tuple[pd.Series, dict[str, Any]]]:
    """(summary row, log record) for every record of every run in ``df`` that has a log."""
    for _, r in df.iterrows():
        f = run_log(results_dir, r["run_id"])
        if f.is_file():
            for rec in _records(f):
                yield r, rec


def loss_curve(path: str | Path) -> pd.DataFrame:
    """Training loss of one run: columns ``step, loss`` from the ``step`` records of its log.jsonl."""
    recs = [(r["step"], r["loss"]) for r in _records(Path(path)) if r.get("type") == "step" and "loss" in r]
    return pd.DataFrame(recs, columns=["step", "loss"])


def detection_curves(df: pd.DataFrame, results_dir: str | Path) -> pd.DataFrame:
    """Share of poisoned pairs each run's defense keeps out of the contrastive loss, per data step.

    ``df`` is a summary (``read_summary``); runs without a log, or whose defense logs no such share (no
    poison, or a defense that does not filter), contribute nothing. Columns: ``DETECTION_COLUMNS``;
    ``caught`` is in [0, 1] and ``epoch`` the epoch of the data step.
    """
    rows = []
    for r, rec in _run_records(df, results_dir):
        key = DETECTION_KEYS.get(str(rec.get("type")))
        if key is not None and key in rec and "epoch" in rec:
            rows.append((r["run_id"], r["attack"], r["defense"], r["seed"], int(rec["epoch"]), float(rec[key])))
    return pd.DataFrame(rows, columns=DETECTION_COLUMNS)


def _float(v: Any) -> float:
    return math.nan if v is None else float(v)


def match_curves(df: pd.DataFrame, results_dir: str | Path) -> pd.DataFrame:
    """Match precision of every matching of every run in ``df`` (a summary) that logs one.

    Columns ``MATCH_COLUMNS``: ``score`` is ``used`` (the assignment the run trained on), ``ot`` or ``global``
    (what that score alone picked at the same matching, before any cap); ``precision`` is the share of
    re-assigned images whose new caption describes them (:mod:`otcbench.eval.matching`), ``n`` how many were
    re-assigned, ``overlap`` / ``shape_overlap`` the mean binding / shape Jaccard of the re-assigned pairs (NaN
    without content; ``random`` is a caption drawn at random, the chance level). Matchings without a precision
    (nothing re-assigned, no ground truth) are left out.
    """
    rows = []
    for r, rec in _run_records(df, results_dir):
        if rec.get("type") not in MATCH_RECORDS or "epoch" not in rec:
            continue
        for suffix, score in MATCH_SCORES.items():
            p = rec.get(f"match_precision{suffix}")
            if p is not None:
                rows.append((r["run_id"], r["attack"], r["defense"], r["seed"], int(rec["epoch"]), score,
                             float(p), int(rec.get(f"match_n{suffix}", 0) or 0),
                             _float(rec.get(f"match_overlap{suffix}")),
                             _float(rec.get(f"match_shape_overlap{suffix}"))))
    return pd.DataFrame(rows, columns=MATCH_COLUMNS)
