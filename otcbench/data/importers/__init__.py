"""``otcbench data import``: real data in its usual layouts → pair datasets and eval sets.

One module per source format, each registered in :data:`IMPORTERS` under its ``--format`` name:
``csv``/``tsv`` (image path + caption tables, CC3M as CleanCLIP/RoCLIP lay it out), ``coco`` (COCO
captions JSON), ``vg`` (Visual Genome region descriptions), ``webdataset`` (tar shards), ``hf``
(Hugging Face datasets) — pair datasets — and ``imagefolder`` (``class_x/img.png``) and ``labelcsv``
(``image,label``) — eval sets. The shared pipeline (:mod:`~otcbench.data.importers.pipeline`) reads,
checks and stores the images and writes the result atomically.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from otcbench.config import validate
from otcbench.data.importers import coco, csvfile, hf, imagefolder, labelcsv, vg, webdataset  # noqa: F401  (register)
from otcbench.data.importers.base import IMPORTERS, Importer, ImportOptions
from otcbench.data.importers.pipeline import ImportResult, Reporter, run_import
from otcbench.errors import UserError

__all__ = ["IMPORTERS", "ImportOptions", "ImportResult", "Importer", "Reporter", "import_dataset", "make_importer"]


def make_importer(src: str | Path, fmt: str, options: dict[str, Any] | None = None) -> Importer:
    """The importer for ``fmt`` with validated options; an option the format lacks is a one-line error."""
    cls = IMPORTERS.get(fmt)
    raw = dict(options or {})
    fields = cls.Options.model_fields
    unknown = [k for k in raw if k not in fields]
    if unknown:
        flag = "--" + unknown[0].replace("_", "-")
        own = ", ".join("--" + k.replace("_", "-") for k in fields if k not in ImportOptions.model_fields)
        raise UserError(f"{flag} does not apply to --format {fmt} (its own options: {own or 'none'}; "
                        "see `otcbench list formats`)")
    opts = validate(cls.Options, raw, where=f"data import --format {fmt}")
    return cls(str(src), opts)


def import_dataset(
    src: str | Path,
    out: str | Path,
    fmt: str,
    options: dict[str, Any] | None = None,
    *,
    command: str = "otcbench data import",
    overwrite: bool = False,
    reporter: Reporter | None = None,
) -> ImportResult:
    """Import ``src`` (in format ``fmt``) into ``out``: a pair dataset, or an eval set for eval formats."""
    importer = make_importer(src, fmt, options)
    return run_import(importer, out, command=command, overwrite=overwrite, reporter=reporter)
