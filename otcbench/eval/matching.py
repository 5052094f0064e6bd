"""Match precision: how often a caption-matching defense re-assigns a caption that truly describes the image.

A caption row j *describes* image row i when row j is clean (its caption was written for its own image, not by
an attack) and the two rows show the same thing: the same ``content`` (the synthetic worlds' canonical
composition, e.g. ``"blue square|red circle"``) where both rows have one, else the same ``label`` (the main
object's class; for imported data the label column where it has one). Rows with label -1 and no content have
no ground truth and are left out of the denominators.

Every statistic is over the *re-assigned* images only (caption row ≠ own row): a defense that keeps every
own caption has no precision (None), not a perfect one.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import torch

__all__ = ["caption_describes", "match_statistics"]


class GroundTruth(Protocol):
    """What match precision reads from a dataset (``TrainData`` has it)."""

    labels: torch.Tensor
    poison: Sequence[str]


def _content_codes(data: Any) -> torch.Tensor | None:
    """[N] int64 code of each row's content string (-1: none), or None when the dataset has no content."""
    content = getattr(data, "content", None)
    if content is None:
        return None
    codes: dict[str, int] = {}
    out = [codes.setdefault(c, len(codes)) if c else -1 for c in content]
    return torch.tensor(out, dtype=torch.long)


def caption_describes(data: GroundTruth, images: torch.Tensor, captions: torch.Tensor,
                      *, by: str = "content") -> tuple[torch.Tensor, torch.Tensor]:
    """(describes [M] bool, known [M] bool) for the pairs (image row ``images[m]``, caption row ``captions[m]``).

    ``by="content"`` compares contents where both rows have one and labels otherwise; ``by="label"`` compares
    labels only (the "names the image's true class" share). ``known`` is False where neither is available.
    """
    images, captions = images.long().cpu(), captions.long().cpu()
    clean = torch.tensor([not p for p in data.poison], dtype=torch.bool)
    labels = data.labels.long().cpu()
    li, lc = labels[images], labels[captions]
    same = li == lc
    known = (li >= 0) & (lc >= 0)
    codes = _content_codes(data) if by == "content" else None
    if codes is not None:
        ci, cc = codes[images], codes[captions]
        both = (ci >= 0) & (cc >= 0)
        same = torch.where(both, ci == cc, same)
        known = both | known
    return same & clean[captions], known


def _precision(data: GroundTruth, assigned: torch.Tensor, by: str = "content") -> tuple[float | None, int]:
    rows = torch.arange(assigned.numel())
    moved = (assigned != rows) & (assigned >= 0)
    if not bool(moved.any()):
        return None, 0
    ok, known = caption_describes(data, rows[moved], assigned[moved], by=by)
    if not bool(known.any()):
        return None, int(moved.sum())
    return float(ok[known].float().mean()), int(moved.sum())


def match_statistics(data: GroundTruth, assigned: torch.Tensor,
                     alternatives: Mapping[str, torch.Tensor] | None = None) -> dict[str, Any]:
    """Log-line statistics of one matching: ``assigned`` [N] is the caption row each image row trains on.

    Keys: ``match_precision`` (share of re-assigned images whose caption describes them), ``match_class_precision``
    (share whose caption's row has the image's label), ``match_n`` (re-assigned images), ``match_distinct``
    (distinct captions among them), ``match_largest_group`` (images sharing the most used caption: hub captions),
    and ``match_precision_<name>`` / ``match_n_<name>`` for each alternative assignment (e.g. the choice the global
    cosine alone or the OT score would have made), so that scores are compared on the same matching.
    """
    assigned = assigned.long().cpu()
    rows = torch.arange(assigned.numel())
    moved = assigned != rows
    out: dict[str, Any] = {}
    out["match_precision"], out["match_n"] = _precision(data, assigned)
    out["match_class_precision"], _ = _precision(data, assigned, by="label")
    caps = assigned[moved]
    if caps.numel():
        _, counts = caps.unique(return_counts=True)
        out["match_distinct"], out["match_largest_group"] = int(counts.numel()), int(counts.max())
    else:
        out["match_distinct"], out["match_largest_group"] = 0, 0
    for name, alt in (alternatives or {}).items():
        alt = alt.long().cpu()
        if bool((alt < 0).all()):  # not computed (e.g. OT choice under score=global)
            continue
        out[f"match_precision_{name}"], out[f"match_n_{name}"] = _precision(data, alt)
    return out
