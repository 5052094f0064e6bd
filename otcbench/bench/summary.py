"""``summary.csv``: one row per run of a recipe (identity, status, variant label, every metrics.json key).

``summary.csv`` is the source of truth of a results directory: the runner writes it from the run directories,
and every table (:mod:`otcbench.bench.tables`) and plot (:mod:`otcbench.bench.plots`) is rebuilt from it.

Defense rows are shown by their ``variant`` column: the recipe label, followed by what the run's options
change from that defense's registered defaults (``safeclip (no warm-up, …)``,
:func:`otcbench.defenses.labels.row_label`); ``variant_options`` holds every change as ``key=value``. A
summary written before these columns existed gets them from the runs' ``run.json`` or the results
directory's ``recipe.yaml`` (:func:`fill_variants`), else keeps the plain label.

The provenance columns (:data:`PROVENANCE`) say what made each run (its ``run.json``): the code fingerprint,
git commit, otcbench and torch versions, CPU model and class, torch threads, and what the run cost (``wall_s``,
``cpu_s``); ``other_code`` is ``yes`` for a run kept from other code (``--keep-other-code``), whose row the
tables mark ``‡``. :func:`made_by` turns them into the lines under every table.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from otcbench.attacks.kinds import kind_labels
from otcbench.bench.layout import RECIPE_COPY, SUMMARY, read_run_info, run_dir, run_state
from otcbench.errors import UserError

if TYPE_CHECKING:
    from otcbench.bench.plan import Plan

#: The first columns of summary.csv (docs/recipes.md), then bookkeeping, then every metrics.json key.
HEAD = ["run_id", "attack", "defense", "seed", "status", "seconds"]
#: What made each run and what it cost (from ``run.json``'s provenance): bookkeeping, never a table metric.
PROVENANCE = ["code", "commit", "otcbench", "torch", "cpu", "isa", "threads", "wall_s", "cpu_s", "other_code"]
META = ["attack_group", "defense_group", "defense_name", "variant", "variant_options", "sweep", "sweep_value",
        "defense_sweep", "defense_sweep_value", "error", *PROVENANCE]
#: Text columns read as text even when a value looks like a number (a fingerprint or commit of digits only).
_TEXT = ("attack", "defense", "status", "error", "sweep", "defense_sweep", "variant", "variant_options", "code",
         "commit", "otcbench", "torch", "cpu", "isa", "other_code")
#: The mark of a row made by other code in the tables and plots.
OTHER_CODE_MARK = "‡"

#: Accuracy columns (first) and defense columns (after the attack kinds' headline metrics) of the tables.
ACCURACY_NAMES = {
    "zeroshot_top1": "zero-shot top-1",
    "zeroshot_top5": "zero-shot top-5",
    "linear_probe_top1": "linear probe",
}
DEFENSE_NAMES = {
    "detect_precision": "detect precision",
    "detect_recall": "detect recall",
    "detect_auroc": "detect AUROC",
    "poison_repaired": "poisons repaired",
    "clean_repaired": "clean repaired",
}
#: metrics.json keys that hold paths (the checkpoint, the eval and poisoned sets): summary.csv writes them
#: relative to the results directory, as :func:`portable_path` says.
PATH_COLUMNS = ("checkpoint", "eval_data", "poison_data")
#: Numeric metrics.json keys that are bookkeeping, not results (never in tables).
NOT_RESULTS = {"n_test", "n_classes", "linear_probe_c", "eval_seconds"}


def metric_names() -> dict[str, str]:
    """Table columns in this order when present, with their display names: accuracies, each attack kind's
    headline metrics (:attr:`otcbench.attacks.kinds.AttackKind.labels`, kinds in registration order), defenses'."""
    return {**ACCURACY_NAMES, **kind_labels(), **DEFENSE_NAMES}


def lower_is_better(metric: str) -> bool:
    """Attack success and repairing clean pairs are bad; everything else in the tables is good."""
    return metric.startswith("asr") or metric in kind_labels() or metric == "clean_repaired"


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
            **provenance_columns(info.get("provenance")),
            "other_code": "yes" if state == "done" and plan.made_by_other_code(run) else "",
        }
        if state == "done":
            metrics = json.loads((run.dir / "metrics.json").read_text())
            if "seconds" in metrics:  # the evaluation's own time; `seconds` is the whole run's
                metrics["eval_seconds"] = metrics.pop("seconds")
            flat = _flatten(metrics)
            for key in PATH_COLUMNS:
                if isinstance(flat.get(key), str):
                    flat[key] = portable_path(flat[key], plan.out)
            row.update({k: v for k, v in flat.items() if k not in row})
        rows.append(row)
    return rows


def portable_path(value: str, out: Path) -> str:
    """``value`` relative to the results directory ``out``, else to the working directory, when it lies inside
    one of them (posix); otherwise unchanged. A committed summary.csv then names no machine's directories."""
    path = Path(value)
    if not path.is_absolute():
        return value
    for base in (out, Path.cwd()):
        rel = os.path.relpath(path, Path(base).absolute())
        if not rel.startswith(".."):
            return Path(rel).as_posix()
    return value


