"""The importer interface: options, records, the format registry and the skip ledger.

An importer reads one source layout (a CSV file, COCO captions, a tar shard set, …) and yields
:class:`Record` s — an image reference, a caption, a label — without reading any image. Reading,
checking, resizing and storing the images, counting what could not be used and writing the dataset
atomically is shared by every format (:mod:`otcbench.data.importers.pipeline`).
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, ClassVar, Literal

from pydantic import Field

from otcbench.config import Options
from otcbench.errors import UserError
from otcbench.registry import Registry

#: ``otcbench data import --format NAME``: name → importer class.
IMPORTERS: Registry[Importer] = Registry("format")

#: Skip reasons that are image problems: they count against ``max_bad_fraction``.
IMAGE_PROBLEMS = ("missing_image", "unreadable_image")

#: File extensions taken for images when a layout does not say which files are images.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


class ImportOptions(Options):
    """Options of every format: storage, image checks and the bad-image threshold."""

    storage: Literal["auto", "bytes", "copy", "link"] = Field(
        "auto",
        description="bytes: images inside the dataset's Arrow files; copy: image files under OUT/images; "
        "link: hard links (symbolic across file systems) under OUT/images; auto: bytes up to "
        "20,000 images, link beyond",
    )
    image_size: int | None = Field(
        None, ge=8, le=4096,
        description="resize the shorter side to PX and centre-crop PX×PX (images re-encoded); default: as is",
    )
    verify: Literal["decode", "header", "none"] = Field(
        "decode", description="decode every image fully (catches truncated files), read headers only, or "
        "only check that files exist",
    )
    max_bad_fraction: float = Field(
        0.01, ge=0, le=1, description="error when more than this fraction of images are missing or unreadable"
    )
    limit: int | None = Field(None, ge=1, description="import only the first N records of the source")
    workers: int = Field(1, ge=1, le=256, description="processes reading and checking images")
    classnames: str | None = Field(
        None, description="'imagenet' (open_clip's 1000 ImageNet names) or a text file, one name per line"
    )
    templates: str | None = Field(
        None, description="'imagenet' (OpenAI's 80), 'simple' (open_clip's 7) or a file, one per line with {}; "
        "default: imagenet with --classnames imagenet, else a short generic set",
    )


class PairImportOptions(ImportOptions):
    """Options of every pair-dataset format."""

    eval_set: str | None = Field(
        None, description="an eval set directory copied into OUT/eval (targeted attacks draw targets from it; "
        "its class names and templates are used unless given)",
    )


class EvalImportOptions(ImportOptions):
    """Options of every eval-set format: how rows are split."""

    splits: str | None = Field(
        None, description="train=0.5,val=0.1,test=0.4 (fractions per class) or train=20,val=5,test=25 "
        "(images per class); a 'targets' split may be added; default train=0.5,val=0.1,test=0.4",
    )
    seed: int = Field(0, description="seed of the per-class shuffle that assigns splits")


@dataclass(frozen=True)
class ImageRef:
    """Where one source image is: a file on disk, or bytes already in memory (a tar member, a HF cell).

    ``key`` identifies the image (reports, de-duplication); ``name`` is its relative path under
    ``OUT/images`` when images are stored as files (unique per key; the extension may be added later).
    """

    key: str
    name: str
    path: str | None = None
    data: bytes | None = None


@dataclass
class Record:
    """One row to import: an image reference, a caption, a label and, for eval sets, a split."""

    image: ImageRef
    caption: str = ""
    label: int = -1
    label_raw: str | int | None = None  # eval sets: class folder / CSV label before class names are resolved
    split: str | None = None
    crop: tuple[int, int, int, int] | None = None  # x, y, w, h in source pixels (Visual Genome regions)
    #: The image's id in the source (``coco:139``); None: the pipeline derives it (:func:`record_image_id`).
    image_id: str | None = None


def record_image_id(rec: Record) -> str:
    """The ``image_id`` a pair row is written with: the source's id, else the image's stored name (its path
    under the source root, tar member, HF row), a crop tagged with its box (a crop is an image of its own)."""
    base = rec.image_id if rec.image_id is not None else rec.image.name
    return base if rec.crop is None else "{}#x{}y{}w{}h{}".format(base, *rec.crop)


@dataclass
class Skips:
    """Records left out, by reason, with the first few examples of each (for the report and meta)."""

    counts: Counter[str] = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)
    max_examples: int = 10

    def add(self, reason: str, example: str) -> None:
        self.counts[reason] += 1
        ex = self.examples.setdefault(reason, [])
        if len(ex) < self.max_examples:
            ex.append(example)

    @property
    def bad_images(self) -> int:
        return sum(self.counts[r] for r in IMAGE_PROBLEMS)

    def first_bad(self) -> str:
        for r in IMAGE_PROBLEMS:
            if self.examples.get(r):
                return f"{r.replace('_', ' ')}: {self.examples[r][0]}"
        return ""


@dataclass
class Scan:
    """What an importer found: the records (a lazy iterable for pair formats), their number if known."""

    records: Iterable[Record]
    total: int | None = None
    classnames: list[str] | None = None  # pair formats that know their classes (label column + names)
    label_universe: list[str] | None = None  # eval formats: every class label, with or without images
    info: dict[str, Any] = field(default_factory=dict)  # layout facts for the meta (e.g. the image root)


class Importer:
    """Base class: subclasses set ``Options``, ``kind``, ``layout`` and implement :meth:`scan`."""

    name: ClassVar[str]
    kind: ClassVar[Literal["pairs", "eval"]] = "pairs"
    Options: ClassVar[type[ImportOptions]] = PairImportOptions
    #: One line: what SRC is (shown by ``otcbench list formats`` and in errors).
    layout: ClassVar[str] = ""

    def __init__(self, src: str, options: ImportOptions, skips: Skips | None = None) -> None:
        self.src = src
        self.options = options
        self.skips = skips if skips is not None else Skips()
        #: class names from --classnames (set by the pipeline before :meth:`scan`), for label columns
        self.classnames: list[str] | None = None

    def scan(self) -> Scan:
        raise NotImplementedError

    # helpers shared by formats -------------------------------------------------------------------

    def src_path(self, *, want: Literal["file", "dir", "any"] = "any") -> Path:
        """SRC as an existing path of the right kind, else a one-line error."""
        p = Path(self.src)
        if not p.exists():
            raise UserError(f"source {p} does not exist; pass the {self.name} source ({self.layout})")
        if want == "file" and not p.is_file():
            raise UserError(f"source {p} is a directory; --format {self.name} reads a file ({self.layout})")
        if want == "dir" and not p.is_dir():
            raise UserError(f"source {p} is a file; --format {self.name} reads a directory ({self.layout})")
        return p


def file_ref(path: Path, root: Path, key: str | None = None) -> ImageRef:
    """A reference to an image file; its stored name is its path under ``root`` when it lies there."""
    name = safe_relative(path, root)
    full = str(path)
    return ImageRef(key=key or full, name=name if name is not None else hashed_name(full, path.name), path=full)


def safe_relative(path: Path, root: Path) -> str | None:
    """``path`` relative to ``root`` as a POSIX string when it lies lexically inside ``root``, else None."""
    try:
        rel = PurePosixPath(*path.relative_to(root).parts)
    except ValueError:
        return None
    if not rel.parts or ".." in rel.parts:
        return None
    return str(rel)


def hashed_name(key: str, basename: str) -> str:
    """A stored name for an image outside the source root: unique per key, readable basename kept."""
    digest = hashlib.sha1(key.encode()).hexdigest()[:16]
    base = PurePosixPath(basename).name or "image"
    return f"_/{digest}/{base}"


def clean_caption(text: Any) -> str:
    """A caption as stored: text with surrounding whitespace removed (None → empty)."""
    if text is None:
        return ""
    return str(text).strip()
