"""The detector table of a results directory: every pair score against every attack, AUROC and precision@n.

``otcbench detect RESULTS_DIR`` takes each finished undefended run (defense ``none``) of a recipe's grid on
a poisoned dataset, and runs ``otcbench defend`` with that run's model on the dataset it was trained on —
once per data-side step whose scores are compared (OTCCLIP's ``ot`` and ``global`` scores, SafeCLIP's GMM
posterior ``p_clean``) and with the embedding detectors (``knn``, ``dao``: :mod:`otcbench.defenses.detectors`)
beside the first. Every score is judged per attack of the dataset (the clean rows and that attack's rows;
:func:`otcbench.eval.detection.per_attack_detection`):

* ``RESULTS_DIR/detectors.csv`` — one row per (run, attack, score): ``auroc`` (clean vs poisoned, higher =
  better, 0.5 = chance) and ``precision_at_n`` (poisoned share of the n lowest-scored rows, n = the attack's
  poisoned rows; chance = the attack's share of the rows judged);
* ``detectors.md`` — both metrics, one row per score, one column per attack, mean ± std over seeds;
* ``plots/detectors.png`` — the same as grouped bars (min–max over seeds as error bars).

The defend outputs stay in ``RESULTS_DIR/detect/<run_id>-<defense>/`` (not committed: they hold a copy of
the data); ``detectors.csv`` is the source of truth and ``otcbench report`` re-renders the table and plot
from it alone.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from otcbench.errors import UserError

DETECTOR_CSV = "detectors.csv"
DETECTOR_MD = "detectors.md"
DETECT_DIR = "detect"
#: The data-side steps compared, and which of their scores the table shows.
DEFAULT_STEPS: tuple[tuple[str, tuple[str, ...]], ...] = (("otcclip", ("ot", "global")), ("safeclip", ("p_clean",)))
#: The scores shown of a step named alone (``--defense``); a defense not listed shows all of its scores.
SHOWN_ALONE: dict[str, tuple[str, ...]] = {"otcclip": ("ot", "global"), "safeclip": ("cosine", "p_clean"),
                                           "roclip": ("cosine",)}
DEFAULT_DETECTORS: tuple[tuple[str, dict[str, Any]], ...] = (("knn", {}), ("dao", {}))
COLUMNS = ["run_id", "attack_group", "seed", "attack", "score", "n_poison", "n_clean", "auroc", "precision_at_n"]


def _undefended_runs(results_dir: Path) -> list[tuple[Path, dict[str, Any], Path]]:
    """(run dir, run.json, poisoned dataset) of every finished ``none`` run on poisoned data, in run-id order."""
    from otcbench.bench.layout import read_run_info, run_state

    out = []
    for run_dir in sorted((results_dir / "runs").glob("*")):
        info = read_run_info(run_dir)
        poison = (info.get("resolved") or {}).get("poison")
        if info.get("defense_name") != "none" or not poison or run_state(run_dir) != "done":
            continue
        data = results_dir / "data" / f"poison-{poison}"
        if (data / "otcbench.json").is_file():
            out.append((run_dir, info, data))
    return out


def steps_for(defenses: Sequence[str]) -> list[tuple[str, tuple[str, ...]]]:
    """The data-side steps of ``detect --defense NAME …`` with the scores each shows (all for an unlisted one)."""
    if len(set(defenses)) != len(defenses):
        raise UserError(f"a defense is given twice ({', '.join(defenses)}); give each --defense once")
    return [(d, SHOWN_ALONE.get(d, ())) for d in defenses]


def _score_label(step: str, score: str, detectors: set[str]) -> str:
    return score if score in detectors else f"{step}:{score}"


def run_detector_grid(
    results_dir: str | Path,
    *,
    steps: Sequence[tuple[str, Sequence[str]]] = DEFAULT_STEPS,
    detectors: Sequence[tuple[str, dict[str, Any]]] = DEFAULT_DETECTORS,
    device: str = "auto",
    batch_size: int = 512,
    redo: bool = False,
    log: Any = print,
) -> pd.DataFrame:
    """Run every data-side step of ``steps`` (with ``detectors`` beside the first) on each undefended run of
    ``results_dir``; write ``detectors.csv`` and return it. A finished defend output is reused unless ``redo``.
    """
    from otcbench.defenses.defend import REPORT, run_defend

    results_dir = Path(results_dir)
    runs = _undefended_runs(results_dir)
    if not runs:
        raise UserError(f"{results_dir} has no finished undefended run (defense none) on poisoned data; run "
                        "the recipe first (`otcbench run RECIPE --out DIR`)")
    names = {n for n, _ in detectors}
    rows: list[dict[str, Any]] = []
    for run_dir, info, data in runs:
        for i, (step, shown) in enumerate(steps):
            out = results_dir / DETECT_DIR / f"{run_dir.name}-{step}"
            report_file = out / REPORT
            if report_file.is_file() and not redo:
                report = json.loads(report_file.read_text())
            else:
                if out.exists():
                    import shutil

                    shutil.rmtree(out)
                log(f"defend {info.get('attack')} seed {info.get('seed')} with {step} → {out}")
                report = run_defend(data, out, defense=step, checkpoint=run_dir, batch_size=batch_size,
                                    device=device, show_progress=False, detectors=detectors if i == 0 else (),
                                    command=f"otcbench detect {results_dir}")
            keep = (set(shown) if shown else set(report.get("scores", []))) | (names if i == 0 else set())
            for r in report.get("detect_by_attack", []):
                if r["score"] not in keep:
                    continue
                rows.append({"run_id": run_dir.name, "attack_group": info.get("attack", ""),
                             "seed": info.get("seed"), "attack": r["attack"],
                             "score": _score_label(step, r["score"], names), "n_poison": r["n_poison"],
                             "n_clean": r["n_clean"], "auroc": r["auroc"], "precision_at_n": r["precision_at_n"]})
    df = pd.DataFrame(rows, columns=COLUMNS)
    from otcbench.train.checkpoint import atomic_write_text

    atomic_write_text(results_dir / DETECTOR_CSV, df.to_csv(index=False))
    return df


def _column(row: pd.Series) -> str:
    """The table column of a row: the attack, prefixed by its recipe entry when that holds several attacks."""
    group, attack = str(row["attack_group"]), str(row["attack"])
    return attack if group == attack else f"{group}: {attack}"


def _cell(values: pd.Series) -> str:
    v = values.dropna()
    if v.empty:
        return "–"
    std = f" ± {100 * v.std():.1f}" if len(v) > 1 else ""
    return f"{100 * v.mean():.1f}{std}"


def detector_markdown(df: pd.DataFrame) -> str:
    """Markdown: AUROC and precision@poison-count (%), one row per score, one column per attack."""
    if df.empty:
        return ""
    df = df.assign(column=df.apply(_column, axis=1))
    columns = list(dict.fromkeys(df["column"]))
    scores = list(dict.fromkeys(df["score"]))
    n_seeds = df.groupby("column")["seed"].nunique()
    lines = []
    for metric, title in (("auroc", "AUROC (%) ↑, clean vs poisoned rows; 50 = chance"),
                          ("precision_at_n", "precision@poison-count (%) ↑: poisoned share of the n lowest-"
                                             "scored rows, n = the attack's rows")):
        lines += [f"### detectors — {title}", "", "| score | " + " | ".join(columns) + " |",
                  "|---|" + "---:|" * len(columns)]
        for s in scores:
            cells = [_cell(df.loc[(df["score"] == s) & (df["column"] == c), metric]) for c in columns]
            lines.append(f"| {s} | " + " | ".join(cells) + " |")
        lines.append("")
    chance = df.drop_duplicates(["run_id", "column"]).assign(p=lambda d: d["n_poison"] / (d["n_poison"] + d["n_clean"]))
    lines.append("Seeds per column: " + ", ".join(f"{c} {int(n_seeds[c])}" for c in columns) + ". Chance "
                 "precision (the attack's share of the rows judged): "
                 + ", ".join(f"{c} {100 * chance.loc[chance['column'] == c, 'p'].mean():.1f}" for c in columns)
                 + ". Scores: `otcclip:ot` / `otcclip:global` OTCCLIP's own-pair OT and global scores, "
                 "`safeclip:p_clean` SafeCLIP's GMM posterior, `knn` / `dao` the embedding detectors "
                 "(docs/defenses.md), all from the undefended model of each run.")
    return "\n".join(lines) + "\n"


def plot_detectors(df: pd.DataFrame, path: Path) -> bool:
    """Grouped bars: AUROC and precision@n per attack (groups) and score (bars); False when empty."""
    if df.empty:
        return False
    from otcbench.bench.plots import _colours, _plt

    plt = _plt()
    df = df.assign(column=df.apply(_column, axis=1))
    columns = list(dict.fromkeys(df["column"]))
    scores = list(dict.fromkeys(df["score"]))
    colours = _colours(scores)
    # an attack label shared by every group ("a+b: a", "a+b: b", "a+b: all") goes into the title once
    head = columns[0].split(": ")[0] + ": "
    prefix = head if all(c.startswith(head) for c in columns) else ""
    ticks = [c[len(prefix):] for c in columns]
    long_ticks = max(map(len, ticks)) > 12
    fig, axes = plt.subplots(2, 1, figsize=(max(6.5, 1.3 * len(columns) * max(1, len(scores)) / 3), 8.0))
    width = 0.8 / max(1, len(scores))
    for ax, metric, label in zip(axes, ("auroc", "precision_at_n"), ("AUROC", "precision@poison-count"),
                                 strict=True):
        for j, s in enumerate(scores):
            means, lo, hi = [], [], []
            for c in columns:
                v = df.loc[(df["score"] == s) & (df["column"] == c), metric].dropna()
                m = float(v.mean()) if not v.empty else math.nan
                means.append(m)
                lo.append(m - float(v.min()) if not v.empty else 0.0)
                hi.append(float(v.max()) - m if not v.empty else 0.0)
            xs = [i + (j - (len(scores) - 1) / 2) * width for i in range(len(columns))]
            ax.bar(xs, means, width, yerr=[lo, hi], color=colours[s], label=s, capsize=2)
        if metric == "auroc":
            ax.axhline(0.5, color="grey", linestyle="--", linewidth=1, label="chance (AUROC 0.5)")
        ax.set_xticks(range(len(columns)))
        ax.set_xticklabels(ticks, rotation=15 if long_ticks else 0, ha="right" if long_ticks else "center",
                           fontsize=8)
        ax.set_ylim(0, 1.02)
        ax.set_ylabel(label)
        ax.grid(axis="y", alpha=0.3)
    # the legend sits above both panels, outside the axes: bars reach 1.0 and a legend inside covers them
    handles, names = axes[0].get_legend_handles_labels()
    fig.legend(handles, names, loc="upper center", bbox_to_anchor=(0.5, 0.935), fontsize=8,
               ncol=min(3, len(names)), frameon=False)
    fig.suptitle(f"{prefix}poisoned-pair detection by the undefended model's scores\n"
                 "(mean over seeds, error bars min–max)", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.89))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write_detector_report(results_dir: str | Path, *, plots: bool = True) -> str:
    """Re-render ``detectors.md`` (and ``plots/detectors.png``) from ``detectors.csv``; "" when there is none."""
    from otcbench.train.checkpoint import atomic_write_text

    results_dir = Path(results_dir)
    csv = results_dir / DETECTOR_CSV
    if not csv.is_file():
        return ""
    df = pd.read_csv(csv)
    md = detector_markdown(df)
    if md:
        atomic_write_text(results_dir / DETECTOR_MD, md)
    if plots:
        plot_detectors(df, results_dir / "plots" / "detectors.png")
    return md
