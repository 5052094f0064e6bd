"""The on-disk pair-dataset and eval-set formats (docs/architecture.md, "Formats").

A *pair dataset* is a Hugging Face ``datasets.Dataset`` saved with ``save_to_disk`` plus ``otcbench.json``
beside it, columns ``image`` (datasets.Image), ``caption``, ``label``, ``poison``, ``origin`` and optionally
``content`` (the ground-truth composition of the image) and ``image_id`` (which rows show one image), see
:data:`OPTIONAL_COLUMNS`. Reading images: :mod:`otcbench.data.images`; image ids: :mod:`otcbench.data.image_ids`.
An *eval set* is a ``DatasetDict`` with splits ``train``/``val``/``test`` (linear-probe train, its
validation split, held-out test) in the same layout, with class names and prompt templates.

Writes are atomic: everything goes to a temporary sibling directory that is renamed into place, so an
interrupted write never leaves a half dataset under the final name and never touches an existing one.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

import datasets
import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from otcbench.data.image_ids import IMAGE_ID_COLUMN, dataset_image_ids

# The image readers lived here before they got their own module; callers still import them from here.
from otcbench.data.images import (  # noqa: F401
    ImageBlobs,
    decode_image,
    image_bytes,
    image_cells,
    images_to_tensor,
    png_bytes,
    read_image_cell,
    resize_centre_crop,
    resolve_image_path,
)
from otcbench.errors import UserError

META_FILE = "otcbench.json"
FORMAT_VERSION = 1
PAIR_COLUMNS = ("image", "caption", "label", "poison", "origin")
EVAL_SPLITS = ("train", "val", "test", "targets")
#: Optional columns: ``content`` is the ground-truth composition of a row's image ("blue square|red circle",
#: "" unknown), written by the compositional synthetic world. Hashed into the fingerprint only when present,
#: so datasets without it keep their fingerprints. ``image_id`` names the image a row shows (several captions of
#: one COCO image share it; a missing column is derived: :mod:`otcbench.data.image_ids`).
OPTIONAL_COLUMNS = ("content", IMAGE_ID_COLUMN)

PAIR_FEATURES = datasets.Features(
    {
        "image": datasets.Image(),
        "caption": datasets.Value("string"),
        "label": datasets.Value("int64"),
        "poison": datasets.Value("string"),
        "origin": datasets.Value("int64"),
    }
)


#: How a path-based ``image`` column is written: ``save_to_disk`` embeds the files an ``Image`` column
#: points to (and fails on paths relative to the dataset root), so such columns are stored as their plain
#: ``{bytes, path}`` struct and cast back to ``datasets.Image`` when loaded.
IMAGE_STORAGE = {"bytes": datasets.Value("binary"), "path": datasets.Value("string")}


def has_image_paths(ds: datasets.Dataset) -> bool:
    """Whether some row's image is a path (no bytes): a path-based dataset."""
    if len(ds) == 0:
        return False
    col = ds.with_format("arrow")["image"]  # with any select/shuffle indices applied
    return any(chunk.field("bytes").null_count > 0 for chunk in col.chunks)


def _for_disk(ds: datasets.Dataset) -> datasets.Dataset:
    """``ds`` as ``save_to_disk`` must see it: path-based image columns as the plain struct (not embedded)."""
    if isinstance(ds.features.get("image"), datasets.Image) and has_image_paths(ds):
        return ds.cast(datasets.Features({**ds.features, "image": IMAGE_STORAGE}), keep_in_memory=True)
    return ds


def _from_disk(ds: datasets.Dataset) -> datasets.Dataset:
    """Undo :func:`_for_disk` after loading: the ``image`` column is a ``datasets.Image`` again (no copy)."""
    if isinstance(ds.features.get("image"), dict):
        return ds.cast_column("image", datasets.Image())
    return ds


