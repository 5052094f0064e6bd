"""The bold rule of every results table (otcbench.bench.ranking): a cell is bold only when it beats the runner-up
beyond the seed spread; hand-built summaries in the summary.csv format, no training."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from otcbench.bench.ranking import ONE_SEED, SPREAD, beats, welch_p
from otcbench.bench.summary import HEAD, META
from otcbench.bench.tables import latex_table, markdown_table, overview_table

METRICS = ["zeroshot_top1", "linear_probe_top1", "asr_backdoor"]


def frame(cells: dict[tuple[str, str], dict[str, list[float]]], n_classes: int = 12) -> pd.DataFrame:
    """A summary: one done run per seed of each (attack, defense), ``cells`` giving each metric's per-seed values."""
    rows: list[dict[str, Any]] = []
    for (attack, defense), metrics in cells.items():
        n = max(len(v) for v in metrics.values())
        for seed in range(n):
            row: dict[str, Any] = {"run_id": f"{attack}-{defense}-{seed}", "attack": attack, "defense": defense,
                                   "seed": seed, "status": "done", "seconds": 1.0, "attack_group": attack,
                                   "defense_group": defense, "defense_name": defense, "variant": defense,
                                   "n_classes": n_classes}
            row.update({m: v[seed] for m, v in metrics.items()})
            rows.append(row)
    return pd.DataFrame(rows, columns=HEAD + META + [m for m in METRICS if any(m in c for c in cells.values())]
                        + ["n_classes"])


def body(md: str) -> dict[str, str]:
    """``defense`` → its markdown row (the first table's rows of one attack)."""
    return {line.split(" | ")[1].rstrip(" †"): line for line in md.splitlines()
            if line.startswith("| badnet | ")}


def test_welch_handles_zero_variance_and_too_few_seeds() -> None:
    assert welch_p([0.5, 0.5, 0.5], [0.5, 0.5]) == 1.0  # identical and without spread: a tie
    assert welch_p([0.9, 0.9], [0.1, 0.1, 0.1], "greater") == 0.0  # different without spread: a clear winner
    assert welch_p([0.9, 0.9], [0.1, 0.1, 0.1], "less") == 1.0
    assert welch_p([0.1, 0.1], [0.9, 0.9], "two-sided") == 0.0
    assert beats([0.1], [0.9, 0.8], lower=True) == ONE_SEED and beats([0.1, 0.2], [0.9], lower=True) == ONE_SEED
    assert beats([0.10, 0.30, 0.20], [0.25, 0.15, 0.20], lower=True) == SPREAD
    with pytest.raises(ValueError):
        welch_p([0.1], [0.2, 0.3])


def test_a_tie_across_seeds_is_not_bold() -> None:
    # the same mean over three seeds: no cell beats the runner-up, in either direction
    df = frame({("badnet", "none"): {"zeroshot_top1": [0.80, 0.82, 0.84], "asr_backdoor": [0.10, 0.30, 0.20]},
                ("badnet", "roclip"): {"zeroshot_top1": [0.84, 0.80, 0.82], "asr_backdoor": [0.25, 0.15, 0.20]},
                ("badnet", "otcclip"): {"zeroshot_top1": [0.5, 0.5, 0.5], "asr_backdoor": [0.9, 0.9, 0.9]}})
    md = markdown_table(df)
    assert "**" not in md
    assert "- nothing bold in zero-shot top-1, ASR backdoor: no cell beats the runner-up beyond the seed spread" \
        in md
    # identical values without any spread are a tie too
    flat = frame({("badnet", "none"): {"asr_backdoor": [0.5, 0.5, 0.5]},
                  ("badnet", "roclip"): {"asr_backdoor": [0.5, 0.5, 0.5]}})
    assert "**" not in markdown_table(flat) and "**" not in overview_table(flat)


def test_a_clear_winner_is_bold_in_every_table() -> None:
    df = frame({("badnet", "none"): {"zeroshot_top1": [0.90, 0.91, 0.92], "asr_backdoor": [0.90, 0.92, 0.94]},
                ("badnet", "roclip"): {"zeroshot_top1": [0.60, 0.62, 0.61], "asr_backdoor": [0.10, 0.12, 0.11]},
                ("badnet", "otcclip"): {"zeroshot_top1": [0.70, 0.70, 0.70], "asr_backdoor": [0.0, 0.0, 0.0]}})
    rows = body(markdown_table(df))
    assert rows["none"] == "| badnet | none | 3/3 | **91.0 ± 1.0** | 92.0 ± 2.0 |"
    assert rows["otcclip"] == "| badnet | otcclip | 3/3 | 70.0 ± 0.0 | **0.0 ± 0.0** |"  # zero spread, clearly lowest
    assert "nothing bold" not in markdown_table(df)
    tex = latex_table(df)
    assert r"\textbf{91.0 $\pm$ 1.0}" in tex and r"\textbf{0.0 $\pm$ 0.0}" in tex and "% bold: the best cell" in tex
    assert "| badnet | ASR backdoor ↓ | 92.0 ± 2.0 | 11.0 ± 1.0 | **0.0 ± 0.0** |" in overview_table(df)


