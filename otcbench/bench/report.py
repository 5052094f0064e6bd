"""Results of a recipe: ``summary.csv`` (one row per run), ``table.md`` / ``table.tex`` and plots.

``summary.csv`` is the source of truth: the runner writes it from the run directories, and every table
and plot is rebuilt from it alone (plus each run's ``log.jsonl`` for training curves), so
``otcbench report DIR`` reproduces exactly what ``otcbench run`` wrote.

Tables: one row per (attack, defense) in recipe order, one column per metric, mean ± sample std over
the seeds that finished, in percent. Within each attack, the best value of each column is bold —
lowest for attack success rates (↓), highest for accuracies and detection scores (↑). ``table.md`` then
holds the same results at a glance: one row per attack and ASR metric, one column per defense.

Defense rows are shown by their ``variant`` column: the recipe label, followed by what the run's options
change from that defense's registered defaults (``safeclip (no warm-up, …)``,
:func:`otcbench.defenses.labels.row_label`); ``variant_options`` holds every change as ``key=value``. A
summary written before these columns existed gets them from the runs' ``run.json`` or the results
directory's ``recipe.yaml`` when ``write_report`` re-renders it, else keeps the plain label.
"""

from __future__ import annotations

import json
import math
from collections.abc import Set as AbstractSet
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from otcbench.errors import UserError

if TYPE_CHECKING:
    from otcbench.bench.runner import Plan

SUMMARY = "summary.csv"
#: The first columns of summary.csv (DESIGN §9), then bookkeeping, then every metrics.json key.
HEAD = ["run_id", "attack", "defense", "seed", "status", "seconds"]
META = ["attack_group", "defense_group", "defense_name", "variant", "variant_options", "sweep", "sweep_value",
        "defense_sweep", "defense_sweep_value", "error"]

#: Table columns in this order when present; their display names.
METRIC_NAMES = {
    "zeroshot_top1": "zero-shot top-1",
    "zeroshot_top5": "zero-shot top-5",
    "linear_probe_top1": "linear probe",
    "asr_targeted": "ASR targeted",
    "asr_backdoor": "ASR backdoor",
    "asr_backdoor_probe": "ASR backdoor (probe)",
    "detect_precision": "detect precision",
    "detect_recall": "detect recall",
    "detect_auroc": "detect AUROC",
    "poison_repaired": "poisons repaired",
    "clean_repaired": "clean repaired",
}
#: Numeric metrics.json keys that are bookkeeping, not results (never in tables).
NOT_RESULTS = {"n_test", "n_classes", "linear_probe_c", "eval_seconds"}


def lower_is_better(metric: str) -> bool:
    """Attack success and repairing clean pairs are bad; everything else in the tables is good."""
    return metric.startswith("asr") or metric == "clean_repaired"


# --------------------------------------------------------------------------------------------------
# summary.csv


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        elif isinstance(v, (str, int, float, bool)) or v is None:
            out[key] = v
    return out


def _sweep_columns(point: list[tuple[str, Any]]) -> tuple[str, Any]:
    if not point:
        return "", ""
    if len(point) == 1:
        return point[0]
    return ";".join(k for k, _ in point), ";".join(str(v) for _, v in point)


def _swept_options(keys: list[str]) -> list[str]:
    """The option keys of a defense sweep (``options.threshold`` → ``threshold``; ``train.*`` keys are no options)."""
    return [k[len("options."):] for k in keys if k.startswith("options.")]


def variant_columns(label: str, name: str, options: dict[str, Any], swept: list[str]) -> dict[str, str]:
    """``variant`` (the row label tables and plots show) and ``variant_options`` (every changed option as
    ``key=value``, ``; ``-separated) of a run of defense ``name`` with resolved ``options``."""
    from otcbench.defenses.labels import format_value, option_changes, row_label

    changes = option_changes(name, options)
    return {"variant": row_label(label, name, options, swept),
            "variant_options": "; ".join(f"{k}={format_value(v)}" for k, v in changes)}