class DatasetMeta(BaseModel):
    """Contents of ``otcbench.json``: provenance, class names, templates, counts, fingerprint."""

    model_config = ConfigDict(extra="allow")

    kind: Literal["pairs", "eval"]
    format_version: int = FORMAT_VERSION
    otcbench_version: str = ""
    created_by: dict[str, Any] = Field(default_factory=dict, description="command, options, seed")
    classnames: list[str] = Field(default_factory=list)
    templates: list[str] = Field(default_factory=list)
    synonyms: dict[str, list[str]] = Field(default_factory=dict, description="offline thesaurus")
    counts: dict[str, int] = Field(default_factory=dict)
    fingerprint: str = ""
    eval_set: str | None = Field(None, description="eval set written alongside, relative to this dir")
    poison: dict[str, Any] | None = Field(None, description="poison manifest (attacks)")


def fingerprint_dataset(ds: datasets.Dataset) -> str:
    """SHA-256 of the dataset's content (captions, labels, flags, image bytes or paths), row order included.

    Computed from the values, not the Arrow buffers, so the same content always gives the same hash.
    """
    h = hashlib.sha256()
    table = ds.with_format("arrow")
    for batch in table.iter(batch_size=2048):
        for name in (*PAIR_COLUMNS, *OPTIONAL_COLUMNS):
            if name not in batch.column_names:
                continue
            col = batch.column(name)
            h.update(name.encode())
            if name == "image":
                for item in col.to_pylist():
                    b, p = (item or {}).get("bytes"), (item or {}).get("path")
                    h.update(b if b is not None else (p or "").encode())
                    h.update(b"\x00")
            elif name in ("caption", "poison", "content", IMAGE_ID_COLUMN):
                for s in col.to_pylist():
                    h.update(s.encode())
                    h.update(b"\x00")
            else:
                h.update(np.asarray(col.to_pylist(), dtype=np.int64).tobytes())
    return h.hexdigest()[:32]


def build_pair_dataset(
    images: Iterable[bytes | str],
    captions: list[str],
    labels: list[int] | None = None,
    poison: list[str] | None = None,
    origin: list[int] | None = None,
    content: list[str] | None = None,
    image_id: list[str] | None = None,
) -> datasets.Dataset:
    """A pair dataset from encoded image bytes (or file paths) and captions, with the standard columns.

    ``content`` and ``image_id`` add the optional columns of those names (omitted when None).
    """
    imgs = [{"bytes": x, "path": None} if isinstance(x, bytes) else {"bytes": None, "path": x} for x in images]
    n = len(captions)
    if len(imgs) != n:
        raise ValueError(f"{len(imgs)} images but {n} captions")
    columns: dict[str, list] = {
        "image": imgs,
        "caption": captions,
        "label": labels if labels is not None else [-1] * n,
        "poison": poison if poison is not None else [""] * n,
        "origin": origin if origin is not None else [-1] * n,
    }
    features = dict(PAIR_FEATURES)
    for name, values in (("content", content), (IMAGE_ID_COLUMN, image_id)):
        if values is not None:
            if len(values) != n:
                raise ValueError(f"{len(values)} {name} strings but {n} captions")
            columns[name] = values
            features[name] = datasets.Value("string")
    return datasets.Dataset.from_dict(columns, features=datasets.Features(features))


def _atomic_dir(out: Path, overwrite: bool) -> Path:
    if out.exists() and not overwrite:
        raise UserError(f"output {out} already exists; choose another path or remove it first")
    out.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))


def _commit_dir(tmp: Path, out: Path) -> None:
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)


def _finish_dir(tmp: Path, out: Path, meta: DatasetMeta, extra_dirs: dict[str, Path] | None) -> None:
    """Move ``extra_dirs`` into ``tmp``, write its ``otcbench.json`` and put it in place of ``out``."""
    for name, src in (extra_dirs or {}).items():
        os.replace(src, tmp / name)
    write_meta(tmp, meta)
    _commit_dir(tmp, out)


#: The link inside a derived (poisoned or defended) dataset to its path-based source's directory.
SOURCE_LINK = "source"


