"""A CSV of ``image,label`` as an eval set: labels are class indices (with ``--classnames``) or class
names; an optional split column (values train/val/test/targets) replaces ``--splits``.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from otcbench.data.importers.base import IMPORTERS, EvalImportOptions, Importer, Record, Scan, file_ref
from otcbench.data.importers.classes import SPLIT_NAMES
from otcbench.data.importers.csvfile import open_table
from otcbench.errors import UserError


class LabelCsvOptions(EvalImportOptions):
    image_column: str = Field("image", description="column of image paths (relative to --image-root)")
    label_column: str = Field("label", description="column of class indices or class names")
    split_column: str | None = Field(None, description="column of split names (train/val/test/targets)")
    delimiter: str = Field(",", min_length=1, max_length=1, description="field separator")
    image_root: str | None = Field(None, description="directory image paths are relative to (default: the file's)")


@IMPORTERS.register("labelcsv")
class LabelCsvImporter(Importer):
    """Eval set from a CSV of image,label (+ an optional split column)."""

    kind = "eval"
    Options = LabelCsvOptions
    layout = "a CSV file with a header image,label (+ split); paths relative to the file"

    def scan(self) -> Scan:
        opts: LabelCsvOptions = self.options  # type: ignore[assignment]
        path = self.src_path(want="file")
        root = Path(opts.image_root) if opts.image_root else path.parent
        if not root.is_dir():
            raise UserError(f"--image-root {root} is not a directory")
        header, rows = open_table(path, opts.delimiter, {"image-column": opts.image_column,
                                                         "label-column": opts.label_column,
                                                         "split-column": opts.split_column})
        i_img, i_lab = header.index(opts.image_column), header.index(opts.label_column)
        i_split = header.index(opts.split_column) if opts.split_column else None
        raw: list[tuple[str, str, str | None, str]] = []
        for n, row in enumerate(rows, start=2):
            if not row:
                continue
            where = f"{path}:{n}"
            if len(row) != len(header):
                self.skips.add("malformed_row", f"{where}: {len(row)} fields, header has {len(header)}")
                continue
            image, label = row[i_img].strip(), row[i_lab].strip()
            if not image:
                self.skips.add("missing_image", f"{where}: empty image path")
                continue
            if not label:
                self.skips.add("missing_label", f"{where}: {image}")
                continue
            split = row[i_split].strip() if i_split is not None else None
            if split is not None and split not in SPLIT_NAMES:
                raise UserError(f"{where}: split {split!r} is not one of {', '.join(SPLIT_NAMES)}")
            raw.append((image, label, split, where))
        if not raw and not self.skips.counts:
            raise UserError(f"source {path} has a header but no rows")
        numeric = all(lab.lstrip("-").isdigit() for _, lab, _, _ in raw)
        records = []
        for image, label, split, _ in raw:
            p = Path(image)
            records.append(Record(file_ref(p if p.is_absolute() else root / p, root), "",
                                  label_raw=int(label) if numeric else label, split=split))
        return Scan(records, len(records), info={"image_root": str(root)})