def summary_rows(plan: Plan) -> list[dict[str, Any]]:
    """One row per planned run: identity, status, seconds, variant label, and every metrics.json key (flattened)."""
    from otcbench.bench.runner import read_run_info, run_state

    rows = []
    for run in plan.runs:
        info = read_run_info(run.dir)
        state = run_state(run.dir)
        status = "done" if state == "done" else info.get("status", "pending") if run.dir.exists() else "pending"
        if status == "running":
            status = "interrupted"
        sweep, sweep_value = _sweep_columns(run.attack.point)
        dsweep, dsweep_value = _sweep_columns(run.defense.point)
        row: dict[str, Any] = {
            "run_id": run.run_id, "attack": run.attack.label, "defense": run.defense.label, "seed": run.seed,
            "status": status, "seconds": info.get("seconds", ""),
            "attack_group": run.attack.spec.base_label, "defense_group": run.defense.spec.base_label,
            "defense_name": run.defense.spec.name,
            **variant_columns(run.defense.label, run.defense.spec.name, run.resolved["defense"]["options"],
                              _swept_options([k for k, _ in run.defense.point])),
            "sweep": sweep, "sweep_value": sweep_value, "defense_sweep": dsweep, "defense_sweep_value": dsweep_value,
            "error": info.get("error", "") if status == "failed" else "",
        }
        if state == "done":
            metrics = json.loads((run.dir / "metrics.json").read_text())
            if "seconds" in metrics:  # the evaluation's own time; `seconds` is the whole run's
                metrics["eval_seconds"] = metrics.pop("seconds")
            row.update({k: v for k, v in _flatten(metrics).items() if k not in row})
        rows.append(row)
    return rows


def _column_order(columns: list[str]) -> list[str]:
    metrics = [c for c in columns if c not in HEAD and c not in META]
    known = [m for m in METRIC_NAMES if m in metrics]
    rest = sorted(m for m in metrics if m not in METRIC_NAMES)
    return HEAD + META + known + rest


def write_summary(rows: list[dict[str, Any]], path: Path) -> pd.DataFrame:
    """Write ``summary.csv`` atomically; returns it as read back (what tables are built from)."""
    from otcbench.train.checkpoint import atomic_write_text

    cols: list[str] = []
    for r in rows:
        cols.extend(k for k in r if k not in cols)
    df = pd.DataFrame(rows, columns=_column_order(cols) if rows else HEAD + META)
    atomic_write_text(path, df.to_csv(index=False))
    return read_summary(path)


def read_summary(path: str | Path) -> pd.DataFrame:
    """Read a ``summary.csv`` (a file, or a results directory holding one)."""
    p = Path(path)
    if p.is_dir():
        p = p / SUMMARY
    if not p.is_file():
        raise UserError(f"{p} does not exist; pass a results directory written by `otcbench run`")
    try:
        df = pd.read_csv(p, keep_default_na=False, na_values=[""])
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise UserError(f"{p} is not a readable CSV ({type(err).__name__}); rebuild it with `otcbench run`") from None
    missing = [c for c in HEAD if c not in df.columns]
    if missing:
        raise UserError(f"{p} lacks the columns {', '.join(missing)}; it was not written by `otcbench run`")
    for c in ("attack", "defense", "status", "error", "sweep", "defense_sweep", "variant", "variant_options"):
        if c in df.columns:
            df[c] = df[c].astype(object).where(df[c].notna(), "").astype(str)
    return df


def _text(v: Any) -> str:
    return "" if v is None or (isinstance(v, float) and math.isnan(v)) else str(v)


def _recipe_defenses(results_dir: Path) -> dict[str, tuple[str, dict[str, Any], list[str]]]:
    """Defense label → (name, options, swept option keys) from a results directory's ``recipe.yaml``
    (empty when it is missing or no longer valid)."""
    from otcbench.bench.recipe import expand_defenses, parse_recipe
    from otcbench.config import load_yaml

    f = results_dir / "recipe.yaml"
    if not f.is_file():
        return {}
    try:
        recipe = parse_recipe(load_yaml(f), where=str(f))
        return {d.label: (d.spec.name, d.options, _swept_options([k for k, _ in d.point]))
                for d in expand_defenses(recipe)}
    except UserError:
        return {}


