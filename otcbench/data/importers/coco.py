"""COCO captions: ``captions_train2017.json`` plus the image directory (``train2017/``).

One pair per caption (COCO has about five per image; ``--captions-per-image K`` keeps the K lowest annotation
ids), or one per image (``--per-image``: its caption with the lowest annotation id). Every row carries its
image's id (``coco:<id>``). Images are in ``images[].file_name`` under the image root; by default
the root is ``<split>/`` beside or above the JSON's directory (``annotations/../train2017``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import Field

from otcbench.data.importers.base import IMPORTERS, Importer, PairImportOptions, Record, Scan, clean_caption, file_ref
from otcbench.errors import UserError


class CocoOptions(PairImportOptions):
    image_root: str | None = Field(None, description="directory of the images (default: <split>/ near the JSON)")
    per_image: bool = Field(False, description="one pair per image (first caption) instead of one per caption; "
                            "the same as captions_per_image=1")
    captions_per_image: int | None = Field(
        None, ge=1, description="at most this many captions per image, the lowest annotation ids first "
        "(default: all, about five; every row carries the image's id, coco:<id>, so defenses that decide per "
        "image see one image)",
    )


def load_json(path: Path, what: str) -> Any:
    """Parse a JSON file with one-line errors."""
    try:
        with path.open(encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as err:
        raise UserError(f"{what} {path} is not valid JSON ({err.msg} at line {err.lineno})") from None
    except UnicodeDecodeError:
        raise UserError(f"{what} {path} is not UTF-8 text") from None


def default_image_root(json_path: Path, first_file: str | None) -> Path | None:
    """COCO's usual layouts: ``annotations/captions_<split>.json`` next to ``<split>/``, or images beside it."""
    split = json_path.stem.removeprefix("captions_")
    candidates = [json_path.parent.parent / split, json_path.parent / split, json_path.parent / "images" / split,
                  json_path.parent]
    existing = [c for c in candidates if c.is_dir()]
    for c in existing:
        if first_file is None or (c / first_file).is_file():
            return c
    return None


@IMPORTERS.register("coco")
class CocoImporter(Importer):
    """COCO captions JSON + image directory; one pair per caption (or per image)."""

    Options = CocoOptions
    layout = "captions_train2017.json (images in train2017/ beside annotations/, or --image-root)"

    def scan(self) -> Scan:
        opts: CocoOptions = self.options  # type: ignore[assignment]
        path = self.src_path(want="file")
        doc = load_json(path, "COCO captions file")
        if not isinstance(doc, dict) or not isinstance(doc.get("images"), list) \
                or not isinstance(doc.get("annotations"), list):
            raise UserError(f"{path} is not a COCO captions file (needs 'images' and 'annotations' lists)")
        images: dict[Any, str] = {}
        for im in doc["images"]:
            if not isinstance(im, dict) or "id" not in im or not im.get("file_name"):
                raise UserError(f"{path}: an entry of 'images' lacks 'id' or 'file_name'")
            if im["id"] in images:
                raise UserError(f"{path}: image id {im['id']!r} is listed twice in 'images' ({images[im['id']]} and "
                                f"{im['file_name']}); image ids must be unique — fix or regenerate the file")
            images[im["id"]] = str(im["file_name"])
        if not images or not doc["annotations"]:
            raise UserError(f"{path} lists no images or no captions; nothing to import")
        if opts.image_root is not None:
            root = Path(opts.image_root)
            if not root.is_dir():
                raise UserError(f"--image-root {root} is not a directory")
        else:
            found = default_image_root(path, next(iter(images.values())))
            if found is None:
                raise UserError(f"no image directory found for {path} (looked for {path.stem.removeprefix('captions_')}"
                                "/ beside and above it); pass --image-root DIR")
            root = found
        by_image: dict[Any, list[tuple[Any, str]]] = {}
        for ann in doc["annotations"]:
            if not isinstance(ann, dict) or "image_id" not in ann:
                raise UserError(f"{path}: an annotation lacks 'image_id'")
            if ann["image_id"] not in images:
                self.skips.add("unknown_image_id", f"annotation {ann.get('id')}: image_id {ann['image_id']}")
                continue
            caption = clean_caption(ann.get("caption"))
            if not caption:
                self.skips.add("empty_caption", f"annotation {ann.get('id')}")
                continue
            by_image.setdefault(ann["image_id"], []).append((ann.get("id", 0), caption))
        records = []
        take = 1 if opts.per_image else opts.captions_per_image  # None: all of them
        for image_id in sorted(images, key=_sort_key):
            caps = sorted(by_image.get(image_id, []), key=lambda a: _sort_key(a[0]))
            if not caps:
                self.skips.add("no_caption", f"image {image_id} ({images[image_id]})")
                continue
            ref = file_ref(root / images[image_id], root)
            for _, caption in caps[:take]:
                records.append(Record(ref, caption, image_id=f"coco:{image_id}"))
        return Scan(records, len(records) + sum(self.skips.counts.values()), info={"image_root": str(root)})


def _sort_key(v: Any) -> tuple[int, Any]:
    """Ids are ints in COCO; sort anything else after them, as strings."""
    return (0, v) if isinstance(v, int) else (1, str(v))
