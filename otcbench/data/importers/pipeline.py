"""The import pipeline shared by every format: read and check images, store them, write atomically.

Records come from an importer (no image read yet). They are processed in chunks: each distinct image
is read and checked (fully decoded by default, so truncated files are caught), cropped/resized when
asked, and stored as bytes in the Arrow table, or as a file under ``OUT/images`` (copied, or linked to
the source file). A missing or unreadable image skips its row and is counted by reason; past
``max_bad_fraction`` the import stops with one line, as soon as the threshold can no longer be met.
Everything is written to a temporary sibling of ``OUT`` and renamed into place at the end, so a failed
import leaves nothing behind and never touches an existing ``OUT``.
"""

from __future__ import annotations

import io
import multiprocessing as mp
import os
import re
import shutil
import sys
import tempfile
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path, PurePosixPath
from typing import Any, Protocol

import datasets
from datasets.arrow_writer import ArrowWriter
from PIL import Image

from otcbench import __version__
from otcbench.data.format import (
    PAIR_FEATURES,
    DatasetMeta,
    build_pair_dataset,
    load_eval_set,
    resize_centre_crop,
    save_eval_set,
)
from otcbench.data.format import save_pair_dataset as _save_pairs
from otcbench.data.image_ids import IMAGE_ID_COLUMN
from otcbench.data.importers.base import (
    IMAGE_PROBLEMS,
    EvalImportOptions,
    ImageRef,
    Importer,
    PairImportOptions,
    Record,
    record_image_id,
)
from otcbench.data.importers.classes import assign_splits, load_classnames, load_templates, resolve_labels
from otcbench.errors import UserError

#: ``storage=auto`` keeps images as bytes up to this many records, links files beyond.
AUTO_BYTES_MAX = 20_000
#: Records per processing chunk (bounds memory: at most one chunk of images is held at a time).
CHUNK = 256
IMAGES_DIR = "images"
_EXT = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp", "GIF": "gif", "BMP": "bmp", "TIFF": "tif"}


class Reporter(Protocol):
    """Progress sink: the CLI passes a rich progress bar, the library default shows nothing."""

    def start(self, description: str, total: int | None) -> None: ...

    def advance(self, n: int) -> None: ...


class _Silent:
    def start(self, description: str, total: int | None) -> None:
        pass

    def advance(self, n: int) -> None:
        pass


@dataclass
class Loaded:
    """One image after reading and checking: its (possibly re-encoded) bytes, format and size, or why not."""

    ok: bool
    reason: str = ""
    detail: str = ""
    data: bytes | None = None  # set when the image was transformed, or when the caller needs the bytes
    ext: str = ""
    size: tuple[int, int] | None = None
    derived: bool = False  # cropped or resized: a new image, not the source file


@dataclass
class ImportResult:
    """What ``data import`` wrote: where, how many rows, how images are stored, what was skipped."""

    out: Path
    kind: str
    meta: DatasetMeta
    storage: str
    rows: int
    skipped: dict[str, int] = field(default_factory=dict)
    examples: dict[str, list[str]] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------------
# reading one image (runs in worker processes)


def _transform(img: Image.Image, crop: tuple[int, int, int, int] | None, size: int | None) -> Image.Image:
    """Crop to a region (clamped to the image), then resize the shorter side to ``size`` and centre-crop."""
    img = img.convert("RGB")
    if crop is not None:
        x, y, w, h = crop
        x0, y0 = max(0, x), max(0, y)
        x1, y1 = min(img.width, x + w), min(img.height, y + h)
        if x1 - x0 < 1 or y1 - y0 < 1:
            raise _BadRegion(f"region {crop} lies outside the {img.width}x{img.height} image")
        img = img.crop((x0, y0, x1, y1))
    if size is not None:
        img = resize_centre_crop(img, size)
    return img


class _BadRegion(Exception):
    pass


def _encode(img: Image.Image, fmt: str | None) -> tuple[bytes, str]:
    """Re-encode a derived image: JPEG sources stay JPEG (quality 95), everything else becomes PNG."""
    buf = io.BytesIO()
    if fmt == "JPEG":
        img.save(buf, format="JPEG", quality=95)
        return buf.getvalue(), "jpg"
    img.save(buf, format="PNG", compress_level=3)
    return buf.getvalue(), "png"


