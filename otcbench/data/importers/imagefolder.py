"""Image folders as eval sets: ``SRC/class_x/img.png`` (split by ``--splits``), or already split as
``SRC/{train,val,test}/class_x/img.png``.

Class names are the folder names (underscores → spaces) unless ``--classnames`` is given: names
matching the folders are used by name; otherwise the i-th name goes to the i-th folder in sorted order
(ImageNet's ``n01440764``… folders with ``--classnames imagenet``).
"""

from __future__ import annotations

from pathlib import Path

from otcbench.data.importers.base import (
    IMAGE_EXTENSIONS,
    IMPORTERS,
    EvalImportOptions,
    Importer,
    Record,
    Scan,
    file_ref,
)
from otcbench.data.importers.classes import SPLIT_NAMES
from otcbench.errors import UserError


def _visible_dirs(p: Path) -> list[Path]:
    return sorted(d for d in p.iterdir() if d.is_dir() and not d.name.startswith("."))


def _images(folder: Path) -> list[Path]:
    """Image files under a class folder (any depth, hidden entries skipped), in sorted order."""
    out = []
    for f in folder.rglob("*"):
        hidden = any(part.startswith(".") for part in f.relative_to(folder).parts)
        if f.suffix.lower() in IMAGE_EXTENSIONS and not hidden and not f.is_dir():
            out.append(f)
    return sorted(out)


@IMPORTERS.register("imagefolder")
class ImageFolderImporter(Importer):
    """Eval set from class folders (class_x/img.png), or pre-split train/val/test/class_x/ folders."""

    kind = "eval"
    Options = EvalImportOptions
    layout = "a directory of class folders (class_x/img.png), optionally under train/ val/ test/"

    def scan(self) -> Scan:
        root = self.src_path(want="dir")
        top = _visible_dirs(root)
        if not top:
            raise UserError(f"source {root} has no class folders ({self.layout})")
        presplit = {d.name for d in top} <= set(SPLIT_NAMES)
        groups = [(d.name, d) for d in top] if presplit else [(None, root)]
        records = []
        classes: set[str] = set()
        for split, base in groups:
            for cls in _visible_dirs(base):
                classes.add(cls.name)
                for f in _images(cls):
                    records.append(Record(file_ref(f, root), "", label_raw=cls.name, split=split))
        if not records:
            raise UserError(f"source {root} holds no images ({', '.join(IMAGE_EXTENSIONS)}) in its class folders")
        return Scan(records, len(records), label_universe=sorted(classes),
                    info={"layout": "split folders" if presplit else "class folders"})
