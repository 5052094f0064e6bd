"""The bold rule of every results table (otcbench.bench.ranking): a cell is bold only when it beats the runner-up
beyond the seed spread; hand-built summaries in the summary.csv format, no training."""

from __future__ import annotations

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
