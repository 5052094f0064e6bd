"""Plots of a recipe's results (PNG, matplotlib's Agg backend, no display needed).

* ``plots/summary.png`` — the directory at a glance: per defense, its headline attack success (targeted and
  backdoor ASR, each the mean over the attacks that measure it) against its clean zero-shot top-1 over the
  same runs; the dashed line is the clean reference (plain CLIP on clean data), the shaded strip lies below
  twice chance, where a model is collapsed and its low ASR no defense (hollow markers).
* ``plots/asr_vs_accuracy.png`` — the same per attack and ASR metric (a marker per attack when several are drawn).
* ``plots/asr_vs_<option>.png`` — ASR against an attack option an entry sweeps (``badnet.rate``), one line per defense.
* ``plots/curves.png`` — training loss against step from each run's ``log.jsonl``, one panel per attack.
* ``plots/match_precision.png``, ``match_overlap.png`` — per matching of OTCCLIP and RoCLIP, the re-assigned captions
  that describe the image: as trained on, the OT and global scores' picks, a random caption's (``match_curves``).
* ``plots/detection.png`` — the share of poisoned pairs OTCCLIP's filter or SafeCLIP's risky set keeps out of the
  contrastive loss, per epoch (:func:`otcbench.bench.logs.detection_curves`).

Every mean is over seeds with its sample std (error bars, or a band along a curve); epochs are 1-based, as in
``table.md``. Legends sit under the axes and name only what is drawn; a defense keeps one colour across a
directory's figures and its table label, cut before the variant to ``safeclip [b]`` and a key (:func:`short_labels`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pandas as pd

from otcbench.attacks.kinds import kind_labels, overview_metrics  # the attack-success metrics
from otcbench.bench.logs import detection_curves, loss_curve, match_curves, run_log

#: Distinct filled matplotlib markers; synthetic-full alone has 13 attacks.
MARKERS = "osD^v<>pXh*PdH8"
#: Marker of each headline metric in the summary figure.
METRIC_MARKERS = {"asr_targeted": "o", "asr_backdoor": "^"}
_GREY, _COLLAPSE = "0.35", "#d62728"
_MEAN_SD = "mean ± std over seeds"


def attack_markers(attacks: list[str]) -> dict[str, str]:
    """One marker per attack; past ``len(MARKERS)`` attacks markers repeat (the legend still names each)."""
    return {a: MARKERS[i % len(MARKERS)] for i, a in enumerate(attacks)}


def _label_parts(labels: Iterable[str]) -> dict[str, tuple[str, str]]:
    """label → (short name, key line or ""), key letters in the order given (:func:`short_labels`)."""
    out: dict[str, tuple[str, str]] = {}
    for label in dict.fromkeys(labels):
        text, mark = (label[:-2], " ‡") if label.endswith(" ‡") else (label, "")
        head, sep, rest = text.partition(" (")
        if sep and rest.endswith(")"):
            n = sum(1 for _, line in out.values() if line)
            letter = chr(97 + n % 26) * (1 + n // 26)
            out[label] = (f"{head} [{letter}]{mark}", f"[{letter}] {head}: {rest[:-1]}")
        else:
            out[label] = (label, "")
    return out


def short_labels(labels: Iterable[str]) -> tuple[dict[str, str], list[str]]:
    """Legend names of defense labels and the key of what they cut: ``roclip (pool 1024, warm-up 4)`` becomes
    ``roclip [a]``, key line ``[a] roclip: pool 1024, warm-up 4``; a trailing ``‡`` (other code) stays."""
    parts = _label_parts(labels)
    return {lab: short for lab, (short, _) in parts.items()}, [line for _, line in parts.values() if line]


def _plt():
    import matplotlib

    matplotlib.use("Agg")  # files only; never a display
    import matplotlib.pyplot as plt

    return plt


def _colours(labels: list[str]) -> dict[str, tuple]:
    cmap = _plt().get_cmap("tab10")
    return {lab: cmap(i % 10) for i, lab in enumerate(labels)}


def _ordered(values: pd.Series) -> list[str]:
    return list(dict.fromkeys(values.tolist()))


def _handle(colour: Any, label: str, marker: str = "s", ls: str = "", hollow: bool = False):
    from matplotlib.lines import Line2D

    return Line2D([], [], color=colour, marker=marker or None, ls=ls, label=label, markersize=6,
                  markerfacecolor="white" if hollow else colour)


class Names:
    """Colours and legend names of a directory's defenses, fixed once for all its figures, so that a defense
    has the same colour and key letter in each; :meth:`legend` names the drawn ones only."""

    def __init__(self, labels: Iterable[str]) -> None:
        self.order = list(dict.fromkeys(labels))
        self.colours = _colours(self.order)
        self.parts = _label_parts(self.order)

    @staticmethod
    def of(names: Names | None, labels: Iterable[str]) -> Names:
        """``names`` (or new ones), with any label it lacks appended, so that nothing else moves."""
        order = names.order if names else []
        return names if names and set(labels) <= set(order) else Names(order + list(labels))

    def legend(self, drawn: Iterable[str], marker: str = "s", ls: str = "") -> tuple[list, list[str]]:
        """Handles of the drawn defenses in the directory's order, and the key lines they need."""
        shown = [lab for lab in self.order if lab in set(drawn)]
        handles = [_handle(self.colours[lab], self.parts[lab][0], marker, ls) for lab in shown]
        return handles, [self.parts[lab][1] for lab in shown if self.parts[lab][1]]