@contextmanager
def staged_extras(out: Path, link_source: Path | None = None) -> Iterator[tuple[Path, dict[str, Path]]]:
    """A scratch folder beside ``out`` for the files a dataset is saved with (``extra_dirs``), removed on exit.

    With ``link_source`` it already holds :data:`SOURCE_LINK`, a link to that directory relative to ``out``,
    so that a source and the set derived from it keep working when moved together.
    """
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.parts-", dir=out.parent))
    try:
        extra: dict[str, Path] = {}
        if link_source is not None:
            os.symlink(os.path.relpath(link_source.resolve(), out.resolve()), staging / SOURCE_LINK,
                       target_is_directory=True)
            extra[SOURCE_LINK] = staging / SOURCE_LINK
        yield staging, extra
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def write_meta(directory: Path, meta: DatasetMeta) -> None:
    """Write ``otcbench.json`` atomically."""
    tmp = directory / (META_FILE + ".tmp")
    tmp.write_text(json.dumps(meta.model_dump(mode="json"), indent=2))
    os.replace(tmp, directory / META_FILE)


def save_pair_dataset(
    ds: datasets.Dataset,
    out: str | Path,
    meta: DatasetMeta,
    *,
    overwrite: bool = False,
    extra_dirs: dict[str, Path] | None = None,
) -> DatasetMeta:
    """Save a pair dataset atomically with its ``otcbench.json`` (fingerprint and counts filled in).

    ``extra_dirs`` maps names to already-written directories moved inside the dataset directory in the
    same atomic step (e.g. the synthetic world's ``eval`` set).
    """
    out = Path(out)
    tmp = _atomic_dir(out, overwrite)
    try:
        _for_disk(ds).save_to_disk(str(tmp / "data"))
        meta = meta.model_copy(
            update={
                "kind": "pairs",
                "fingerprint": fingerprint_dataset(ds),
                "counts": {**meta.counts, "pairs": len(ds), "poisoned": sum(1 for p in ds["poison"] if p)},
            }
        )
        _finish_dir(tmp, out, meta, extra_dirs)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return meta


def save_eval_set(
    splits: dict[str, datasets.Dataset],
    out: str | Path,
    meta: DatasetMeta,
    *,
    overwrite: bool = False,
    extra_dirs: dict[str, Path] | None = None,
) -> DatasetMeta:
    """Save a labelled eval set (``train``/``val``/``test`` splits) atomically with ``otcbench.json``.

    ``extra_dirs`` are moved inside in the same atomic step (an imported set's ``images/``).
    """
    out = Path(out)
    tmp = _atomic_dir(out, overwrite)
    try:
        dd = datasets.DatasetDict({k: _for_disk(v) for k, v in splits.items()})
        dd.save_to_disk(str(tmp / "data"))
        h = hashlib.sha256()
        for name in EVAL_SPLITS:
            if name in splits:
                h.update(fingerprint_dataset(splits[name]).encode())
        meta = meta.model_copy(
            update={
                "kind": "eval",
                "fingerprint": h.hexdigest()[:32],
                "counts": {**meta.counts, **{k: len(v) for k, v in splits.items()}},
            }
        )
        _finish_dir(tmp, out, meta, extra_dirs)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return meta


def read_meta(path: str | Path, what: str = "dataset") -> DatasetMeta:
    """Read ``otcbench.json`` of a dataset directory with one-line errors for every way it can be wrong."""
    p = Path(path)
    if not p.exists():
        raise UserError(f"{what} directory {p} does not exist; create one with `otcbench data synth {p}`")
    if not p.is_dir():
        raise UserError(f"{what} {p} is a file, not a dataset directory")
    mf = p / META_FILE
    if not mf.is_file():
        raise UserError(
            f"{p} is not an otcbench {what} (no {META_FILE}); make one with `otcbench data synth` "
            "or `otcbench data import`"
        )
    try:
        raw = json.loads(mf.read_text())
        return DatasetMeta.model_validate(raw)
    except (json.JSONDecodeError, ValueError) as err:
        first = str(err).splitlines()[0]
        raise UserError(f"{mf} is corrupted ({first}); recreate the dataset") from None


