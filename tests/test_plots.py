"""Plots that read at a glance: legends under the axes naming only what is drawn, short labels with a key, error
bars on every mean over seeds, one summary figure per results directory (no training: hand-written summaries)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from otcbench.bench import plots
from otcbench.bench.plots import plot_asr_vs_accuracy, plot_summary, short_labels, write_plots

SAFE = "safeclip (no warm-up, full-rate slow phase)"


def rows(attacks: tuple[str, ...] = ("targeted+badnet",), seeds: int = 3, clean: bool = True) -> pd.DataFrame:
    """clean × none, then each attack × {none, SAFE, roclip} over ``seeds`` seeds; roclip collapsed (5 %)."""
    out: list[dict[str, Any]] = []

    def add(attack: str, defense: str, seed: int, **m: float) -> None:
        out.append({"run_id": f"{attack}-{defense}-{seed}", "attack": attack, "defense": defense, "seed": seed,
                    "status": "done", "defense_name": defense.split(" ")[0], "n_classes": 12, "sweep": "",
                    "attack_group": attack, **m})

    for s in range(seeds):
        if clean:
            add("clean", "none", s, zeroshot_top1=0.96 + 0.01 * s)
        for a in attacks:
            add(a, "none", s, zeroshot_top1=0.95, asr_targeted=1.0 - 0.05 * s, asr_backdoor=0.9)
            add(a, SAFE, s, zeroshot_top1=0.90 + 0.01 * s, asr_targeted=0.2, asr_backdoor=0.02 * s)
            add(a, "roclip", s, zeroshot_top1=0.05, asr_targeted=0.1, asr_backdoor=0.0)
    return pd.DataFrame(out)


@pytest.fixture
def figures(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """The figures the plot functions would save, kept open for inspection."""
    kept: list[Any] = []
    monkeypatch.setattr(plots, "_save", lambda fig, path, plt, dpi=110: kept.append(fig))
    return kept


def legend_texts(fig: Any) -> list[str]:
    return [t.get_text() for leg in fig.legends for t in leg.get_texts()]


def test_short_labels_cut_the_variant_into_a_key() -> None:
    short, key = short_labels(["none", "roclip (pool 1024, warm-up 4)", SAFE, "otcclip", "cleanclip (lr=0.0001) ‡"])
    assert short == {"none": "none", "roclip (pool 1024, warm-up 4)": "roclip [a]", SAFE: "safeclip [b]",
                     "otcclip": "otcclip", "cleanclip (lr=0.0001) ‡": "cleanclip [c] ‡"}
    assert key == ["[a] roclip: pool 1024, warm-up 4", "[b] safeclip: no warm-up, full-rate slow phase",
                   "[c] cleanclip: lr=0.0001"]


def test_accuracy_figure_legend_is_below_and_names_only_what_is_drawn(tmp_path: Path, figures: list[Any]) -> None:
    assert plot_asr_vs_accuracy(rows(), tmp_path / "a.png")
    fig = figures[0]
    axes = [ax for ax in fig.axes if ax.get_visible()]
    assert all(ax.get_legend() is None for ax in axes)  # nothing on the data
    (legend,) = fig.legends
    assert legend.get_bbox_to_anchor().y1 <= fig.bbox.y0 + 1  # hangs under the figure's axes
    texts = legend_texts(fig)
    assert "targeted+badnet" not in texts  # one attack: no marker key for it
    assert texts[:3] == ["none", "safeclip [a]", "roclip"] and not any("clean" == t for t in texts)
    assert any(t.startswith("clean reference: 97.0 ± 1.0 %") for t in texts)
    assert any(t.startswith("hollow: collapsed") for t in texts) and any("twice chance" in t for t in texts)
    assert "[a] safeclip: no warm-up, full-rate slow phase" in [t.get_text() for t in fig.texts][0]
    # every mean over three seeds carries its std as error bars
    bars = [c for ax in axes for c in ax.containers]
    assert bars and all(c.has_yerr and c.has_xerr for c in bars)


def test_several_attacks_get_a_marker_key_and_one_seed_no_error_bars(tmp_path: Path, figures: list[Any]) -> None:
    df = rows(("targeted", "badnet"), seeds=1, clean=False)
    assert plot_asr_vs_accuracy(df, tmp_path / "a.png")
    fig = figures[0]
    texts = legend_texts(fig)
    assert {"defense:", "attack:", "targeted", "badnet"} <= set(texts)
    assert not any(t.startswith("clean reference") for t in texts)  # no clean runs: no line, no entry
    assert fig.legends[0].get_title().get_text() == "one seed: no error bars"
    assert not any(c.has_yerr for ax in fig.axes for c in ax.containers)


def test_summary_figure_one_point_per_defense_and_metric(tmp_path: Path, figures: list[Any]) -> None:
    df = rows(("targeted", "badnet"))
    assert plot_summary(df, tmp_path / "s.png", "demo")
    (fig,) = figures
    (ax,) = fig.axes
    assert ax.get_title() == "demo: attack success against accuracy\n(mean of ASR targeted over 2 attacks, ASR " \
                             "backdoor over 2 attacks)"
    assert len(ax.containers) == 3 * 2  # none, safeclip, roclip × targeted, backdoor
    means = sorted((round(c.lines[0].get_xdata()[0], 6), round(c.lines[0].get_ydata()[0], 6)) for c in ax.containers)
    assert means[-1] == (95.0, 95.0)  # none's targeted ASR: the mean over seeds of 100, 95, 90
    assert ax.lines and any(line.get_linestyle() == "--" for line in ax.lines)  # the clean reference
    assert {"ASR targeted", "ASR backdoor"} <= set(legend_texts(fig))
    assert not plot_summary(rows().drop(columns=["asr_targeted", "asr_backdoor"]), tmp_path / "n.png")


def test_write_plots_adds_the_summary_and_match_plot_from_the_committed_csv(tmp_path: Path) -> None:
    out = tmp_path / "res"
    out.mkdir()
    df = rows()
    match = [{"run_id": f"targeted+badnet-roclip-{s}", "attack": "targeted+badnet", "defense": "roclip", "seed": s,
              "epoch": e, "score": score, "precision": 0.1 * e + 0.01 * s, "n": 100}
             for s in range(3) for e in (1, 3) for score in ("used", "random")]
    pd.DataFrame(match).to_csv(out / "match_precision.csv", index=False)  # no run logs: a committed directory
    names = sorted(p.name for p in write_plots(df, out))
    assert names == ["asr_vs_accuracy.png", "match_precision.png", "summary.png"]


def test_a_legend_group_longer_than_the_defenses_stays_in_one_column(tmp_path: Path, figures: list[Any]) -> None:
    # four attacks under three defenses: the attack group (its header and four markers) must not wrap
    df = rows(("a1", "a2", "a3", "a4"), seeds=1, clean=False)
    assert plot_asr_vs_accuracy(df, tmp_path / "a.png")
    (legend,) = figures[0].legends
    texts = [t.get_text() for t in legend.get_texts()]
    per_column = len(texts) // legend._ncols
    columns = {t: i // per_column for i, t in enumerate(texts)}
    assert len({columns[t] for t in ("attack:", "a1", "a2", "a3", "a4")}) == 1
    assert len({columns[t] for t in ("defense:", "none", "safeclip [a]", "roclip")}) == 1