def _grid(n: int, plt, width: float = 4.6, height: float = 3.8):
    cols = min(3, n)
    fig, axes = plt.subplots(math.ceil(n / cols), cols, figsize=(width * cols, height * math.ceil(n / cols)),
                             squeeze=False)
    for ax in list(axes.flat)[n:]:
        ax.set_visible(False)
    return fig, list(axes.flat)[:n]


def _pct(values: pd.Series) -> pd.Series:
    return pd.to_numeric(values, errors="coerce").astype(float) * 100


def _sd(values: pd.Series) -> float | None:  # sample std over seeds; None (no error bar) with one seed
    return float(values.std(ddof=1)) if len(values) > 1 else None


def _grouped(groups: list[tuple[str, list]]) -> tuple[list, int]:
    """Legend handles in column groups (defenses, then attacks, then the references), each group headed by its
    name and starting a new column; returns the handles and the column count for ``fig.legend``."""
    from matplotlib.lines import Line2D

    groups = [([Line2D([], [], ls="", label=f"{name}:")] if name else []) + hs for name, hs in groups if hs]
    rows = max(4, *(len(hs) for hs in groups))  # each group in one column: a long attack list never wraps
    out = []
    for hs in groups:
        out += hs + [Line2D([], [], ls="", label=" ")] * (-len(hs) % rows)
    return out, len(out) // rows


def _legend_below(fig, handles: list, key: list[str] | None = None, title: str | None = _MEAN_SD,
                  ncol: int | None = None) -> None:
    """A figure legend under the axes (never on the data) and, under it, the key of the short labels;
    ``handles`` is a list, or a list of (group name, handles) laid out by :func:`_grouped`."""
    fig.tight_layout()
    if handles and isinstance(handles[0], tuple) and isinstance(handles[0][0], str):  # not an errorbar's tuple
        handles, ncol = _grouped(handles)
    if not handles:
        return
    leg = fig.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=ncol or min(len(handles), 3),
                     fontsize=8, frameon=False, title=title, title_fontsize=8)
    if key:
        fig.canvas.draw()
        box = leg.get_window_extent().transformed(fig.transFigure.inverted())
        fig.text(0.5, box.y0 - 0.01, "\n".join(key), ha="center", va="top", fontsize=7.5, color="0.25",
                 multialignment="left")


def _save(fig, path: Path, plt, dpi: int = 110) -> None:
    fig.savefig(path, dpi=dpi, bbox_inches="tight", pad_inches=0.15)
    plt.close(fig)


