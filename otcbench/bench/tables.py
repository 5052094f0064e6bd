"""The tables of a recipe's results, from its ``summary.csv``: markdown, LaTeX, the at-a-glance overview,
match precision.

One row per (attack, defense) in recipe order, one column per metric, mean ± sample std over the seeds that
finished, in percent. Within each attack, the best cell of a column (lowest for attack success rates ↓,
highest for accuracies and detection scores ↑) is bold only when it beats the runner-up beyond the seed
spread (:mod:`otcbench.bench.ranking`, one rule for every table here); the footer says why a column has no
bold cell. The overview holds the same results at a glance: one row per attack and ASR metric, one column per
defense.
"""

from __future__ import annotations

import math
from typing import Any

import pandas as pd

from otcbench.attacks.kinds import overview_metrics
from otcbench.bench.ranking import (
    ALPHA,
    RULE,
    ColumnRanking,
    collapsed_rows,
    no_bold_lines,
    paired_p,
    rank_table,
)
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
    """One row per (attack, defense) in first-appearance order: n done / n planned, mean, std, count and the
    per-seed values (a tuple, what the bold rule tests) per metric."""
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
            row[f"{m}_values"] = tuple(vals)
        out.append(row)
    return pd.DataFrame(out)


def is_fraction(df: pd.DataFrame, metric: str) -> bool:
    """Whether ``metric`` is a fraction, shown in percent (every known metric; else all values in [0, 1])."""
    if metric in metric_names():
        return True
    vals = df[metric].dropna()
    return bool(len(vals)) and bool(((vals >= 0) & (vals <= 1)).all())


def fmt_cell(mean: float, std: float, pct: bool, pm: str) -> str:
    """``mean pm std`` (× 100 when ``pct``), "–" without a mean and no std with one seed."""
    if math.isnan(mean):
        return "–"
    scale = 100.0 if pct else 1.0
    if pct:
        text = f"{mean * scale:.1f}"
        return text + (f" {pm} {std * scale:.1f}" if not math.isnan(std) else "")
    text = f"{mean:.4g}"
    return text + (f" {pm} {std:.2g}" if not math.isnan(std) else "")


def _cells(df: pd.DataFrame, pm: str, bold: tuple[str, str]) -> tuple[list[str], list[list[str]], list[str]]:
    """Header, body rows and the footer lines saying why a column has no bold cell, shared by the markdown
    and LaTeX tables."""
    agg = aggregate(df)
    metrics = table_metrics(df)
    header = ["attack", "defense", "seeds"]
    for m in metrics:
        name = metric_names().get(m, m)
        unit = " (%)" if is_fraction(df, m) else ""
        header.append(f"{name}{unit} {'↓' if lower_is_better(m) else '↑'}")
    body = []
    collapsed = collapsed_rows(agg, df)
    rankings = rank_table(agg, df, metrics)
    for i, r in agg.iterrows():
        seeds = f"{r['n_done']}/{r['n_runs']}" + (f" ({r['n_failed']} failed)" if r["n_failed"] else "")
        cells = [str(r["attack"]), str(r["defense"]) + (" †" if i in collapsed else ""), seeds]
        for m in metrics:
            text = fmt_cell(r[f"{m}_mean"], r[f"{m}_std"], is_fraction(df, m), pm)
            if i in rankings[m].bold:
                text = f"{bold[0]}{text}{bold[1]}"
            cells.append(text)
        body.append(cells)
    return header, body, no_bold_lines(rankings)


NOTE = ("mean ± sample std over seeds, in %; seeds = finished/planned runs; ↓ lower is better, ↑ higher is "
        "better; † zero-shot below twice chance: a collapsed model, not ranked")


def markdown_table(df: pd.DataFrame, title: str = "") -> str:
    """The attack × defense table in GitHub markdown (defense rows by their variant label, each variant's
    changed options listed under the table)."""
    df = shown_labels(df)
    header, body, no_bold = _cells(df, "±", ("**", "**"))
    lines = [f"### {title}", ""] if title else []
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "|".join(["---", "---", "---:"] + ["---:"] * (len(header) - 3)) + "|")
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in body]
    lines += ["", NOTE + ".", "", RULE[0].upper() + RULE[1:] + ".", *(f"- {line}" for line in no_bold)]
    notes = variant_notes(df)
    if notes:
        lines += ["", "Options that differ from each defense's defaults:", *notes]
    failed = df[df["status"] == "failed"]
    if len(failed):
        lines.append("")  # its own list, apart from the footer's and the variants'
    for _, r in failed.iterrows():
        lines.append(f"- failed: {r['attack']} × {r['defense']} (seed {r['seed']}, run {r['run_id']}): {r['error']}")
    return "\n".join(lines) + "\n"


def _overview_cell(r: pd.Series, metric: str, bold: bool, collapsed: bool) -> str:
    text = fmt_cell(r[f"{metric}_mean"], r[f"{metric}_std"], True, "±")
    if bold:
        text = f"**{text}**"
    if collapsed:
        text += " †"
    if r["n_done"] < r["n_runs"] and not math.isnan(r[f"{metric}_mean"]):
        text += f" ({r['n_done']}/{r['n_runs']})"
    return text


