"""Which cell of a results table is bold, and whether two sets of seeds differ beyond their spread.

One rule serves the markdown table, the LaTeX table and the overview (:mod:`otcbench.bench.tables`): within an
attack, the cell with the best mean of a column is bold only when it beats the runner-up (the best other
ranked cell) beyond the seed spread — Welch's t-test over the per-seed values, one-sided, p < 0.05. A single
seed has no spread, and rows move by up to 20 points between CPU classes (docs/benchmarks.md), so a one-seed
table has nothing bold. Collapsed models (†, :func:`collapsed_rows`) and the clean reference are not ranked:
a model that recognises no class has a low attack success without defending anything, and the clean
reference is a yardstick, not a defense.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from otcbench.bench.summary import lower_is_better, metric_names

#: The significance level of every test here (the bold rule and ``otcbench report --compare``).
ALPHA = 0.05

#: The attack label of the recipe's clean entry (``attack: none``) when it has no label of its own.
CLEAN_LABEL = "clean"

RULE = ("bold: the best cell of its attack and column, only when it beats the runner-up (the best other ranked "
        "cell) beyond the seed spread — Welch's t-test over the per-seed values, one-sided, p < 0.05; † rows "
        "and the clean reference are not ranked")

# Why a group (one attack's cells of one column) has no bold cell.
BOLD, ONE_SEED, SPREAD, ALONE, REFERENCE = "bold", "one seed", "spread", "alone", "reference"
REASONS = {
    ONE_SEED: "one seed (no seed spread to test against)",
    SPREAD: "no cell beats the runner-up beyond the seed spread",
    ALONE: "fewer than two ranked cells in an attack",
    REFERENCE: "the clean reference is not ranked",
}


def welch_p(a: Sequence[float], b: Sequence[float], alternative: str = "two-sided") -> float:
    """p-value of Welch's t-test of ``a`` against ``b`` (``greater``: mean of ``a`` above ``b``'s; ``less``;
    ``two-sided``); each needs two values or more.

    Two samples without any variance have no t statistic: equal means are a tie (p = 1), different means
    differ for certain (p = 0 in the direction tested, 1 against it).
    """
    x, y = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if len(x) < 2 or len(y) < 2:
        raise ValueError("Welch's t-test needs two values or more on each side")
    if np.ptp(x) == 0 and np.ptp(y) == 0:  # ptp, not var: a float mean may be off by an ulp
        if math.isclose(x[0], y[0], rel_tol=1e-12, abs_tol=1e-15):
            return 1.0
        if alternative == "two-sided":
            return 0.0
        return 0.0 if (x[0] > y[0]) == (alternative == "greater") else 1.0
    from scipy.stats import ttest_ind

    with warnings.catch_warnings():
        # one side without spread (identical seeds) is exact here; scipy warns of precision loss all the same
        warnings.simplefilter("ignore", RuntimeWarning)
        return float(ttest_ind(x, y, equal_var=False, alternative=alternative).pvalue)


def paired_p(diffs: Sequence[float], alternative: str) -> float:
    """p-value of the one-sample t-test of per-seed differences against 0 (``greater``: above 0; ``less``):
    two measures of the same runs compared seed by seed. Needs two values or more; differences without any
    spread decide for certain (p = 0 in their direction, 1 otherwise; all zero: p = 1)."""
    d = np.asarray(diffs, dtype=float)
    if len(d) < 2:
        raise ValueError("a paired t-test needs two seeds or more")
    if np.ptp(d) == 0:
        if math.isclose(d[0], 0.0, abs_tol=1e-12):
            return 1.0
        return 0.0 if (d[0] > 0) == (alternative == "greater") else 1.0
    from scipy.stats import ttest_1samp

    return float(ttest_1samp(d, 0.0, alternative=alternative).pvalue)


def beats(best: Sequence[float], other: Sequence[float], lower: bool) -> str:
    """:data:`BOLD` when ``best`` beats ``other`` beyond the seed spread (lower values better when ``lower``),
    else why not (:data:`ONE_SEED`, :data:`SPREAD`)."""
    if len(best) < 2 or len(other) < 2:
        return ONE_SEED
    return BOLD if welch_p(best, other, "less" if lower else "greater") < ALPHA else SPREAD


def collapsed_rows(agg: pd.DataFrame, df: pd.DataFrame) -> set[int]:
    """Rows of ``agg`` whose mean clean zero-shot top-1 is below twice chance (1 / ``n_classes``).

    Such a model recognises no class, the target included, so its low attack success is not a defense:
    those rows are marked † and never ranked.
    """
    if "zeroshot_top1_mean" not in agg or "n_classes" not in df:
        return set()
    n_classes = pd.to_numeric(df["n_classes"], errors="coerce").dropna()
    if not len(n_classes):
        return set()
    floor = 2.0 / float(n_classes.max())
    return {int(i) for i, v in agg["zeroshot_top1_mean"].items() if not math.isnan(v) and v < floor}


def reference_attacks(df: pd.DataFrame) -> set[str]:
    """Attack labels of the clean reference: the default label, or an attack whose finished runs were
    evaluated on no poisoned data (a relabelled ``attack: none`` entry)."""
    out = {a for a in df["attack"] if a == CLEAN_LABEL}
    if "poison_data" in df:
        done = df[df["status"] == "done"]
        for attack, g in done.groupby("attack", sort=False):
            if g["poison_data"].map(lambda v: v is None or (isinstance(v, float) and math.isnan(v)) or v == "").all():
                out.add(str(attack))
    return out


@dataclass
class ColumnRanking:
    """One column's bold cells (rows of the aggregate) and, per attack, :data:`BOLD` or why nothing is."""

    bold: set[int] = field(default_factory=set)
    outcomes: dict[str, str] = field(default_factory=dict)

    def reason(self, attacks: Iterable[str] | None = None) -> str:
        """Why nothing is bold in these attacks' cells ("" when something is, or when only the clean reference,
        which the rule itself leaves out, has values)."""
        got = [self.outcomes[a] for a in (self.outcomes if attacks is None else attacks) if a in self.outcomes]
        if BOLD in got:
            return ""
        # a group that could have been ranked explains the column better than one that could not
        for tier in ((ONE_SEED, SPREAD), (ALONE,)):
            present = [REASONS[o] for o in tier if o in got]
            if present:
                return "; ".join(present)
        return ""


