"""Plots of a recipe's results (PNG, matplotlib's Agg backend, no display needed).

* ``plots/asr_vs_accuracy.png`` — robustness against accuracy: one panel per attack-success metric,
  clean zero-shot top-1 (x) against ASR (y), mean ± std over seeds, one colour per defense, one marker
  per attack; the dashed line is the clean reference (attack ``clean``, defense ``none``) when present.
* ``plots/asr_vs_<option>.png`` — where an attack entry sweeps one numeric option (``badnet.rate``):
  ASR against the swept value, one line per defense.
* ``plots/curves.png`` — training loss against step from each run's ``log.jsonl``, one panel per
  attack, one colour per defense (one line per seed).
* ``plots/match_precision.png`` — at every matching of OTCCLIP and RoCLIP: the share of re-assigned captions
  that describe the image, for the assignment trained on and for the OT and global scores' own picks
  (:func:`otcbench.bench.logs.match_curves`).
* ``plots/detection.png`` — where a defense logs it (OTCCLIP's pair filter, SafeCLIP's risky set): the share
  of poisoned pairs kept out of the contrastive loss against epoch, one panel per attack, one colour per
  defense, mean over seeds with the min–max band (:func:`otcbench.bench.logs.detection_curves`).

Every legend names a defense by the label the tables show: its variant label where the run's options differ
from the defense's defaults (:func:`otcbench.bench.summary.shown_labels`).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pandas as pd

from otcbench.attacks.kinds import kind_labels  # the attack-success metrics: one panel each
from otcbench.bench.logs import detection_curves, loss_curve, match_curves, run_log

#: Distinct filled matplotlib markers; synthetic-full alone has 13 attacks.
MARKERS = "osD^v<>pXh*PdH8"


def attack_markers(attacks: list[str]) -> dict[str, str]:
    """One marker per attack; past ``len(MARKERS)`` attacks markers repeat (the legend still names each)."""
    return {a: MARKERS[i % len(MARKERS)] for i, a in enumerate(attacks)}


def _plt():
    import matplotlib

    matplotlib.use("Agg")  # files only; never a display
    import matplotlib.pyplot as plt

    return plt


def _colours(labels: list[str]) -> dict[str, tuple]:
    plt = _plt()
    cmap = plt.get_cmap("tab10")
    return {lab: cmap(i % 10) for i, lab in enumerate(labels)}


def _ordered(values: pd.Series) -> list[str]:
    return list(dict.fromkeys(values.tolist()))


def _grid(n: int, plt, width: float = 4.6, height: float = 3.8):
    cols = min(3, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols, height * rows), squeeze=False)
    flat = list(axes.flat)
    for ax in flat[n:]:
        ax.set_visible(False)
    return fig, flat[:n]


def plot_asr_vs_accuracy(df: pd.DataFrame, path: Path) -> bool:
    """Robustness–accuracy picture; False (nothing written) when no run measured an ASR."""
    done = df[df["status"] == "done"]
    metrics = [m for m in kind_labels() if m in done and done[m].notna().any()]
    if not metrics or "zeroshot_top1" not in done:
        return False
    plt = _plt()
    colours = _colours(_ordered(df["defense"]))
    attacks = _ordered(df["attack"])
    markers = attack_markers(attacks)
    clean = done[(done["attack"] == "clean") & (done["defense_name"] == "none")] if "defense_name" in done else None
    fig, axes = _grid(len(metrics), plt)
    for ax, m in zip(axes, metrics, strict=True):
        sub = done[done[m].notna()]
        for (attack, defense), g in sub.groupby(["attack", "defense"], sort=False):
            x, y = g["zeroshot_top1"].astype(float) * 100, g[m].astype(float) * 100
            ax.errorbar(x.mean(), y.mean(), xerr=x.std(ddof=1) if len(g) > 1 else None,
                        yerr=y.std(ddof=1) if len(g) > 1 else None, fmt=markers[attack], color=colours[defense],
                        markersize=7, capsize=3)
        if clean is not None and len(clean) and clean["zeroshot_top1"].notna().any():
            ax.axvline(clean["zeroshot_top1"].astype(float).mean() * 100, ls="--", color="grey", lw=1)
        ax.set_xlabel("clean zero-shot top-1 (%) →")
        ax.set_ylabel(f"{m} (%) ↓")
        ax.set_ylim(-3, 103)
        ax.grid(alpha=0.3)
        ax.set_title(m.replace("_", " "))
    # two legends in one: colour = defense, marker = attack (every combination would not fit)
    from matplotlib.lines import Line2D

    shown = set(done[done[metrics].notna().any(axis=1)]["attack"])
    handles = [Line2D([], [], color=colours[d], marker="s", ls="", label=d) for d in colours]
    handles += [Line2D([], [], color="grey", marker=markers[a], ls="", label=a) for a in attacks if a in shown]
    if clean is not None and len(clean):
        handles.append(Line2D([], [], color="grey", ls="--", label="clean reference"))
    fig.tight_layout()
    fig.legend(handles=handles, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8, frameon=False)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return True


def plot_asr_vs_sweep(df: pd.DataFrame, out_dir: Path) -> list[Path]:
    """ASR against each swept numeric attack option (e.g. the poison rate); returns the files written."""
    if "sweep" not in df:
        return []
    done = df[(df["status"] == "done") & (df["sweep"] != "") & ~df["sweep"].str.contains(";")]
    written = []
    for key in _ordered(done["sweep"]):
        sub = done[done["sweep"] == key].copy()
        sub["sweep_value"] = pd.to_numeric(sub["sweep_value"], errors="coerce")
        sub = sub[sub["sweep_value"].notna()]
        metrics = [m for m in kind_labels() if m in sub and sub[m].notna().any()]
        if sub.empty or not metrics:
            continue
        plt = _plt()
        colours = _colours(_ordered(df["defense"]))
        fig, axes = _grid(len(metrics), plt)
        for ax, m in zip(axes, metrics, strict=True):
            for (group, defense), g in sub.groupby(["attack_group", "defense"], sort=False):
                stats = g.groupby("sweep_value")[m].agg(["mean", "std"]).sort_index()
                ax.errorbar(stats.index, stats["mean"] * 100, yerr=stats["std"].fillna(0) * 100, marker="o",
                            color=colours[defense], capsize=3, label=f"{defense} / {group}")
            values = sorted(sub["sweep_value"].unique())
            if len(values) > 2 and values[0] > 0 and values[-1] / values[0] >= 8:
                ax.set_xscale("log")
            ax.set_xlabel(key)
            ax.set_ylabel(f"{m} (%) ↓")
            ax.set_ylim(-3, 103)
            ax.grid(alpha=0.3)
            ax.set_title(f"{m.replace('_', ' ')} vs {key.split('.')[-1]}")
        axes[0].legend(fontsize=8)
        fig.tight_layout()
        leaf = key.split(".")[-1]
        path = out_dir / f"asr_vs_{leaf}.png"
        if path in written:
            path = out_dir / f"asr_vs_{key.replace('.', '_')}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def _label_panel(ax, title: str, xlabel: str, ylabel: str) -> None:
    """Title, axis labels, grid and legend of one per-attack panel (curves, detection)."""
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


def _save_panels(fig, path: Path, plt) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_curves(df: pd.DataFrame, results_dir: Path, path: Path) -> bool:
    """Training loss curves from the runs' log.jsonl; False when no log exists."""
    logs = {}
    for _, r in df.iterrows():
        f = run_log(results_dir, r["run_id"])
        if f.is_file():
            curve = loss_curve(f)
            if len(curve):
                logs[r["run_id"]] = curve
    if not logs:
        return False
    plt = _plt()
    colours = _colours(_ordered(df["defense"]))
    attacks = [a for a in _ordered(df["attack"]) if df[(df["attack"] == a) & df["run_id"].isin(logs)].size]
    fig, axes = _grid(len(attacks), plt, height=3.4)
    for ax, attack in zip(axes, attacks, strict=True):
        labelled = set()
        for _, r in df[(df["attack"] == attack) & df["run_id"].isin(logs)].iterrows():
            c = logs[r["run_id"]]
            label = None if r["defense"] in labelled else r["defense"]
            labelled.add(r["defense"])
            ax.plot(c["step"], c["loss"], color=colours[r["defense"]], lw=1, alpha=0.85, label=label)
        _label_panel(ax, attack, "step", "training loss")
    _save_panels(fig, path, plt)
    return True


