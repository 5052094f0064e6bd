"""``otcbench data export``: a pair dataset written out as COCO captions files, or as a pair dataset with
several captions per image.

``coco`` writes what MS-COCO ships — ``annotations/captions_<split>.json`` and ``<split>/<id>.jpg`` — so that
``otcbench data import --format coco`` reads it back like the real thing: the real-data path end to end on a
CPU. ``pairs`` writes the same images and captions as an otcbench pair dataset (PNG bytes as stored, image
ids), the native twin of the COCO files for comparing the two paths.

Rows are grouped by image id (docs/data.md, "Several captions per image"): one COCO image per id, with the
captions of its rows. The synthetic world has one caption per image; exported, each image gets
``captions_per_image`` (default 5, COCO's number) from the world's own caption model
(:mod:`otcbench.data.world_captions`). Labels do not survive COCO (its captions files have none); poisoned
datasets are refused (COCO has no poison flags: export the clean data, import it, then poison it).
"""

from __future__ import annotations

import io
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from PIL import Image
from pydantic import Field

from otcbench import __version__
from otcbench.config import Options
from otcbench.data.format import (
    DatasetMeta,
    PairDataset,
    build_pair_dataset,
    decode_image,
    image_cells,
    load_pair_dataset,
    read_image_cell,
    save_pair_dataset,
    staged_extras,
)
from otcbench.data.image_ids import image_groups
from otcbench.data.world_captions import extra_captions, world_config
from otcbench.errors import UserError

#: Captions per image of an exported synthetic world (MS-COCO's number).
WORLD_CAPTIONS = 5


class ExportOptions(Options):
    """Options of ``otcbench data export``."""

    format: Literal["coco", "pairs"] = Field("coco", description="coco: JPEGs + captions JSON; pairs: a pair dataset")
    captions_per_image: int | None = Field(
        None, ge=1, description="the synthetic world: captions per image, the first one the stored caption and the "
        f"rest written by the world's caption model (default {WORLD_CAPTIONS}); other datasets: at most this many "
        "of an image's rows (default all)",
    )
    split: str = Field("train2017", pattern=r"^[A-Za-z0-9_-]+$", description="coco: the split name in file names")
    quality: int = Field(95, ge=50, le=100, description="coco: JPEG quality (4:4:4 chroma; JPEG sources are copied)")
    labels: bool = Field(True, description="pairs: keep the rows' labels (false: -1, as a COCO import has)")


@dataclass
class ExportResult:
    """What an export wrote."""

    out: Path
    format: str
    images: int
    captions: int


@dataclass
class _Grouped:
    """One entry per image: the source row showing it and its captions."""

    rows: list[int]
    captions: list[list[str]]
    ids: list[str]


def _grouped(src: PairDataset, per_image: int | None) -> _Grouped:
    cfg = world_config(src.meta)
    if cfg is not None:
        k = per_image or WORLD_CAPTIONS
        return _Grouped(list(range(len(src))), extra_captions(src, k), [f"world:{i}" for i in range(len(src))])
    if any(src.poison_flags):
        raise UserError(f"{src.path} is poisoned and an export keeps no poison flags; export the clean dataset, "
                        "import it, then poison the import")
    groups = image_groups(src.image_ids).tolist()
    ids, caps = src.image_ids, src.captions
    first: dict[int, int] = {}
    captions: list[list[str]] = []
    for row, g in enumerate(groups):
        if g not in first:
            first[g] = row
            captions.append([])
        if per_image is None or len(captions[g]) < per_image:
            captions[g].append(caps[row])
    rows = [first[g] for g in range(len(first))]
    return _Grouped(rows, captions, [ids[r] for r in rows])


def _check_out(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"export directory {out} is not empty; choose a new or empty directory")