def rank_column(agg: pd.DataFrame, metric: str, unranked: AbstractSet[int],
                reference: AbstractSet[str]) -> ColumnRanking:
    """The bold rule for one column of ``agg`` (:func:`otcbench.bench.tables.aggregate`, with ``METRIC_values``):
    rows in ``unranked`` and attacks in ``reference`` take no part."""
    lower = lower_is_better(metric)
    ranking = ColumnRanking()
    for attack, g in agg.groupby("attack", sort=False):
        vals = g[f"{metric}_mean"].dropna()
        if not len(vals):
            continue
        if attack in reference:
            ranking.outcomes[str(attack)] = REFERENCE
            continue
        vals = vals[[i not in unranked for i in vals.index]]
        if len(vals) < 2:
            ranking.outcomes[str(attack)] = ALONE
            continue
        order = vals.sort_values(ascending=lower, kind="stable")
        best, runner_up = order.index[0], order.index[1]
        outcome = beats(g.at[best, f"{metric}_values"], g.at[runner_up, f"{metric}_values"], lower)
        ranking.outcomes[str(attack)] = outcome
        if outcome == BOLD:
            ranking.bold.add(int(best))
    return ranking


def rank_table(agg: pd.DataFrame, df: pd.DataFrame, metrics: Sequence[str]) -> dict[str, ColumnRanking]:
    """The bold rule for every column of a table: ``agg`` aggregated from the summary ``df``."""
    unranked = collapsed_rows(agg, df)
    reference = reference_attacks(df)
    return {m: rank_column(agg, m, unranked, reference) for m in metrics}


def no_bold_lines(rankings: dict[str, ColumnRanking]) -> list[str]:
    """One line per reason, naming the columns without a bold cell for it (the footer under a table)."""
    by_reason: dict[str, list[str]] = {}
    for metric, ranking in rankings.items():
        reason = ranking.reason()
        if reason:
            by_reason.setdefault(reason, []).append(metric_names().get(metric, metric))
    return [f"nothing bold in {', '.join(cols)}: {reason}" for reason, cols in by_reason.items()]