def overview_table(df: pd.DataFrame, title: str = "") -> str:
    """Attack × defense at a glance (markdown): each attack's ASR (targeted and/or backdoor) per defense,
    the clean row's zero-shot top-1, and a last row with each defense's zero-shot top-1 averaged over all
    its finished runs.

    The full table says everything; this one is the picture a reader looks for first. A cell with fewer
    finished than planned seeds carries ``(finished/planned)``; bold follows the full table's rule
    (:mod:`otcbench.bench.ranking`: a row's best cell, when it beats the runner-up beyond the seed spread;
    a collapsed model, †, is never ranked), and the footer says why a row has no bold cell.
    """
    df = shown_labels(df)
    agg = aggregate(df)
    if agg.empty:
        return ""
    metrics = table_metrics(df)
    collapsed = collapsed_rows(agg, df)
    rankings: dict[str, ColumnRanking] = rank_table(agg, df, metrics)
    defenses = list(dict.fromkeys(agg["defense"]))
    lines = [f"### {title}: at a glance" if title else "### at a glance", ""]
    lines.append("| attack | metric | " + " | ".join(defenses) + " |")
    lines.append("|---|---|" + "---:|" * len(defenses))
    no_bold: dict[str, list[str]] = {}
    for attack, g in agg.groupby("attack", sort=False):
        # the ASR metrics the overview shows, one row each: each attack kind's first (for the attacks that have it)
        shown = [m for m in overview_metrics() if m in metrics and g[f"{m}_mean"].notna().any()]
        if not shown and "zeroshot_top1" in metrics:
            shown = ["zeroshot_top1"]
        for metric in shown:
            ranking = rankings[metric]
            cells = {r["defense"]: _overview_cell(r, metric, i in ranking.bold, i in collapsed)
                     for i, r in g.iterrows()}
            name = metric_names().get(metric, metric) + (" ↓" if lower_is_better(metric) else " ↑")
            lines.append(f"| {str(attack).replace('|', chr(92) + '|')} | {name} | "
                         + " | ".join(cells.get(d, "") for d in defenses) + " |")
            reason = ranking.reason([str(attack)])
            if reason:
                no_bold.setdefault(reason, []).append(f"{attack} {metric_names().get(metric, metric)}")
    if "zeroshot_top1" in metrics:
        done = df[df["status"] == "done"]
        means = []
        for d in defenses:
            vals = done.loc[done["defense"] == d, "zeroshot_top1"].dropna().astype(float)
            means.append(f"{vals.mean() * 100:.1f} (n={len(vals)})" if len(vals) else "–")
        lines.append("| *all attacks* | zero-shot top-1 ↑ | " + " | ".join(means) + " |")
    lines += ["", "In %: mean ± sample std over seeds; (finished/planned) marks a partial cell; the last row "
              "averages every finished run of the defense (n runs), unranked.", "",
              RULE[0].upper() + RULE[1:] + ".",
              *(f"- nothing bold in {', '.join(rows)}: {reason}" for reason, rows in no_bold.items())]
    return "\n".join(lines) + "\n"


_TEX_ESCAPE = {"&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_", "{": r"\{", "}": r"\}",
               "~": r"\textasciitilde{}", "^": r"\textasciicircum{}", "\\": r"\textbackslash{}"}


def _tex(text: str) -> str:
    out = "".join(_TEX_ESCAPE.get(ch, ch) for ch in text)
    return out.replace("↓", r"$\downarrow$").replace("↑", r"$\uparrow$").replace("×", r"$\times$")