class _Accuracy:
    """The accuracy figures' clean reference (line, ± std band), strip below twice chance and collapsed (hollow)
    points; :meth:`handles` names only what was drawn."""

    def __init__(self, done: pd.DataFrame) -> None:
        from otcbench.bench.ranking import reference_attacks

        ref = done[done["attack"].isin(reference_attacks(done))]
        ref = ref[ref["defense_name"] == "none"] if "defense_name" in ref else ref.iloc[:0]
        self.clean = _pct(ref["zeroshot_top1"]).dropna() if "zeroshot_top1" in ref else pd.Series(dtype=float)
        n = pd.to_numeric(done["n_classes"], errors="coerce").dropna() if "n_classes" in done else pd.Series([])
        self.floor = 200.0 / float(n.max()) if len(n) and n.max() > 0 else None
        self.strip = self.hollow = False

    def point(self, ax, x: pd.Series, y: pd.Series, marker: str, colour: Any) -> None:
        """One mean with std error bars over seeds; hollow when the model collapsed."""
        hollow = self.floor is not None and float(x.mean()) < self.floor
        self.hollow |= hollow
        ax.errorbar(x.mean(), y.mean(), xerr=_sd(x), yerr=_sd(y), fmt=marker, color=colour, markersize=7,
                    capsize=3, markerfacecolor="white" if hollow else colour, elinewidth=1)

    def axes(self, ax, ylabel: str, title: str) -> None:
        if len(self.clean):
            mean, sd = float(self.clean.mean()), _sd(self.clean)
            ax.axvline(mean, ls="--", color=_GREY, lw=1)
            if sd:
                ax.axvspan(mean - sd, mean + sd, color="0.5", alpha=0.12, lw=0)
        lo, hi = ax.get_xlim()
        if self.floor is not None and self.floor > lo:
            ax.axvspan(lo, min(self.floor, hi), color=_COLLAPSE, alpha=0.07, lw=0)
            self.strip = True
        ax.set(xlim=(lo, hi), ylim=(-3, 103), xlabel="clean zero-shot top-1 (%), higher is better",
               ylabel=f"{ylabel} (%), lower is better", title=title)
        ax.grid(alpha=0.3)

    def handles(self) -> list:
        from matplotlib.patches import Patch

        out = []
        if len(self.clean):
            sd = _sd(self.clean)
            out.append(_handle(_GREY, f"clean reference: {self.clean.mean():.1f}{f' ± {sd:.1f}' if sd else ''} % "
                               "zero-shot", "", "--"))
        if self.hollow:
            out.append(_handle(_GREY, "hollow: collapsed, its ASR is no defense", "o", hollow=True))
        if self.strip:
            out.append(Patch(color=_COLLAPSE, alpha=0.15, label=f"below twice chance ({self.floor:.1f} %)"))
        return out


def plot_asr_vs_accuracy(df: pd.DataFrame, path: Path, names: Names | None = None) -> bool:
    """Robustness–accuracy picture per attack; False (nothing written) when no run measured an ASR."""
    done = df[df["status"] == "done"]
    metrics = [m for m in kind_labels() if m in done and done[m].notna().any()]
    if not metrics or "zeroshot_top1" not in done:
        return False
    plt, labels = _plt(), kind_labels()
    names = Names.of(names, df["defense"])
    markers = attack_markers(_ordered(df["attack"]))
    drawn = done[done[metrics].notna().any(axis=1)]
    attacks = _ordered(drawn["attack"])
    acc = _Accuracy(done)
    fig, axes = _grid(len(metrics), plt)
    for ax, m in zip(axes, metrics, strict=True):
        for (attack, defense), g in done[done[m].notna()].groupby(["attack", "defense"], sort=False):
            acc.point(ax, _pct(g["zeroshot_top1"]), _pct(g[m]), markers[attack] if len(attacks) > 1 else "o",
                      names.colours[defense])
        acc.axes(ax, labels[m], labels[m])
    handles, key = names.legend(drawn["defense"])
    if len(attacks) > 1:  # marker = attack; with one attack the marker says nothing
        _legend_below(fig, [("defense", handles), ("attack", [_handle(_GREY, a, markers[a]) for a in attacks]),
                            ("", acc.handles())], key, _seeds_title(_seed_counts(done)))
    else:
        _legend_below(fig, handles + acc.handles(), key, _seeds_title(_seed_counts(done)))
    _save(fig, path, plt)
    return True


def _seed_counts(done: pd.DataFrame) -> list[int]:
    return done.groupby(["attack", "defense"], sort=False)["seed"].nunique().tolist()


def _per_seed(g: pd.DataFrame, metric: str) -> pd.DataFrame:
    """Per seed, the mean over the attacks measuring ``metric`` of clean zero-shot (x) and the metric (y), in %."""
    g = g[g[metric].notna()]
    return pd.DataFrame({"x": _pct(g["zeroshot_top1"]), "y": _pct(g[metric]), "seed": g["seed"]}).groupby("seed").mean()


