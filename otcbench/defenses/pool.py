"""A FIFO pool of detached embeddings with nearest-neighbour lookup (RoCLIP's caption pool, SafeCLIP's banks).

Like the memory bank the official RoCLIP/SafeCLIP code takes from lightly (``NNMemoryBankModule``), the
pool starts as random unit vectors, a lookup returns the entry of highest cosine similarity, and new
entries overwrite the oldest. Unlike it, a batch that runs past the end wraps around (lightly's bank
drops the part of the batch that does not fit before its end), and every entry remembers which dataset
row it came from (``-1`` for the random initial entries), so a defense can report, or re-encode, what
it matched.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

#: RoCLIP's default pool size (the official ``--memory_bank_size``).
ROCLIP_POOL_SIZE = 21_845


@dataclass
class Match:
    """The result of a nearest-neighbour lookup for a batch of queries."""

    vectors: torch.Tensor  # [B, D] the matched entries (detached, float32)
    slots: torch.Tensor  # [B] their positions in the pool
    rows: torch.Tensor  # [B] dataset rows the entries came from (-1: a random initial entry)
    similarity: torch.Tensor  # [B] cosine similarity of each query with its match


class EmbeddingPool:
    """A fixed-size FIFO of detached, L2-normalised embeddings on one device.

    Args:
        size: number of entries.
        dim: embedding dimension.
        device: where the entries live (the model's device).
        seed: seeds the random unit vectors the pool starts with.
    """

    def __init__(self, size: int, dim: int, device: torch.device | str = "cpu", seed: int = 0) -> None:
        if size < 1:
            raise ValueError(f"pool size must be >= 1, got {size}")
        self.size = size
        self.dim = dim
        self.device = torch.device(device)
        g = torch.Generator().manual_seed(seed)
        self.vectors = F.normalize(torch.randn(size, dim, generator=g), dim=1).to(self.device)
        self.rows = torch.full((size,), -1, dtype=torch.long, device=self.device)
        self.ptr = 0
        self.filled = 0  # entries written so far (capped at size): how many are real embeddings

    @torch.no_grad()
    def nearest(self, queries: torch.Tensor) -> Match:
        """The entry of highest cosine similarity to each query (ties: the lowest slot)."""
        q = F.normalize(queries.detach().float(), dim=1)
        sim = q @ self.vectors.t()
        best, slots = sim.max(dim=1)
        return Match(self.vectors[slots], slots, self.rows[slots], best)

    @torch.no_grad()
    def push(self, vectors: torch.Tensor, rows: torch.Tensor | None = None) -> None:
        """Append a batch (detached, normalised), overwriting the oldest entries; a batch larger than the
        pool keeps its last ``size`` rows."""
        v = F.normalize(vectors.detach().float(), dim=1).to(self.device)
        r = (rows if rows is not None else torch.full((len(v),), -1, dtype=torch.long)).to(self.device)
        if len(v) > self.size:
            v, r = v[-self.size :], r[-self.size :]
        n = len(v)
        slots = (self.ptr + torch.arange(n, device=self.device)) % self.size
        self.vectors[slots] = v
        self.rows[slots] = r.long()
        self.ptr = (self.ptr + n) % self.size
        self.filled = min(self.size, self.filled + n)

    def to(self, device: torch.device | str) -> EmbeddingPool:
        """Move the entries to ``device`` (in place); returns the pool."""
        self.device = torch.device(device)
        self.vectors = self.vectors.to(self.device)
        self.rows = self.rows.to(self.device)
        return self

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue exactly (tensors on the CPU)."""
        return {"vectors": self.vectors.cpu().clone(), "rows": self.rows.cpu().clone(), "ptr": self.ptr,
                "filled": self.filled}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        vectors = state["vectors"]
        if tuple(vectors.shape) != (self.size, self.dim):
            raise ValueError(f"pool state has shape {tuple(vectors.shape)}, expected {(self.size, self.dim)}")
        self.vectors = vectors.to(self.device).clone()
        self.rows = state["rows"].to(self.device).clone()
        self.ptr = int(state["ptr"])
        self.filled = int(state["filled"])

    @classmethod
    def from_state(cls, state: dict[str, Any], device: torch.device | str = "cpu") -> EmbeddingPool:
        """A pool rebuilt from :meth:`state_dict` (size and dimension taken from the state)."""
        size, dim = state["vectors"].shape
        pool = cls(int(size), int(dim), device)
        pool.load_state_dict(state)
        return pool