class PairDataset:
    """A loaded pair dataset: the Hugging Face dataset, its metadata and its directory."""

    def __init__(self, path: Path, ds: datasets.Dataset, meta: DatasetMeta) -> None:
        self.path = path
        self.ds = ds
        self.meta = meta

    def __len__(self) -> int:
        return len(self.ds)

    @property
    def captions(self) -> list[str]:
        return list(self.ds["caption"])

    @property
    def poison_flags(self) -> list[str]:
        return list(self.ds["poison"])

    @property
    def content(self) -> list[str] | None:
        """The ground-truth ``content`` column ("" = unknown), or None when the dataset has none."""
        return list(self.ds["content"]) if "content" in self.ds.column_names else None

    @property
    def image_ids(self) -> list[str]:
        """Every row's image id: the ``image_id`` column, or derived from the stored images when it is absent."""
        return dataset_image_ids(self.ds)

    @property
    def has_image_id_column(self) -> bool:
        """Whether the dataset stores its image ids (derived ones are not written back)."""
        return IMAGE_ID_COLUMN in self.ds.column_names

    def eval_set_path(self) -> Path | None:
        """The eval set written beside this dataset (synthetic world), if any."""
        if self.meta.eval_set:
            p = (self.path / self.meta.eval_set).resolve()
            if self.path.resolve() not in p.parents:
                raise UserError(f"{self.path}/{META_FILE}: eval_set points outside the dataset directory")
            return p
        return None


def load_pair_dataset(path: str | Path, *, verify: bool = True) -> PairDataset:
    """Load a pair dataset; ``verify`` recomputes the fingerprint and rejects a modified dataset."""
    p = Path(path)
    meta = read_meta(p)
    if meta.kind != "pairs":
        raise UserError(f"{p} is an eval set, not a pair dataset; pass the training dataset directory")
    try:
        ds = _from_disk(datasets.load_from_disk(str(p / "data")))
    except Exception as err:  # datasets raises several types for broken directories
        raise UserError(f"{p}/data could not be read as a Hugging Face dataset ({type(err).__name__}); "
                        "recreate the dataset") from None
    if not isinstance(ds, datasets.Dataset):
        raise UserError(f"{p}/data holds several splits; a pair dataset is a single split")
    missing = [c for c in PAIR_COLUMNS if c not in ds.column_names]
    if missing:
        raise UserError(f"{p} lacks the columns {', '.join(missing)}; recreate it with otcbench")
    if verify and meta.fingerprint and fingerprint_dataset(ds) != meta.fingerprint:
        raise UserError(f"{p}: the data does not match the fingerprint in {META_FILE}; it was modified "
                        "after it was written — recreate it")
    return PairDataset(p, ds, meta)


class EvalSet:
    """A labelled eval set: splits, class names and prompt templates."""

    def __init__(self, path: Path, splits: dict[str, datasets.Dataset], meta: DatasetMeta) -> None:
        self.path = path
        self.splits = splits
        self.meta = meta

    @property
    def classnames(self) -> list[str]:
        return self.meta.classnames

    @property
    def templates(self) -> list[str]:
        return self.meta.templates


def load_eval_set(path: str | Path) -> EvalSet:
    """Load an eval set, or the eval set written beside a pair dataset (``DATA/eval``)."""
    p = Path(path)
    meta = read_meta(p, what="eval set")
    if meta.kind == "pairs":
        inner = PairDataset(p, None, meta).eval_set_path()  # type: ignore[arg-type]
        if inner is None:
            raise UserError(f"{p} is a pair dataset without an eval set; pass --eval-data EVAL_SET_DIR")
        if read_meta(inner, what="eval set").kind != "eval":
            raise UserError(f"{p}/{META_FILE}: eval_set {meta.eval_set!r} is not an eval set; recreate it")
        return load_eval_set(inner)
    try:
        dd = datasets.load_from_disk(str(p / "data"))
    except Exception as err:
        raise UserError(f"{p}/data could not be read ({type(err).__name__}); recreate the eval set") from None
    raw_splits = dict(dd) if isinstance(dd, datasets.DatasetDict) else {"test": dd}
    splits = {k: _from_disk(v) for k, v in raw_splits.items()}
    if "test" not in splits:
        raise UserError(f"eval set {p} has no 'test' split (has: {', '.join(splits)})")
    if not meta.classnames:
        raise UserError(f"eval set {p} has no class names in {META_FILE}")
    if not meta.templates:
        raise UserError(f"eval set {p} has no prompt templates in {META_FILE}")
    return EvalSet(p, splits, meta)