def _epoch_line(ax, g: pd.DataFrame, column: str, colour: Any, label: str, ls: str = "-",
                band_alpha: float | None = None) -> None:
    """One curve of a per-epoch share (in %): the mean over seeds, with the min–max band when several seeds
    ran and ``band_alpha`` is given; the label counts the seeds."""
    stats = g.groupby("epoch")[column].agg(["mean", "min", "max"])
    seeds = g["seed"].nunique()
    ax.plot(stats.index, 100 * stats["mean"], marker="o", ms=3, color=colour, ls=ls, label=f"{label} (n={seeds})")
    if seeds > 1 and band_alpha is not None:
        ax.fill_between(stats.index, 100 * stats["min"], 100 * stats["max"], color=colour, alpha=band_alpha, lw=0)


def plot_detection(curves: pd.DataFrame, path: Path) -> bool:
    """Share of poisoned pairs kept out of training against epoch (``detection_curves``); False when empty."""
    if curves.empty:
        return False
    plt = _plt()
    colours = _colours(_ordered(curves["defense"]))
    attacks = _ordered(curves["attack"])
    fig, axes = _grid(len(attacks), plt, height=3.4)
    for ax, attack in zip(axes, attacks, strict=True):
        for defense, g in curves[curves["attack"] == attack].groupby("defense", sort=False):
            _epoch_line(ax, g, "caught", colours[defense], str(defense), band_alpha=0.2)
        ax.set_ylim(-3, 103)
        _label_panel(ax, attack, "epoch", "poisoned pairs kept out (%)")
    _save_panels(fig, path, plt)
    return True