def export_dataset(src: str | Path, out: str | Path, options: ExportOptions | None = None, *,
                   command: str = "otcbench data export") -> ExportResult:
    """Export the pair dataset ``src`` to ``out`` (a new or empty directory) as ``options.format`` says."""
    o = options or ExportOptions()
    out = Path(out)
    _check_out(out)
    data = load_pair_dataset(src)
    grouped = _grouped(data, o.captions_per_image)
    if o.format == "coco":
        return _write_coco(data, grouped, out, o, command)
    return _write_pairs(data, grouped, out, o, command)


def _jpeg(cell: dict, root: Path, quality: int) -> tuple[bytes, int, int]:
    """JPEG bytes (a JPEG source as it is) with width and height."""
    raw = read_image_cell(cell, root)
    if raw[:3] == b"\xff\xd8\xff":
        with Image.open(io.BytesIO(raw)) as im:
            return raw, im.width, im.height
    arr = decode_image(cell, root)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=quality, subsampling=0)
    return buf.getvalue(), arr.shape[1], arr.shape[0]


def _write_coco(data: PairDataset, g: _Grouped, out: Path, o: ExportOptions, command: str) -> ExportResult:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.export-", dir=out.parent))
    try:
        (tmp / o.split).mkdir()
        (tmp / "annotations").mkdir()
        cells = image_cells(data.ds)
        images, anns = [], []
        for i, (row, caps) in enumerate(zip(g.rows, g.captions, strict=True), start=1):
            name = f"{i:012d}.jpg"
            blob, w, h = _jpeg(cells[row], data.path, o.quality)
            (tmp / o.split / name).write_bytes(blob)
            images.append({"id": i, "file_name": name, "width": w, "height": h, "otcbench_image_id": g.ids[i - 1]})
            anns += [{"id": len(anns) + j + 1, "image_id": i, "caption": c} for j, c in enumerate(caps)]
        doc = {"info": {"description": f"exported by otcbench {__version__} from {data.path}",
                        "otcbench": {"command": command, "source": str(data.path),
                                     "source_fingerprint": data.meta.fingerprint,
                                     "options": o.model_dump(mode="json")}},
               "licenses": [], "images": images, "annotations": anns}
        (tmp / "annotations" / f"captions_{o.split}.json").write_text(json.dumps(doc))
        if out.exists():
            out.rmdir()  # empty: checked before
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return ExportResult(out, "coco", len(images), len(anns))


def _write_pairs(data: PairDataset, g: _Grouped, out: Path, o: ExportOptions, command: str) -> ExportResult:
    cells = image_cells(data.ds)
    labels, content = list(data.ds["label"]), data.content
    images: list[bytes] = []
    caps: list[str] = []
    labs: list[int] = []
    cont: list[str] = []
    ids: list[str] = []
    for row, rc, image_id in zip(g.rows, g.captions, g.ids, strict=True):
        blob = read_image_cell(cells[row], data.path)
        for c in rc:
            images.append(blob)
            caps.append(c)
            labs.append(labels[row] if o.labels else -1)
            cont.append(content[row] if content is not None else "")
            ids.append(image_id)
    ds = build_pair_dataset(images, caps, labs, content=cont if content is not None else None, image_id=ids)
    meta = DatasetMeta(kind="pairs", otcbench_version=__version__,
                       created_by={"command": command, "options": o.model_dump(mode="json"),
                                   "source": str(data.path), "source_fingerprint": data.meta.fingerprint},
                       classnames=data.meta.classnames, templates=data.meta.templates, synonyms=data.meta.synonyms)
    with staged_extras(out) as (staging, extra):
        eval_path = data.eval_set_path()
        if eval_path is not None:
            shutil.copytree(eval_path, staging / "eval")
            extra["eval"] = staging / "eval"
            meta.eval_set = "eval"
        if out.exists():
            out.rmdir()  # empty: checked before
        save_pair_dataset(ds, out, meta, extra_dirs=extra)
    return ExportResult(out, "pairs", len(g.rows), len(caps))
