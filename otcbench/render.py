"""Every rich table the command line prints, built from the plain values the library returns.

The library computes (dicts, dataclasses, registries); this module only lays them out, so that a command is
parse → call → ``console.print(render.…)``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from rich import box
from rich.markup import escape
from rich.table import Table

from otcbench.registry import Registry, option_rows


def _fmt_counts(counts: dict[str, int], limit: int = 12) -> str:
    items = list(counts.items())
    txt = ", ".join(f"{k} {v}" for k, v in items[:limit])
    return txt + (f", … (+{len(items) - limit})" if len(items) > limit else "")


# --------------------------------------------------------------------------------------------------
# data


def _labels_cell(stats: dict) -> str:
    if not stats.get("labels"):
        return "none"
    lab = _fmt_counts(stats["labels"])
    return lab + (f"; unlabelled {stats['unlabelled']}" if stats.get("unlabelled") else "")


def _caption_cell(stats: dict) -> str:
    w, c = stats.get("caption_words", {}), stats.get("caption_chars", {})
    cap = (f"words mean {w.get('mean', 0)} (min {w.get('min', 0)}, max {w.get('max', 0)}); "
           f"chars mean {c.get('mean', 0)} (min {c.get('min', 0)}, max {c.get('max', 0)})")
    return cap + (f"; {stats['empty_captions']} empty" if stats.get("empty_captions") else "")


def _image_cell(stats: dict) -> str:
    size = stats.get("image_size") or ", ".join(stats.get("image_sizes_sampled", {})) or "-"
    if stats.get("image_storage"):
        size += f"  (stored as {stats['image_storage']})"
    if stats.get("unreadable_sampled"):
        size += f"  [red]{stats['unreadable_sampled']} unreadable[/red]"
    return size


def _fingerprint_cell(stats: dict) -> str:
    fp = stats.get("fingerprint") or "-"
    ok = stats.get("fingerprint_ok")
    if ok is True:
        fp += "  [green]ok[/green]"
    elif ok is False:
        fp += f"  [red]MISMATCH (data is {stats.get('fingerprint_actual')}: modified after writing)[/red]"
    return fp


def _created_by_cell(stats: dict) -> str:
    made = stats.get("created_by") or {}
    if not made:
        return "unknown"
    parts = [str(made.get("command", "?"))]
    if "seed" in made:
        parts.append(f"seed {made['seed']}")
    opts = made.get("options")
    if isinstance(opts, dict) and opts:
        parts.append(", ".join(f"{k}={v}" for k, v in opts.items()))
    return "; ".join(parts)


def stats_table(stats: dict) -> Table:
    """The stats of :func:`otcbench.data.show.show_dataset` as a two-column table (``data show``)."""
    t = Table(title=f"{stats.get('name', '')} ({stats.get('kind', '')})", show_header=False, title_style="bold")
    t.add_column("stat", style="cyan", no_wrap=True)
    t.add_column("value", overflow="fold")
    t.add_row("path", str(stats.get("path", "")))
    rows = f"{stats.get('rows', 0)}"
    if stats.get("splits"):
        rows += "  (" + ", ".join(f"{k} {v}" for k, v in stats["splits"].items()) + ")"
    t.add_row("rows", rows)
    if stats.get("poisoned"):
        t.add_row("poisoned", f"[red]{stats['poisoned']}[/red]  ({_fmt_counts(stats['poison_by_attack'])})")
    else:
        t.add_row("poisoned", "0")
    if stats.get("poison_manifest"):
        t.add_row("poison manifest", ", ".join(f"{k}={v}" for k, v in stats["poison_manifest"].items()))
    t.add_row("labels", _labels_cell(stats))
    t.add_row("classes / templates", f"{stats.get('classnames', 0)} / {stats.get('templates', 0)}")
    t.add_row("caption length", _caption_cell(stats))
    t.add_row("image size", _image_cell(stats))
    t.add_row("fingerprint", _fingerprint_cell(stats))
    t.add_row("created by", _created_by_cell(stats))
    if stats.get("eval_set"):
        t.add_row("eval set", str(stats["eval_set"]))
    if stats.get("png"):
        t.add_row("samples", f"{len(stats.get('samples', []))} "
                  f"({stats.get('samples_poisoned', 0)} poisoned) → {stats['png']}")
    return t


def skipped_table(skipped: dict[str, int], examples: dict[str, list[str]]) -> Table:
    """``data import``: the records skipped, per reason, with a first example."""
    table = Table(title=f"skipped {sum(skipped.values())} records")
    for col in ("reason", "count", "first example"):
        table.add_column(col)
    for reason, count in sorted(skipped.items(), key=lambda kv: -kv[1]):
        table.add_row(reason, str(count), (examples.get(reason) or [""])[0])
    return table


def poison_table(out: Any, meta: Any) -> Table:
    """``poison``: one row per attack of a poisoned dataset's manifest (``meta``: its DatasetMeta); the details
    are each attack kind's own line about its entry."""
    from otcbench.attacks.kinds import attack_kind  # the attack machinery only once a poison table is shown

    table = Table(title=f"poisoned {out} ({meta.counts['pairs']} pairs, fingerprint {meta.fingerprint})")
    for col in ("attack", "kind", "poisoned rows", "details"):
        table.add_column(col)
    for a in meta.poison["attacks"]:
        details = attack_kind(a["kind"], f"attack {a['name']!r}").describe(a)
        table.add_row(a["name"], a["kind"], str(a["n_poisoned"]), details)
    return table


