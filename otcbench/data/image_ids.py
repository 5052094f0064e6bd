"""Which rows of a pair dataset show the same image: the ``image_id`` column, or ids derived from the images.

A COCO image has about five captions and a Visual Genome image dozens of region phrases: one image, several
rows. Defenses that decide per image (OTCCLIP's filter with ``filter_duplicates``) group rows by image id;
match precision counts a caption of the same image as describing it (docs/data.md, "Several captions per
image").

Where the ids come from:

* importers write an explicit ``image_id`` column: ``coco:<id>``, ``vg:<id>`` (a region crop adds its box),
  otherwise the image's stored name (its path under the source root, a tar member, a Hugging Face row);
* a dataset without the column (the synthetic world, datasets written before the column existed) gets
  derived ids: ``path:<stored path>`` for a path-based row, ``sha1:<digest>`` of the encoded bytes for a
  byte-stored one — so byte-identical images (a targeted poison's copies) share an id and every other row
  is its own image. Nothing is written back: such datasets keep their fingerprints.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import datasets
import torch

from otcbench.data.images import image_cells

#: The optional column holding each row's image id.
IMAGE_ID_COLUMN = "image_id"


def content_id(data: bytes) -> str:
    """The id of an image given by its encoded bytes: equal bytes, equal id."""
    return "sha1:" + hashlib.sha1(data).hexdigest()[:24]


def derived_image_ids(ds: datasets.Dataset) -> list[str]:
    """Ids for a dataset without an ``image_id`` column: the stored path, else a hash of the stored bytes."""
    return [content_id(c["bytes"]) if c["bytes"] is not None else f"path:{c['path']}" for c in image_cells(ds)]


def dataset_image_ids(ds: datasets.Dataset) -> list[str]:
    """Every row's image id: the ``image_id`` column where the dataset has one (an empty cell is derived)."""
    if IMAGE_ID_COLUMN not in ds.column_names:
        return derived_image_ids(ds)
    ids = list(ds[IMAGE_ID_COLUMN])
    if all(ids):
        return ids
    derived = derived_image_ids(ds)
    return [i or d for i, d in zip(ids, derived, strict=True)]


def image_groups(ids: Sequence[str]) -> torch.Tensor:
    """[N] int64 group of each row: rows with equal ids share a group; groups numbered by first appearance."""
    codes: dict[str, int] = {}
    return torch.tensor([codes.setdefault(i, len(codes)) for i in ids], dtype=torch.long)
