"""The tables of a recipe's results, from its ``summary.csv``: markdown, LaTeX, the at-a-glance overview,
match precision.

One row per (attack, defense) in recipe order, one column per metric, mean ± sample std over the seeds that
finished, in percent. Within each attack, the best value of each column is bold — lowest for attack success
rates (↓), highest for accuracies and detection scores (↑). The overview holds the same results at a glance:
one row per attack and ASR metric, one column per defense.
"""

from __future__ import annotations

import math
from collections.abc import Set as AbstractSet
from typing import Any

import pandas as pd

from otcbench.attacks.kinds import overview_metrics
from otcbench.bench.summary import (
    HEAD,
    META,
    NOT_RESULTS,
    _column_order,
    lower_is_better,
    metric_names,
    shown_labels,
    variant_notes,
)


def table_metrics(df: pd.DataFrame) -> list[str]:
    """Result columns with at least one value among finished runs: known metrics first."""
    done = df[df["status"] == "done"]
    cols = []
    for c in _column_order(list(df.columns)):
        if c in HEAD or c in META or c in NOT_RESULTS or "." in c or c.endswith("_n"):
            continue
        if c not in done or not pd.api.types.is_numeric_dtype(done[c]) or done[c].isna().all():
            continue
        cols.append(c)
    return cols


def aggregate(df: pd.DataFrame) -> pd.DataFrame:
    """One row per (attack, defense) in first-appearance order: n done / n planned, mean and std per metric."""
    metrics = table_metrics(df)
    out = []
    for (attack, defense), g in df.groupby(["attack", "defense"], sort=False):
        done = g[g["status"] == "done"]
        row: dict[str, Any] = {"attack": attack, "defense": defense, "n_done": len(done), "n_runs": len(g),
                               "n_failed": int((g["status"] == "failed").sum())}
        for m in metrics:
            vals = done[m].dropna().astype(float)
            row[f"{m}_mean"] = float(vals.mean()) if len(vals) else math.nan
            row[f"{m}_std"] = float(vals.std(ddof=1)) if len(vals) > 1 else math.nan
            row[f"{m}_n"] = len(vals)
        out.append(row)
    return pd.DataFrame(out)


def _is_fraction(df: pd.DataFrame, metric: str) -> bool:
    if metric in metric_names():
        return True
    vals = df[metric].dropna()
    return bool(len(vals)) and bool(((vals >= 0) & (vals <= 1)).all())


def _fmt(mean: float, std: float, pct: bool, pm: str) -> str:
    if math.isnan(mean):
        return "–"
    scale = 100.0 if pct else 1.0
    if pct:
        text = f"{mean * scale:.1f}"
        return text + (f" {pm} {std * scale:.1f}" if not math.isnan(std) else "")
    text = f"{mean:.4g}"
    return text + (f" {pm} {std:.2g}" if not math.isnan(std) else "")


def collapsed_rows(agg: pd.DataFrame, df: pd.DataFrame) -> set[int]:
    """Rows whose mean clean zero-shot top-1 is below twice chance (1 / ``n_classes``).

    Such a model recognises no class, the target included, so its low attack success is not a defense:
    those rows are marked and never win a lower-is-better (ASR) column.
    """
    if "zeroshot_top1_mean" not in agg or "n_classes" not in df:
        return set()
    n_classes = pd.to_numeric(df["n_classes"], errors="coerce").dropna()
    if not len(n_classes):
        return set()
    floor = 2.0 / float(n_classes.max())
    return {int(i) for i, v in agg["zeroshot_top1_mean"].items() if not math.isnan(v) and v < floor}


def _best(agg: pd.DataFrame, metric: str, excluded: AbstractSet[int] = frozenset()) -> set[int]:
    """Row positions holding the best mean of ``metric`` within their attack (ties all win).

    Rows in ``excluded`` (collapsed models) do not compete for lower-is-better metrics.
    """
    best: set[int] = set()
    for _, g in agg.groupby("attack", sort=False):
        vals = g[f"{metric}_mean"].dropna()
        if lower_is_better(metric):
            vals = vals[[i not in excluded for i in vals.index]]
        if len(vals) < 2:
            continue
        target = vals.min() if lower_is_better(metric) else vals.max()
        best.update(int(i) for i in vals.index[vals == target])
    return best


