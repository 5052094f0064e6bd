"""``otcbench data show``: statistics of a pair dataset or eval set and a PNG grid of samples.

The grid shows each sampled image enlarged (nearest-neighbour, so pixels stay visible) with its caption
wrapped underneath; poisoned rows get a thick red frame and a ``POISON: <attack>`` tag, and when a dataset
has poisoned rows some of them (up to a quarter of the grid) are always among the samples.

The PNG is never written inside the dataset directory: that directory's content is fingerprinted, and a
stray file there would look like tampering. The default is ``./<dataset-name>-samples.png``.
"""

from __future__ import annotations

import hashlib
import math
import os
import textwrap
from collections import Counter
from pathlib import Path
from typing import Any

import datasets
import numpy as np

from otcbench.data.format import (
    EVAL_SPLITS,
    DatasetMeta,
    decode_image,
    fingerprint_dataset,
    load_eval_set,
    load_pair_dataset,
    read_meta,
)
from otcbench.errors import UserError
from otcbench.render import stats_table as render_stats_table  # its historical import path

#: Grid layout: columns of the sample grid and the size of one cell in inches.
GRID_COLUMNS = 8
CELL_W, CELL_H = 1.9, 2.6  # one grid cell: title, image, caption
IMAGE_IN, TITLE_H = 1.7, 0.34
HEADER_H, MARGIN = 0.5, 0.08
CAPTION_WIDTH = 26  # characters per wrapped caption line
CAPTION_LINES = 4
POISON_COLOUR = "#d62728"


def _length_stats(values: list[int]) -> dict[str, float]:
    if not values:
        return {"mean": 0.0, "min": 0, "max": 0}
    return {"mean": round(float(np.mean(values)), 2), "min": int(min(values)), "max": int(max(values))}


def _wrap_caption(caption: str) -> str:
    """The caption as at most :data:`CAPTION_LINES` lines, truncated with an ellipsis."""
    text = " ".join(caption.split()) or "(empty caption)"
    lines = textwrap.wrap(text, CAPTION_WIDTH, break_long_words=True, break_on_hyphens=False)
    if len(lines) > CAPTION_LINES:
        lines = lines[:CAPTION_LINES]
        last = lines[-1]
        lines[-1] = (last[: CAPTION_WIDTH - 1] if len(last) >= CAPTION_WIDTH else last) + "…"
    return "\n".join(lines)


def _resolve_png(dataset_dir: Path, out_png: Path | None) -> Path:
    """Where the PNG goes: ``out_png`` (a file, or a directory to put the default name in) or ``./``."""
    default_name = f"{dataset_dir.resolve().name}-samples.png"
    if out_png is None:
        target = Path.cwd() / default_name
    else:
        target = Path(out_png)
        if target.is_dir():
            target = target / default_name
    root = dataset_dir.resolve()
    resolved = target.resolve()
    if resolved == root or root in resolved.parents:
        raise UserError(
            f"refusing to write the sample grid {target} inside the dataset directory {dataset_dir} "
            "(its content is fingerprinted); pass an output path outside it, e.g. --out samples.png"
        )
    return target


def _load(path: Path) -> tuple[DatasetMeta, list[tuple[str, datasets.Dataset]]]:
    """The dataset's metadata and its splits (one ``pairs`` split for a pair dataset)."""
    meta = read_meta(path)
    if meta.kind == "pairs":
        pd = load_pair_dataset(path, verify=False)  # the fingerprint is checked (and reported) below
        return pd.meta, [("pairs", pd.ds)]
    ev = load_eval_set(path)
    names = [s for s in EVAL_SPLITS if s in ev.splits] + [s for s in ev.splits if s not in EVAL_SPLITS]
    return ev.meta, [(s, ev.splits[s]) for s in names]


def _fingerprint(meta: DatasetMeta, parts: list[tuple[str, datasets.Dataset]]) -> str:
    """Recompute the fingerprint the way :mod:`otcbench.data.format` wrote it."""
    if meta.kind == "pairs":
        return fingerprint_dataset(parts[0][1])
    h = hashlib.sha256()
    for name, ds in parts:
        if name in EVAL_SPLITS:
            h.update(fingerprint_dataset(ds).encode())
    return h.hexdigest()[:32]


