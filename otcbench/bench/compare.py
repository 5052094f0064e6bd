"""``otcbench report DIR --compare REF``: every cell of a results table beside the same cell of a reference
results directory, and whether the two differ beyond the seed spread.

A cell is one (attack, defense, metric), matched by the labels the tables show (attack label, defense variant
label). Within the seed spread means: Welch's t-test over the two sets of per-seed values, two-sided, p ≥ 0.05,
when both sides have two seeds or more; with one seed on a side, the difference is at most twice the other
side's sample std (a single seed has no spread of its own); with one seed on both sides nothing decides it.
The quickstart's rows move by up to 20 points between CPU classes (docs/benchmarks.md), so a reference made
on another host is compared against its spread, never bit for bit.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pandas as pd

from otcbench.bench.layout import SUMMARY
from otcbench.bench.ranking import ALPHA, welch_p
from otcbench.bench.summary import (
    OTHER_CODE_MARK,
    fill_variants,
    lower_is_better,
    metric_names,
    read_summary,
    shown_labels,
)
from otcbench.bench.tables import aggregate, fmt_cell, is_fraction, table_metrics
from otcbench.errors import UserError

#: compare_results' columns: ``present`` is both, this or reference; means and stds in the metric's own units,
#: ``diff`` (this − reference) in points (percentage points for fractions); ``within`` True, False or None
#: (undecided); ``rule`` says which test decided it.
COLUMNS = ["attack", "defense", "metric", "present", "percent", "n", "mean", "std", "ref_n", "ref_mean", "ref_std",
           "diff", "p", "within", "rule"]

WELCH, TWO_STD_THIS, TWO_STD_REF, UNDECIDED = "welch", "2 std of this", "2 std of the reference", "one seed each"


def _load(path: str | Path, what: str) -> pd.DataFrame:
    p = Path(path)
    if not (p / SUMMARY).is_file():
        raise UserError(f"{what} {p} is not a results directory (no {SUMMARY}); pass a directory written by "
                        "`otcbench run`")
    return shown_labels(fill_variants(read_summary(p), p))


def _cells(df: pd.DataFrame) -> dict[tuple[str, str, str], tuple[tuple[float, ...], bool]]:
    """(attack, defense, metric) → (per-seed values, shown in percent) for every cell with a value."""
    agg = aggregate(df)
    metrics = {m: is_fraction(df, m) for m in table_metrics(df)}
    out = {}
    for _, r in agg.iterrows():  # the table's row order, each row's metrics in column order
        for m, pct in metrics.items():
            if r[f"{m}_n"]:
                # a row kept from other code shows "label ‡": it is still the same cell as the other side's label
                defense = str(r["defense"]).removesuffix(" " + OTHER_CODE_MARK)
                out[(str(r["attack"]), defense, m)] = (tuple(r[f"{m}_values"]), pct)
    return out


def _std(values: tuple[float, ...]) -> float:
    return float(pd.Series(values).std(ddof=1)) if len(values) > 1 else math.nan


def within_spread(this: tuple[float, ...], ref: tuple[float, ...]) -> tuple[bool | None, float, str]:
    """Whether two sets of per-seed values agree within the seed spread: (within, Welch's p or NaN, the rule)."""
    if len(this) > 1 and len(ref) > 1:
        p = welch_p(this, ref)
        return p >= ALPHA, p, WELCH
    diff = abs(sum(this) / len(this) - sum(ref) / len(ref)) - 1e-12  # equal means may differ by an ulp
    if len(this) > 1:
        return bool(diff <= 2 * _std(this)), math.nan, TWO_STD_THIS
    if len(ref) > 1:
        return bool(diff <= 2 * _std(ref)), math.nan, TWO_STD_REF
    return None, math.nan, UNDECIDED


def _row(key: tuple[str, str, str], this: Any, ref: Any) -> dict[str, Any]:
    attack, defense, metric = key
    row: dict[str, Any] = {"attack": attack, "defense": defense, "metric": metric,
                           "present": "both" if this and ref else "this" if this else "reference",
                           "percent": (this or ref)[1], "diff": math.nan, "p": math.nan, "within": None, "rule": ""}
    for prefix, side in (("", this), ("ref_", ref)):
        values = side[0] if side else ()
        row[f"{prefix}n"] = len(values)
        row[f"{prefix}mean"] = sum(values) / len(values) if values else math.nan
        row[f"{prefix}std"] = _std(values)
    if this and ref:
        row["diff"] = (row["mean"] - row["ref_mean"]) * (100.0 if row["percent"] else 1.0)
        row["within"], row["p"], row["rule"] = within_spread(this[0], ref[0])
    return row


def compare_results(results: str | Path, reference: str | Path) -> pd.DataFrame:
    """One row per (attack, defense, metric) cell of either results directory (:data:`COLUMNS`): this
    directory's cells in table order, then those only the reference has. Raises :class:`UserError` (one
    line) when either is not a results directory."""
    mine = _cells(_load(results, "results directory"))
    theirs = _cells(_load(reference, "--compare"))
    keys = list(mine) + [k for k in theirs if k not in mine]
    table = pd.DataFrame([_row(k, mine.get(k), theirs.get(k)) for k in keys], columns=COLUMNS)
    table["within"] = table["within"].astype(object)  # True, False or None, whichever occur
    return table


def _verdict(r: pd.Series) -> str:
    if r["within"] is None:
        return "– (one seed on each side)"
    word = "yes" if r["within"] else "no"
    if r["rule"] == WELCH:
        return f"{word} (Welch p = {r['p']:.2g})"
    std = r["std"] if r["rule"] == TWO_STD_THIS else r["ref_std"]
    scale = 100.0 if r["percent"] else 1.0
    side = "this run's" if r["rule"] == TWO_STD_THIS else "the reference's"
    return f"{word} (one seed: 2 × {side} std = {2 * std * scale:.3g})"


def compare_summary(table: pd.DataFrame) -> str:
    """"k of n cells within the seed spread" (and how many nothing decides)."""
    both = table[table["present"] == "both"]
    decided = both[both["within"].notna()]
    line = f"{sum(bool(w) for w in decided['within'])} of {len(both)} cells within the seed spread"
    if len(decided) < len(both):
        line += f" ({len(both) - len(decided)} undecided: one seed on each side)"
    return line


def _only_lines(table: pd.DataFrame, side: str, where: str) -> list[str]:
    rows = table[table["present"] == side]
    out: dict[tuple[str, str], list[str]] = {}
    for _, r in rows.iterrows():
        out.setdefault((r["attack"], r["defense"]), []).append(metric_names().get(r["metric"], r["metric"]))
    return [f"- only in {where}: {a} × {d} ({', '.join(ms)})" for (a, d), ms in out.items()]


def compare_markdown(table: pd.DataFrame, results: str | Path, reference: str | Path) -> str:
    """The comparison of :func:`compare_results` in GitHub markdown, the summary line and the cells present in
    only one of the two directories."""
    lines = [f"### {results} against {reference}", "",
             "| attack | defense | metric | this | reference | difference | within the seed spread |",
             "|---|---|---|---:|---:|---:|---|"]
    for _, r in table[table["present"] == "both"].iterrows():
        name = metric_names().get(r["metric"], r["metric"]) + (" (%)" if r["percent"] else "")
        name += " ↓" if lower_is_better(r["metric"]) else " ↑"
        diff = f"{r['diff']:+.1f}" if r["percent"] else f"{r['diff']:+.4g}"
        cells = [r["attack"], r["defense"], name, fmt_cell(r["mean"], r["std"], r["percent"], "±"),
                 fmt_cell(r["ref_mean"], r["ref_std"], r["percent"], "±"), diff, _verdict(r)]
        lines.append("| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |")
    lines += ["", f"{compare_summary(table)}: Welch's t-test over the per-seed values, two-sided, p ≥ {ALPHA:g}; "
              "with one seed on a side, a difference of at most twice the other side's sample std; the difference "
              "is this − reference, in points."]
    only = _only_lines(table, "this", str(results)) + _only_lines(table, "reference", str(reference))
    if only:
        lines += ["", *only]
    return "\n".join(lines) + "\n"


def compare_with_reference(results: str | Path, reference: str | Path | None) -> str:
    """The comparison ``otcbench run`` prints after its table: "" without a reference, when it does not exist
    or when it is ``results`` itself (a run written over its own reference has nothing to compare with)."""
    if reference is None or not Path(reference).exists():
        return ""
    if Path(reference).resolve() == Path(results).resolve():
        return ""
    return compare_markdown(compare_results(results, reference), results, reference)
