"""Reading the images of a dataset: stored paths resolved inside the dataset directory, cells decoded.

A pair dataset's ``image`` column holds ``{"bytes", "path"}`` cells: encoded bytes, or a path relative to the
dataset directory (docs/data.md, "Storing images"). Everything here reads them with otcbench's rules —
``datasets``' own decoding resolves paths against the working directory instead.
"""

from __future__ import annotations

import io
from collections.abc import Iterator, Sequence
from pathlib import Path, PurePosixPath
from typing import Any

import datasets
import numpy as np
import torch
from PIL import Image

from otcbench.errors import UserError


def png_bytes(img: np.ndarray) -> bytes:
    """Lossless PNG of a uint8 HxWx3 array (fast compression: speed over size for small images)."""
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def resolve_image_path(path: str, root: Path | None) -> Path:
    """The file a stored image path names: inside ``root`` (the dataset directory), never outside it.

    Stored paths are relative POSIX paths; an absolute path or a ``..`` component is refused, so a
    crafted dataset cannot read files elsewhere. The check is on the stored string: links that otcbench
    itself creates (``--link-images``, a poisoned set's ``source`` link) are followed. Without a root
    (no dataset directory) the path is used as given.
    """
    if root is None:
        return Path(path)
    rel = PurePosixPath(path)
    if rel.is_absolute() or ".." in rel.parts or not rel.parts or "\\" in path:
        raise UserError(f"image path {path!r} points outside the dataset directory {root}; stored paths must be "
                        "relative and stay inside it — re-import the dataset")
    return root.joinpath(*rel.parts)


def decode_image(item: Any, root: Path | None = None) -> np.ndarray:
    """Decode one ``image`` cell (``{"bytes", "path"}`` or a PIL image) to uint8 HxWx3."""
    if isinstance(item, Image.Image):
        img = item
    elif item.get("bytes") is not None:
        img = Image.open(io.BytesIO(item["bytes"]))
    else:
        img = Image.open(resolve_image_path(item["path"], root))
    return np.asarray(img.convert("RGB"))


def resize_centre_crop(img: Image.Image, size: int) -> Image.Image:
    """``img`` as ``size``×``size``: shorter side resized to ``size`` (bicubic), then centre-cropped.

    CLIP's evaluation transform; the importers' ``--image-size`` and the streamed training images both use
    it. A square image is a plain bicubic resize (the pixels ``images_to_tensor(size=...)`` gives).
    """
    if img.size == (size, size):
        return img
    scale = size / min(img.size)
    w, h = max(size, round(img.width * scale)), max(size, round(img.height * scale))
    img = img.resize((w, h), Image.BICUBIC)
    left, top = (w - size) // 2, (h - size) // 2
    return img.crop((left, top, left + size, top + size))


def read_image_cell(item: dict[str, Any], root: Path | None = None) -> bytes:
    """The encoded bytes of one raw ``image`` cell: its stored bytes, or the file its path names."""
    if item["bytes"] is not None:
        return item["bytes"]
    return resolve_image_path(item["path"], root).read_bytes()


def image_bytes(ds: datasets.Dataset, root: Path | None = None) -> list[bytes]:
    """The encoded bytes of every image of ``ds`` (stored bytes, or the file a relative path names)."""
    raw = ds.cast_column("image", datasets.Image(decode=False))
    return [read_image_cell(item, root) for item in raw["image"]]


def image_cells(ds: datasets.Dataset) -> list[dict[str, Any]]:
    """The raw ``{"bytes", "path"}`` cell of every row (no file is read)."""
    return ds.with_format("arrow")["image"].to_pylist()


class ImageBlobs(Sequence[bytes]):
    """The encoded image of each row of a dataset, read only when indexed.

    What attacks see of the source images: a path-based dataset of millions of rows is never read whole,
    only the rows an attack picks.
    """

    def __init__(self, cells: list[dict[str, Any]], root: Path | None) -> None:
        self.cells = cells
        self.root = root

    def __len__(self) -> int:
        return len(self.cells)

    def __getitem__(self, i: int) -> bytes:  # type: ignore[override]
        if isinstance(i, slice):
            raise TypeError("ImageBlobs supports integer indices only")
        return read_image_cell(self.cells[i], self.root)

    def __iter__(self) -> Iterator[bytes]:
        for cell in self.cells:
            yield read_image_cell(cell, self.root)


def images_to_tensor(ds: datasets.Dataset, size: int | None = None, root: Path | None = None) -> torch.Tensor:
    """Decode every image of ``ds`` into one uint8 tensor ``[N,3,H,W]`` (resized to ``size`` if given).

    The in-memory path for small datasets (the synthetic world): decoding once makes epochs cheap.
    """
    raw = ds.cast_column("image", datasets.Image(decode=False))
    arrays = []
    for i, item in enumerate(raw["image"]):
        try:
            a = decode_image(item, root)
        except UserError:
            raise
        except Exception as err:  # a missing or broken file: one line naming the row, not a traceback
            what = item["path"] if item["bytes"] is None else "stored bytes"
            raise UserError(f"image of row {i} ({what}) in {root or 'the dataset'} could not be read "
                            f"({type(err).__name__}); re-import or recreate the dataset") from None
        if size is not None and a.shape[:2] != (size, size):
            a = np.asarray(Image.fromarray(a).resize((size, size), Image.BICUBIC))
        arrays.append(a)
    if not arrays:
        return torch.empty(0, 3, size or 0, size or 0, dtype=torch.uint8)
    shapes = {a.shape for a in arrays}
    if len(shapes) > 1:
        raise UserError(f"images have different sizes {sorted(shapes)[:3]}; pass a size to resize them")
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