def _choose_samples(poison: list[str], n: int, rng: np.random.Generator) -> list[int]:
    """``n`` row indices (global over splits), with up to a quarter of them poisoned when any are."""
    total = len(poison)
    n = min(n, total)
    poisoned = np.flatnonzero(np.asarray([bool(p) for p in poison], dtype=bool))
    k_poison = min(len(poisoned), max(1, n // 4)) if len(poisoned) else 0
    chosen_p = rng.choice(poisoned, size=k_poison, replace=False) if k_poison else np.empty(0, dtype=int)
    clean = np.setdiff1d(np.arange(total), poisoned, assume_unique=True)
    k_clean = min(len(clean), n - k_poison)
    chosen_c = rng.choice(clean, size=k_clean, replace=False) if k_clean else np.empty(0, dtype=int)
    chosen = list(chosen_p) + list(chosen_c)
    if len(chosen) < n:  # not enough clean rows: fill with more poisoned ones
        rest = np.setdiff1d(poisoned, chosen_p, assume_unique=True)
        chosen += list(rng.choice(rest, size=n - len(chosen), replace=False))
    return sorted(int(i) for i in chosen)


def _split_of(index: int, offsets: list[int]) -> int:
    """Which split a global row index falls in."""
    s = 0
    while s + 1 < len(offsets) and index >= offsets[s + 1]:
        s += 1
    return s


def _read_rows(ds: datasets.Dataset, rows: list[int]) -> list[dict[str, Any]]:
    """Raw (undecoded) cells of ``rows``: image ``{"bytes", "path"}`` dicts, captions, labels, flags."""
    if not rows:
        return []
    table = ds.with_format("arrow").select(rows)[:]
    cols = {name: table.column(name).to_pylist() for name in table.column_names}
    return [{k: v[i] for k, v in cols.items()} for i in range(len(rows))]


def _decode(item: Any, root: Path) -> np.ndarray | None:
    try:
        return decode_image(item, root)
    except Exception:  # unreadable or missing file: shown as a placeholder, counted in the stats
        return None


def _draw_grid(samples: list[dict[str, Any]], classnames: list[str], title: str, out: Path) -> None:
    from matplotlib.figure import Figure  # Agg canvas, no pyplot global state or GUI backend

    cols = min(GRID_COLUMNS, len(samples))
    rows = math.ceil(len(samples) / cols)
    width, height = cols * CELL_W + 2 * MARGIN, rows * CELL_H + HEADER_H + MARGIN
    fig = Figure(figsize=(width, height), dpi=100)
    fig.text(0.5, 1 - 0.5 * HEADER_H / height, title, ha="center", va="center", fontsize=11, parse_math=False)
    for i, s in enumerate(samples):
        r, c = divmod(i, cols)
        left = MARGIN + c * CELL_W + (CELL_W - IMAGE_IN) / 2
        bottom = height - (HEADER_H + r * CELL_H + TITLE_H + IMAGE_IN)
        ax = fig.add_axes((left / width, bottom / height, IMAGE_IN / width, IMAGE_IN / height))
        ax.set_xticks([])
        ax.set_yticks([])
        img = s["array"]
        if img is None:
            ax.imshow(np.full((8, 8, 3), 200, dtype=np.uint8), interpolation="nearest")
            ax.text(0.5, 0.5, "unreadable\nimage", ha="center", va="center", fontsize=8,
                    transform=ax.transAxes, parse_math=False)
        else:
            ax.imshow(img, interpolation="nearest")
        label = s.get("label", -1)
        name = classnames[label] if 0 <= label < len(classnames) else ""
        head = f"{s['where']}" + (f" · {name}" if name else "")
        if s["poison"]:
            for sp in ax.spines.values():
                sp.set_visible(True)
                sp.set_color(POISON_COLOUR)
                sp.set_linewidth(5)
            ax.set_title(f"POISON: {s['poison']}\n{head}", fontsize=7.5, color=POISON_COLOUR,
                         fontweight="bold", pad=5, parse_math=False)
        else:
            for sp in ax.spines.values():
                sp.set_color("#999999")
                sp.set_linewidth(0.6)
            ax.set_title(head, fontsize=7, color="#444444", pad=3, parse_math=False)
        ax.text(0.5, -0.04, _wrap_caption(s["caption"] or ""), transform=ax.transAxes, ha="center",
                va="top", fontsize=6.5, color=POISON_COLOUR if s["poison"] else "black",
                linespacing=1.15, parse_math=False)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        fig.savefig(tmp, format="png")
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            tmp.unlink()


def show_dataset(path: str | Path, out_png: Path | None = None, n: int = 32, seed: int = 0) -> dict:
    """Statistics of a pair dataset or eval set, and a PNG grid of ``n`` samples (poisoned ones marked).

    Returns a JSON-serialisable dict; its ``png`` entry is the path of the grid written (``None`` when the
    dataset is empty). ``out_png`` defaults to ``./<dataset-name>-samples.png`` — never inside the
    dataset directory.
    """
    p = Path(path)
    if n < 1:
        raise UserError(f"--n {n}: the number of samples must be at least 1")
    meta, parts = _load(p)
    png = _resolve_png(p, Path(out_png) if out_png is not None else None)
    classnames = list(meta.classnames)

    captions: list[str] = []
    labels: list[int] = []
    poison: list[str] = []
    offsets: list[int] = []
    storage: Counter[str] = Counter()
    for _, ds in parts:
        offsets.append(len(captions))
        arrow = ds.with_format("arrow")
        captions += arrow["caption"].to_pylist()
        labels += arrow["label"].to_pylist()
        poison += arrow["poison"].to_pylist()
        if len(ds):
            first = arrow.select([0])["image"].to_pylist()[0] or {}
            storage["bytes" if first.get("bytes") is not None else "paths"] += 1
    total = len(captions)

    by_attack = Counter(x for x in poison if x)
    label_hist: dict[str, int] = {}
    counted = Counter(x for x in labels if x is not None and x >= 0)
    for lab in sorted(counted):
        name = classnames[lab] if lab < len(classnames) else f"label {lab}"
        label_hist[name] = counted[lab]
    stored_fp = meta.fingerprint
    actual_fp = _fingerprint(meta, parts)

    rng = np.random.default_rng(seed)
    chosen = _choose_samples(poison, n, rng) if total else []
    samples: list[dict[str, Any]] = []
    by_split: dict[int, list[int]] = {}
    for g in chosen:
        by_split.setdefault(_split_of(g, offsets), []).append(g)
    for s_idx, globals_ in by_split.items():
        split_name, ds = parts[s_idx]
        local = [g - offsets[s_idx] for g in globals_]
        for g, li, row in zip(globals_, local, _read_rows(ds, local), strict=True):
            where = f"#{li}" if split_name == "pairs" else f"{split_name} #{li}"
            samples.append({**row, "index": g, "where": where, "array": _decode(row["image"], p)})
    samples.sort(key=lambda r: r["index"])
    sizes = Counter(f"{a.shape[1]}x{a.shape[0]}" for a in (s["array"] for s in samples) if a is not None)

    name = p.resolve().name
    stats: dict[str, Any] = {
        "path": str(p),
        "name": name,
        "kind": meta.kind,
        "rows": total,
        "splits": {s: len(ds) for s, ds in parts} if meta.kind == "eval" else None,
        "poisoned": sum(by_attack.values()),
        "poison_by_attack": dict(sorted(by_attack.items())),
        "labels": label_hist,
        "unlabelled": sum(1 for x in labels if x is None or x < 0),
        "classnames": len(classnames),
        "templates": len(meta.templates),
        "caption_words": _length_stats([len(c.split()) for c in captions]),
        "caption_chars": _length_stats([len(c) for c in captions]),
        "empty_captions": sum(1 for c in captions if not c.strip()),
        "image_size": next(iter(sizes)) if len(sizes) == 1 else None,
        "image_sizes_sampled": dict(sizes),
        "image_storage": "+".join(sorted(storage)) if storage else None,
        "unreadable_sampled": sum(1 for s in samples if s["array"] is None),
        "fingerprint": stored_fp,
        "fingerprint_actual": actual_fp,
        "fingerprint_ok": (actual_fp == stored_fp) if stored_fp else None,
        "created_by": meta.created_by,
        "poison_manifest": _manifest_summary(meta.poison),
        "eval_set": meta.eval_set,
        "samples": [int(s["index"]) for s in samples],
        "samples_poisoned": sum(1 for s in samples if s["poison"]),
        "png": None,
    }
    if samples:
        poisoned_txt = (
            f", {stats['poisoned']} poisoned ({', '.join(f'{k}: {v}' for k, v in by_attack.items())})"
            if by_attack else ""
        )
        title = f"{name} — {meta.kind}, {total} rows{poisoned_txt}; {len(samples)} samples (seed {seed})"
        _draw_grid(samples, classnames, title, png)
        stats["png"] = str(png)
    return stats


def _manifest_summary(manifest: dict[str, Any] | None) -> dict[str, Any] | None:
    """The poison manifest without its long lists (indices, target images)."""
    if not manifest:
        return None
    out: dict[str, Any] = {}
    for k, v in manifest.items():
        if isinstance(v, list) and len(v) > 8:
            out[k] = f"<{len(v)} items>"
        elif isinstance(v, (str, int, float, bool)) or v is None or isinstance(v, dict) and len(str(v)) < 300:
            out[k] = v
        else:
            out[k] = f"<{type(v).__name__}>"
    return out


__all__ = ["render_stats_table", "show_dataset"]
