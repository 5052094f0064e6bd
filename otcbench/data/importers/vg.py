"""Visual Genome region descriptions: region phrases as captions, of the whole image or the region crop.

Layout of the official release: ``region_descriptions.json`` (a list of ``{"id": image_id, "regions":
[{"x", "y", "width", "height", "phrase", …}]}``), ``image_data.json`` (``{"image_id", "url", …}``; the
URL's last two parts, ``VG_100K_2/1.jpg``, name the file) and the image directories ``VG_100K/`` and
``VG_100K_2/``. Without ``image_data.json`` images are found by id in those directories.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from otcbench.data.importers.base import (
    IMAGE_EXTENSIONS,
    IMPORTERS,
    Importer,
    PairImportOptions,
    Record,
    Scan,
    clean_caption,
    file_ref,
)
from otcbench.data.importers.coco import load_json
from otcbench.errors import UserError

REGIONS_FILE = "region_descriptions.json"
IMAGE_DATA_FILE = "image_data.json"
IMAGE_DIRS = ("VG_100K", "VG_100K_2", "images", ".")


class VgOptions(PairImportOptions):
    image_root: str | None = Field(None, description="directory holding VG_100K/ and VG_100K_2/ (default: the "
                                   "JSON's directory)")
    image_data: str | None = Field(None, description="image_data.json (default: beside the regions file, if there)")
    regions: Literal["whole", "crop"] = Field("whole", description="pair each phrase with the whole image, or "
                                              "with the region cropped out of it")
    per_image: bool = Field(False, description="one pair per image (its first region) instead of one per region")
    max_regions: int | None = Field(None, ge=1, description="at most this many regions per image (the first ones; "
                                    "default all, about 50: every row of an image carries its id, vg:<id>)")
    min_region_size: int = Field(16, ge=1, description="crop mode: skip regions narrower or shorter than this (px)")


@IMPORTERS.register("vg")
class VgImporter(Importer):
    """Visual Genome region descriptions: one pair per region phrase (whole image or region crop)."""

    Options = VgOptions
    layout = "region_descriptions.json (or its directory) with image_data.json and VG_100K*/ image directories"

    def scan(self) -> Scan:
        opts: VgOptions = self.options  # type: ignore[assignment]
        src = self.src_path()
        path = src / REGIONS_FILE if src.is_dir() else src
        if not path.is_file():
            raise UserError(f"{src} has no {REGIONS_FILE}; pass the region descriptions file")
        root = Path(opts.image_root) if opts.image_root else path.parent
        if not root.is_dir():
            raise UserError(f"--image-root {root} is not a directory")
        doc = load_json(path, "Visual Genome regions file")
        if not isinstance(doc, list) or not doc:
            raise UserError(f"{path} is not a Visual Genome region descriptions file (expected a non-empty list)")
        files = self._image_files(opts, path, root)
        records = []
        for entry in doc:
            if not isinstance(entry, dict) or not isinstance(entry.get("regions"), list):
                raise UserError(f"{path}: an entry lacks its 'regions' list")
            regions = entry["regions"]
            image_id = entry.get("id", entry.get("image_id"))
            if image_id is None and regions:
                image_id = regions[0].get("image_id")
            if image_id is None:
                raise UserError(f"{path}: an entry has no image id ('id')")
            rel = files(image_id)
            if rel is None:
                self.skips.add("missing_image", f"image {image_id}: no file found under {root}")
                continue
            ref = file_ref(root / rel, root, key=str(root / rel))
            taken = 0
            for reg in regions:
                if (opts.per_image and taken == 1) or (opts.max_regions is not None and taken >= opts.max_regions):
                    break
                phrase = clean_caption(reg.get("phrase"))
                if not phrase:
                    self.skips.add("empty_caption", f"region {reg.get('region_id')} of image {image_id}")
                    continue
                crop = None
                if opts.regions == "crop":
                    try:
                        crop = (int(reg["x"]), int(reg["y"]), int(reg["width"]), int(reg["height"]))
                    except (KeyError, TypeError, ValueError):
                        self.skips.add("bad_region", f"region {reg.get('region_id')} of image {image_id}")
                        continue
                    if min(crop[2], crop[3]) < opts.min_region_size:
                        self.skips.add("small_region", f"region {reg.get('region_id')} of image {image_id}")
                        continue
                records.append(Record(ref, phrase, crop=crop, image_id=f"vg:{image_id}"))
                taken += 1
        if not records and not self.skips.counts:
            raise UserError(f"{path} holds no regions; nothing to import")
        return Scan(records, len(records) + sum(self.skips.counts.values()),
                    info={"image_root": str(root), "regions": opts.regions})

    def _image_files(self, opts: VgOptions, regions_path: Path, root: Path) -> Callable[[Any], str | None]:
        """image id → path relative to the root (from image_data.json URLs, else by listing directories)."""
        data_path = Path(opts.image_data) if opts.image_data else regions_path.parent / IMAGE_DATA_FILE
        if opts.image_data and not data_path.is_file():
            raise UserError(f"--image-data {data_path} does not exist")
        by_url: dict[Any, str] = {}
        if data_path.is_file():
            data = load_json(data_path, "Visual Genome image data")
            if not isinstance(data, list):
                raise UserError(f"{data_path} is not Visual Genome image data (expected a list)")
            for d in data:
                if isinstance(d, dict) and d.get("url"):
                    image_id = d.get("image_id", d.get("id"))
                    parts = str(d["url"]).rstrip("/").split("/")
                    by_url[image_id] = "/".join(parts[-2:])
        listing: dict[str, str] | None = None

        def find(image_id: Any) -> str | None:
            nonlocal listing
            rel = by_url.get(image_id)
            if rel is not None and (root / rel).is_file():
                return rel
            if rel is not None and (root / Path(rel).name).is_file():
                return Path(rel).name
            if listing is None:  # listed once, only when some id is not found from the URLs
                listing = {}
                for d in IMAGE_DIRS:
                    folder = root / d
                    if folder.is_dir():
                        for f in sorted(folder.iterdir()):
                            if f.suffix.lower() in IMAGE_EXTENSIONS:
                                listing.setdefault(f.stem, str(f.relative_to(root).as_posix()))
            return listing.get(str(image_id))

        return find
