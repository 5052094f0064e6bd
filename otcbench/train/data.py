"""Training data in the form the loop consumes: uint8 images and token ids, indexed by row.

Two ways to hold the images, one interface (``TrainData.image_rows`` / ``TrainData.image_batches``):

* **memory** — the whole dataset decoded once into one uint8 tensor; epochs then cost no decoding at all.
  The default for anything that fits (the synthetic world: a few hundred MB of pixels at most).
* **stream** — path-based datasets far larger than memory (CC3M-style imports): images are decoded on
  demand at the model's side, batches through a ``DataLoader`` with worker processes and pinned memory
  (:mod:`otcbench.train.stream`).

``train.data_mode=auto`` (the default) picks memory when the pixels it would hold (images up to 4× the
model's side as stored, larger ones at the model's side) fit in ``MAX_IN_MEMORY_BYTES``, else stream.
Both give the same pixels for the same rows, so a run trains to the same weights either way (for images
stored at the model's side; otherwise the memory path keeps the stored size and resizes on the device,
the stream path resizes on the CPU).

Re-pairing defenses change which caption an image is trained with through ``Trainer.caption_index``, so
captions are kept as a separate token table.
"""

from __future__ import annotations

import io
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch

from otcbench.data.format import PairDataset, images_to_tensor, resolve_image_path
from otcbench.data.image_ids import image_groups
from otcbench.errors import UserError
from otcbench.train.stream import ImageLoader, StreamImages

#: Above this many bytes of decoded pixels ``auto`` streams and ``memory`` refuses.
MAX_IN_MEMORY_BYTES = 8 * 1024**3

DataMode = Literal["auto", "memory", "stream"]


@dataclass(frozen=True)
class LoaderOptions:
    """How streamed images are read: worker processes, pinned memory, the bad-image threshold."""

    num_workers: int = 0
    pin_memory: bool = False
    max_bad_fraction: float = 0.01


@dataclass
class TrainData:
    """Images, tokenised captions and metadata of a pair dataset.

    ``images`` is a uint8 ``[N,3,H,W]`` tensor (memory) or a :class:`StreamImages` (stream) that decodes
    the rows it is indexed with. Read raw images through :meth:`image_rows` (a few rows) and
    :meth:`image_batches` (a pass over many batches: workers and prefetching when streaming).
    """

    images: torch.Tensor | StreamImages  # uint8 [N,3,H,W], or decoded on demand
    tokens: torch.Tensor  # int64 [N,L]
    labels: torch.Tensor  # int64 [N]
    poison: list[str]
    captions: list[str]
    loader: LoaderOptions = field(default_factory=LoaderOptions)
    #: Ground-truth composition of each row's image ("" = unknown, e.g. rows added by an attack); None when
    #: the dataset has no ``content`` column. Kept after ``loader`` so positional construction still works.
    content: list[str] | None = None
    #: The image each row shows (several captions of one image share an id: docs/data.md); None when the data
    #: was built without ids (then pixel-identical images stand in for one image where a defense needs it).
    image_ids: list[str] | None = None
    _train_loader: ImageLoader | None = field(default=None, repr=False)

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def mode(self) -> Literal["memory", "stream"]:
        """``stream`` when images are decoded on demand, else ``memory``."""
        return "stream" if isinstance(self.images, StreamImages) else "memory"

    @property
    def n_bad_images(self) -> int:
        """Rows whose image was missing or unreadable when streamed (trained as black images)."""
        return self.images.n_bad if isinstance(self.images, StreamImages) else 0

    @property
    def bad_image_examples(self) -> list[str]:
        """The first bad streamed images, ``"row N (path): Error"``."""
        return list(self.images.bad_examples) if isinstance(self.images, StreamImages) else []

    def image_groups(self) -> torch.Tensor | None:
        """[N] int64: rows showing the same image share a group (numbered by first row); None without ids."""
        return None if self.image_ids is None else image_groups(self.image_ids)

    def image_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """Raw uint8 images ``[B,3,H,W]`` (CPU) of ``rows``, read now in this process."""
        return self.images[rows]

    def image_batches(self, batches: Sequence[torch.Tensor], *, persistent: bool = False) -> Iterator[torch.Tensor]:
        """Raw uint8 images of each row batch in ``batches``, in order.

        In memory: indexing. Streaming: decoded ahead by ``loader.num_workers`` worker processes (pinned
        when ``loader.pin_memory``); ``persistent`` keeps one loader's workers alive across calls (the
        trainer's epochs) — only one such pass may be in flight at a time; other passes get their own.
        """
        if not isinstance(self.images, StreamImages):
            return (self.images[b] for b in batches)
        if persistent:
            if self._train_loader is None:
                self._train_loader = self._new_loader(persistent=True)
            return self._train_loader(batches)
        return self._one_pass(batches)

    def _new_loader(self, persistent: bool) -> ImageLoader:
        assert isinstance(self.images, StreamImages)
        o = self.loader
        return ImageLoader(self.images, num_workers=o.num_workers, pin_memory=o.pin_memory, persistent=persistent)

    def _one_pass(self, batches: Sequence[torch.Tensor]) -> Iterator[torch.Tensor]:
        loader = self._new_loader(persistent=False)
        try:
            yield from loader(batches)
        finally:
            loader.close()

    def close(self) -> None:
        """Stop streaming workers and threads (a no-op in memory); reading again restarts them."""
        if self._train_loader is not None:
            self._train_loader.close()
            self._train_loader = None
        if isinstance(self.images, StreamImages):
            self.images.close()