#: line style of each score in the match precision plot: what was trained on, and the two scores' own picks
_SCORE_STYLE = {"used": "-", "ot": "--", "global": ":", "random": "-."}


def plot_match_precision(curves: pd.DataFrame, path: Path, value: str = "precision") -> bool:
    """Match precision (or ``value="overlap"``: binding overlap) against epoch (``match_curves``): per attack,
    each defense's assignment (solid), the choices of the OT score (dashed) and the global cosine (dotted) at
    the same matchings and a random caption (dash-dot, the chance level); False when there is nothing to draw."""
    if value not in curves or curves.empty:
        return False
    curves = curves[curves[value].notna()]
    if curves.empty:
        return False
    plt = _plt()
    colours = _colours(_ordered(curves["defense"]))
    attacks = _ordered(curves["attack"])
    fig, axes = _grid(len(attacks), plt, height=3.4)
    for ax, attack in zip(axes, attacks, strict=True):
        sub = curves[curves["attack"] == attack]
        for (defense, score), g in sub.groupby(["defense", "score"], sort=False):
            _epoch_line(ax, g, value, colours[defense], f"{defense}: {score}",
                        ls=_SCORE_STYLE.get(str(score), "-"), band_alpha=0.15 if score == "used" else None)
        ax.set_ylim(-3, 103)
        _label_panel(ax, attack, "epoch", "re-assigned captions that describe the image (%)" if value == "precision"
                     else "binding overlap of image and caption (%)")
    _save_panels(fig, path, plt)
    return True


def write_plots(df: pd.DataFrame, results_dir: str | Path) -> list[Path]:
    """Write every plot the results allow into ``results_dir/plots``; returns the files written.

    Defenses are named by their variant labels (``safeclip (no warm-up, …)``), as in the tables.
    """
    from otcbench.bench.summary import shown_labels

    df = shown_labels(df)
    out = Path(results_dir) / "plots"
    out.mkdir(parents=True, exist_ok=True)
    written = []
    if plot_asr_vs_accuracy(df, out / "asr_vs_accuracy.png"):
        written.append(out / "asr_vs_accuracy.png")
    written += plot_asr_vs_sweep(df, out)
    if plot_curves(df, Path(results_dir), out / "curves.png"):
        written.append(out / "curves.png")
    if plot_detection(detection_curves(df, results_dir), out / "detection.png"):
        written.append(out / "detection.png")
    curves = match_curves(df, results_dir)
    if plot_match_precision(curves, out / "match_precision.png"):
        written.append(out / "match_precision.png")
    if plot_match_precision(curves, out / "match_overlap.png", value="overlap"):
        written.append(out / "match_overlap.png")
    return written