def plot_summary(df: pd.DataFrame, path: Path, title: str = "", names: Names | None = None) -> bool:
    """The results directory at a glance (the module docstring); False when no run measured an ASR."""
    from otcbench.bench.ranking import reference_attacks

    done = df[df["status"] == "done"]
    metrics = [m for m in overview_metrics() if m in done and done[m].notna().any()]
    if not metrics or "zeroshot_top1" not in done:
        return False
    poisoned = done[~done["attack"].isin(reference_attacks(done))]
    plt, labels = _plt(), kind_labels()
    names = Names.of(names, df["defense"])
    acc = _Accuracy(done)
    fig, ax = plt.subplots(figsize=(6.4, 4.6))
    drawn, attacks = [], {}
    for defense, g in poisoned.groupby("defense", sort=False):
        for m in metrics:
            seeds = _per_seed(g, m)
            if len(seeds):
                attacks[m] = max(attacks.get(m, 0), int(g.loc[g[m].notna(), "attack"].nunique()))
                acc.point(ax, seeds["x"], seeds["y"], METRIC_MARKERS.get(m, "s"), names.colours[defense])
                drawn.append(defense)
    if not drawn:
        plt.close(fig)
        return False
    averaged = ", ".join(f"{labels[m]} over {n} attacks" for m, n in attacks.items() if n > 1)
    acc.axes(ax, "attack success", f"{title + ': ' if title else ''}attack success against accuracy"
             + (f"\n(mean of {averaged})" if averaged else ""))
    handles, key = names.legend(drawn)
    handles += [_handle(_GREY, labels[m], METRIC_MARKERS.get(m, "s")) for m in attacks]
    _legend_below(fig, handles + acc.handles(), key, _seeds_title(_seed_counts(poisoned)), ncol=2)
    _save(fig, path, plt)
    return True


def _value_axis(ax, key: str, values: list[float]) -> None:
    """The swept option's axis: a tick at each swept value (no minor labels), log scale when they span ≥ 8×."""
    from matplotlib.ticker import NullLocator

    if len(values) > 2 and values[0] > 0 and values[-1] / values[0] >= 8:
        ax.set_xscale("log")
    ax.set_xticks(values, [f"{v:g}" for v in values])
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xlabel(key)


def plot_asr_vs_sweep(df: pd.DataFrame, out_dir: Path, names: Names | None = None) -> list[Path]:
    """ASR against each swept numeric attack option (e.g. the poison rate); returns the files written."""
    if "sweep" not in df:
        return []
    done = df[(df["status"] == "done") & (df["sweep"] != "") & ~df["sweep"].str.contains(";")]
    labels, names = kind_labels(), Names.of(names, df["defense"])
    written = []
    for key in _ordered(done["sweep"]):
        sub = done[done["sweep"] == key].copy()
        sub["sweep_value"] = pd.to_numeric(sub["sweep_value"], errors="coerce")
        sub = sub[sub["sweep_value"].notna()]
        metrics = [m for m in kind_labels() if m in sub and sub[m].notna().any()]
        if sub.empty or not metrics:
            continue
        plt = _plt()
        groups = _ordered(sub["attack_group"])
        fig, axes = _grid(len(metrics), plt)
        for ax, m in zip(axes, metrics, strict=True):
            for (group, defense), g in sub.groupby(["attack_group", "defense"], sort=False):
                stats = g.groupby("sweep_value")[m].agg(["mean", "std"]).sort_index()
                ax.errorbar(stats.index, stats["mean"] * 100, yerr=stats["std"].fillna(0) * 100, marker="o",
                            color=names.colours[defense], capsize=3,
                            label=names.parts[defense][0] + (f" / {group}" if len(groups) > 1 else ""))
            _value_axis(ax, key, sorted(sub["sweep_value"].unique()))
            ax.set(ylabel=f"{labels[m]} (%), lower is better", ylim=(-3, 103),
                   title=f"{labels[m]} against {key.split('.')[-1]}")
            ax.grid(alpha=0.3)
        _legend_below(fig, axes[0].get_legend_handles_labels()[0], names.legend(sub["defense"])[1],
                      _seeds_title(_seed_counts(sub)))
        path = out_dir / f"asr_vs_{key.split('.')[-1]}.png"
        if path in written:
            path = out_dir / f"asr_vs_{key.replace('.', '_')}.png"
        _save(fig, path, plt)
        written.append(path)
    return written


