"""Token features for OTCCLIP: the feature extractors, the per-epoch feature store, the caption pool, and the
named per-pair statistics of a matching.

The extractors are module attributes looked up at call time (``features.image_features``), so tests substitute
hand-built lookup tables for the model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from otcbench.models import encode_image_tokens, encode_text_tokens

__all__ = ["FeatureStore", "PairStats", "PoolFeatures", "image_features", "text_features"]


def image_features(model: torch.nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(global [B, D], tokens [B, n, D]) of uint8 images, one forward of the image tower."""
    return encode_image_tokens(model, images)


def text_features(model: torch.nn.Module, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(global [B, D], tokens [B, m, D], mask [B, m]) of token ids, one forward of the text tower."""
    return encode_text_tokens(model, tokens)


@dataclass
class PairStats:
    """Per-row statistics of one matching (rows in dataset order; every tensor [h]).

    ``match`` is the matching score s of the image with its own caption, ``ot`` its 1 − d_OT, ``cos`` its global
    cosine, ``best`` the best candidate's score (the own caption included only where it competes), ``n_tokens``
    the image's token count; ``choice_global`` and ``choice_ot`` are the caption rows the global cosine alone and
    the OT score would pick (before any cap), so that match precision compares the two scores side by side.
    """

    match: torch.Tensor
    ot: torch.Tensor
    cos: torch.Tensor
    best: torch.Tensor
    n_tokens: torch.Tensor
    choice_global: torch.Tensor
    choice_ot: torch.Tensor

    FIELDS = ("match", "ot", "cos", "best", "n_tokens", "choice_global", "choice_ot")

    def stack(self) -> torch.Tensor:
        """[h, 7] float64 (exact for the row indices): one tensor for the all-gather under torchrun."""
        return torch.stack([getattr(self, f).double() for f in self.FIELDS], dim=1)

    @classmethod
    def unstack(cls, t: torch.Tensor) -> PairStats:
        cols = {f: t[:, i] for i, f in enumerate(cls.FIELDS)}
        for f in ("choice_global", "choice_ot", "n_tokens"):
            cols[f] = cols[f].long()
        for f in ("match", "ot", "cos", "best"):
            cols[f] = cols[f].float()
        return cls(**cols)

    @classmethod
    def cat(cls, parts: list[PairStats], device: torch.device) -> PairStats:
        if not parts:
            empty = torch.empty(0, device=device)
            return cls(empty, empty, empty, empty, *(torch.empty(0, dtype=torch.long, device=device),) * 3)
        return cls(**{f: torch.cat([getattr(p, f) for p in parts]) for f in cls.FIELDS})


@dataclass
class FeatureStore:
    """Detached features of every row from one epoch's training forward passes (for the next matching)."""

    epoch: int
    img_g: torch.Tensor  # [N, D] normalised image globals
    img_t: torch.Tensor  # [N, n, D] image tokens
    img_ok: torch.Tensor  # [N] bool: row encoded this epoch
    txt_g: torch.Tensor  # [N, D] normalised caption globals (by caption row)
    txt_t: torch.Tensor  # [N, L, D]
    txt_m: torch.Tensor  # [N, L] bool (start token dropped as configured)
    txt_ok: torch.Tensor  # [N] bool

    @classmethod
    def empty(cls, epoch: int, n: int, n_img: int, n_txt: int, d: int, device: torch.device) -> FeatureStore:
        def z(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
            return torch.zeros(shape, dtype=dtype, device=device)

        return cls(epoch, z(n, d), z(n, n_img, d), z(n, dtype=torch.bool), z(n, d), z(n, n_txt, d),
                   z(n, n_txt, dtype=torch.bool), z(n, dtype=torch.bool))

    def state_dict(self) -> dict[str, Any]:
        return {k: (v.cpu() if isinstance(v, torch.Tensor) else v) for k, v in self.__dict__.items()}

    def to(self, device: torch.device) -> FeatureStore:
        return FeatureStore(**{k: (v.to(device) if isinstance(v, torch.Tensor) else v)
                               for k, v in self.__dict__.items()})

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> FeatureStore:
        return cls(**state)


class PoolFeatures:
    """The caption pool of one matching: rows [P], normalised globals [P, D], optional token cache."""

    def __init__(self, rows: torch.Tensor, globals_: torch.Tensor, tokens: torch.Tensor | None = None,
                 mask: torch.Tensor | None = None, n_rows: int = 0) -> None:
        self.rows, self.globals, self.tokens, self.mask = rows, globals_, tokens, mask
        self.image_keys: torch.Tensor | None = None  # [N, k] image key of every row (exclude_duplicates)
        self.position = None
        if tokens is not None:
            # caption row -> index in the pool (-1 when a FIFO pool does not hold it)
            self.position = torch.full((n_rows,), -1, dtype=torch.long, device=rows.device)
            self.position[rows] = torch.arange(rows.numel(), device=rows.device)