def provenance_columns(prov: Any) -> dict[str, Any]:
    """The summary's provenance columns of a run's ``run.json`` provenance block (empty without one)."""
    from otcbench.provenance import short_commit

    if not isinstance(prov, dict):
        return {c: "" for c in PROVENANCE if c != "other_code"}
    return {"code": prov.get("code") or "", "commit": short_commit(prov.get("commit"), prov.get("dirty")),
            "otcbench": prov.get("otcbench") or "", "torch": prov.get("torch") or "", "cpu": prov.get("cpu") or "",
            "isa": prov.get("isa") or "", "threads": prov.get("threads") or "",
            "wall_s": "" if prov.get("wall_s") is None else prov["wall_s"],
            "cpu_s": "" if prov.get("cpu_s") is None else prov["cpu_s"]}


def _column_order(columns: list[str]) -> list[str]:
    metrics = [c for c in columns if c not in HEAD and c not in META]
    names = metric_names()
    known = [m for m in names if m in metrics]
    rest = sorted(m for m in metrics if m not in names)
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
        df = pd.read_csv(p, keep_default_na=False, na_values=[""], dtype={c: str for c in _TEXT})
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise UserError(f"{p} is not a readable CSV ({type(err).__name__}); rebuild it with `otcbench run`") from None
    missing = [c for c in HEAD if c not in df.columns]
    if missing:
        raise UserError(f"{p} lacks the columns {', '.join(missing)}; it was not written by `otcbench run`")
    for c in _TEXT:
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

    f = results_dir / RECIPE_COPY
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
        resolved = read_run_info(run_dir(results_dir, str(r["run_id"]))).get("resolved", {}).get("defense", {})
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
    """The summary with each row's ``defense`` replaced by its ``variant`` label where it has one, marked
    ``‡`` when the run was made by other code (what every table and plot shows); idempotent."""
    if "variant" in df:
        variant = df["variant"].map(_text)
        if not ((variant == "").all() or (variant == df["defense"]).all()):
            df = df.copy()
            df["defense"] = variant.where(variant != "", df["defense"])
    if "other_code" in df:
        other = df["other_code"].map(_text) == "yes"
        if other.any():
            labels = df["defense"].astype(str)
            marked = labels.str.endswith(" " + OTHER_CODE_MARK)
            df = df.copy()
            df["defense"] = labels.where(~other | marked, labels + " " + OTHER_CODE_MARK)
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


def _counts(done: pd.DataFrame, column: str) -> dict[str, int]:
    """How many finished runs hold each value of ``column`` (most first, ties in row order; "not recorded"
    for none)."""
    from collections import Counter

    if column not in done:
        return {"not recorded": len(done)}
    values = [_text(int(v) if isinstance(v, float) and v.is_integer() else v) or "not recorded" for v in done[column]]
    return dict(Counter(values).most_common())


def provenance_counts(df: pd.DataFrame) -> dict[str, Any]:
    """Finished runs by code fingerprint, commit, CPU model, CPU class and thread count (results.json's
    ``runs`` block)."""
    done = df[df["status"] == "done"]
    return {"done": len(done), **{c: _counts(done, c) for c in ("code", "commit", "cpu", "isa", "threads")}}


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def made_by(df: pd.DataFrame) -> list[str]:
    """The lines under a table: what made its finished runs, e.g. ``made by otcbench 0.1.0 at 1a2b3c4 (code
    9f8e7d6c5b4a), torch 2.5.1, Intel Xeon (AVX-512), 1 thread per run, 21 runs``; then a warning when they
    mix code fingerprints, CPU classes or thread counts (their numbers then differ in more than the seed),
    and the footnote of the ``‡`` rows. Empty when no run has finished."""
    done = df[df["status"] == "done"] if "status" in df else df
    if done.empty:
        return []
    if set(_counts(done, "code")) == {"not recorded"}:
        return [f"made by: not recorded (summary.csv has no provenance for its {_plural(len(done), 'run')})"]

    def shown(column: str) -> str:
        return " / ".join(_counts(done, column))

    commit = "" if set(_counts(done, "commit")) == {"not recorded"} else f" at {shown('commit')}"
    cpus = " / ".join(dict.fromkeys(f"{_text(c) or 'CPU not recorded'} ({_text(i) or 'class not recorded'})"
                                    for c, i in zip(done.get("cpu", [""] * len(done)),
                                                    done.get("isa", [""] * len(done)), strict=True)))
    threads = _counts(done, "threads")
    per_run = f"{shown('threads')} thread{'' if list(threads) == ['1'] else 's'} per run"
    lines = [f"made by otcbench {shown('otcbench')}{commit} (code {shown('code')}), torch {shown('torch')}, "
             f"{cpus}, {per_run}, {_plural(len(done), 'run')}"]
    mixed = []
    for what, counts in (("code fingerprints", _counts(done, "code")), ("CPU classes", _counts(done, "isa")),
                         ("thread counts", threads)):
        if len(counts) > 1:
            each = ", ".join(f"{value}: {_plural(n, 'run')}" for value, n in counts.items())
            mixed.append(f"{len(counts)} {what} ({each})")
    if mixed:
        lines.append(f"**warning: mixed provenance**: {'; '.join(mixed)}. Runs of different code, CPU class or "
                     "thread count differ in more than their seed; compare rows with care (summary.csv: code, "
                     "isa, threads).")
    if "other_code" in df and (df["other_code"].map(_text) == "yes").any():
        lines.append(f"{OTHER_CODE_MARK} made by other code than the grid's (or starting from a run that was), "
                     "kept with `--keep-other-code` (summary.csv: code, other_code).")
    return lines
