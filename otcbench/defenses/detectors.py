"""Poisoned-sample detectors on a model's embeddings: k-nearest-neighbour distance and a DAO-style local density.

A detector reads the L2-normalised image and text embeddings of every pair of a dataset (an
:class:`EmbeddingSet`) and returns one score per pair, **higher = more likely clean** — the convention of
every score of a data-side defense step (:class:`~otcbench.defenses.base.DataStepResult`), so its AUROC and
precision sit beside OTCCLIP's OT and global scores and SafeCLIP's GMM posterior in ``otcbench defend``.

Registered detectors (``DETECTORS``; ``otcbench list detectors``):

* ``knn`` — minus the Euclidean distance to the k-th nearest neighbour in a reference set (the "k-dist"
  baseline of Huang et al., ICLR 2025, "Detecting backdoor samples in contrastive language image
  pretraining"). A point in a sparse neighbourhood gets a low score.
* ``dao`` — minus a dimensionality-aware outlier score in the spirit of that paper's best detector (DAO,
  Anderberg et al. 2024): for a query q with k nearest reference neighbours o,
  ``DAO(q) = mean_o LID(o) · ln(d_k(q) / d_k(o))`` — the log of the local density ratio between q and its
  neighbours, each neighbour's ratio raised to its local intrinsic dimensionality (maximum-likelihood
  estimate from its own k neighbours, ``LID(o) = −(mean_i ln(d_i(o)/d_k(o)))⁻¹``). The published detector
  averages the ratios themselves; the mean of their logarithms (as in the paper's released code) ranks the
  same way for a single neighbour and never overflows. otcbench's implementation, written from that
  description, not the authors' code.

Both work in Euclidean distance between unit vectors (what the paper's code uses on open_clip's normalised
features). The reference set is ``reference_size`` rows drawn without replacement by a seeded generator
(all rows when the dataset is smaller); a query never counts itself. The paper uses a random batch of the
training data as the reference and notes that the detectors rely on the poisons being rare in it: a
backdoor that is a tight cluster of more than ``k`` points in the reference looks *dense*, not sparse
(docs/defenses.md, the detector table).

Distances are computed in query chunks (memory ``chunk × reference`` floats), so a 10k-row world takes a
fraction of a second and a million rows against a 16k reference stay within a few hundred MB.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from pydantic import Field

from otcbench.config import Options
from otcbench.registry import Registry

__all__ = ["DETECTORS", "DaoDetector", "Detector", "EmbeddingSet", "KnnDetector", "knn", "knn_distances", "mle_lid",
           "run_detectors"]

DETECTORS: Registry[Detector] = Registry("detector")

#: Distances below this are treated as equal to it (exact duplicates have distance 0, and ln 0 is −∞).
_MIN_DISTANCE = 1e-6
#: Query rows per distance chunk.
_CHUNK = 1024


@dataclass
class EmbeddingSet:
    """L2-normalised embeddings of every pair of a dataset: ``image`` and ``text`` (the pair's caption), [N, D]."""

    image: torch.Tensor
    text: torch.Tensor

    def __post_init__(self) -> None:
        if self.image.ndim != 2 or self.text.ndim != 2 or self.image.shape[0] != self.text.shape[0]:
            raise ValueError(f"image and text embeddings must be [N, D] with the same N, got "
                             f"{tuple(self.image.shape)} and {tuple(self.text.shape)}")

    def __len__(self) -> int:
        return int(self.image.shape[0])

    def space(self, name: str) -> torch.Tensor:
        """The embeddings a detector works in: ``image``, ``text`` or ``joint`` (both, concatenated, /√2)."""
        if name == "image":
            return self.image.float()
        if name == "text":
            return self.text.float()
        if name == "joint":
            return torch.cat([self.image.float(), self.text.float()], dim=1) / math.sqrt(2.0)
        raise ValueError(f"unknown embedding space {name!r} (image, text, joint)")


class DetectorOptions(Options):
    """Options every neighbourhood detector shares."""

    k: int = Field(16, ge=1, description="neighbours (the paper's default: 16)")
    space: Literal["image", "text", "joint"] = Field(
        "image", description="embeddings to search: image (the paper's vision modality), text, or both")
    reference_size: int = Field(
        16384, ge=2, description="reference rows drawn at random (all rows when the dataset is smaller)")
    seed: int = Field(0, ge=0, description="seeds the reference draw")


class Detector:
    """Base class: subclasses set ``Options`` and implement :meth:`score` (higher = more likely clean)."""

    name: ClassVar[str]
    Options: ClassVar[type[Options]] = DetectorOptions

    def __init__(self, options: Options) -> None:
        self.options = options

    def score(self, emb: EmbeddingSet) -> torch.Tensor:
        """One float32 score per row of ``emb`` (CPU), higher = more likely a clean pair."""
        raise NotImplementedError

    def reference(self, n: int) -> torch.Tensor:
        """Sorted indices of the reference rows: all when ``n ≤ reference_size``, else a seeded draw."""
        opts: DetectorOptions = self.options  # type: ignore[assignment]
        if n <= opts.reference_size:
            return torch.arange(n)
        g = torch.Generator().manual_seed(opts.seed)
        return torch.randperm(n, generator=g)[: opts.reference_size].sort().values


def knn_distances(query: torch.Tensor, reference: torch.Tensor, k: int,
                  query_rows: torch.Tensor | None = None, reference_rows: torch.Tensor | None = None) -> torch.Tensor:
    """Sorted Euclidean distances ``[Q, k]`` from each query to its ``k`` nearest reference points.

    When ``query_rows`` and ``reference_rows`` (dataset row ids) are given, a query never counts the
    reference entry of its own row. Raises ``ValueError`` when fewer than ``k`` neighbours remain.
    """
    return knn(query, reference, k, query_rows, reference_rows)[0]


def knn(query: torch.Tensor, reference: torch.Tensor, k: int, query_rows: torch.Tensor | None = None,
        reference_rows: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """As :func:`knn_distances`, plus the reference positions of the neighbours: (distances, indices), ``[Q, k]``.

    Float64 throughout, so ranks do not depend on float32 round-off of nearly equal distances.
    """
    q, r = query.double(), reference.double()
    own_excluded = query_rows is not None and reference_rows is not None
    available = r.shape[0] - (1 if own_excluded else 0)
    if k > available:
        raise ValueError(f"k={k} neighbours requested but the reference has only {available} other rows")
    pos = None
    if own_excluded:
        # position of each query's own row in the reference (-1: not in it)
        size = int(max(query_rows.max(), reference_rows.max())) + 1 if query_rows.numel() else 1
        lookup = torch.full((size,), -1, dtype=torch.long)
        lookup[reference_rows] = torch.arange(reference_rows.numel())
        pos = lookup[query_rows]
    r_sq = (r * r).sum(1)
    ds, ids = [], []
    for s in range(0, q.shape[0], _CHUNK):
        qc = q[s:s + _CHUNK]
        d = ((qc * qc).sum(1, keepdim=True) + r_sq.unsqueeze(0) - 2.0 * qc @ r.T).clamp_min_(0).sqrt_()
        if pos is not None:
            p = pos[s:s + _CHUNK]
            own = p >= 0
            d[own.nonzero().squeeze(1), p[own]] = math.inf
        v, i = torch.topk(d, k, dim=1, largest=False, sorted=True)
        ds.append(v)
        ids.append(i)
    if not ds:
        return torch.empty((0, k), dtype=torch.float64), torch.empty((0, k), dtype=torch.long)
    return torch.cat(ds), torch.cat(ids)


def mle_lid(dist: torch.Tensor) -> torch.Tensor:
    """Maximum-likelihood local intrinsic dimensionality from sorted neighbour distances ``[N, k]``.

    ``LID = −(mean_i ln(d_i / d_k))⁻¹`` (Levina–Bickel / Amsaleg et al.), distances floored at 1e-6; a row
    whose k distances are all equal (no information) gets the largest finite LID of the set (or 1).
    """
    d = dist.double().clamp_min(_MIN_DISTANCE)
    mean_log = torch.log(d / d[:, -1:]).mean(1)  # ≤ 0
    lid = -1.0 / mean_log
    finite = torch.isfinite(lid)
    cap = float(lid[finite].max()) if bool(finite.any()) else 1.0
    return torch.where(finite, lid, torch.full_like(lid, cap))


class _NeighbourDetector(Detector):
    """Shared reference handling: the query set is every row, the reference a (seeded) subset."""

    def _neighbours(self, emb: EmbeddingSet) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(k-NN distances [N, k], their positions in the reference [N, k], the reference rows)."""
        opts: DetectorOptions = self.options  # type: ignore[assignment]
        x = emb.space(opts.space)
        n = x.shape[0]
        ref = self.reference(n)
        rows = torch.arange(n)
        d, idx = knn(x, x[ref], opts.k, rows, ref)
        return d, idx, ref


@DETECTORS.register("knn")
class KnnDetector(_NeighbourDetector):
    """k-NN distance: minus the distance to the k-th nearest reference neighbour (sparse → low score)."""

    def score(self, emb: EmbeddingSet) -> torch.Tensor:
        d, _, _ = self._neighbours(emb)
        return (-d[:, -1]).float()


@DETECTORS.register("dao")
class DaoDetector(_NeighbourDetector):
    """DAO-style local density ratio (Huang et al. 2025): minus mean_o LID(o)·ln(d_k(q)/d_k(o)) over q's k-NN."""

    def score(self, emb: EmbeddingSet) -> torch.Tensor:
        opts: DetectorOptions = self.options  # type: ignore[assignment]
        d, idx, ref = self._neighbours(emb)
        x = emb.space(opts.space)
        # each reference point's own neighbourhood within the reference: its k-distance and LID
        if ref.numel() == x.shape[0]:  # every row is a reference row: the queries' neighbourhoods are theirs
            d_ref = d
        else:
            d_ref = knn_distances(x[ref], x[ref], opts.k, torch.arange(ref.numel()), torch.arange(ref.numel()))
        kd_ref = d_ref[:, -1].clamp_min(_MIN_DISTANCE)
        lid_ref = mle_lid(d_ref)
        kd_q = d[:, -1].clamp_min(_MIN_DISTANCE).unsqueeze(1)
        dao = (lid_ref[idx] * torch.log(kd_q / kd_ref[idx])).mean(1)
        return (-dao).float()


def run_detectors(specs: Sequence[tuple[str, dict[str, Any]]], emb: EmbeddingSet) -> dict[str, torch.Tensor]:
    """Score ``emb`` with every ``(name, options)`` of ``specs``; returns name → scores (higher = clean).

    A detector given twice with different options is keyed ``name@i`` for its second and later use.
    """
    out: dict[str, torch.Tensor] = {}
    for name, values in specs:
        det = DETECTORS.get(name)(DETECTORS.options(name, values))
        key = name if name not in out else f"{name}@{len(out)}"
        out[key] = det.score(emb)
    return out
