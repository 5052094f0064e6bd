"""Streaming training images: decoded on demand, at the model's side, through a torch ``DataLoader``.

The scale path for path-based datasets (CC3M-style imports) whose pixels do not fit in memory. Nothing is
decoded up front; a batch's images are read when it is about to train (``train.num_workers`` worker
processes, each decoding a whole batch, ``prefetch_factor`` batches ahead, pinned memory on CUDA), in the
very order the trainer asks for them — so a run streams exactly the pixels the in-memory path would index,
and trains to the same weights.

A missing or unreadable image does not stop training halfway: it becomes a black image and is counted
(distinct rows, reported in ``log.jsonl``); past ``max_bad_fraction`` of the dataset the run stops with one
line, the rule the importers use.
"""

from __future__ import annotations

import numbers
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch
from PIL import Image

from otcbench.data.format import decode_image, resize_centre_crop
from otcbench.errors import UserError

#: Batches each worker decodes ahead of the one training now.
PREFETCH_FACTOR = 4
#: First bad images kept (row and reason) for the report.
BAD_EXAMPLES = 5


def fit_square(a: np.ndarray, side: int) -> np.ndarray:
    """``a`` (HxWx3 uint8) as ``side``×``side`` by :func:`otcbench.data.format.resize_centre_crop`."""
    if a.shape[:2] == (side, side):
        return a
    return np.asarray(resize_centre_crop(Image.fromarray(a), side))


class StreamImages:
    """The images of a pair dataset, decoded when indexed, as uint8 ``[B, 3, side, side]``.

    Stands where the in-memory ``uint8 [N,3,H,W]`` tensor stands (``len``, ``shape``, ``dtype``, indexing
    by a row tensor, a list, a slice or an int), so data-side code that indexes rows keeps working; reads in
    the calling process use ``threads`` decoding threads, and a read of consecutive rows starts decoding the
    next as many rows in the background (data-side passes read chunks in row order). Batches of the
    training loop and whole-dataset embedding go through :class:`ImageLoader` instead (worker processes,
    prefetching).

    Args:
        ds: the pair dataset's ``datasets.Dataset`` (its ``image`` column: bytes or paths).
        root: the dataset directory (stored paths are resolved inside it).
        side: the side every image is brought to (the model's native resolution).
        max_bad_fraction: more distinct bad rows than this fraction of the dataset is an error.
        threads: decoding threads for reads in this process.
    """

    dtype = torch.uint8

    def __init__(self, ds: datasets.Dataset, root: Path | None, side: int, *, max_bad_fraction: float = 0.01,
                 threads: int = 1) -> None:
        self.table = ds.with_format("arrow")
        self.root = root
        self.side = side
        self.max_bad_fraction = max_bad_fraction
        self.threads = max(1, threads)
        self.bad_rows: set[int] = set()
        self.bad_examples: list[str] = []
        self._pool: ThreadPoolExecutor | None = None
        self._ahead_pool: ThreadPoolExecutor | None = None
        self._ahead: tuple[list[int], Future] | None = None  # the next contiguous chunk, being decoded

    def __len__(self) -> int:
        return len(self.table)

    @property
    def shape(self) -> torch.Size:
        return torch.Size((len(self), 3, self.side, self.side))

    def __getstate__(self) -> dict[str, Any]:
        # worker processes get the dataset, never this process's thread pool
        return {**self.__dict__, "_pool": None, "_ahead_pool": None, "_ahead": None}

    # ---- decoding (runs in worker processes too) --------------------------------------------------

    def cells(self, rows: Sequence[int]) -> list[dict[str, Any]]:
        """The raw ``{"bytes", "path"}`` cells of ``rows`` (in that order; no image is read)."""
        return self.table[list(rows)].column("image").to_pylist()

    def _decode(self, row: int, cell: dict[str, Any]) -> tuple[np.ndarray | None, str]:
        try:
            return fit_square(decode_image(cell, self.root), self.side), ""
        except UserError:
            raise  # a stored path outside the dataset: the dataset is bad, not one image
        except Exception as err:  # missing file, truncated or corrupt data
            what = cell.get("path") if cell.get("bytes") is None else "stored bytes"
            return None, f"row {row} ({what}): {type(err).__name__}"

    def read(self, rows: Sequence[int], pool: ThreadPoolExecutor | None = None
             ) -> tuple[torch.Tensor, list[tuple[int, str]]]:
        """Decode ``rows``: uint8 ``[B,3,side,side]`` (black where unreadable) and ``(row, "row N (...): Error")``
        per unreadable row. Pure: counting is the caller's (:meth:`note_bad`)."""
        rows = [int(r) for r in rows]
        cells = self.cells(rows)
        if pool is not None and len(rows) > 1:
            decoded = list(pool.map(self._decode, rows, cells))
        else:
            decoded = [self._decode(r, c) for r, c in zip(rows, cells, strict=True)]
        out = np.zeros((len(rows), self.side, self.side, 3), dtype=np.uint8)
        bad = []
        for i, (a, why) in enumerate(decoded):
            if a is None:
                bad.append((rows[i], why))
            else:
                out[i] = a
        return torch.from_numpy(out).permute(0, 3, 1, 2).contiguous(), bad

    # ---- the in-process accessor --------------------------------------------------------------------

    def __getitem__(self, index: Any) -> torch.Tensor:
        single = isinstance(index, numbers.Integral)
        rows = _rows(index, len(self))
        if self.threads > 1 and self._pool is None:
            self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="otcbench-decode")
            self._ahead_pool = ThreadPoolExecutor(1, thread_name_prefix="otcbench-read-ahead")
        ahead, self._ahead = self._ahead, None
        if ahead is not None and ahead[0] == rows:
            images, bad = ahead[1].result()
        else:
            images, bad = self.read(rows, self._pool)
        if self._ahead_pool is not None and len(rows) > 1 and rows[-1] + 1 < len(self) \
                and rows == list(range(rows[0], rows[0] + len(rows))):
            # a scan in row order (data-side passes: matching, scoring): decode the next chunk meanwhile
            nxt = list(range(rows[-1] + 1, min(len(self), rows[-1] + 1 + len(rows))))
            self._ahead = (nxt, self._ahead_pool.submit(self.read, nxt, self._pool))
        self.note_bad(bad)
        return images[0] if single else images

    def note_bad(self, bad: list[tuple[int, str]]) -> None:
        """Count unreadable rows (each row once, however often it is read); past the threshold, one line."""
        for row, line in bad:
            if row not in self.bad_rows:
                self.bad_rows.add(row)
                if len(self.bad_examples) < BAD_EXAMPLES:
                    self.bad_examples.append(line)
        n = len(self)
        if len(self.bad_rows) > self.max_bad_fraction * n:
            raise UserError(f"{len(self.bad_rows)} of {n} images are missing or unreadable (first: "
                            f"{'; '.join(self.bad_examples)}), more than train.max_bad_fraction "
                            f"{self.max_bad_fraction:g}; fix or re-import the dataset, or raise "
                            "--set train.max_bad_fraction")

    @property
    def n_bad(self) -> int:
        """Distinct rows found missing or unreadable so far (shown black)."""
        return len(self.bad_rows)

    def close(self) -> None:
        """Stop the decoding threads (reads still work afterwards, single-threaded until reopened)."""
        self._ahead = None
        for pool in (self._ahead_pool, self._pool):
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)
        self._pool = self._ahead_pool = None