def latex_table(df: pd.DataFrame, title: str = "") -> str:
    """The same table as a booktabs ``tabular`` (``\\usepackage{booktabs}``)."""
    header, body, no_bold = _cells(shown_labels(df), "\x00", ("\x01", "\x02"))
    def cell(c: str) -> str:
        return _tex(c).replace("\x00", r"$\pm$").replace("\x01", r"\textbf{").replace("\x02", "}")
    lines = [f"% {title}" if title else "% otcbench results", f"% {NOTE}", f"% {RULE}",
             *(f"% {line}" for line in no_bold),
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


def _pct_cell(values: pd.Series) -> str:
    """Mean ± sample std over seeds of fractions, in %; "–" without a value, no std with one."""
    v = values.dropna()
    std = float(v.std()) if len(v) > 1 else math.nan
    return "–" if v.empty else fmt_cell(float(v.mean()), std, True, "±")


def ot_vs_global(curves: pd.DataFrame) -> pd.DataFrame:
    """Per attack, defense and seed: the mean over the run's matchings of the OT score's and the global score's
    picks (``exact_ot``, ``exact_global``: match precision; ``binding_ot``, ``binding_global``: binding overlap;
    fractions), for the runs that log both picks."""
    both = curves[curves["score"].isin(("ot", "global"))]
    rows = []
    for (attack, defense, seed), g in both.groupby(["attack", "defense", "seed"], sort=False):
        by = {sc: g[g["score"] == sc] for sc in ("ot", "global")}
        epochs = sorted(set(by["ot"]["epoch"]) & set(by["global"]["epoch"]))  # the matchings with both picks
        if not epochs:
            continue
        row: dict[str, Any] = {"attack": attack, "defense": defense, "seed": seed, "matchings": len(epochs)}
        for sc, v in by.items():
            v = v[v["epoch"].isin(epochs)]
            row[f"exact_{sc}"] = float(v["precision"].mean())
            row[f"binding_{sc}"] = float(v["overlap"].mean()) if v["overlap"].notna().any() else math.nan
        rows.append(row)
    return pd.DataFrame(rows)


def _verdict(diffs: list[float]) -> str:
    if len(diffs) < 2:
        return "one seed"
    if paired_p(diffs, "greater") < ALPHA:
        return "**OT ahead**"
    if paired_p(diffs, "less") < ALPHA:
        return "**global ahead**"
    return "within the seed spread"


def _diffs_and_verdict(diffs: list[float]) -> str:
    """The last two cells of an OT-against-global row: the per-seed differences in points, then the verdict."""
    return " / ".join(f"{d:+.1f}" for d in diffs) + f" | {_verdict(diffs)} |"


def ot_vs_global_table(curves: pd.DataFrame) -> str:
    """Markdown: the OT score's pick against the global score's over every matching of a run, seed by seed —
    the answer to "does OT re-pair better than global?" in one row per attack and defense."""
    per_seed = ot_vs_global(curves)
    if per_seed.empty:
        return ""
    has_binding = per_seed["binding_ot"].notna().any()
    measure = "binding" if has_binding else "exact"
    lines = ["### OT score against global score: their picks over every matching (%)", "",
             "| attack | defense | seeds | matchings | exact: OT | exact: global | binding: OT | binding: global "
             f"| {measure}, OT − global, per seed | verdict |", "|---|---|---:|---:|---:|---:|---:|---:|---|---|"]
    for (attack, defense), g in per_seed.groupby(["attack", "defense"], sort=False):
        diffs = [100 * float(d) for d in (g[f"{measure}_ot"] - g[f"{measure}_global"]) if not math.isnan(d)]
        cells = [_pct_cell(g[col]) for col in ("exact_ot", "exact_global", "binding_ot", "binding_global")]
        lines.append(f"| {attack} | {defense} | {len(g)} | {g['matchings'].mean():.0f} | " + " | ".join(cells)
                     + " | " + _diffs_and_verdict(diffs))
    lines += ["", "Each seed's value is the mean over the run's matchings of what each score alone picked at the "
              "same matching (the tables below, epoch by epoch); mean ± sample std over seeds. Verdict: the "
              f"per-seed differences tested against 0 (paired t-test over seeds, one-sided, p < {ALPHA:g}); "
              "'within the seed spread' when neither score is ahead beyond it."]
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
        return _pct_cell(g.loc[g["score"] == score, col])

    groups = list(curves.groupby(["attack", "defense", "epoch"], sort=False))
    summary = ot_vs_global_table(curves)
    lines = [summary.rstrip("\n"), ""] if summary else []
    lines += ["### match precision: re-assigned captions that describe the image (%)", "",
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


def offline_picks_table(picks: pd.DataFrame) -> str:
    """Markdown: the offline picks of ``benchmarks/match_scores.py --csv`` (``match_scores.csv``: one row per
    finished model and (alpha, top_k), each pick's ``exact_*`` and ``binding_*`` in %) as one row per attack,
    defense and setting: mean ± std over seeds and the paired OT − global verdict, as for the matchings in
    training. "" without rows."""
    if picks.empty:
        return ""
    lines = ["### OT score against global score, offline: each finished model re-pairs the clean world (%)", "",
             "| attack | defense | α, top_k | seeds | exact: OT | exact: global | exact: random | binding: OT "
             "| binding: global | binding: random | binding, OT − global, per seed | verdict |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|---|"]
    keys = ["attack", "defense", "alpha", "top_k"]
    for (attack, defense, alpha, top_k), g in picks.fillna({"attack": "", "defense": ""}).groupby(keys, sort=False):
        g = g.sort_values("seed")
        diffs = [float(d) for d in (g["binding_ot"] - g["binding_global"])]
        cells = [_pct_cell(g[f"{stat}_{key}"] / 100) for stat in ("exact", "binding")
                 for key in ("ot", "global", "random")]
        lines.append(f"| {attack} | {defense} | {alpha:g}, {top_k} | {len(g)} | " + " | ".join(cells) + " | "
                     + _diffs_and_verdict(diffs))
    lines += ["", "`benchmarks/match_scores.py`: OTCCLIP's data-side step with each run's final model on the clean "
              "world (own caption excluded); α weighs the global cosine against 1 − the OT distance, top_k is "
              "the number of global-cosine candidates. Mean ± sample std over seeds; verdict: the per-seed "
              f"differences of binding overlap tested against 0 (paired t-test, one-sided, p < {ALPHA:g})."]
    return "\n".join(lines) + "\n"