def test_a_winner_needs_two_seeds_on_both_sides() -> None:
    # the runner-up has one finished seed: its spread is unknown, so nothing beats it beyond it
    df = frame({("badnet", "none"): {"asr_backdoor": [0.90, 0.92, 0.94]},
                ("badnet", "roclip"): {"asr_backdoor": [0.10, 0.12, 0.11]},
                ("badnet", "otcclip"): {"asr_backdoor": [0.15]}})
    md = markdown_table(df)
    assert "**" not in md and "- nothing bold in ASR backdoor: one seed (no seed spread to test against)" in md


def test_a_collapsed_row_is_never_bold_even_with_the_best_values() -> None:
    # 12 classes: roclip's zero-shot is below twice chance (2/12); its 0 % ASR and its best linear probe are
    # out of the ranking, and otcclip is ranked against the undefended model
    df = frame({("badnet", "none"): {"zeroshot_top1": [0.90, 0.91, 0.92], "linear_probe_top1": [0.70, 0.71, 0.69],
                                     "asr_backdoor": [0.90, 0.92, 0.94]},
                ("badnet", "roclip"): {"zeroshot_top1": [0.05, 0.06, 0.05], "linear_probe_top1": [0.99, 0.99, 0.98],
                                       "asr_backdoor": [0.0, 0.0, 0.0]},
                ("badnet", "otcclip"): {"zeroshot_top1": [0.80, 0.81, 0.82], "linear_probe_top1": [0.85, 0.86, 0.84],
                                        "asr_backdoor": [0.05, 0.06, 0.04]}})
    rows = body(markdown_table(df))
    assert rows["roclip"] == "| badnet | roclip † | 3/3 | 5.3 ± 0.6 | 98.7 ± 0.6 | 0.0 ± 0.0 |"
    assert rows["otcclip"] == "| badnet | otcclip | 3/3 | 81.0 ± 1.0 | **85.0 ± 1.0** | **5.0 ± 1.0** |"
    assert "| badnet | ASR backdoor ↓ | 92.0 ± 2.0 | 0.0 ± 0.0 † | **5.0 ± 1.0** |" in overview_table(df)


def test_one_seed_bolds_nothing_and_the_footer_says_why() -> None:
    df = frame({("badnet", "none"): {"zeroshot_top1": [0.95], "asr_backdoor": [0.95]},
                ("badnet", "roclip"): {"zeroshot_top1": [0.58], "asr_backdoor": [0.05]}})
    md = markdown_table(df)
    assert "**" not in md
    assert "- nothing bold in zero-shot top-1, ASR backdoor: one seed (no seed spread to test against)" in md
    assert "Bold: the best cell of its attack and column, only when it beats the runner-up" in md
    overview = overview_table(df)
    assert "**" not in overview and "- nothing bold in badnet ASR backdoor: one seed" in overview
    assert "% nothing bold in zero-shot top-1, ASR backdoor: one seed" in latex_table(df)


def test_the_clean_reference_is_not_ranked() -> None:
    # two defenses on the clean data, clearly apart: the reference rows stay plain, and the rule says why
    df = frame({("clean", "none"): {"zeroshot_top1": [0.95, 0.96, 0.95]},
                ("clean", "roclip"): {"zeroshot_top1": [0.50, 0.52, 0.51]},
                ("badnet", "none"): {"zeroshot_top1": [0.90, 0.91, 0.92]},
                ("badnet", "roclip"): {"zeroshot_top1": [0.60, 0.62, 0.61]}})
    md = markdown_table(df)
    assert md.count("**") == 2 and "| badnet | none | 3/3 | **91.0 ± 1.0** |" in md
    assert "† rows and the clean reference are not ranked" in md
    assert "| clean | zero-shot top-1 ↑ | 95.3 ± 0.6 | 51.0 ± 1.0 |" in overview_table(df)


# --------------------------------------------------------------------------------------------------
# the OT score's pick against the global score's, seed by seed (a paired rule: both picks come from one run)


def test_paired_p_on_hand_built_differences() -> None:
    from otcbench.bench.ranking import paired_p

    assert paired_p([0.0, 0.0, 0.0], "greater") == 1.0  # no difference at all: a tie
    assert paired_p([0.5, 0.5, 0.5], "greater") == 0.0 and paired_p([0.5, 0.5, 0.5], "less") == 1.0
    assert paired_p([1.0, 2.0, 3.0], "greater") < 0.05  # t = 3.46 with 2 degrees of freedom: p = 0.037
    assert paired_p([1.0, -1.0, 0.5], "greater") > 0.05
    with pytest.raises(ValueError, match="two seeds"):
        paired_p([1.0], "greater")


def curves(per_seed: dict[str, list[tuple[float, float]]], epochs: tuple[int, ...] = (3, 5)) -> pd.DataFrame:
    """match_precision rows of one otcclip run per seed: ``per_seed[score][seed]`` = (precision, overlap) at every
    matching, plus the random caption's and the assignment trained on."""
    from otcbench.bench.logs import MATCH_COLUMNS

    rows = []
    for score, values in per_seed.items():
        for seed, (precision, overlap) in enumerate(values):
            for epoch in epochs:
                rows.append((f"run{seed}", "relabel", "otcclip", seed, epoch, score, precision, 100, overlap, 0.2))
    return pd.DataFrame(rows, columns=MATCH_COLUMNS)


