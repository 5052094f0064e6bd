"""``otcbench data …``: make, import and inspect pair datasets (synth, show, import)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from otcbench import render
from otcbench.commands.common import SetOpt, console, err_console, flag, handle_errors, progress_enabled, quiet_datasets
from otcbench.errors import UserError
from otcbench.progress import progress_bar

data_app = typer.Typer(help="Make, import and inspect pair datasets.", no_args_is_help=True)


@data_app.command("synth")
@handle_errors
def data_synth(
    out: Annotated[Path, typer.Argument(help="Output directory (must not exist).")],
    n_train: Annotated[int | None, typer.Option("--n-train", help="Training pairs (default 10000).")] = None,
    image_size: Annotated[int | None, typer.Option("--image-size", help="Image side in px (default 32).")] = None,
    seed: Annotated[int | None, typer.Option("--seed", help="World seed (default 0).")] = None,
    set_: SetOpt = None,
    overwrite: Annotated[bool, flag("--overwrite", help="Replace an existing output.")] = False,
    no_progress: Annotated[bool, flag("--no-progress", help="No progress bars (shown on a terminal only).")] = False,
) -> None:
    """Generate the embedded synthetic image–caption world: OUT (pairs) and OUT/eval (labelled splits).

    Example: otcbench data synth data/world --n-train 10000 --seed 0
    """
    from otcbench.data.synth import expected_images, write_world
    from otcbench.options import synth_config

    quiet_datasets()
    cfg = synth_config(n_train=n_train, image_size=image_size, seed=seed, overrides=set_)
    if out.exists() and not overwrite:
        raise UserError(f"output {out} already exists; choose another path, remove it, or pass --overwrite")
    with progress_bar(progress_enabled(no_progress), console=err_console) as progress:
        task = progress.add_task("rendering", total=expected_images(cfg))
        meta = write_world(
            out, cfg, command=" ".join(["otcbench", *sys.argv[1:]]), overwrite=overwrite,
            progress=lambda k: progress.advance(task, k),
        )
    console.print(
        f"wrote {meta.counts['pairs']} pairs to [bold]{out}[/] and the eval set to [bold]{out / 'eval'}[/] "
        f"({len(meta.classnames)} classes, fingerprint {meta.fingerprint})"
    )


@data_app.command("show")
@handle_errors
def data_show(
    data: Annotated[Path, typer.Argument(help="Pair dataset or eval set directory.")],
    out: Annotated[Path | None, typer.Option("--out", help="PNG path (default ./<name>-samples.png).")] = None,
    n: Annotated[int, typer.Option("-n", help="Samples in the grid.")] = 32,
    seed: Annotated[int, typer.Option("--seed", help="Which samples the grid shows.")] = 0,
    as_json: Annotated[bool, flag("--json", help="Print the stats as JSON.")] = False,
) -> None:
    """Print dataset stats and write a PNG grid of samples with captions (poisoned rows marked).

    Example: otcbench data show data/world --out world.png
    """
    from otcbench.data.show import show_dataset

    quiet_datasets()
    if n < 1:
        raise UserError("-n must be at least 1")
    stats = show_dataset(data, out, n=n, seed=seed)
    if as_json:
        console.print_json(json.dumps(stats, default=str))
    else:
        console.print(render.stats_table(stats))


@data_app.command("import")
@handle_errors
def data_import(
    src: Annotated[str, typer.Argument(help="Source: a file, a directory, a shard pattern or a hub name.")],
    out: Annotated[Path, typer.Argument(help="Output directory (must not exist).")],
    fmt: Annotated[str | None, typer.Option("--format", "-f", help="csv, tsv, coco, vg, webdataset, hf (pair "
                                            "datasets); imagefolder, labelcsv (eval sets). See `otcbench list formats`."
                                            )] = None,
    image_column: Annotated[str | None, typer.Option("--image-column", help="Column of images/paths.")] = None,
    caption_column: Annotated[str | None, typer.Option("--caption-column", help="Column of captions.")] = None,
    label_column: Annotated[str | None, typer.Option("--label-column", help="Column of labels.")] = None,
    split_column: Annotated[str | None, typer.Option("--split-column", help="labelcsv: column of splits.")] = None,
    delimiter: Annotated[str | None, typer.Option("--delimiter", help="Field separator (csv/tsv/labelcsv).")] = None,
    image_root: Annotated[str | None, typer.Option("--image-root", "--image-dir",
                                                   help="Directory image paths are relative to.")] = None,
    image_data: Annotated[str | None, typer.Option("--image-data", help="vg: image_data.json.")] = None,
    split: Annotated[str | None, typer.Option("--split", help="hf: which split to import.")] = None,
    per_image: Annotated[bool, flag("--per-image", help="coco/vg: one pair per image.")] = False,
    regions: Annotated[str | None, typer.Option("--regions", help="vg: whole (image) or crop (region).")] = None,
    max_regions: Annotated[int | None, typer.Option("--max-regions", help="vg: regions per image.")] = None,
    min_region_size: Annotated[int | None, typer.Option("--min-region-size", help="vg crop: min side px.")] = None,
    caption_ext: Annotated[str | None, typer.Option("--caption-ext", help="webdataset: caption member.")] = None,
    classnames: Annotated[str | None, typer.Option("--classnames", help="'imagenet' or a file of names.")] = None,
    templates: Annotated[str | None, typer.Option("--templates", help="imagenet, simple or a file.")] = None,
    splits: Annotated[str | None, typer.Option("--splits", help="Eval splits: train=0.5,val=0.1,test=0.4.")] = None,
    eval_set: Annotated[str | None, typer.Option("--eval-set", help="Eval set to copy into OUT/eval.")] = None,
    image_size: Annotated[int | None, typer.Option("--image-size", help="Resize + centre-crop to PX.")] = None,
    as_bytes: Annotated[bool, flag("--bytes", help="Store images inside the dataset.")] = False,
    copy_images: Annotated[bool, flag("--copy-images", help="Copy image files to OUT/images.")] = False,
    link_images: Annotated[bool, flag("--link-images", help="Link image files into OUT/images.")] = False,
    verify: Annotated[str | None, typer.Option("--verify", help="decode (default), header or none.")] = None,
    max_bad_fraction: Annotated[float | None, typer.Option("--max-bad-fraction",
                                                           help="Error above this bad-image fraction (0.01).")] = None,
    limit: Annotated[int | None, typer.Option("--limit", help="Import only the first N records.")] = None,
    workers: Annotated[int | None, typer.Option("--workers", help="Image-reading processes.")] = None,
    seed: Annotated[int | None, typer.Option("--seed", help="Eval split seed.")] = None,
    set_: SetOpt = None,
    overwrite: Annotated[bool, flag("--overwrite", help="Replace an existing output.")] = False,
    no_progress: Annotated[bool, flag("--no-progress", help="No progress bars (shown on a terminal only).")] = False,
    as_json: Annotated[bool, flag("--json", help="Print the result as JSON.")] = False,
) -> None:
    """Import real data: a pair dataset (csv, tsv, coco, vg, webdataset, hf) or an eval set (imagefolder,
    labelcsv). Missing/unreadable images are skipped and counted (an error above --max-bad-fraction).

    Examples: otcbench data import cc3m/train.csv data/cc3m --format csv --classnames imagenet;
    otcbench data import coco/annotations/captions_train2017.json data/coco --format coco;
    otcbench data import imagenet/val data/imagenet --format imagefolder --classnames imagenet --image-size 224
    """
    from otcbench.data.importers import import_dataset
    from otcbench.options import import_options, storage_option

    quiet_datasets()
    if fmt is None:  # required, but a missing option should be one line, not click's usage box
        from otcbench.data.importers import IMPORTERS

        raise UserError(f"--format is required: one of {', '.join(IMPORTERS.names())} (`otcbench list formats`)")
    storage = storage_option({"--bytes": as_bytes, "--copy-images": copy_images, "--link-images": link_images})
    options = import_options(
        set_, image_column=image_column, caption_column=caption_column, label_column=label_column,
        split_column=split_column, delimiter=delimiter, image_root=image_root, image_data=image_data, split=split,
        per_image=per_image or None, regions=regions, max_regions=max_regions, min_region_size=min_region_size,
        caption_ext=caption_ext, classnames=classnames, templates=templates, splits=splits, eval_set=eval_set,
        image_size=image_size, storage=storage, verify=verify, max_bad_fraction=max_bad_fraction, limit=limit,
        workers=workers, seed=seed)

    class _Bar:  # the pipeline's Reporter on a rich progress bar, one phase at a time
        def __init__(self, progress: Any) -> None:  # a progress_bar()
            self.progress, self.task = progress, None

        def start(self, description: str, total: int | None) -> None:
            if self.task is not None:
                self.progress.remove_task(self.task)
            self.task = self.progress.add_task(description, total=total)

        def advance(self, n: int) -> None:
            self.progress.advance(self.task, n)

    with progress_bar(progress_enabled(no_progress), console=err_console) as progress:
        result = import_dataset(src, out, fmt, options, command=" ".join(["otcbench", *sys.argv[1:]]),
                                overwrite=overwrite, reporter=_Bar(progress))
    if as_json:
        console.print_json(json.dumps({"out": str(result.out), "kind": result.kind, "rows": result.rows,
                                       "storage": result.storage, "counts": result.meta.counts,
                                       "skipped": result.skipped, "fingerprint": result.meta.fingerprint}))
        return
    what = "eval set" if result.kind == "eval" else "pair dataset"
    splits_note = ""
    if result.kind == "eval":
        splits_note = " (" + ", ".join(f"{s} {result.meta.counts[s]}" for s in ("train", "val", "test", "targets")
                                       if s in result.meta.counts) + f"; {len(result.meta.classnames)} classes)"
    console.print(f"imported {result.rows} rows from {src} into the {what} [bold]{out}[/]{splits_note}; images "
                  f"stored as {result.storage}, fingerprint {result.meta.fingerprint}")
    if result.skipped:
        console.print(render.skipped_table(result.skipped, result.examples))


@data_app.command("export")
@handle_errors
def data_export(
    src: Annotated[Path, typer.Argument(help="Pair dataset to export (e.g. the synthetic world).")],
    out: Annotated[Path, typer.Argument(help="New or empty output directory.")],
    fmt: Annotated[str, typer.Option("--format", help="coco: JPEGs + captions JSON; pairs: a pair dataset.")] = "coco",
    captions_per_image: Annotated[int | None, typer.Option(
        "--captions-per-image", help="The world: captions per image (default 5); others: at most this many.")] = None,
    set_: SetOpt = None,
) -> None:
    """Write a pair dataset as COCO captions files (re-import with `data import --format coco`) or as a pair
    dataset with several captions per image; rows are grouped by image id (docs/data.md)."""
    from otcbench.config import apply_overrides, validate
    from otcbench.data.export import ExportOptions, export_dataset

    quiet_datasets()
    given = {"format": fmt, "captions_per_image": captions_per_image}
    options = validate(ExportOptions, apply_overrides({k: v for k, v in given.items() if v is not None}, set_),
                       "data export")
    res = export_dataset(src, out, options, command=" ".join(["otcbench", *sys.argv[1:]]))
    console.print(f"exported {res.images} images with {res.captions} captions from {src} as {res.format} into "
                  f"[bold]{res.out}[/]")
