"""CSV/TSV tables of image paths and captions (CC3M as CleanCLIP and RoCLIP lay it out).

CleanCLIP's ``train.csv`` has a header ``image,caption`` and image paths relative to the CSV file;
RoCLIP reads the same kind of file with configurable column names and delimiter. Paths may also be
absolute. An optional label column holds class indices, or class names when ``--classnames`` is given.
"""

from __future__ import annotations

import csv
import sys
from collections.abc import Iterator
from pathlib import Path

from pydantic import Field

from otcbench.data.importers.base import IMPORTERS, Importer, PairImportOptions, Record, Scan, clean_caption, file_ref
from otcbench.errors import UserError

csv.field_size_limit(min(sys.maxsize, 2**31 - 1))  # long captions / paths must not abort a big import


class CsvOptions(PairImportOptions):
    image_column: str = Field("image", description="column of image paths (relative to --image-root)")
    caption_column: str = Field("caption", description="column of captions")
    label_column: str | None = Field(None, description="optional column of class indices (or names)")
    delimiter: str | None = Field(None, min_length=1, max_length=1, description="field separator (default , or tab)")
    image_root: str | None = Field(None, description="directory image paths are relative to (default: the file's)")


def open_table(path: Path, delimiter: str, columns: dict[str, str | None]) -> tuple[list[str], Iterator[list[str]]]:
    """The header and row iterator of a delimited file, with every needed column checked (one-line errors)."""
    f = path.open(newline="", encoding="utf-8-sig")
    reader = csv.reader(f, delimiter=delimiter)
    try:
        header = next(reader)
    except StopIteration:
        f.close()
        raise UserError(f"source {path} is empty; expected a header row ({', '.join(c for c in columns.values() if c)})"
                        ) from None
    except (csv.Error, UnicodeDecodeError) as err:
        f.close()
        raise UserError(f"source {path} could not be read as a delimited text file ({err})") from None
    header = [h.strip() for h in header]
    for option, col in columns.items():
        if col is not None and col not in header:
            shown = ", ".join(header[:8]) + (", …" if len(header) > 8 else "")
            hint = "; is the delimiter right? (--delimiter)" if len(header) == 1 else ""
            f.close()
            raise UserError(f"source {path} has no column {col!r} (columns: {shown}); pass --{option} NAME{hint}")

    def rows() -> Iterator[list[str]]:
        with f:
            try:
                yield from reader
            except (csv.Error, UnicodeDecodeError) as err:
                raise UserError(f"source {path}, line {reader.line_num}: {err}") from None

    return header, rows()


def parse_label(value: str, classnames: list[str] | None, where: str) -> int:
    """A label cell: an integer class index, or a class name when names are known."""
    value = value.strip()
    if value.lstrip("-").isdigit():
        return int(value)
    if classnames is not None and value in classnames:
        return classnames.index(value)
    if classnames is None:
        raise UserError(f"{where}: label {value!r} is not a class index; pass --classnames to use class names")
    raise UserError(f"{where}: label {value!r} is not one of the --classnames")


@IMPORTERS.register("csv")
class CsvImporter(Importer):
    """Table of image path + caption (CleanCLIP/RoCLIP CC3M layout: train.csv with image,caption)."""

    Options = CsvOptions
    layout = "a CSV file with a header, e.g. image,caption; image paths relative to the file"
    default_delimiter = ","

    def scan(self) -> Scan:
        opts: CsvOptions = self.options  # type: ignore[assignment]
        path = self.src_path(want="file")
        root = Path(opts.image_root) if opts.image_root else path.parent
        if not root.is_dir():
            raise UserError(f"--image-root {root} is not a directory")
        delim = opts.delimiter or self.default_delimiter
        cols = {"image-column": opts.image_column, "caption-column": opts.caption_column,
                "label-column": opts.label_column}
        header, rows = open_table(path, delim, cols)
        total = sum(1 for r in rows if r)
        if total == 0:
            raise UserError(f"source {path} has a header but no rows")
        _, rows = open_table(path, delim, cols)
        i_img, i_cap = header.index(opts.image_column), header.index(opts.caption_column)
        i_lab = header.index(opts.label_column) if opts.label_column else None
        names = self.classnames

        def records() -> Iterator[Record]:
            for n, row in enumerate((r for r in rows if r), start=2):
                where = f"{path}:{n}"
                if len(row) != len(header):
                    self.skips.add("malformed_row", f"{where}: {len(row)} fields, header has {len(header)}")
                    continue
                image, caption = row[i_img].strip(), clean_caption(row[i_cap])
                if not image:
                    self.skips.add("missing_image", f"{where}: empty image path")
                    continue
                if not caption:
                    self.skips.add("empty_caption", f"{where}: {image}")
                    continue
                label = parse_label(row[i_lab], names, where) if i_lab is not None else -1
                p = Path(image)
                yield Record(file_ref(p if p.is_absolute() else root / p, root), caption, label)

        return Scan(records(), total, info={"image_root": str(root)})


@IMPORTERS.register("tsv")
class TsvImporter(CsvImporter):
    """Tab-separated image path + caption table (same options as csv)."""

    layout = "a TSV file with a header, e.g. image<TAB>caption; image paths relative to the file"
    default_delimiter = "\t"
