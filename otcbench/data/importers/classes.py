"""Class names, prompt templates and split assignment for imported data.

``--classnames imagenet`` and ``--templates imagenet`` come from open_clip (``IMAGENET_CLASSNAMES``,
``OPENAI_IMAGENET_TEMPLATES``); anything else is a text file, one entry per line.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from otcbench.errors import UserError

#: Templates of an eval set when none are given and the classes are not ImageNet's.
DEFAULT_TEMPLATES = (
    "a photo of a {}.",
    "a photo of the {}.",
    "a blurry photo of a {}.",
    "a close-up photo of a {}.",
    "a bright photo of a {}.",
    "a cropped photo of the {}.",
    "a good photo of a {}.",
)

#: Splits of an eval set when ``--splits`` is not given (fractions of each class).
DEFAULT_SPLITS = "train=0.5,val=0.1,test=0.4"
SPLIT_NAMES = ("train", "val", "test", "targets")


def _read_lines(path: str, what: str) -> list[str]:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"--{what} {path!r}: no such file; pass 'imagenet' or a text file, one entry per line")
    text = p.read_text(encoding="utf-8-sig")
    if p.suffix == ".json":
        try:
            items = json.loads(text)
        except json.JSONDecodeError as err:
            raise UserError(f"--{what} {path}: not valid JSON ({err.msg}, line {err.lineno})") from None
        if not isinstance(items, list) or not all(isinstance(x, str) for x in items):
            raise UserError(f"--{what} {path}: expected a JSON list of strings")
        lines = [x.strip() for x in items]
    else:
        lines = [ln.strip() for ln in text.splitlines()]
    lines = [ln for ln in lines if ln]
    if not lines:
        raise UserError(f"--{what} {path} is empty; give one entry per line")
    return lines


def load_classnames(spec: str | None) -> list[str] | None:
    """``imagenet`` → open_clip's ImageNet class names; a path → its lines; None → None."""
    if spec is None:
        return None
    if spec == "imagenet":
        import open_clip

        return list(open_clip.IMAGENET_CLASSNAMES)
    names = _read_lines(spec, "classnames")
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise UserError(f"--classnames {spec}: duplicate class names ({', '.join(dup[:3])}); names must be unique")
    return names


def load_templates(spec: str | None, classnames_spec: str | None) -> list[str]:
    """Prompt templates with one ``{}`` for the class name."""
    import open_clip

    if spec is None:
        spec = "imagenet" if classnames_spec == "imagenet" else "default"
    if spec == "default":
        return list(DEFAULT_TEMPLATES)
    if spec == "imagenet":
        return [t("{}") for t in open_clip.OPENAI_IMAGENET_TEMPLATES]
    if spec == "simple":
        return [t("{}") for t in open_clip.SIMPLE_IMAGENET_TEMPLATES]
    templates = _read_lines(spec, "templates")
    for t in templates:
        if t.count("{}") != 1 or re.search(r"\{[^}]", t):
            raise UserError(f"--templates {spec}: template {t!r} must contain exactly one {{}} for the class name")
    return templates


def pretty_name(folder: str) -> str:
    """A class folder's name as a class name: underscores become spaces."""
    return " ".join(folder.replace("_", " ").split())