def _rows(index: Any, n: int) -> list[int]:
    """Row numbers of an index: an int, a slice, a list/array or a 1-d integer (or bool) tensor."""
    if isinstance(index, numbers.Integral):
        index = [index]
    elif isinstance(index, slice):
        return list(range(n))[index]
    if isinstance(index, torch.Tensor):
        if index.dtype == torch.bool:
            index = index.nonzero().flatten()
        index = index.reshape(-1).tolist()
    rows = [int(i) for i in index]
    rows = [r + n if r < 0 else r for r in rows]
    if any(r < 0 or r >= n for r in rows):
        raise IndexError(f"row index out of range for {n} images")
    return rows


class _BatchReader(torch.utils.data.Dataset):
    """A map-style dataset whose items are whole batches: item ``rows`` → (images, bad rows, error or "")."""

    def __init__(self, source: StreamImages) -> None:
        self.source = source

    def __getitem__(self, rows: list[int]) -> tuple[torch.Tensor, list[tuple[int, str]], str]:  # type: ignore[override]
        try:
            return (*self.source.read(rows), "")
        except UserError as err:
            # returned, not raised: a worker's exception reaches the caller wrapped in a traceback
            return torch.empty(0, dtype=torch.uint8), [], str(err)

    def __len__(self) -> int:
        return len(self.source)


class _Plan(torch.utils.data.Sampler):
    """The batches of one pass, in order; replaced between passes (so persistent workers are reused)."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


class ImageLoader:
    """Raw images of given row batches, in order, decoded by ``num_workers`` worker processes.

    One ``DataLoader`` per loader: with ``persistent`` the workers survive between passes (the trainer
    keeps one for its epochs); ``pin_memory`` for CUDA (then ``.to(device, non_blocking=True)`` overlaps the
    copy). The loader never touches the global RNG, so streaming does not change any random draw.
    """

    def __init__(self, source: StreamImages, *, num_workers: int = 0, pin_memory: bool = False,
                 persistent: bool = False) -> None:
        self.source = source
        self.plan = _Plan()
        kwargs: dict[str, Any] = {}
        if num_workers > 0:
            kwargs.update(persistent_workers=persistent, prefetch_factor=PREFETCH_FACTOR)
        self.loader = torch.utils.data.DataLoader(
            _BatchReader(source), batch_size=None, sampler=self.plan, num_workers=num_workers,
            pin_memory=pin_memory, generator=torch.Generator(), **kwargs)

    def __call__(self, batches: Sequence[torch.Tensor]) -> Iterator[torch.Tensor]:
        """Yield the uint8 images of each of ``batches`` (row tensors), in order; bad rows are counted."""
        self.plan.batches = [b.tolist() for b in batches]
        if not self.plan.batches:
            return
        for images, bad, error in self.loader:
            if error:
                raise UserError(error)
            if bad:
                self.source.note_bad(bad)
            yield images

    def close(self) -> None:
        """Shut the worker processes down now (instead of at garbage collection)."""
        it = getattr(self.loader, "_iterator", None)
        if it is not None and hasattr(it, "_shutdown_workers"):
            it._shutdown_workers()
        self.loader._iterator = None
