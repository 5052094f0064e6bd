"""Variant labels: a defense row's name plus what its options change from that defense's defaults.

A registered defense's ``Options`` defaults are the published method's; a recipe that changes them runs a
variant, and the tables should say so. :func:`variant_label` compares the resolved options with
``DEFENSES.get(name).Options()`` (nested options flattened with dots) and returns the plain name when they
are equal, else ``name (change, change, …)``:

* each changed option becomes the phrase its defense class gives in ``variant_phrases`` (``"no warm-up"``),
  or ``key=value`` when the class has none for it (or its phrase function returns None);
* phrased changes come first, then the ``key=value`` ones, each group in the options' declaration order;
* at most :data:`MAX_PHRASES` are shown, then ``+N more``;
* options in the class's ``label_ignore`` (execution knobs: chunk sizes, caches, tolerances) never count.

The comparison is per registered name: a variant registered under its own name (``otcclip+filter``, a
subclass with other defaults) is plain ``otcclip+filter`` at its own defaults.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Any

from pydantic import BaseModel

from otcbench.errors import UserError

#: Changes shown in a label before the rest are counted as ``+N more``.
MAX_PHRASES = 4


def _flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, Mapping):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def format_value(v: Any) -> str:
    """Compact text of an option value: ``1e-05``, ``0.05``, ``true``, ``none``, ``[1,2]``."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if v is None:
        return "none"
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, (int, str)):
        return str(v)
    return json.dumps(v, separators=(",", ":"), sort_keys=True, default=str)


def _ignored(key: str, ignore: Iterable[str]) -> bool:
    # an ignored section (``image_aug``) hides all its nested keys
    return any(key == k or key.startswith(k + ".") for k in ignore)


def resolved_options(name: str, options: Mapping[str, Any] | BaseModel | None) -> dict[str, Any]:
    """The options of defense ``name`` with defaults filled in, flattened with dots (JSON values).

    A mapping is validated against the defense's ``Options`` (unknown keys are a one-line UserError).
    """
    from otcbench.defenses.base import DEFENSES

    if isinstance(options, BaseModel):
        dumped = options.model_dump(mode="json")
    else:
        dumped = DEFENSES.options(name, dict(options or {})).model_dump(mode="json")
    return _flatten(dumped)


def option_changes(name: str, options: Mapping[str, Any] | BaseModel | None) -> list[tuple[str, Any]]:
    """``(dotted key, value)`` of every option that differs from ``name``'s defaults, in declaration order,
    leaving out the class's ``label_ignore`` knobs."""
    from otcbench.defenses.base import DEFENSES

    cls = DEFENSES.get(name)
    defaults = _flatten(cls.Options().model_dump(mode="json"))
    given = resolved_options(name, options)
    ignore = getattr(cls, "label_ignore", frozenset())
    return [(k, v) for k, v in given.items() if not _ignored(k, ignore) and (k not in defaults or defaults[k] != v)]


def change_phrases(name: str, options: Mapping[str, Any] | BaseModel | None,
                   exclude: Iterable[str] = ()) -> list[str]:
    """The phrases of :func:`option_changes` (phrased changes first), leaving out the keys in ``exclude``
    (and their nested keys: a sweep already names them)."""
    from otcbench.defenses.base import DEFENSES

    phrases_of = getattr(DEFENSES.get(name), "variant_phrases", {})
    exclude = list(exclude)
    phrased, plain = [], []
    for key, value in option_changes(name, options):
        if _ignored(key, exclude):
            continue
        fn = phrases_of.get(key)
        phrase = fn(value) if fn is not None else None
        if phrase:
            phrased.append(phrase)
        else:
            plain.append(f"{key}={format_value(value)}")
    return phrased + plain


def compact(phrases: list[str], max_phrases: int = MAX_PHRASES) -> str:
    """``a, b, c, d, +2 more``: the first ``max_phrases`` phrases and a count of the rest."""
    if len(phrases) <= max_phrases:
        return ", ".join(phrases)
    return ", ".join([*phrases[:max_phrases], f"+{len(phrases) - max_phrases} more"])


def variant_label(name: str, options: Mapping[str, Any] | BaseModel | None = None) -> str:
    """``name`` when ``options`` equal the registered defense's defaults, else ``name (changes)``.

    >>> variant_label("safeclip", {"unimodal_epochs": 0})
    'safeclip (no warm-up)'
    """
    phrases = change_phrases(name, options)
    return f"{name} ({compact(phrases)})" if phrases else name


def row_label(label: str, name: str, options: Mapping[str, Any] | BaseModel | None,
              swept: Iterable[str] = ()) -> str:
    """The defense label a results table shows for a recipe entry.

    ``label`` is the recipe's (its own ``label``, or the name, plus a sweep's ``KEY=VALUE``); ``swept`` are the
    option keys the entry's sweep sets (already in the label, so not repeated). The label is kept and the
    remaining changes appended: ``safeclip (no warm-up)``, ``ft (lr=0.0001)``, ``safeclip threshold=0.5
    (no cross-aug)``; at the defaults it is ``label`` unchanged.
    """
    phrases = change_phrases(name, options, exclude=swept)
    return f"{label} ({compact(phrases)})" if phrases else label


def registered_variant_of(cls: type) -> tuple[str, list[str]] | None:
    """For a defense class registered as a subclass of another registered defense (``otcclip+filter`` of
    ``otcclip``): the parent's name and the phrases of its own defaults against the parent's; else None."""
    from otcbench.defenses.base import DEFENSES

    for parent in cls.__mro__[1:]:
        pname = parent.__dict__.get("name")
        if isinstance(pname, str) and pname in DEFENSES.names() and DEFENSES.get(pname) is parent:
            try:
                return pname, change_phrases(pname, cls.Options().model_dump(mode="json"))
            except UserError:  # the variant adds options its parent lacks: name the parent only
                return pname, []
    return None