def resolve_labels(
    raw: Sequence[str | int], names: list[str] | None, where: str, universe: list[str] | None = None
) -> tuple[list[str], list[int]]:
    """Class names and integer labels from raw labels (folder names, CSV values).

    Integer labels index ``names`` (required). String labels are looked up in ``names`` by name; when they
    are not names but as many as the names (ImageNet's wnid folders), the i-th name goes to the i-th label
    in sorted order; without ``names`` the sorted distinct labels are the classes. ``universe`` lists
    every label when some have no rows (an empty class folder still is a class).
    """
    if not raw:
        raise UserError(f"{where}: no labelled images found")
    if all(isinstance(r, int) for r in raw):
        ints = [int(r) for r in raw]
        if names is None:
            raise UserError(f"{where}: labels are class indices; pass --classnames imagenet or a file of names")
        bad = [r for r in ints if not 0 <= r < len(names)]
        if bad:
            raise UserError(f"{where}: label {bad[0]} is not a class index of the {len(names)} class names")
        return names, ints
    strs = [str(r) for r in raw]
    distinct = sorted(set(strs) | set(universe or []))
    if names is None:
        index = {d: i for i, d in enumerate(distinct)}
        return [pretty_name(d) for d in distinct], [index[s] for s in strs]
    by_name = {n: i for i, n in enumerate(names)}
    if all(d in by_name for d in distinct):
        return names, [by_name[s] for s in strs]
    if len(distinct) == len(names):
        index = {d: i for i, d in enumerate(distinct)}
        return names, [index[s] for s in strs]
    unknown = next(d for d in distinct if d not in by_name)
    raise UserError(f"{where}: label {unknown!r} is not one of the {len(names)} class names and there are "
                    f"{len(distinct)} distinct labels, not {len(names)}; pass matching --classnames")


def parse_splits(spec: str | None) -> tuple[str, dict[str, float]]:
    """``train=0.5,val=0.1,test=0.4`` → ("fraction", {...}); ``train=20,test=30`` → ("count", {...}).

    A value written with a decimal point is a fraction of each class, a whole number is images per class.
    """
    spec = spec or DEFAULT_SPLITS
    out: dict[str, float] = {}
    kinds = set()
    for part in spec.split(","):
        name, sep, value = part.strip().partition("=")
        name, value = name.strip(), value.strip()
        if not sep or name not in SPLIT_NAMES:
            raise UserError(f"--splits {spec!r}: expected NAME=VALUE with NAME in {', '.join(SPLIT_NAMES)}, "
                            "e.g. train=0.5,val=0.1,test=0.4")
        if name in out:
            raise UserError(f"--splits {spec!r}: split {name!r} given twice")
        try:
            out[name] = float(value)
        except ValueError:
            raise UserError(f"--splits {spec!r}: {value!r} is not a number") from None
        if out[name] < 0:
            raise UserError(f"--splits {spec!r}: {name} must not be negative")
        kinds.add("fraction" if "." in value or "e" in value.lower() else "count")
    if "test" not in out:
        raise UserError(f"--splits {spec!r}: an eval set needs a test split, e.g. train=0.5,val=0.1,test=0.4")
    if len(kinds) > 1:
        raise UserError(f"--splits {spec!r}: give either fractions (0.5) or whole images per class (20), not both")
    mode = kinds.pop()
    if mode == "fraction" and sum(out.values()) > 1 + 1e-9:
        raise UserError(f"--splits {spec!r}: fractions add up to {sum(out.values()):g} > 1")
    return mode, out


def assign_splits(labels: Sequence[int], spec: str | None, seed: int, classnames: list[str]) -> list[str | None]:
    """The split of each row: per class, a seeded shuffle cut by fractions or counts (None: left out)."""
    mode, parts = parse_splits(spec)
    labels_arr = np.asarray(labels, dtype=np.int64)
    out: list[str | None] = [None] * len(labels_arr)
    rng = np.random.default_rng(seed)
    for c in range(len(classnames)):
        rows = np.flatnonzero(labels_arr == c)
        if len(rows) == 0:
            continue
        rows = rows[rng.permutation(len(rows))]
        if mode == "fraction":
            cum = np.cumsum([parts[k] for k in parts])
            bounds = [0, *[int(round(f * len(rows))) for f in cum]]
        else:
            need = int(sum(parts.values()))
            if need > len(rows):
                raise UserError(f"--splits asks {need} images per class but class {classnames[c]!r} has "
                                f"{len(rows)}; lower the counts or use fractions")
            bounds = [0, *np.cumsum([int(parts[k]) for k in parts]).tolist()]
        for name, lo, hi in zip(parts, bounds[:-1], bounds[1:], strict=True):
            for r in rows[lo:hi]:
                out[int(r)] = name
    return out
