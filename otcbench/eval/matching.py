"""Match precision: how often a caption-matching defense re-assigns a caption that truly describes the image.

A caption row j *describes* image row i when row j is clean (its caption was written for its own image, not by
an attack) and the two rows show the same thing: the same ``content`` (the synthetic worlds' canonical
composition, e.g. ``"blue square|red circle"``) where both rows have one, else the same ``label`` (the main
object's class; for imported data the label column where it has one). A clean caption of a row showing the
same image (the same image id: another of a COCO image's five captions) describes it, whatever the labels.
Rows with label -1, no content and no other row of their image have no ground truth and are left out of the
denominators.

Every statistic is over the *re-assigned* images only (caption row ≠ own row): a defense that keeps every
own caption has no precision (None), not a perfect one.

Exact composition is a strict test: in a 10k-row compositional world most compositions occur once, so almost no
candidate pool holds another caption with the image's exact content and precision is near 0 for every score.
Where rows have content, the *binding overlap* grades a match instead: the Jaccard index between the image's
colour–shape bindings and those of the caption's row (0 for a poisoned caption row), and the *shape overlap*
the same over shapes without colours. A score that binds colour to shape raises the first; one that sees a bag
of shapes raises only the second. Both come with a ``random`` reference: a fixed derangement of the rows (its
own seeded generator, so the training stream is untouched), the value of a caption drawn at random.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import torch

__all__ = ["binding_overlap", "caption_describes", "match_statistics"]


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

    ``by="content"`` compares contents where both rows have one and labels otherwise, and counts a clean caption
    of the same image as describing it; ``by="label"`` compares labels only (the "names the image's true class"
    share). ``known`` is False where neither is available.
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
    groups = data.image_groups() if by == "content" and hasattr(data, "image_groups") else None
    if groups is not None:  # a clean caption of the same image describes it
        one_image = (groups[images] == groups[captions]) & clean[captions]
        same, known = same | one_image, known | one_image
    return same & clean[captions], known


def _content_sets(data: Any) -> tuple[torch.Tensor, torch.Tensor] | None:
    """([N, B] bool bindings, [N, S] bool shapes) of each row's content, or None without content.

    A content string is "colour shape" bindings joined by "|"; the shape is the last word of a binding.
    """
    content = getattr(data, "content", None)
    if content is None or not any(content):
        return None
    bindings: dict[str, int] = {}
    shapes: dict[str, int] = {}
    parsed = [[b for b in c.split("|") if b] if c else [] for c in content]
    for items in parsed:
        for b in items:
            bindings.setdefault(b, len(bindings))
            shapes.setdefault(b.rsplit(" ", 1)[-1], len(shapes))
    bind = torch.zeros(len(parsed), max(len(bindings), 1), dtype=torch.bool)
    shape = torch.zeros(len(parsed), max(len(shapes), 1), dtype=torch.bool)
    for i, items in enumerate(parsed):
        for b in items:
            bind[i, bindings[b]] = True
            shape[i, shapes[b.rsplit(" ", 1)[-1]]] = True
    return bind, shape


def _jaccard(sets: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    inter = (sets[a] & sets[b]).sum(1).float()
    union = (sets[a] | sets[b]).sum(1).float()
    return torch.where(union > 0, inter / union.clamp_min(1), torch.zeros_like(union))


def _pair_overlap(sets: tuple[torch.Tensor, torch.Tensor], clean: torch.Tensor, images: torch.Tensor,
                  captions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    bind, shape = sets
    ok = clean[captions]
    return _jaccard(bind, images, captions) * ok, _jaccard(shape, images, captions) * ok


def binding_overlap(data: Any, images: torch.Tensor,
                    captions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(binding Jaccard [M], shape Jaccard [M]) of the pairs (image row, caption row); None without content.

    Pairs where either row has no content count 0, and so do poisoned caption rows: the caption was not
    written for that row's image, so the row's content says nothing about it.
    """
    sets = _content_sets(data)
    if sets is None:
        return None
    clean = torch.tensor([not p for p in data.poison], dtype=torch.bool)
    return _pair_overlap(sets, clean, images.long().cpu(), captions.long().cpu())


def _random_assignment(n: int) -> torch.Tensor:
    """A fixed derangement of ``n`` rows (row i takes row perm[i] ≠ i), from its own seeded generator."""
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(n, generator=g)
    fixed = perm == torch.arange(n)
    if n > 1 and bool(fixed.any()):
        perm[fixed] = (torch.arange(n)[fixed] + 1) % n
    return perm


def _overlaps(sets: tuple[torch.Tensor, torch.Tensor] | None, clean: torch.Tensor, assigned: torch.Tensor,
              suffix: str, out: dict[str, Any]) -> None:
    """Adds the mean binding and shape overlap of the re-assigned images of ``assigned`` to ``out``."""
    rows = torch.arange(assigned.numel())
    moved = (assigned != rows) & (assigned >= 0)
    if sets is None or not bool(moved.any()):
        return
    bind, shape = _pair_overlap(sets, clean, rows[moved], assigned[moved])
    out[f"match_overlap{suffix}"] = float(bind.mean())
    out[f"match_shape_overlap{suffix}"] = float(shape.mean())


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
    cosine alone or the OT score would have made), so that scores are compared on the same matching, plus the
    ``random`` alternative (a caption drawn at random: the chance level). Where rows have content:
    ``match_overlap[_<name>]`` and ``match_shape_overlap[_<name>]``, the mean binding and shape Jaccard
    (:func:`binding_overlap`).
    """
    assigned = assigned.long().cpu()
    rows = torch.arange(assigned.numel())
    moved = assigned != rows
    out: dict[str, Any] = {}
    out["match_precision"], out["match_n"] = _precision(data, assigned)
    out["match_class_precision"], _ = _precision(data, assigned, by="label")
    sets = _content_sets(data)
    clean = torch.tensor([not p for p in data.poison], dtype=torch.bool)
    _overlaps(sets, clean, assigned, "", out)
    caps = assigned[moved]
    if caps.numel():
        _, counts = caps.unique(return_counts=True)
        out["match_distinct"], out["match_largest_group"] = int(counts.numel()), int(counts.max())
    else:
        out["match_distinct"], out["match_largest_group"] = 0, 0
    alts = {**(alternatives or {}), "random": _random_assignment(assigned.numel())}
    for name, alt in alts.items():
        alt = alt.long().cpu()
        if bool((alt < 0).all()):  # not computed (e.g. OT choice under score=global)
            continue
        out[f"match_precision_{name}"], out[f"match_n_{name}"] = _precision(data, alt)
        _overlaps(sets, clean, alt, f"_{name}", out)
    return out