# --------------------------------------------------------------------------------------------------
# evaluation


def metrics_table(metrics: dict[str, Any]) -> Table:
    """``eval``: every scalar metric."""
    table = Table(title=f"metrics — {metrics['model']}", show_header=True)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for k, v in metrics.items():
        if isinstance(v, float):
            table.add_row(k, f"{v:.4f}")
        elif isinstance(v, int):
            table.add_row(k, str(v))
    return table


def asr_table(asr: dict[str, dict[str, Any]]) -> Table:
    """``eval --asr``: attack success per attack of the poisoned dataset."""
    at = Table(title="attack success")
    for col in ("attack", "kind", "ASR (zero-shot)", "ASR (probe)", "n", "no-trigger rate"):
        at.add_column(col)
    for name, r in asr.items():
        probe = f"{r['asr_probe']:.3f}" if "asr_probe" in r else "-"
        base = f"{r['clean_rate']:.3f}" if "clean_rate" in r else "-"
        at.add_row(name, r["kind"], f"{r['asr']:.3f}", probe, str(r["n"]), base)
    return at


# --------------------------------------------------------------------------------------------------
# listings


def models_table(summaries: Sequence[dict[str, Any]], title: str) -> Table:
    """``list models``: one row per :func:`otcbench.models.model_summary`."""
    table = Table(title=title)
    for col in ("name", "family", "image", "embed", "context", "params (M)"):
        table.add_column(col)
    for s in summaries:
        params = f"{s['params_m']:.2f}" if s.get("params_m") else "-"
        img = s["image_size"]
        table.add_row(s["name"], s["family"], f"{img[0]}x{img[1]}", str(s["embed_dim"]), str(s["context_length"]),
                      params)
    return table