def _seeds_title(counts: Iterable[int]) -> str:
    n = sorted(set(counts)) or [0]
    return "one seed: no error bars" if n == [1] else _MEAN_SD if n == [0] else \
        f"mean ± std over {n[0]}{'' if len(n) == 1 else f'–{n[-1]}'} seeds"


def _band(ax, x, mean: pd.Series, sd: pd.Series, colour: Any) -> None:
    if sd.notna().any():
        ax.fill_between(x, mean - sd.fillna(0), mean + sd.fillna(0), color=colour, alpha=0.2, lw=0)


def plot_curves(df: pd.DataFrame, results_dir: Path, path: Path, names: Names | None = None) -> bool:
    """Training loss from the runs' log.jsonl, the mean over seeds with a ± std band; False when no log exists."""
    logs = {}
    for run_id in df["run_id"]:
        f = run_log(results_dir, run_id)
        curve = loss_curve(f) if f.is_file() else []
        if len(curve):
            logs[run_id] = curve
    if not logs:
        return False
    plt, names = _plt(), Names.of(names, df["defense"])
    runs = df[df["run_id"].isin(logs)]
    attacks = _ordered(runs["attack"])
    fig, axes = _grid(len(attacks), plt, height=3.4)
    seeds = []
    for ax, attack in zip(axes, attacks, strict=True):
        for defense, g in runs[runs["attack"] == attack].groupby("defense", sort=False):
            stats = pd.concat([logs[i] for i in g["run_id"]]).groupby("step")["loss"].agg(["mean", "std"])
            ax.plot(stats.index, stats["mean"], color=names.colours[defense], lw=1)
            _band(ax, stats.index, stats["mean"], stats["std"], names.colours[defense])
            seeds.append(len(g))
        ax.set(title=attack, xlabel="step", ylabel="training loss")
        ax.grid(alpha=0.3)
    handles, key = names.legend(runs["defense"], "", "-")
    _legend_below(fig, handles, key, _seeds_title(seeds))
    _save(fig, path, plt, dpi=100)
    return True


def _epoch_line(ax, g: pd.DataFrame, column: str, colour: Any, ls: str = "-", bars: bool = False) -> int:
    """One per-epoch share in % against the 1-based epoch: the mean over seeds with a ± std band, or error bars
    (``bars``); returns the number of seeds."""
    stats = g.groupby("epoch")[column].agg(["mean", "std"])
    x, mean, sd = stats.index + 1, 100 * stats["mean"], 100 * stats["std"]
    if bars:
        ax.errorbar(x, mean, yerr=sd.fillna(0), marker="o", ms=3, color=colour, ls=ls, capsize=2, elinewidth=0.8)
    else:
        ax.plot(x, mean, marker="o", ms=3, color=colour, ls=ls)
        _band(ax, x, mean, sd, colour)
    return int(g["seed"].nunique())


def _epoch_axes(ax, title: str, ylabel: str, top: float) -> None:
    from matplotlib.ticker import MaxNLocator

    upper = min(103.0, max(10.0, top * 1.15 + 2))
    ax.set(ylim=(-0.03 * upper, upper), title=title, xlabel="epoch", ylabel=ylabel)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)


def plot_detection(curves: pd.DataFrame, path: Path, names: Names | None = None) -> bool:
    """Share of poisoned pairs kept out of training against epoch (``detection_curves``); False when empty."""
    if curves.empty:
        return False
    plt, names = _plt(), Names.of(names, curves["defense"])
    attacks = _ordered(curves["attack"])
    fig, axes = _grid(len(attacks), plt, height=3.4)
    seeds = []
    for ax, attack in zip(axes, attacks, strict=True):
        for defense, g in curves[curves["attack"] == attack].groupby("defense", sort=False):
            seeds.append(_epoch_line(ax, g, "caught", names.colours[defense]))
        _epoch_axes(ax, attack, "poisoned pairs kept out (%)", 100.0)
    handles, key = names.legend(curves["defense"], "o", "-")
    _legend_below(fig, handles, key, _seeds_title(seeds))
    _save(fig, path, plt, dpi=100)
    return True


#: line style and legend name of each score in the match precision plot (random: one grey line, the chance level)
_SCORE_STYLE = {"used": ("-", "assignment trained on"), "ot": ("--", "OT score's pick"),
                "global": (":", "global score's pick"), "random": ("-.", "random caption (chance)")}