def fill_variants(df: pd.DataFrame, results_dir: str | Path) -> pd.DataFrame:
    """A summary with ``variant`` / ``variant_options`` filled where they are empty (a summary.csv older
    than those columns): from each run's ``run.json`` (its resolved defense options), else from the
    results directory's ``recipe.yaml``; a row neither describes (or whose options no longer validate)
    keeps them empty, i.e. its plain label."""
    from otcbench.bench.runner import read_run_info

    df = df.copy()
    for c in ("variant", "variant_options"):
        df[c] = df[c].map(_text) if c in df else ""
    if (df["variant"] != "").all():
        return df
    results_dir = Path(results_dir)
    entries: dict[str, tuple[str, dict[str, Any], list[str]]] | None = None
    for i, r in df.iterrows():
        if r["variant"]:
            continue
        label = str(r["defense"])
        name = _text(r.get("defense_name")) or label
        resolved = read_run_info(results_dir / "runs" / str(r["run_id"])).get("resolved", {}).get("defense", {})
        if isinstance(resolved, dict) and resolved.get("name") == name and isinstance(resolved.get("options"), dict):
            options, swept = resolved["options"], _swept_options(_text(r.get("defense_sweep")).split(";"))
        else:
            if entries is None:
                entries = _recipe_defenses(results_dir)
            if label not in entries or entries[label][0] != name:
                continue
            _, options, swept = entries[label]
        try:
            cols = variant_columns(label, name, options, swept)
        except UserError:  # a defense or option that is not registered any more: the plain label
            continue
        df.loc[i, "variant"], df.loc[i, "variant_options"] = cols["variant"], cols["variant_options"]
    return df


def shown_labels(df: pd.DataFrame) -> pd.DataFrame:
    """The summary with each row's ``defense`` replaced by its ``variant`` label where it has one (what every
    table and plot shows); idempotent."""
    if "variant" not in df:
        return df
    variant = df["variant"].map(_text)
    if (variant == "").all() or (variant == df["defense"]).all():
        return df
    df = df.copy()
    df["defense"] = variant.where(variant != "", df["defense"])
    return df


def variant_notes(df: pd.DataFrame) -> list[str]:
    """One line per variant label: every option it changes (``key=value``), for the note under a table."""
    if "variant_options" not in df or "variant" not in df:
        return []
    seen: dict[str, str] = {}
    for v, opts in zip(df["variant"].map(_text), df["variant_options"].map(_text), strict=True):
        if v and opts and v not in seen:
            seen[v] = opts
    return [f"- {v}: {opts}" for v, opts in seen.items()]


# --------------------------------------------------------------------------------------------------
# tables


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
    if metric in METRIC_NAMES:
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
        name = METRIC_NAMES.get(m, m)
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


#: The ASR metrics the overview shows, one row each, for the attacks that have them.
HEADLINE_ASR = ("asr_targeted", "asr_backdoor")


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
        shown = [m for m in HEADLINE_ASR if m in metrics and g[f"{m}_mean"].notna().any()]
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
            name = METRIC_NAMES.get(metric, metric) + (" ↓" if lower_is_better(metric) else " ↑")
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


# --------------------------------------------------------------------------------------------------
# everything at once


def write_report(out: str | Path, *, plan: Plan | None = None, plots: bool = True) -> str:
    """(Re)write summary.csv (from the run directories when ``plan`` is given), table.md, table.tex and,
    with ``plots``, the PNGs; returns the markdown table."""
    from otcbench.train.checkpoint import atomic_write_text

    out = Path(out)
    title = ""
    if plan is not None:
        df = write_summary(summary_rows(plan), out / SUMMARY)
        title = plan.recipe.name
    else:
        df = fill_variants(read_summary(out), out)
        title = _recipe_name(out)
    md = markdown_table(df, title)
    overview = overview_table(df, title)
    if overview:
        md += "\n" + overview
    matching = match_precision_table(_match_curves(df, out))
    if matching:
        md += "\n" + matching
    atomic_write_text(out / "table.md", md)
    atomic_write_text(out / "table.tex", latex_table(df, title))
    if plots:
        from otcbench.bench.plots import write_plots

        write_plots(df, out)
    from otcbench.bench.detector_table import write_detector_report

    write_detector_report(out, plots=plots)  # detectors.md from detectors.csv (`otcbench detect`), if any
    return md


MATCH_FILE = "match_precision.csv"


def _match_curves(df: pd.DataFrame, out: Path) -> pd.DataFrame:
    """Match precision per matching from the runs' logs, kept in ``match_precision.csv`` so that a results
    directory committed without its run logs still reports it."""
    from otcbench.bench.logs import MATCH_COLUMNS, match_curves
    from otcbench.train.checkpoint import atomic_write_text

    curves = match_curves(df, out)
    path = out / MATCH_FILE
    if not curves.empty:
        atomic_write_text(path, curves.to_csv(index=False))
        return curves
    if path.is_file():
        return pd.read_csv(path)
    return pd.DataFrame(columns=MATCH_COLUMNS)


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


def _recipe_name(out: Path) -> str:
    from otcbench.bench.runner import MARKER

    try:
        return str(json.loads((out / MARKER).read_text()).get("recipe", ""))
    except (OSError, json.JSONDecodeError):
        return ""