def _cells(df: pd.DataFrame, pm: str, bold: tuple[str, str]) -> tuple[list[str], list[list[str]], list[str]]:
    """Header, body rows and metric keys shared by the markdown and LaTeX tables."""
    agg = aggregate(df)
    metrics = table_metrics(df)
    header = ["attack", "defense", "seeds"]
    for m in metrics:
        name = metric_names().get(m, m)
        unit = " (%)" if _is_fraction(df, m) else ""
        header.append(f"{name}{unit} {'↓' if lower_is_better(m) else '↑'}")
    body = []
    collapsed = collapsed_rows(agg, df)
    bests = {m: _best(agg, m, collapsed) for m in metrics}
    for i, r in agg.iterrows():
        seeds = f"{r['n_done']}/{r['n_runs']}" + (f" ({r['n_failed']} failed)" if r["n_failed"] else "")
        cells = [str(r["attack"]), str(r["defense"]) + (" †" if i in collapsed else ""), seeds]
        for m in metrics:
            text = _fmt(r[f"{m}_mean"], r[f"{m}_std"], _is_fraction(df, m), pm)
            if i in bests[m]:
                text = f"{bold[0]}{text}{bold[1]}"
            cells.append(text)
        body.append(cells)
    return header, body, metrics


NOTE = ("mean ± sample std over seeds, in %; seeds = finished/planned runs; best per attack in bold "
        "(↓ lower is better, ↑ higher is better); † zero-shot below twice chance: a collapsed model, its ASRs "
        "are not ranked")


def markdown_table(df: pd.DataFrame, title: str = "") -> str:
    """The attack × defense table in GitHub markdown (defense rows by their variant label, each variant's
    changed options listed under the table)."""
    df = shown_labels(df)
    header, body, _ = _cells(df, "±", ("**", "**"))
    lines = [f"### {title}", ""] if title else []
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "|".join(["---", "---", "---:"] + ["---:"] * (len(header) - 3)) + "|")
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in body]
    lines += ["", NOTE + "."]
    notes = variant_notes(df)
    if notes:
        lines += ["", "Options that differ from each defense's defaults:", *notes]
    failed = df[df["status"] == "failed"]
    for _, r in failed.iterrows():
        lines.append(f"- failed: {r['attack']} × {r['defense']} (seed {r['seed']}, run {r['run_id']}): {r['error']}")
    return "\n".join(lines) + "\n"


def overview_table(df: pd.DataFrame, title: str = "") -> str:
    """Attack × defense at a glance (markdown): each attack's ASR (targeted and/or backdoor) per defense,
    the clean row's zero-shot top-1, and a last row with each defense's zero-shot top-1 averaged over all
    its finished runs.

    The full table says everything; this one is the picture a reader looks for first. A cell with fewer
    finished than planned seeds carries ``(finished/planned)``; the best cell of a row is bold, and a
    collapsed model (†, see :func:`collapsed_rows`) never wins an ASR row.
    """
    df = shown_labels(df)
    agg = aggregate(df)
    if agg.empty:
        return ""
    metrics = set(table_metrics(df))
    collapsed = collapsed_rows(agg, df)
    defenses = list(dict.fromkeys(agg["defense"]))
    lines = [f"### {title}: at a glance" if title else "### at a glance", ""]
    lines.append("| attack | metric | " + " | ".join(defenses) + " |")
    lines.append("|---|---|" + "---:|" * len(defenses))
    for attack, g in agg.groupby("attack", sort=False):
        # the ASR metrics the overview shows, one row each: each attack kind's first (for the attacks that have it)
        shown = [m for m in overview_metrics() if m in metrics and g[f"{m}_mean"].notna().any()]
        if not shown and "zeroshot_top1" in metrics:
            shown = ["zeroshot_top1"]
        for metric in shown:
            best = _best(g, metric, collapsed)
            cells = {}
            for i, r in g.iterrows():
                text = _fmt(r[f"{metric}_mean"], r[f"{metric}_std"], True, "±")
                if i in best:
                    text = f"**{text}**"
                if i in collapsed:
                    text += " †"
                if r["n_done"] < r["n_runs"] and not math.isnan(r[f"{metric}_mean"]):
                    text += f" ({r['n_done']}/{r['n_runs']})"
                cells[r["defense"]] = text
            name = metric_names().get(metric, metric) + (" ↓" if lower_is_better(metric) else " ↑")
            lines.append(f"| {str(attack).replace('|', chr(92) + '|')} | {name} | "
                         + " | ".join(cells.get(d, "") for d in defenses) + " |")
    if "zeroshot_top1" in metrics:
        done = df[df["status"] == "done"]
        means = []
        for d in defenses:
            vals = done.loc[done["defense"] == d, "zeroshot_top1"].dropna().astype(float)
            means.append(f"{vals.mean() * 100:.1f} (n={len(vals)})" if len(vals) else "–")
        lines.append("| *all attacks* | zero-shot top-1 ↑ | " + " | ".join(means) + " |")
    lines += ["", "In %: mean ± sample std over seeds; (finished/planned) marks a partial cell; best per row in "
              "bold; the last row averages every finished run of the defense (n runs)."]
    return "\n".join(lines) + "\n"