def registry_table(registry: Registry, title: str, *, with_kind: bool = False,
                   note: Callable[[type], str] | None = None) -> Table:
    """``list defenses`` / ``list attacks``: per registered method a row with its first doc line (and
    ``note(cls)`` under it), then a row per option: dotted key, default and the option's own description."""
    table = Table(title=title)
    for col in ("name", *(("kind",) if with_kind else ()), "option", "default", "description"):
        table.add_column(col, overflow="fold")
    for name in registry.names():
        cls = registry.get(name)
        doc = (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""
        extra = note(cls) if note is not None else ""
        kind = (cls.kind,) if with_kind else ()  # type: ignore[attr-defined]
        table.add_row(name, *kind, "", "", f"[bold]{escape(doc)}[/bold]" + (f"\n{escape(extra)}" if extra else ""))
        for key, default, description in option_rows(cls.Options):  # type: ignore[attr-defined]
            table.add_row("", *(("",) if with_kind else ()), key, escape(repr(default)),
                          escape(" ".join(description.split())))
        table.add_section()
    return table


def formats_table(importers: Registry, common: set[str]) -> Table:
    """``list formats``: per import format what it makes, its source layout and its own options."""
    table = Table(title="import formats (options common to all: see `otcbench data import --help`)")
    for col in ("format", "makes", "source", "own options"):
        table.add_column(col)
    for name in importers.names():
        cls = importers.get(name)
        own = [f"{k}={f.get_default()!r}" for k, f in cls.Options.model_fields.items()  # type: ignore[attr-defined]
               if k not in common]
        table.add_row(name, "eval set" if cls.kind == "eval" else "pairs", cls.layout,  # type: ignore[attr-defined]
                      "\n".join(own) or "-")
    return table


def recipes_table(recipes: Sequence[tuple[str, int, list[str], str]], where: str) -> Table:
    """``list recipes``: (name, runs, needs, description) per shipped recipe."""
    table = Table(title=f"recipes ({where})")
    for col in ("name", "runs", "needs", "description"):
        table.add_column(col)
    for name, runs, needs, description in recipes:
        table.add_row(name, str(runs), "\n".join(needs), description)
    return table


# --------------------------------------------------------------------------------------------------
# grids and benchmarks


def plan_table(plan: Any, jobs: int) -> Table:
    """``run --dry-run``: every run of a plan with its state (``other code`` and ``parent re-run``: re-run from
    scratch; ``done (other code, kept)`` with ``--keep-other-code``)."""
    table = Table(title=f"{plan.recipe.name}: {len(plan.runs)} runs, {jobs} at a time → {plan.out}",
                  caption=f"code fingerprint {plan.code}")
    for col in ("run_id", "attack", "defense", "seed", "starts from", "state"):
        table.add_column(col)
    for r in plan.runs:
        state = plan.state(r)
        if state == "done" and plan.made_by_other_code(r):
            state = "done (other code, kept)"
        table.add_row(r.run_id, r.attack.label, r.defense.label, str(r.seed), r.parent or "", state)
    return table


def train_bench_table(rows: Sequence[dict[str, Any]], model: str, batch_size: int) -> Table:
    """``bench train``: step time, throughput and data-side time per defense."""
    r0 = rows[0]
    nw = r0["num_workers"]
    streamed = f", streamed ({nw} worker{'' if nw == 1 else 's'})" if r0["data_mode"] == "stream" else ""
    table = Table(title=f"bench train: {model}, batch {batch_size}, {r0['device']} {r0['amp']}{streamed}")
    for col in ("defense", "step ms", "images/s", "data-side s/epoch", "epoch s", "× none (epoch)", "× none (step)"):
        table.add_column(col, justify="left" if col == "defense" else "right")
    for r in rows:
        table.add_row(r["defense"], f"{r['step_ms']:.1f}", f"{r['images_per_s']:.0f}", f"{r['data_side_s']:.2f}",
                      f"{r['epoch_s']:.2f}", "" if r["epoch_ratio"] is None else f"{r['epoch_ratio']:.2f}",
                      "" if r["step_ratio"] is None else f"{r['step_ratio']:.2f}")
    return table


def _rate(v: float | None) -> str:
    if v is None:
        return "-"
    for unit, scale in (("M", 1e6), ("k", 1e3)):
        if v >= scale:
            return f"{v / scale:.3g}{unit}"
    return f"{v:.3g}"


def _speedup(v: float | None) -> str:
    return "-" if v is None else f"{v:.3g}×"


def ot_bench_table(rows: Sequence[dict[str, Any]]) -> Table:
    """``bench ot``: pairs/s of ours, POT's batch solver and POT's loop, speedups, max |distance difference|."""
    multi = len({r["device"] for r in rows}) > 1
    devices = "/".join(sorted({r["device"] for r in rows}))
    table = Table(title=f"bench ot ({devices}): pairs/s, higher is better", box=box.SIMPLE_HEAD, pad_edge=False)
    cols = (("device",) if multi else ()) + ("n×m", "batch", "dim", "ours", "ours\ne2e", "POT\nbatch", "POT\nloop*",
                                             "vs\nbatch", "vs\nloop", "max\n|Δd|")
    for col in cols:
        table.add_column(col, justify="left" if col in ("device", "n×m") else "right", no_wrap=True)
    for r in rows:
        table.add_row(*((r["device"],) if multi else ()), f"{r['n']}×{r['m']}", str(r["batch"]), str(r["dim"]),
                      _rate(r["ours_pairs_per_s"]), _rate(r["ours_e2e_pairs_per_s"]),
                      _rate(r["pot_batch_pairs_per_s"]), _rate(r["pot_loop_pairs_per_s"]),
                      _speedup(r["speedup_vs_batch"]), _speedup(r["speedup_vs_loop"]), f"{r['max_abs_diff']:.0e}")
    return table


# --------------------------------------------------------------------------------------------------
# defend


def _value(v: Any) -> str:
    """A report value in a cell: floats to 4 decimals, a missing one as "-"."""
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4f}"
    return str(v)


def defend_table(report: dict[str, Any]) -> Table:
    """``defend``: the report's counts, detection metrics and one AUROC (and precision at the poison count) per
    score, from :func:`otcbench.defenses.defend.run_defend`'s report."""
    table = Table(title=f"defend — {report['defense']} with {report['model']} on {report['n']} pairs")
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_column("", style="dim")
    table.add_row("flagged pairs", str(report["n_flagged"]), "the defense acted on them")
    table.add_row("re-paired pairs", str(report["n_repaired"]), "caption replaced")
    table.add_row("kept pairs", str(report["n_keep"]), "trained on with the CLIP loss")
    if "detect_n_poison" in report:
        table.add_row("poisoned pairs", str(report["detect_n_poison"]), "ground truth")
        table.add_row("detect precision", _value(report["detect_precision"]), "poisoned among flagged")
        table.add_row("detect recall", _value(report["detect_recall"]), "flagged among poisoned")
        table.add_row("poison repaired", _value(report["poison_repaired"]), "of poisoned pairs")
        table.add_row("clean repaired", _value(report["clean_repaired"]), "of clean pairs")
        for i, name in enumerate(report["scores"]):
            note = "the defense's own score" if i == 0 else "ablation, side by side"
            if name in {d for d, _ in report.get("detectors", [])}:
                note = "detector on the model's embeddings"
            table.add_row(f"AUROC ({name} score)", _value(report.get(f"detect_auroc_{name}")), note)
            table.add_row(f"precision@poisons ({name})", _value(report.get(f"detect_precision_at_n_{name}")),
                          "poisoned among the lowest-scored")
    else:
        table.add_row("detection", "-", "the dataset has no poisoned rows")
    return table
