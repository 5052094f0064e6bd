"""Hugging Face datasets: a ``save_to_disk`` directory, or a hub name when online.

The image column may be a ``datasets.Image`` (bytes, or paths) or a string column of paths (relative
to the dataset directory); the caption column a string, or a list of strings (one pair per caption).
Offline (``HF_HUB_OFFLINE=1``, or no network), a hub name gives a one-line error instead of a hang.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import datasets
from pydantic import Field

from otcbench.data.importers.base import (
    IMPORTERS,
    ImageRef,
    Importer,
    PairImportOptions,
    Record,
    Scan,
    clean_caption,
    file_ref,
)
from otcbench.data.importers.csvfile import parse_label
from otcbench.errors import UserError

BATCH = 256


class HfOptions(PairImportOptions):
    split: str | None = Field(None, description="split of a DatasetDict or hub dataset (default: train)")
    image_column: str = Field("image", description="column of images (datasets.Image or paths)")
    caption_column: str = Field("caption", description="column of captions (string or list of strings)")
    label_column: str | None = Field(None, description="optional column of class indices (or names)")


@IMPORTERS.register("hf")
class HfImporter(Importer):
    """A Hugging Face dataset (load_from_disk directory, or a hub name when online)."""

    Options = HfOptions
    layout = "a datasets.save_to_disk directory, or a hub dataset name (online only)"

    def load(self) -> tuple[datasets.Dataset, Path | None]:
        opts: HfOptions = self.options  # type: ignore[assignment]
        p = Path(self.src)
        if p.exists():
            if not p.is_dir():
                raise UserError(f"source {p} is a file; --format hf reads a datasets.save_to_disk directory")
            try:
                ds: Any = datasets.load_from_disk(str(p))
            except Exception as err:  # datasets raises several types for a directory it cannot read
                if (p / "state.json").exists() and not any(p.glob("*.arrow")):
                    # datasets saves a zero-row dataset without shards and then cannot load it (IndexError)
                    raise UserError(f"{p} is a Hugging Face dataset with no rows; nothing to import") from None
                raise UserError(f"{p} is not a Hugging Face dataset saved with save_to_disk "
                                f"({type(err).__name__})") from None
            root: Path | None = p
        else:
            if datasets.config.HF_HUB_OFFLINE:
                raise UserError(f"source {self.src} is not a local directory and the Hugging Face hub is offline "
                                "(HF_HUB_OFFLINE); pass a save_to_disk directory")
            try:
                ds = datasets.load_dataset(self.src, split=opts.split or "train")
            except Exception as err:  # network, missing dataset, gated dataset, unknown split
                first = (str(err).splitlines() or [""])[0][:200]
                raise UserError(f"source {self.src} is neither a local directory nor loadable from the Hugging "
                                f"Face hub ({type(err).__name__}: {first})") from None
            root = None
        if isinstance(ds, datasets.DatasetDict):
            split = opts.split or "train"
            if split not in ds:
                raise UserError(f"{self.src} has no split {split!r} (splits: {', '.join(ds)}); pass --split NAME")
            ds = ds[split]
        elif opts.split is not None and root is not None:
            raise UserError(f"{self.src} is a single dataset without splits; drop --split")
        return ds, root

    def scan(self) -> Scan:
        opts: HfOptions = self.options  # type: ignore[assignment]
        ds, root = self.load()
        for option, col in (("image-column", opts.image_column), ("caption-column", opts.caption_column),
                            ("label-column", opts.label_column)):
            if col is not None and col not in ds.column_names:
                raise UserError(f"{self.src} has no column {col!r} (columns: {', '.join(ds.column_names)}); "
                                f"pass --{option} NAME")
        img_feature = ds.features[opts.image_column]
        if isinstance(img_feature, datasets.Image):
            ds = ds.cast_column(opts.image_column, datasets.Image(decode=False))
        elif not (isinstance(img_feature, datasets.Value) and img_feature.dtype in ("string", "large_string")):
            raise UserError(f"{self.src}: column {opts.image_column!r} holds {type(img_feature).__name__}, "
                            "not images or image paths")
        cap_feature = ds.features[opts.caption_column]
        listed = isinstance(cap_feature, (datasets.Sequence, list, datasets.LargeList))
        if len(ds) == 0:
            raise UserError(f"{self.src} has no rows")
        cols = [c for c in (opts.image_column, opts.caption_column, opts.label_column) if c is not None]
        table = ds.select_columns(cols).with_format("arrow")
        total = len(ds)
        if listed:
            import pyarrow.compute as pc

            total = sum(int(pc.sum(pc.list_value_length(b.column(opts.caption_column))).as_py() or 0)
                        for b in table.iter(batch_size=4096))
        base = root or Path(".")
        names = self.classnames

        def records() -> Iterator[Record]:
            i = 0
            for batch in table.iter(batch_size=BATCH):
                images = batch.column(opts.image_column).to_pylist()
                captions = batch.column(opts.caption_column).to_pylist()
                labels = batch.column(opts.label_column).to_pylist() if opts.label_column else [None] * len(images)
                for image, caption, label in zip(images, captions, labels, strict=True):
                    where = f"{self.src}[{i}]"
                    ref = _ref(image, base, where, i)
                    i += 1
                    if ref is None:
                        self.skips.add("missing_image", f"{where}: no image")
                        continue
                    lab = -1 if label is None else parse_label(str(label), names, where)
                    for cap in (caption or []) if listed else [caption]:
                        cap = clean_caption(cap)
                        if not cap:
                            self.skips.add("empty_caption", where)
                            continue
                        yield Record(ref, cap, lab)

        return Scan(records(), total, info={"hf_source": self.src})


def _ref(cell: Any, base: Path, key: str, row: int) -> ImageRef | None:
    """An image cell (``{"bytes", "path"}`` or a path string) as a reference."""
    if cell is None:
        return None
    if isinstance(cell, str):
        cell = {"bytes": None, "path": cell}
    if cell.get("bytes") is not None:
        suffix = Path(cell.get("path") or "").suffix
        return ImageRef(key=key, name=f"{row // 10000:04d}/{row:09d}{suffix}", data=cell["bytes"])
    if cell.get("path"):
        p = Path(cell["path"])
        return file_ref(p if p.is_absolute() else base / p, base)
    return None