def plot_match_precision(curves: pd.DataFrame, path: Path, value: str = "precision",
                         names: Names | None = None) -> bool:
    """Match precision (or ``value="overlap"``: binding overlap) against epoch (``match_curves``): per attack,
    each defense's assignment (solid), the OT score's (dashed) and the global cosine's (dotted) picks at the
    same matchings, and a random caption (grey dash-dot); False when there is nothing to draw."""
    if value not in curves or curves.empty or curves[value].isna().all():
        return False
    curves = curves[curves[value].notna()]
    plt, names = _plt(), Names.of(names, curves["defense"])
    attacks = _ordered(curves["attack"])
    fig, axes = _grid(len(attacks), plt, height=3.6)
    seeds, scores = [], set()
    for ax, attack in zip(axes, attacks, strict=True):
        sub = curves[curves["attack"] == attack]
        for (defense, score), g in sub[sub["score"] != "random"].groupby(["defense", "score"], sort=False):
            ls = _SCORE_STYLE.get(str(score), ("-", ""))[0]
            seeds.append(_epoch_line(ax, g, value, names.colours[defense], ls, bars=True))
            scores.add(str(score))
        rnd = sub[sub["score"] == "random"]
        if len(rnd):  # the chance level: one line, whichever defense's matching drew it
            _epoch_line(ax, rnd.assign(seed=rnd["run_id"]), value, "0.45", "-.", bars=True)
            scores.add("random")
        top = sub.groupby(["defense", "score", "epoch"])[value].agg(["mean", "std"]).fillna(0).sum(axis=1).max()
        _epoch_axes(ax, attack, "re-assigned captions that\ndescribe the image (%)" if value == "precision"
                    else "binding overlap of image\nand caption (%)", 100 * float(top))
    handles, key = names.legend(curves.loc[curves["score"] != "random", "defense"], "", "-")
    handles += [_handle("0.45" if s == "random" else "0.2", name, "", ls)
                for s, (ls, name) in _SCORE_STYLE.items() if s in scores]
    _legend_below(fig, handles, key, _seeds_title(seeds))
    _save(fig, path, plt, dpi=100)
    return True


def _match_curves(df: pd.DataFrame, results_dir: Path) -> pd.DataFrame:
    """Match curves from the runs' logs, else from ``match_precision.csv`` (a directory committed without
    them), each row named by the label the tables show for its run."""
    from otcbench.bench.layout import MATCH_FILE

    curves = match_curves(df, results_dir)
    if curves.empty and (results_dir / MATCH_FILE).is_file():
        curves = pd.read_csv(results_dir / MATCH_FILE)
    if not curves.empty:
        shown = df.drop_duplicates("run_id").set_index("run_id")["defense"]
        curves = curves.assign(defense=curves["run_id"].map(shown).fillna(curves["defense"]))
    return curves


def write_plots(df: pd.DataFrame, results_dir: str | Path) -> list[Path]:
    """Write every plot the results allow into ``results_dir/plots``; returns the files written.

    Defenses are named by their variant labels (``safeclip (no warm-up, …)``), as in the tables, shortened in
    the legends with a key (:func:`short_labels`), one colour each across the figures.
    """
    from otcbench.bench.layout import recipe_name
    from otcbench.bench.summary import shown_labels

    results_dir = Path(results_dir)
    df = shown_labels(df)
    names = Names(df["defense"])
    out = results_dir / "plots"
    out.mkdir(parents=True, exist_ok=True)
    written = []
    if plot_summary(df, out / "summary.png", recipe_name(results_dir), names):
        written.append(out / "summary.png")
    if plot_asr_vs_accuracy(df, out / "asr_vs_accuracy.png", names):
        written.append(out / "asr_vs_accuracy.png")
    written += plot_asr_vs_sweep(df, out, names)
    if plot_curves(df, results_dir, out / "curves.png", names):
        written.append(out / "curves.png")
    if plot_detection(detection_curves(df, results_dir), out / "detection.png", names):
        written.append(out / "detection.png")
    curves = _match_curves(df, results_dir)
    for value, name in (("precision", "match_precision.png"), ("overlap", "match_overlap.png")):
        if plot_match_precision(curves, out / name, value, names):
            written.append(out / name)
    return written