def decoded_bytes(n: int, side: int) -> int:
    """Bytes of ``n`` decoded RGB uint8 images of ``side``×``side``."""
    return n * 3 * side * side


def choose_mode(mode: DataMode, n: int, side: int) -> Literal["memory", "stream"]:
    """``auto`` → memory when ``n`` images at ``side`` px fit in :data:`MAX_IN_MEMORY_BYTES`, else stream."""
    if mode == "auto":
        return "memory" if decoded_bytes(n, side) <= MAX_IN_MEMORY_BYTES else "stream"
    return mode


def load_train_data(
    data: PairDataset,
    tokenizer,
    image_size: int | None = None,
    *,
    mode: DataMode = "memory",
    loader: LoaderOptions | None = None,
) -> TrainData:
    """Training data of a pair dataset, images at ``image_size`` (as stored when None; ``stream`` needs it).

    ``mode``: ``memory`` decodes everything now (refused above :data:`MAX_IN_MEMORY_BYTES`), ``stream``
    decodes on demand, ``auto`` picks by size.
    """
    n = len(data)
    if n == 0:
        raise UserError(f"dataset {data.path} is empty; nothing to train on")
    side = image_size or 224  # a guess when the stored size is kept: what real images are resized to
    chosen = choose_mode(mode, n, side)
    if chosen == "memory" and decoded_bytes(n, side) > MAX_IN_MEMORY_BYTES:
        raise UserError(f"dataset {data.path} ({n} images at {side}px) is too large to decode into memory; "
                        "stream it (--set train.data_mode=stream) or use a smaller subset")
    if chosen == "stream" and image_size is None:
        raise ValueError("streaming needs an image_size (the model's side)")
    return _load(data, tokenizer, image_size, chosen, loader or LoaderOptions())


def load_for_model(data: PairDataset, tokenizer, side: int, mode: DataMode, loader: LoaderOptions) -> TrainData:
    """What the trainer trains on: ``data`` for a model of ``side`` px, held as ``mode`` says.

    In memory, images keep their stored size (the model input is resized on the device) unless they are
    over 4× the model's side: then they are resized once here rather than at every step.
    """
    n = len(data)
    if n == 0:
        raise UserError(f"dataset {data.path} is empty; nothing to train on")
    # in memory, images up to 4x the model's side keep their stored size: size the decision by that
    stored = _stored_side(data) or side
    held = stored if stored <= 4 * side else side
    chosen = choose_mode(mode, n, held)
    if chosen == "stream":
        return _load(data, tokenizer, side, "stream", loader)
    if decoded_bytes(n, held) > MAX_IN_MEMORY_BYTES:
        raise UserError(f"dataset {data.path} ({n} images at {held}px) is too large to decode into memory; "
                        "stream it (--set train.data_mode=stream or auto)")
    td = _load(data, tokenizer, None, "memory", loader)
    if td.images.shape[-1] != side and td.images.shape[-1] > 4 * side:
        td = _load(data, tokenizer, side, "memory", loader)
    return td


def _stored_side(data: PairDataset) -> int | None:
    """The longer side of the first image (its header only), or None when it cannot be read."""
    from PIL import Image

    try:
        cell = data.ds.with_format("arrow")[:1].column("image").to_pylist()[0]
        source = io.BytesIO(cell["bytes"]) if cell.get("bytes") is not None else \
            resolve_image_path(cell["path"], data.path)
        with Image.open(source) as img:
            return max(img.size)
    except Exception:  # a bad first image: the caller's default; the read itself reports it later
        return None


def _load(data: PairDataset, tokenizer, image_size: int | None, mode: Literal["memory", "stream"],
          loader: LoaderOptions) -> TrainData:
    images: torch.Tensor | StreamImages
    if mode == "stream":
        assert image_size is not None
        images = StreamImages(data.ds, data.path, image_size, max_bad_fraction=loader.max_bad_fraction,
                              threads=loader.num_workers)
    else:
        images = images_to_tensor(data.ds, size=image_size, root=data.path)
    captions = data.captions
    tokens = tokenizer(captions)
    labels = torch.tensor(data.ds["label"], dtype=torch.long)
    return TrainData(images, tokens, labels, data.poison_flags, captions, loader, content=data.content,
                     image_ids=data.image_ids)