def test_ot_vs_global_table_verdicts() -> None:
    from otcbench.bench.tables import match_precision_table, ot_vs_global, ot_vs_global_table

    ahead = curves({"ot": [(0.10, 0.30), (0.12, 0.33), (0.11, 0.35)],
                    "global": [(0.08, 0.27), (0.09, 0.30), (0.10, 0.31)],
                    "random": [(0.01, 0.03)] * 3, "used": [(0.10, 0.30)] * 3})
    per_seed = ot_vs_global(ahead)
    assert list(per_seed["matchings"]) == [2, 2, 2]
    assert per_seed["binding_ot"].tolist() == pytest.approx([0.30, 0.33, 0.35])
    text = ot_vs_global_table(ahead)
    row = next(line for line in text.splitlines() if line.startswith("| relabel | otcclip |"))
    # binding overlap 32.7 ± 2.5 against 29.3 ± 2.1; OT ahead by 3, 3 and 4 points on the three seeds
    assert "32.7 ± 2.5" in row and "29.3 ± 2.1" in row and "+3.0 / +3.0 / +4.0" in row and "**OT ahead**" in row
    assert text in match_precision_table(ahead)  # the summary heads the epoch-by-epoch tables

    tie = curves({"ot": [(0.10, 0.30), (0.10, 0.28), (0.10, 0.33)],
                  "global": [(0.10, 0.31), (0.10, 0.30), (0.10, 0.29)]})
    assert "within the seed spread" in ot_vs_global_table(tie)  # -1, -2, +4: neither ahead beyond the spread
    behind = curves({"ot": [(0.1, 0.20), (0.1, 0.21), (0.1, 0.19)], "global": [(0.1, 0.22), (0.1, 0.24), (0.1, 0.23)]})
    assert "**global ahead**" in ot_vs_global_table(behind)
    one = curves({"ot": [(0.1, 0.4)], "global": [(0.1, 0.2)]})
    assert "| one seed |" in ot_vs_global_table(one)
    # runs that log one pick only (score=global) are left out; no such run at all: no table
    assert ot_vs_global_table(curves({"global": [(0.1, 0.2)] * 3, "used": [(0.1, 0.2)] * 3})) == ""


def picks(binding: dict[str, list[float]], defense: str = "otcclip", alpha: float = 0.5) -> pd.DataFrame:
    """match_scores.csv rows (``benchmarks/match_scores.py --csv``, in %) of one defense, one model per seed."""
    n = len(binding["ot"])
    return pd.DataFrame({"checkpoint": [f"run{s}" for s in range(n)], "attack": "t+b", "defense": defense,
                         "seed": range(n), "alpha": alpha, "top_k": 5,
                         **{f"binding_{k}": v for k, v in binding.items()},
                         **{f"exact_{k}": [v / 4 for v in binding[k]] for k in binding},
                         **{f"shape_{k}": [2 * v for v in binding[k]] for k in binding}})


def test_offline_picks_table_rows_and_verdicts(tmp_path: Path) -> None:
    from otcbench.bench.report import write_report
    from otcbench.bench.tables import offline_picks_table

    behind = picks({"ot": [30.0, 33.0, 35.0], "global": [33.0, 36.0, 39.0], "random": [3.0, 3.2, 3.1]})
    ahead = picks({"ot": [20.0, 22.0, 21.0], "global": [18.0, 19.0, 19.5], "random": [3.0] * 3}, alpha=0.0)
    text = offline_picks_table(pd.concat([behind, ahead]))
    rows = [line for line in text.splitlines() if line.startswith("| t+b | otcclip |")]
    assert len(rows) == 2 and "| 0.5, 5 | 3 |" in rows[0] and "| 0, 5 | 3 |" in rows[1]
    # binding 32.7 ± 2.5 against 36.0 ± 3.0, random 3.1 ± 0.1; global ahead by 3, 3 and 4 points
    assert "32.7 ± 2.5" in rows[0] and "36.0 ± 3.0" in rows[0] and "3.1 ± 0.1" in rows[0]
    assert "8.2 ± 0.6" in rows[0]  # exact: OT, a quarter of its binding overlap here
    assert "-3.0 / -3.0 / -4.0" in rows[0] and "**global ahead**" in rows[0]
    assert "+2.0 / +3.0 / +1.5" in rows[1] and "**OT ahead**" in rows[1]
    assert "| one seed |" in offline_picks_table(picks({"ot": [30.0], "global": [31.0], "random": [3.0]}))
    assert offline_picks_table(behind.iloc[:0]) == ""
    # the report puts the table in table.md when a results directory holds match_scores.csv
    from test_report import summary

    out = summary(tmp_path)
    assert "offline" not in write_report(out, plots=False)
    behind.to_csv(out / "match_scores.csv", index=False)
    md = write_report(out, plots=False)
    assert text.splitlines()[0] in md and (out / "table.md").read_text() == md