_TEX_ESCAPE = {"&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_", "{": r"\{", "}": r"\}",
               "~": r"\textasciitilde{}", "^": r"\textasciicircum{}", "\\": r"\textbackslash{}"}


def _tex(text: str) -> str:
    out = "".join(_TEX_ESCAPE.get(ch, ch) for ch in text)
    return out.replace("↓", r"$\downarrow$").replace("↑", r"$\uparrow$").replace("×", r"$\times$")


def latex_table(df: pd.DataFrame, title: str = "") -> str:
    """The same table as a booktabs ``tabular`` (``\\usepackage{booktabs}``)."""
    header, body, _ = _cells(shown_labels(df), "\x00", ("\x01", "\x02"))
    def cell(c: str) -> str:
        return _tex(c).replace("\x00", r"$\pm$").replace("\x01", r"\textbf{").replace("\x02", "}")
    lines = [f"% {title}" if title else "% otcbench results", f"% {NOTE}",
             r"\begin{tabular}{ll" + "r" * (len(header) - 2) + "}", r"\toprule",
             " & ".join(cell(h) for h in header) + r" \\", r"\midrule"]
    prev = None
    for row in body:
        if prev is not None and row[0] != prev:
            lines.append(r"\midrule")
        lines.append(" & ".join(cell(c) for c in row) + r" \\")
        prev = row[0]
    lines += [r"\bottomrule", r"\end{tabular}"]
    return "\n".join(lines) + "\n"


def match_precision_table(curves: pd.DataFrame) -> str:
    """Markdown: match precision (%) per attack, defense and matching epoch, mean ± std over seeds, for the
    assignment trained on, the OT and global scores' own picks at the same matchings and a random caption
    ("–" when none); then, where the rows have content, the same for the binding and shape overlaps."""
    if curves.empty:
        return ""
    curves = curves.copy()
    for col in ("overlap", "shape_overlap"):  # a match_precision.csv from before the overlap columns
        if col not in curves:
            curves[col] = math.nan
    scores = ("used", "ot", "global", "random")

    def cell(g: pd.DataFrame, score: str, col: str) -> str:
        v = g.loc[g["score"] == score, col].dropna()
        std = float(v.std()) if len(v) > 1 else math.nan
        return "–" if v.empty else _fmt(float(v.mean()), std, True, "±")

    groups = list(curves.groupby(["attack", "defense", "epoch"], sort=False))
    lines = ["### match precision: re-assigned captions that describe the image (%)", "",
             "| attack | defense | epoch | trained on | OT score's pick | global score's pick | random caption "
             "| re-assigned (mean n) |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    for (attack, defense, epoch), g in groups:
        n = g.loc[g["score"] == "used", "n"]
        cells = [cell(g, sc, "precision") for sc in scores] + ["–" if n.empty else f"{n.mean():.0f}"]
        lines.append(f"| {attack} | {defense} | {int(epoch) + 1} | " + " | ".join(cells) + " |")
    lines += ["", "Epochs are 1-based; mean ± sample std over seeds. The OT and global picks are what each score "
              "alone chose at the same matching, before any cap; the random caption is the chance level "
              "(docs/otcclip.md, match precision)."]
    if curves["overlap"].notna().any():
        lines += ["", "### binding overlap: Jaccard of the image's and the caption row's colour–shape bindings "
                  "(shape overlap: shapes only) (%)", "",
                  "| attack | defense | epoch | trained on | OT score's pick | global score's pick | random caption "
                  "| shapes: trained on | shapes: OT | shapes: global | shapes: random |",
                  "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for (attack, defense, epoch), g in groups:
            if not g["overlap"].notna().any():
                continue
            cells = [cell(g, sc, col) for col in ("overlap", "shape_overlap") for sc in scores]
            lines.append(f"| {attack} | {defense} | {int(epoch) + 1} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