def load_image(task: tuple[ImageRef, tuple[int, int, int, int] | None, int | None, str, bool]) -> Loaded:
    """Read and check one image; never raises for a bad image (the reason is returned instead)."""
    ref, crop, size, verify, want_bytes = task
    transform = crop is not None or size is not None
    data = ref.data
    if data is None:
        assert ref.path is not None
        if verify == "none" and not transform and not want_bytes:
            if os.path.isfile(ref.path):
                return Loaded(True, ext=Path(ref.path).suffix.lstrip(".").lower())
            return Loaded(False, "missing_image", "no such file")
        try:
            with open(ref.path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return Loaded(False, "missing_image", "no such file")
        except OSError as err:  # a directory, no permission, an I/O error
            return Loaded(False, "missing_image", f"{type(err).__name__}: {err.strerror or err}")
    try:
        with Image.open(io.BytesIO(data)) as img:
            fmt = img.format
            ext = _EXT.get(fmt or "", (fmt or "bin").lower())
            if crop is not None or (size is not None and img.size != (size, size)):
                out = _transform(img, crop, size)
                blob, ext = _encode(out, fmt)
                return Loaded(True, data=blob, ext=ext, size=out.size, derived=True)
            if verify == "decode":
                img.load()
            elif verify == "header":
                img.verify()
            wh = img.size
    except _BadRegion as err:
        return Loaded(False, "bad_region", str(err))
    except Exception as err:  # PIL raises many types for broken files; all mean "unreadable"
        detail = re.sub(r" <_io\.BytesIO object at 0x[0-9a-f]+>", "", str(err))
        return Loaded(False, "unreadable_image", f"{type(err).__name__}: {detail}")
    keep = want_bytes and ref.data is None
    return Loaded(True, data=data if keep else None, ext=ext, size=wh)


def _pool_map(workers: int) -> tuple[Callable[[Callable[[Any], Any], list[Any]], Iterable[Any]], Any]:
    if workers <= 1:
        return (lambda fn, items: map(fn, items)), None
    # fork: workers inherit the imported modules (no re-import of torch per worker)
    ctx = mp.get_context("fork") if sys.platform.startswith("linux") else None
    pool = ProcessPoolExecutor(max_workers=workers, mp_context=ctx)
    return (lambda fn, items: pool.map(fn, items, chunksize=8)), pool


def _batched(items: Iterable[Record], n: int) -> Iterator[list[Record]]:
    it = iter(items)
    while chunk := list(islice(it, n)):
        yield chunk


# --------------------------------------------------------------------------------------------------
# storing


class _Store:
    """Turns a checked image into the ``image`` cell of a row (bytes, or a path under ``images/``)."""

    def __init__(self, storage: str, staging: Path, size: int | None) -> None:
        self.storage = storage
        self.images = staging / IMAGES_DIR
        self.size = size
        self.files = 0
        self.symlinks = 0

    def cell(self, rec: Record, res: Loaded) -> dict[str, Any]:
        if self.storage == "bytes":
            data = res.data if res.data is not None else rec.image.data
            assert data is not None
            return {"bytes": data, "path": None}
        name = self.name(rec, res)
        dest = self.images.joinpath(*PurePosixPath(name).parts)
        if not (dest.exists() or dest.is_symlink()):  # written before for this image (several captions)
            dest.parent.mkdir(parents=True, exist_ok=True)
            data = res.data if res.data is not None else rec.image.data
            if data is not None:
                dest.write_bytes(data)
            elif self.storage == "copy":
                shutil.copyfile(rec.image.path, dest)  # type: ignore[arg-type]
            else:
                try:
                    os.link(rec.image.path, dest)  # type: ignore[arg-type]
                except OSError:  # another file system (or no hard links): a symbolic link to the source
                    os.symlink(os.path.abspath(rec.image.path), dest)  # type: ignore[arg-type]
                    self.symlinks += 1
            self.files += 1
        return {"bytes": None, "path": f"{IMAGES_DIR}/{name}"}

    def name(self, rec: Record, res: Loaded) -> str:
        """The stored name: the source's relative path, tagged when the image was cropped or resized."""
        name = rec.image.name
        p = PurePosixPath(name)
        if res.derived:
            tags = []
            if rec.crop is not None:
                tags.append("x{}y{}w{}h{}".format(*rec.crop))
            if self.size is not None:
                tags.append(f"s{self.size}")
            return str(p.with_name(f"{p.stem}.{'.'.join(tags)}.{res.ext}"))
        if not p.suffix and res.ext:
            return f"{name}.{res.ext}"
        return name


#: Pair datasets are written with their image ids; eval sets without.
PAIR_ID_FEATURES = datasets.Features({**PAIR_FEATURES, IMAGE_ID_COLUMN: datasets.Value("string")})


def _writer(path: Path, features: datasets.Features) -> ArrowWriter:
    return ArrowWriter(features=features, path=str(path))


def _finish(writer: ArrowWriter | None, path: Path) -> datasets.Dataset:
    if writer is None:
        return build_pair_dataset([], [], image_id=[])
    writer.finalize()
    writer.close()
    return datasets.Dataset.from_file(str(path))


# --------------------------------------------------------------------------------------------------
# the pipeline


def run_import(
    importer: Importer,
    out: str | Path,
    *,
    command: str = "otcbench data import",
    overwrite: bool = False,
    reporter: Reporter | None = None,
) -> ImportResult:
    """Import ``importer``'s source into ``out`` (a pair dataset or an eval set, by the format's kind)."""
    out = Path(out)
    rep = reporter or _Silent()
    opts = importer.options
    if out.exists() and not overwrite:
        raise UserError(f"output {out} already exists; choose another path, remove it, or pass --overwrite")
    eval_set = None
    if isinstance(opts, PairImportOptions) and opts.eval_set is not None:
        eval_set = load_eval_set(opts.eval_set)
    importer.classnames = load_classnames(opts.classnames)

    rep.start(f"reading the {importer.name} source", None)
    scan = importer.scan()
    if importer.kind == "eval":
        assert isinstance(opts, EvalImportOptions)
        records_list = list(islice(scan.records, opts.limit))
        if not records_list:
            raise UserError(f"source {importer.src} has no images ({importer.layout})")
        classnames, labels = resolve_labels([r.label_raw for r in records_list],  # type: ignore[misc]
                                            importer.classnames, f"source {importer.src}", scan.label_universe)
        for r, lab in zip(records_list, labels, strict=True):
            r.label = lab
        presplit = any(r.split is not None for r in records_list)
        if presplit and opts.splits is not None:
            raise UserError(f"source {importer.src} is already split into {sorted({r.split for r in records_list})}"
                            "; --splits applies only to unsplit sources")
        if not presplit:
            for r, s in zip(records_list, assign_splits(labels, opts.splits, opts.seed, classnames), strict=True):
                r.split = s
            for r in records_list:
                if r.split is None:
                    importer.skips.add("not_in_splits", r.image.key)
            records_list = [r for r in records_list if r.split is not None]
        templates = load_templates(opts.templates, opts.classnames)
        records: Iterable[Record] = records_list
        total: int | None = len(records_list)
    else:
        records = islice(scan.records, opts.limit)
        total = scan.total if opts.limit is None or scan.total is None else min(scan.total, opts.limit)
        if total == 0:
            raise UserError(f"source {importer.src} has no records ({importer.layout})")
        classnames = importer.classnames or scan.classnames or (eval_set.classnames if eval_set else None) or []
        if opts.templates is not None or (classnames and not eval_set):
            templates = load_templates(opts.templates, opts.classnames)
        else:
            templates = list(eval_set.templates) if eval_set and classnames else []

    storage = opts.storage
    if storage == "auto":
        storage = "bytes" if total is not None and total <= AUTO_BYTES_MAX else "link"

    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.import-", dir=out.parent))
    try:
        result = _process(importer, records, total, storage, staging, rep)
        writers, rows, sizes, store, processed, late_skips = result
        skips = importer.skips
        n_skipped = sum(skips.counts.values())
        # records: every source record seen — those that reached the image stage and those skipped before
        n_records = processed + n_skipped - late_skips
        _check_threshold(importer, n_records - skips.counts.get("not_in_splits", 0), final=True)
        if rows == 0:
            reasons = ", ".join(f"{n} {r.replace('_', ' ')}" for r, n in skips.counts.most_common(3))
            raise UserError(f"no usable rows in {importer.src} ({processed} records read; skipped: {reasons or '-'})")
        counts: dict[str, int] = {"records": n_records, "rows": rows, "skipped": n_skipped}
        counts.update({f"skipped_{r}": n for r, n in sorted(skips.counts.items())})
        if storage != "bytes":
            counts["image_files"] = store.files
        meta = DatasetMeta(
            kind=importer.kind,
            otcbench_version=__version__,
            created_by={
                "command": command,
                "format": importer.name,
                "source": str(importer.src),
                "options": opts.model_dump(mode="json"),
                **({"seed": opts.seed} if isinstance(opts, EvalImportOptions) else {}),
            },
            classnames=classnames,
            templates=templates,
            counts=counts,
        )
        meta_extra = {
            "storage": storage,
            "skipped_examples": skips.examples,
            **({"symlinked_images": store.symlinks} if store.symlinks else {}),
            **scan.info,
        }
        meta = meta.model_copy(update={"import_report": meta_extra})
        extra: dict[str, Path] = {}
        if (staging / IMAGES_DIR).is_dir():
            extra[IMAGES_DIR] = staging / IMAGES_DIR
        rep.start("writing the dataset", None)
        if importer.kind == "eval":
            splits = {name: _finish(w, staging / f"{name}.arrow") for name, w in writers.items()}
            order = [s for s in ("train", "val", "test", "targets") if s in splits]
            if "test" not in splits:
                raise UserError(f"no image of {importer.src} landed in the test split; check --splits or the layout")
            meta = save_eval_set({s: splits[s] for s in order}, out, meta, overwrite=overwrite, extra_dirs=extra)
        else:
            ds = _finish(writers.get("pairs"), staging / "pairs.arrow")
            if eval_set is not None:
                shutil.copytree(eval_set.path, staging / "eval")
                extra["eval"] = staging / "eval"
                meta.eval_set = "eval"
            meta = _save_pairs(ds, out, meta, overwrite=overwrite, extra_dirs=extra)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return ImportResult(out, importer.kind, meta, storage, rows, dict(importer.skips.counts),
                        dict(importer.skips.examples))


def _check_threshold(importer: Importer, attempted: int, *, total: int | None = None, final: bool = False) -> None:
    """Stop when missing/unreadable images exceed ``max_bad_fraction`` of the records.

    While importing, ``total`` (the source's record count, when known) lets it stop as soon as the
    threshold can no longer be met; ``final`` checks against the ``attempted`` records at the end.
    """
    skips = importer.skips
    bad = skips.bad_images
    limit = importer.options.max_bad_fraction
    denominator = attempted if final else total
    if bad == 0 or denominator is None or denominator == 0 or bad <= limit * denominator:
        return
    kinds = ", ".join(f"{skips.counts[r]} {r.replace('_', ' ')}" for r in IMAGE_PROBLEMS if skips.counts[r])
    seen = f"{bad} of {denominator}" if final or attempted >= denominator else \
        f"{bad} of the first {attempted} (of {denominator})"
    raise UserError(f"{seen} images of {importer.src} are missing or unreadable ({kinds}; first: "
                    f"{skips.first_bad()}), more than --max-bad-fraction {limit:g}; fix the source, or raise "
                    "--max-bad-fraction to skip them")


def _process(
    importer: Importer, records: Iterable[Record], total: int | None, storage: str, staging: Path, rep: Reporter
) -> tuple[dict[str, ArrowWriter], int, Counter[tuple[int, int]], _Store, int, int]:
    opts = importer.options
    skips = importer.skips
    store = _Store(storage, staging, opts.image_size)
    writers: dict[str, ArrowWriter] = {}
    sizes: Counter[tuple[int, int]] = Counter()
    cache: OrderedDict[tuple[str, Any], Loaded] = OrderedDict()  # several captions of one image: read once
    want_bytes = storage == "bytes"
    rows = processed = late_skips = 0
    one_size = importer.kind == "eval" and opts.image_size is None
    mapper, pool = _pool_map(opts.workers)
    rep.start("importing images", total)
    try:
        for chunk in _batched(records, CHUNK):
            todo: dict[tuple[str, Any], tuple[Any, ...]] = {}
            for rec in chunk:
                k = (rec.image.key, rec.crop)
                if k not in cache and k not in todo:
                    todo[k] = (rec.image, rec.crop, opts.image_size, opts.verify, want_bytes)
            for k, res in zip(todo, mapper(load_image, list(todo.values())), strict=True):
                cache[k] = res
            for rec in chunk:
                k = (rec.image.key, rec.crop)
                res = cache[k]
                cache.move_to_end(k)
                processed += 1
                if not res.ok:
                    skips.add(res.reason, f"{rec.image.key}: {res.detail}")
                    late_skips += 1
                    continue
                if res.size is not None:
                    sizes[res.size] += 1
                    if one_size and len(sizes) > 1:  # an eval set needs one size: say so at the first misfit
                        a, b = list(sizes)[:2]
                        raise UserError(f"the images of {importer.src} differ in size ({a[0]}x{a[1]}, {b[0]}x{b[1]}: "
                                        f"{rec.image.key}); an eval set needs one size: pass --image-size PX")
                split = rec.split or "pairs"
                features = PAIR_ID_FEATURES if split == "pairs" else PAIR_FEATURES
                if split not in writers:
                    writers[split] = _writer(staging / f"{split}.arrow", features)
                row = {"image": store.cell(rec, res), "caption": rec.caption, "label": rec.label,
                       "poison": "", "origin": -1}
                if split == "pairs":
                    row[IMAGE_ID_COLUMN] = record_image_id(rec)
                writers[split].write(features.encode_example(row))
                rows += 1
            while len(cache) > 2 * CHUNK:
                cache.popitem(last=False)
            rep.advance(len(chunk))
            _check_threshold(importer, processed, total=total)
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    return writers, rows, sizes, store, processed, late_skips
