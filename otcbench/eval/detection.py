"""Poison-detection metrics of a data-side defense step (metrics.json keys: docs/defenses.md).

A matching or filtering defense acts on some pairs (a caption replaced, a pair put in the risky set) and
scores every pair (higher = more likely clean). Given the ground-truth poison flags of the dataset this
module measures how well it did:

* ``detect_precision`` / ``detect_recall``: of the flagged pairs, the fraction that are poisoned; of the
  poisoned pairs, the fraction that were flagged;
* ``detect_auroc``: AUROC of the pair score for separating clean (positive, high score) from poisoned
  pairs, ties counted one half (the Mann–Whitney statistic) — one extra ``detect_auroc_<name>`` per
  further named score, so ablations (OT score next to the global score) sit side by side;
* ``poison_repaired`` / ``clean_repaired``: the fraction of poisoned / clean pairs whose caption was
  replaced (for re-pairing defenses the flagged pairs; for filtering defenses, read from the caption
  index, usually 0).

Undefined values (no flagged pair, no poisoned pair, only one class) are ``None``, never a made-up number;
the counts are reported alongside so a reader can tell why.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

__all__ = ["auroc", "detection_metrics", "per_attack_detection", "poison_mask", "precision_at_count"]


def poison_mask(poison: Sequence[str] | Sequence[bool] | torch.Tensor) -> torch.Tensor:
    """Boolean poison mask from a ``poison`` column (attack names, "" for clean) or booleans."""
    if isinstance(poison, torch.Tensor):
        return poison.to(torch.bool).flatten().cpu()
    return torch.tensor([bool(p) for p in poison], dtype=torch.bool)


def auroc(scores: torch.Tensor, positive: torch.Tensor) -> float | None:
    """Area under the ROC curve of ``scores`` for ``positive`` (higher score = positive), ties = ½.

    Computed exactly as the normalised Mann–Whitney U statistic with average ranks for tied scores, in
    O(N log N): AUROC = (Σ ranks of positives − n₊(n₊+1)/2) / (n₊ n₋). None when a class is empty.

    Raises:
        ValueError: shapes differ, or a score is NaN (a NaN has no rank).
    """
    s = scores.detach().flatten().to(torch.float64).cpu()
    pos = positive.flatten().to(torch.bool).cpu()
    if s.shape != pos.shape:
        raise ValueError(f"{s.numel()} scores but {pos.numel()} labels")
    if torch.isnan(s).any():
        raise ValueError("scores contain NaN; AUROC is undefined")
    n_pos = int(pos.sum())
    n_neg = s.numel() - n_pos
    if n_pos == 0 or n_neg == 0:
        return None
    sorted_s, order = torch.sort(s, stable=True)
    _, counts = torch.unique_consecutive(sorted_s, return_counts=True)
    # 1-based ranks; every member of a tie group gets the group's mean rank
    ends = torch.cumsum(counts, 0).to(torch.float64)
    mean_rank = ends - (counts.to(torch.float64) - 1) / 2
    ranks_sorted = torch.repeat_interleave(mean_rank, counts)
    ranks = torch.empty_like(ranks_sorted)
    ranks[order] = ranks_sorted
    u = float(ranks[pos].sum()) - n_pos * (n_pos + 1) / 2
    return u / (n_pos * n_neg)


def _ratio(num: int, den: int) -> float | None:
    return num / den if den else None


def detection_metrics(
    flagged: torch.Tensor,
    scores: torch.Tensor | Mapping[str, torch.Tensor] | None,
    poison_flags: Sequence[str] | Sequence[bool] | torch.Tensor,
    *,
    caption_index: torch.Tensor | None = None,
) -> dict[str, Any]:
    """Detection metrics of one data-side step against ground-truth poison flags.

    Args:
        flagged: (N,) bool, the pairs the defense acted on (re-paired or put in the risky set).
        scores: (N,) pair score, higher = more likely clean; or a mapping name → score whose *first*
            entry is the defense's own score (``detect_auroc``), every entry also reported as
            ``detect_auroc_<name>``; None for no AUROC.
        poison_flags: (N,) the dataset's ``poison`` column (attack name or "") or booleans.
        caption_index: (N,) caption row now paired with each image row; a pair is *repaired* when it
            differs from its own row. Default: repaired = flagged (re-pairing defenses).

    Returns:
        ``detect_precision``, ``detect_recall``, ``detect_auroc`` (+ per-score AUROCs), ``poison_repaired``,
        ``clean_repaired`` and the counts ``detect_n``, ``detect_n_poison``, ``detect_n_flagged``,
        ``detect_tp``, ``poison_repaired_n``, ``clean_repaired_n``. Fractions are None when undefined.

    Raises:
        ValueError: the inputs do not all have N entries.
    """
    flag = flagged.detach().flatten().to(torch.bool).cpu()
    poison = poison_mask(poison_flags)
    n = flag.numel()
    if poison.numel() != n:
        raise ValueError(f"{n} flags but {poison.numel()} poison labels")
    if caption_index is None:
        repaired = flag
    else:
        ci = caption_index.detach().flatten().cpu()
        if ci.numel() != n:
            raise ValueError(f"{n} flags but a caption index of {ci.numel()} rows")
        repaired = ci != torch.arange(n)
    n_poison = int(poison.sum())
    n_clean = n - n_poison
    n_flagged = int(flag.sum())
    tp = int((flag & poison).sum())
    poison_rep = int((repaired & poison).sum())
    clean_rep = int((repaired & ~poison).sum())
    out: dict[str, Any] = {
        "detect_precision": _ratio(tp, n_flagged),
        "detect_recall": _ratio(tp, n_poison),
    }
    named: dict[str, torch.Tensor] = {}
    if isinstance(scores, torch.Tensor):
        named = {"score": scores}
    elif scores is not None:
        named = dict(scores)
    clean = ~poison
    for i, (name, s) in enumerate(named.items()):
        if s.numel() != n:
            raise ValueError(f"score {name!r} has {s.numel()} entries, expected {n}")
        value = auroc(s, clean)
        if i == 0:
            out["detect_auroc"] = value
        if not isinstance(scores, torch.Tensor):
            out[f"detect_auroc_{name}"] = value
    if not named:
        out["detect_auroc"] = None
    out.update(
        {
            "poison_repaired": _ratio(poison_rep, n_poison),
            "clean_repaired": _ratio(clean_rep, n_clean),
            "detect_n": n,
            "detect_n_poison": n_poison,
            "detect_n_flagged": n_flagged,
            "detect_tp": tp,
            "poison_repaired_n": poison_rep,
            "clean_repaired_n": clean_rep,
        }
    )
    return out


def precision_at_count(scores: torch.Tensor, poisoned: torch.Tensor, count: int | None = None) -> float | None:
    """Share of poisoned rows among the ``count`` lowest-scoring rows (default: as many as there are poisons).

    Scores are "higher = more likely clean", so the ``count`` lowest are what a detector would remove. Rows
    tied with the cut-off score count fractionally (the expected precision over every order of the tie), so
    the value never depends on row order. None when there is no poisoned row or ``count`` is 0.
    """
    s = scores.detach().flatten().to(torch.float64).cpu()
    p = poisoned.flatten().to(torch.bool).cpu()
    if s.shape != p.shape:
        raise ValueError(f"{s.numel()} scores but {p.numel()} labels")
    n = int(p.sum()) if count is None else int(count)
    if n <= 0 or not bool(p.any()):
        return None
    n = min(n, s.numel())
    cut = torch.sort(s).values[n - 1]
    below = s < cut
    tied = s == cut
    hits = float((below & p).sum()) + (n - int(below.sum())) * float((tied & p).sum()) / int(tied.sum())
    return hits / n


def per_attack_detection(scores: Mapping[str, torch.Tensor], poison: Sequence[str]) -> list[dict[str, Any]]:
    """AUROC and precision@poison-count of every score, for every attack of a ``poison`` column and for all.

    For attack ``a`` the rows are the clean rows and ``a``'s rows (other attacks' rows left out), so each
    attack is judged against clean data alone; ``attack="all"`` uses every row. Returns one dict per (score,
    attack): ``score``, ``attack``, ``n_poison``, ``n_clean``, ``auroc``, ``precision_at_n``.
    """
    labels = list(poison)
    clean = torch.tensor([not p for p in labels], dtype=torch.bool)
    attacks = sorted({p for p in labels if p})
    groups = [(a, clean | torch.tensor([p == a for p in labels], dtype=torch.bool)) for a in attacks]
    if len(attacks) > 1:
        groups.append(("all", torch.ones(len(labels), dtype=torch.bool)))
    out = []
    for name, s in scores.items():
        s = s.detach().flatten().cpu()
        if s.numel() != len(labels):
            raise ValueError(f"score {name!r} has {s.numel()} entries, expected {len(labels)}")
        for attack, rows in groups:
            sub, cl = s[rows], clean[rows]
            out.append({"score": name, "attack": attack, "n_poison": int((~cl).sum()), "n_clean": int(cl.sum()),
                        "auroc": auroc(sub, cl), "precision_at_n": precision_at_count(sub, ~cl)})
    return out
