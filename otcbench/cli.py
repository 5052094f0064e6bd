"""The ``otcbench`` command line: thin — parse, validate, call the library, render with rich."""

from __future__ import annotations

import functools
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.table import Table

from otcbench.errors import UserError

app = typer.Typer(
    name="otcbench",
    help="Poisoning and backdoor attacks on CLIP pre-training, and the defenses against them.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
data_app = typer.Typer(help="Make, import and inspect pair datasets.", no_args_is_help=True)
list_app = typer.Typer(help="List registered models, defenses, attacks and recipes.", no_args_is_help=True)
bench_app = typer.Typer(help="Micro-benchmarks: bench ot (Sinkhorn vs POT), bench train (throughput per defense).",
                         no_args_is_help=True)
app.add_typer(data_app, name="data")
app.add_typer(list_app, name="list")
app.add_typer(bench_app, name="bench")

console = Console()
err_console = Console(stderr=True)

F = TypeVar("F", bound=Callable[..., Any])

SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", help="Override any option: --set train.lr=1e-3 (repeatable)."),
]


def handle_errors(fn: F) -> F:
    """Turn a UserError into one red line on stderr and exit code 2 — never a traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except UserError as err:
            err_console.print(f"[bold red]error:[/] {err}", highlight=False, soft_wrap=True)
            raise typer.Exit(code=err.exit_code) from None
        except KeyboardInterrupt:
            err_console.print("[yellow]interrupted[/]")
            raise typer.Exit(code=130) from None

    return wrapper  # type: ignore[return-value]


def _quiet_datasets() -> None:
    import datasets

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()


def _progress_enabled(no_progress: bool) -> bool:
    """Bars only on a terminal: in a log file or pipe a bar's last frame would sit before an error line."""
    return not no_progress and os.environ.get("OTCBENCH_NO_PROGRESS", "") == "" and err_console.is_terminal


# --------------------------------------------------------------------------------------------------
# data


@data_app.command("synth")
@handle_errors
def data_synth(
    out: Annotated[Path, typer.Argument(help="Output directory (must not exist).")],
    n_train: Annotated[int | None, typer.Option("--n-train", help="Training pairs (default 10000).")] = None,
    image_size: Annotated[int | None, typer.Option("--image-size", help="Image side in px (default 32).")] = None,
    seed: Annotated[int | None, typer.Option("--seed", help="World seed (default 0).")] = None,
    set_: SetOpt = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing output.")] = False,
    no_progress: Annotated[bool, typer.Option("--no-progress")] = False,
) -> None:
    """Generate the embedded synthetic image–caption world: OUT (pairs) and OUT/eval (labelled splits).

    Example: otcbench data synth data/world --n-train 10000 --seed 0
    """
    from rich.progress import Progress

    from otcbench.config import SynthConfig, apply_overrides, validate
    from otcbench.data.synth import expected_images, write_world

    _quiet_datasets()
    raw: dict[str, Any] = {}
    for k, v in (("n_train", n_train), ("image_size", image_size), ("seed", seed)):
        if v is not None:
            raw[k] = v
    cfg = validate(SynthConfig, apply_overrides(raw, set_), where="data synth")
    if out.exists() and not overwrite:
        raise UserError(f"output {out} already exists; choose another path, remove it, or pass --overwrite")
    with Progress(disable=not _progress_enabled(no_progress), console=err_console) as progress:
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
    seed: Annotated[int, typer.Option("--seed")] = 0,
    as_json: Annotated[bool, typer.Option("--json", help="Print the stats as JSON.")] = False,
) -> None:
    """Print dataset stats and write a PNG grid of samples with captions (poisoned rows marked).

    Example: otcbench data show data/world --out world.png
    """
    from otcbench.data.show import render_stats_table, show_dataset

    _quiet_datasets()
    if n < 1:
        raise UserError("-n must be at least 1")
    stats = show_dataset(data, out, n=n, seed=seed)
    if as_json:
        console.print_json(json.dumps(stats, default=str))
    else:
        console.print(render_stats_table(stats))


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
    per_image: Annotated[bool, typer.Option("--per-image", help="coco/vg: one pair per image.")] = False,
    regions: Annotated[str | None, typer.Option("--regions", help="vg: whole (image) or crop (region).")] = None,
    max_regions: Annotated[int | None, typer.Option("--max-regions", help="vg: regions per image.")] = None,
    min_region_size: Annotated[int | None, typer.Option("--min-region-size", help="vg crop: min side px.")] = None,
    caption_ext: Annotated[str | None, typer.Option("--caption-ext", help="webdataset: caption member.")] = None,
    classnames: Annotated[str | None, typer.Option("--classnames", help="'imagenet' or a file of names.")] = None,
    templates: Annotated[str | None, typer.Option("--templates", help="imagenet, simple or a file.")] = None,
    splits: Annotated[str | None, typer.Option("--splits", help="Eval splits: train=0.5,val=0.1,test=0.4.")] = None,
    eval_set: Annotated[str | None, typer.Option("--eval-set", help="Eval set to copy into OUT/eval.")] = None,
    image_size: Annotated[int | None, typer.Option("--image-size", help="Resize + centre-crop to PX.")] = None,
    as_bytes: Annotated[bool, typer.Option("--bytes", help="Store images inside the dataset.")] = False,
    copy_images: Annotated[bool, typer.Option("--copy-images", help="Copy image files to OUT/images.")] = False,
    link_images: Annotated[bool, typer.Option("--link-images", help="Link image files into OUT/images.")] = False,
    verify: Annotated[str | None, typer.Option("--verify", help="decode (default), header or none.")] = None,
    max_bad_fraction: Annotated[float | None, typer.Option("--max-bad-fraction",
                                                           help="Error above this bad-image fraction (0.01).")] = None,
    limit: Annotated[int | None, typer.Option("--limit", help="Import only the first N records.")] = None,
    workers: Annotated[int | None, typer.Option("--workers", help="Image-reading processes.")] = None,
    seed: Annotated[int | None, typer.Option("--seed", help="Eval split seed.")] = None,
    set_: SetOpt = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing output.")] = False,
    no_progress: Annotated[bool, typer.Option("--no-progress")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
) -> None:
    """Import real data: a pair dataset (csv, tsv, coco, vg, webdataset, hf) or an eval set (imagefolder,
    labelcsv). Missing/unreadable images are skipped and counted (an error above --max-bad-fraction).

    Examples: otcbench data import cc3m/train.csv data/cc3m --format csv --classnames imagenet;
    otcbench data import coco/annotations/captions_train2017.json data/coco --format coco;
    otcbench data import imagenet/val data/imagenet --format imagefolder --classnames imagenet --image-size 224
    """
    from rich.progress import Progress

    from otcbench.config import apply_overrides
    from otcbench.data.importers import import_dataset

    _quiet_datasets()
    if fmt is None:  # required, but a missing option should be one line, not click's usage box
        from otcbench.data.importers import IMPORTERS

        raise UserError(f"--format is required: one of {', '.join(IMPORTERS.names())} (`otcbench list formats`)")
    flags = [name for name, on in (("--bytes", as_bytes), ("--copy-images", copy_images),
                                   ("--link-images", link_images)) if on]
    if len(flags) > 1:
        raise UserError(f"{' and '.join(flags)} exclude each other; pick one way to store images")
    given = {
        "image_column": image_column, "caption_column": caption_column, "label_column": label_column,
        "split_column": split_column, "delimiter": delimiter, "image_root": image_root, "image_data": image_data,
        "split": split, "per_image": per_image or None, "regions": regions, "max_regions": max_regions,
        "min_region_size": min_region_size, "caption_ext": caption_ext, "classnames": classnames,
        "templates": templates, "splits": splits, "eval_set": eval_set, "image_size": image_size,
        "storage": {"--bytes": "bytes", "--copy-images": "copy", "--link-images": "link"}.get(flags[0])
        if flags else None,
        "verify": verify, "max_bad_fraction": max_bad_fraction, "limit": limit, "workers": workers, "seed": seed,
    }
    options = apply_overrides({k: v for k, v in given.items() if v is not None}, set_)

    class _Bar:  # the pipeline's Reporter on a rich progress bar, one phase at a time
        def __init__(self, progress: Progress) -> None:
            self.progress, self.task = progress, None

        def start(self, description: str, total: int | None) -> None:
            if self.task is not None:
                self.progress.remove_task(self.task)
            self.task = self.progress.add_task(description, total=total)

        def advance(self, n: int) -> None:
            self.progress.advance(self.task, n)

    with Progress(disable=not _progress_enabled(no_progress), console=err_console) as progress:
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
        table = Table(title=f"skipped {sum(result.skipped.values())} records")
        for col in ("reason", "count", "first example"):
            table.add_column(col)
        for reason, count in sorted(result.skipped.items(), key=lambda kv: -kv[1]):
            table.add_row(reason, str(count), (result.examples.get(reason) or [""])[0])
        console.print(table)


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

    _quiet_datasets()
    given = {"format": fmt, "captions_per_image": captions_per_image}
    options = validate(ExportOptions, apply_overrides({k: v for k, v in given.items() if v is not None}, set_),
                       "data export")
    res = export_dataset(src, out, options, command=" ".join(["otcbench", *sys.argv[1:]]))
    console.print(f"exported {res.images} images with {res.captions} captions from {src} as {res.format} into "
                  f"[bold]{res.out}[/]")


# --------------------------------------------------------------------------------------------------
# train / eval


@app.command("train")
@handle_errors
def train(
    data: Annotated[Path, typer.Argument(help="Pair dataset directory.")],
    out: Annotated[Path, typer.Argument(help="Run directory to write.")],
    defense: Annotated[str, typer.Option("--defense", help="Defense (see `otcbench list defenses`).")] = "none",
    model: Annotated[str | None, typer.Option("--model", help="open_clip model name.")] = None,
    epochs: Annotated[int | None, typer.Option("--epochs")] = None,
    init: Annotated[Path | None, typer.Option("--init", help="Start from this checkpoint.")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the run in OUT.")] = False,
    config: Annotated[Path | None, typer.Option("--config", help="YAML file of options.")] = None,
    seed: Annotated[int | None, typer.Option("--seed")] = None,
    set_: SetOpt = None,
    no_progress: Annotated[bool, typer.Option("--no-progress")] = False,
) -> None:
    """Pre-train (or fine-tune with --init) a CLIP model on a pair dataset with a defense.

    Example: otcbench train data/world runs/clip --defense none --epochs 6 --set train.lr=3e-3
    """
    from otcbench.config import TrainJob, apply_overrides, load_yaml, validate
    from otcbench.models import checkpoint_model_name
    from otcbench.train.loop import Trainer

    _quiet_datasets()
    raw: dict[str, Any] = load_yaml(config) if config else {}
    raw["data"] = str(data)
    raw.setdefault("defense", {})["name"] = defense
    if model is not None:
        raw.setdefault("model", {})["name"] = model
    if init is not None:
        raw.setdefault("model", {})["init"] = str(init)
        if model is None and "name" not in raw.get("model", {}):
            name = checkpoint_model_name(init)
            if name:
                raw["model"]["name"] = name
    if epochs is not None:
        raw.setdefault("train", {})["epochs"] = epochs
    if seed is not None:
        raw.setdefault("train", {})["seed"] = seed
    job = validate(TrainJob, apply_overrides(raw, set_), where="train")
    from otcbench.defenses.base import check_defense

    check_defense(job.defense.name, job.defense.options, job.train.epochs, f"defense {job.defense.name}")
    trainer = Trainer(job, out, resume=resume, show_progress=_progress_enabled(no_progress))
    try:
        last = trainer.fit()
    finally:
        from otcbench.train import distributed

        distributed.destroy()
    if trainer.dist.is_main:
        console.print(f"trained {job.train.epochs} epochs of [bold]{job.model.name}[/] "
                  f"(defense {job.defense.name}); checkpoint: [bold]{last}[/]")


@app.command("eval")
@handle_errors
def eval_cmd(
    checkpoint: Annotated[Path, typer.Argument(help="Run directory or checkpoint file.")],
    eval_data: Annotated[Path, typer.Option("--eval-data", help="Eval set (or the synthetic world dir).")],
    zeroshot: Annotated[bool, typer.Option("--zeroshot", help="Zero-shot top-1/top-5.")] = False,
    linear_probe: Annotated[bool, typer.Option("--linear-probe", help="Linear-probe top-1.")] = False,
    asr: Annotated[bool, typer.Option("--asr", help="Attack success rates (needs --poison).")] = False,
    poison: Annotated[
        Path | None, typer.Option("--poison", help="Poisoned dataset whose manifest defines the attacks.")
    ] = None,
    model: Annotated[str | None, typer.Option("--model", help="Model name if the checkpoint lacks it.")] = None,
    out: Annotated[Path | None, typer.Option("--out", help="metrics.json path (default: run dir).")] = None,
    set_: SetOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the metrics as JSON.")] = False,
) -> None:
    """Evaluate a checkpoint: zero-shot, linear probe and, with --poison, attack success rates
    (all of them when no metric flag is given).

    Example: otcbench eval runs/clip --eval-data data/world --poison data/poisoned --asr
    """
    from otcbench.config import EvalConfig, apply_overrides, validate
    from otcbench.eval.run import evaluate

    _quiet_datasets()
    raw: dict[str, Any] = {}
    if zeroshot or linear_probe or asr:
        raw = {"zeroshot": zeroshot, "linear_probe": linear_probe, "asr": asr}
    elif poison is not None:
        raw = {"asr": True}
    cfg = validate(EvalConfig, apply_overrides(raw, set_), where="eval")
    metrics = evaluate(checkpoint, eval_data, cfg, model_name=model, out=out, poison=poison)
    if as_json:
        console.print_json(json.dumps(metrics))
        return
    table = Table(title=f"metrics — {metrics['model']}", show_header=True)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for k, v in metrics.items():
        if isinstance(v, float):
            table.add_row(k, f"{v:.4f}")
        elif isinstance(v, int):
            table.add_row(k, str(v))
    console.print(table)
    if metrics.get("asr"):
        at = Table(title="attack success")
        for col in ("attack", "kind", "ASR (zero-shot)", "ASR (probe)", "n", "no-trigger rate"):
            at.add_column(col)
        for name, r in metrics["asr"].items():
            probe = f"{r['asr_probe']:.3f}" if "asr_probe" in r else "-"
            base = f"{r['clean_rate']:.3f}" if "clean_rate" in r else "-"
            at.add_row(name, r["kind"], f"{r['asr']:.3f}", probe, str(r["n"]), base)
        console.print(at)
    console.print(f"metrics written to [bold]{metrics['metrics_file']}[/]")


@app.command("poison")
@handle_errors
def poison_cmd(
    data: Annotated[Path, typer.Argument(help="Clean pair dataset (never modified).")],
    out: Annotated[Path, typer.Argument(help="Poisoned dataset directory to write.")],
    attack: Annotated[list[str], typer.Option("--attack", help="Attack name (repeat for several).")],
    set_: SetOpt = None,
    seed: Annotated[int, typer.Option("--seed", help="Poisoning seed.")] = 0,
    overwrite: Annotated[bool, typer.Option("--overwrite")] = False,
) -> None:
    """Poison a pair dataset with one or several attacks; writes the poisoned copy and its manifest.

    Examples: otcbench poison data/world data/badnet --attack badnet --set rate=0.01 --set trigger.size=0.25;
    otcbench poison data/world data/mixed --attack targeted --attack badnet --set targeted.n_targets=8
    """
    from otcbench.attacks.poison import attack_options, poison_dataset

    _quiet_datasets()
    meta = poison_dataset(data, out, attack_options(attack, set_), seed=seed,
                          command=" ".join(["otcbench", *sys.argv[1:]]), overwrite=overwrite)
    table = Table(title=f"poisoned {out} ({meta.counts['pairs']} pairs, fingerprint {meta.fingerprint})")
    for col in ("attack", "kind", "poisoned rows", "details"):
        table.add_column(col)
    for a in meta.poison["attacks"]:
        if a["kind"] == "targeted":
            details = f"{len(a['targets'])} targets, e.g. {a['targets'][0]['true_class']} → " \
                      f"{a['targets'][0]['adversarial_class']}"
        else:
            details = f"target {a['target_class']}, trigger {a['trigger']['kind']}"
        table.add_row(a["name"], a["kind"], str(a["n_poisoned"]), details)
    console.print(table)


@app.command("defend")
@handle_errors
def defend_cmd(
    data: Annotated[Path, typer.Argument(help="Pair dataset (e.g. a poisoned one; never modified).")],
    out: Annotated[Path, typer.Argument(help="New directory: re-paired dataset + pair_scores.parquet + defend.json.")],
    defense: Annotated[str, typer.Option("--defense", help="A defense with a data-side step (otcclip, …).")],
    checkpoint: Annotated[Path, typer.Option("--checkpoint", help="Run directory or checkpoint file.")],
    set_: Annotated[list[str] | None, typer.Option(
        "--set", help="A defense option (--set top_k=10), or how images are read: train.data_mode, "
        "train.num_workers, train.max_bad_fraction (repeatable).")] = None,
    model: Annotated[str | None, typer.Option("--model", help="Model name if the checkpoint lacks it.")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Images per no-grad chunk.")] = 512,
    device: Annotated[str, typer.Option("--device", help="auto, cpu, cuda, cuda:N.")] = "auto",
    no_progress: Annotated[bool, typer.Option("--no-progress")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
    detector: Annotated[list[str] | None, typer.Option(
        "--detector", help="Also score pairs with a detector on the model's embeddings (knn, dao; repeatable; "
        "options: --set detector.knn.k=32).")] = None,
) -> None:
    """Run a defense's data-side step alone (caption re-matching / pair filtering) with a trained model;
    writes the re-paired dataset, per-pair scores and detection metrics. --set takes the defense's options,
    and train.data_mode / train.num_workers / train.max_bad_fraction (images in memory or streamed, as train).

    Examples: otcbench defend data/p data/p-otc --defense otcclip --checkpoint runs/clip --set top_k=10;
    otcbench defend data/cc3m-p out --defense otcclip --checkpoint runs/rn50 --set train.data_mode=stream
    --set train.num_workers=8; otcbench defend data/p out --defense safeclip --checkpoint runs/clip
    --detector knn --detector dao
    """
    from otcbench.config import apply_overrides
    from otcbench.defenses.defend import data_options, detector_specs, report_table, run_defend

    _quiet_datasets()
    options = apply_overrides({}, set_)
    loading = data_options(options.pop("train", None))  # how images are read; the rest is the defense's
    detectors = detector_specs(detector or [], options.pop("detector", None))
    if set(options) == {"defense"} and isinstance(options["defense"], dict):  # train-style keys work too
        options = options["defense"].get("options", {})
    report = run_defend(data, out, defense=defense, checkpoint=checkpoint, options=options, model_name=model,
                        batch_size=batch_size, device=device, loading=loading,
                        show_progress=_progress_enabled(no_progress), command=" ".join(["otcbench", *sys.argv[1:]]),
                        detectors=detectors)
    if as_json:
        console.print_json(json.dumps(report))
        return
    console.print(report_table(report))
    console.print(f"defended dataset written to [bold]{report['out']}[/]")


# --------------------------------------------------------------------------------------------------
# list


@list_app.command("models")
@handle_errors
def list_models(
    all_: Annotated[bool, typer.Option("--all", help="Also list every open_clip architecture.")] = False,
) -> None:
    """List model architectures (bundled tiny configs first).

    Example: otcbench list models --all
    """
    from otcbench.models import bundled_model_names, list_model_names, model_summary

    bundled = bundled_model_names()
    names = bundled + ([n for n in list_model_names() if n not in bundled] if all_ else [])
    table = Table(title="models" + ("" if all_ else " (bundled; --all for every open_clip name)"))
    for col in ("name", "family", "image", "embed", "context", "params (M)"):
        table.add_column(col)
    for n in names:
        s = model_summary(n, count_params=n in bundled)
        params = f"{s['params_m']:.2f}" if s.get("params_m") else "-"
        img = s["image_size"]
        table.add_row(n, s["family"], f"{img[0]}x{img[1]}", str(s["embed_dim"]), str(s["context_length"]), params)
    console.print(table)


def _registry_table(registry, title: str, with_kind: bool = False, note=None) -> Table:
    """One row per registered method: name, (kind), every option with its default, first doc line
    (and ``note(cls)`` under it when given and not empty)."""
    table = Table(title=title)
    for col in ("name", *(("kind",) if with_kind else ()), "options", "description"):
        table.add_column(col)
    for name in registry.names():
        cls = registry.get(name)
        opts = []
        for k, f in cls.Options.model_fields.items():
            default = f.get_default(call_default_factory=True)
            if hasattr(default, "model_dump"):  # nested options (a trigger spec) listed key by key
                opts.extend(f"{k}.{kk}={vv!r}" for kk, vv in default.model_dump().items())
            else:
                opts.append(f"{k}={default!r}")
        doc = (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""
        extra = note(cls) if note is not None else ""
        doc = f"{doc}\n{extra}" if extra else doc
        kind = (cls.kind,) if with_kind else ()
        table.add_row(name, *kind, "\n".join(opts) or "-", doc)
    return table


@list_app.command("defenses")
@handle_errors
def list_defenses() -> None:
    """List defenses and their options (set them with --set defense.options.KEY=VALUE on `train`).

    A variant registered under its own name (a subclass of another defense with other defaults) is a line
    of its own, with what its defaults change from its parent's.

    Example: otcbench list defenses
    """
    from otcbench.defenses import DEFENSES
    from otcbench.defenses.labels import compact, registered_variant_of

    def variant_note(cls: type) -> str:
        of = registered_variant_of(cls)
        if of is None:
            return ""
        parent, phrases = of
        return f"variant of {parent}" + (f": {compact(phrases, max_phrases=8)}" if phrases else "")

    console.print(_registry_table(DEFENSES, "defenses", note=variant_note))


@list_app.command("detectors")
@handle_errors
def list_detectors() -> None:
    """List poisoned-sample detectors and their options (`defend --detector NAME --set detector.NAME.KEY=V`).

    Example: otcbench list detectors
    """
    from otcbench.defenses.detectors import DETECTORS

    console.print(_registry_table(DETECTORS, "detectors"))


@list_app.command("attacks")
@handle_errors
def list_attacks() -> None:
    """List attacks and their options (set them with --set KEY=VALUE on `poison`).

    Example: otcbench list attacks
    """
    from otcbench.attacks import ATTACKS

    console.print(_registry_table(ATTACKS, "attacks", with_kind=True))


@list_app.command("formats")
@handle_errors
def list_formats() -> None:
    """List `data import` formats: what SRC is, what they make, their own options.

    Example: otcbench list formats
    """
    from otcbench.data.importers import IMPORTERS, ImportOptions

    table = Table(title="import formats (options common to all: see `otcbench data import --help`)")
    for col in ("format", "makes", "source", "own options"):
        table.add_column(col)
    for name in IMPORTERS.names():
        cls = IMPORTERS.get(name)
        own = [f"{k}={f.get_default()!r}" for k, f in cls.Options.model_fields.items()
               if k not in ImportOptions.model_fields]
        table.add_row(name, "eval set" if cls.kind == "eval" else "pairs", cls.layout, "\n".join(own) or "-")
    console.print(table)


# --------------------------------------------------------------------------------------------------
# recipes: run, report, list recipes


@app.command("run")
@handle_errors
def run_cmd(
    recipe: Annotated[str, typer.Argument(help="Recipe YAML file, or the name of a shipped recipe.")],
    set_: SetOpt = None,
    out: Annotated[Path | None, typer.Option("--out", help="Results directory (default results/<name>).")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue interrupted or failed runs.")] = False,
    jobs: Annotated[int | None, typer.Option(
        "--jobs", "-j", help="Runs trained at once (worker processes; default: the recipe's `jobs`).")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Validate and list the grid; run nothing.")] = False,
    no_plots: Annotated[bool, typer.Option("--no-plots", help="Skip the PNG plots.")] = False,
    no_progress: Annotated[bool, typer.Option("--no-progress")] = False,
) -> None:
    """Run a recipe: the attacks × defenses × seeds grid, cached and resumable; prints the results table.

    Examples: otcbench run recipes/quickstart.yaml; otcbench run quickstart --set train.epochs=2 --out
    results/short; otcbench run quickstart --set defenses.cleanclip.train.epochs=5; otcbench run quickstart
    --resume (after an interruption); otcbench run quickstart --jobs 2 (two runs at once)
    """
    from otcbench.bench.recipe import load_recipe
    from otcbench.bench.runner import execute_plan, plan_recipe

    _quiet_datasets()
    if jobs is not None and jobs < 1:
        raise UserError(f"--jobs {jobs}: give at least 1")
    rec, path = load_recipe(recipe, set_)
    jobs = rec.jobs if jobs is None else jobs
    plan = plan_recipe(rec, out, resume=resume)
    if dry_run:
        table = Table(title=f"{rec.name}: {len(plan.runs)} runs, {jobs} at a time → {plan.out}")
        for col in ("run_id", "attack", "defense", "seed", "starts from", "state"):
            table.add_column(col)
        for r in plan.runs:
            table.add_row(r.run_id, r.attack.label, r.defense.label, str(r.seed), r.parent or "", plan.state(r))
        console.print(table)
        return
    result = execute_plan(plan, jobs=jobs, show_progress=_progress_enabled(no_progress), console=err_console,
                          recipe_file=path, plots=not no_plots)
    typer.echo(result.table_md)
    counts = {a: sum(o.action == a for o in result.outcomes) for a in ("trained", "resumed", "cached", "failed")}
    done = ", ".join(f"{n} {a}" for a, n in counts.items() if n)
    console.print(f"{len(result.outcomes)} runs ({done}); results in [bold]{plan.out}[/] "
                  "(summary.csv, table.md, table.tex, plots/)", highlight=False)
    if result.failed:
        raise typer.Exit(code=1)


@app.command("report")
@handle_errors
def report_cmd(
    results: Annotated[Path, typer.Argument(help="Results directory written by `otcbench run`.")],
    fmt: Annotated[str, typer.Option("--format", help="What to print: md, csv or latex.")] = "md",
    plots: Annotated[bool, typer.Option("--plots", help="Also rebuild the PNG plots.")] = False,
) -> None:
    """Rebuild table.md and table.tex (and with --plots the PNGs) from RESULTS/summary.csv; print a table.

    Example: otcbench report results/quickstart --format latex --plots
    """
    from otcbench.bench.report import SUMMARY, write_report

    if fmt not in ("md", "csv", "latex"):
        raise UserError(f"--format {fmt!r}: use md, csv or latex")
    md = write_report(results, plots=plots)
    if fmt == "md":
        typer.echo(md)
    elif fmt == "csv":
        typer.echo((results / SUMMARY).read_text(), nl=False)
    else:
        typer.echo((results / "table.tex").read_text(), nl=False)


@app.command("detect")
@handle_errors
def detect_cmd(
    results: Annotated[Path, typer.Argument(help="Results directory of `otcbench run` (with its runs/ and data/).")],
    detector: Annotated[list[str] | None, typer.Option(
        "--detector", help="Embedding detectors to compare (default: knn and dao; repeatable).")] = None,
    defense: Annotated[list[str] | None, typer.Option(
        "--defense", help="Data-side steps whose scores are compared (default: otcclip and safeclip; repeatable; "
        "safeclip alone also shows its own-pair cosine, the cheapest global score).")] = None,
    device: Annotated[str, typer.Option("--device", help="auto, cpu, cuda, cuda:N.")] = "auto",
    redo: Annotated[bool, typer.Option("--redo", help="Recompute defend outputs that already exist.")] = False,
) -> None:
    """The detector table: every undefended run's model scores its own training pairs with OTCCLIP's OT and
    global scores, SafeCLIP's GMM and the embedding detectors (`defend`); AUROC and precision@poison-count per
    score and attack in RESULTS/detectors.csv, detectors.md and plots/detectors.png.

    Example: otcbench detect results/peers --detector knn --detector dao
    """
    from otcbench.bench.detector_table import (
        DEFAULT_DETECTORS,
        DEFAULT_STEPS,
        run_detector_grid,
        steps_for,
        write_detector_report,
    )
    from otcbench.defenses.defend import detector_specs

    _quiet_datasets()
    specs = detector_specs(detector, None) if detector else list(DEFAULT_DETECTORS)
    steps = steps_for(defense) if defense else list(DEFAULT_STEPS)
    run_detector_grid(results, steps=steps, detectors=specs, device=device, redo=redo, log=console.print)
    typer.echo(write_detector_report(results))


@list_app.command("recipes")
@handle_errors
def list_recipes() -> None:
    """List the shipped recipes (run one with `otcbench run NAME`).

    Example: otcbench list recipes
    """
    from otcbench.bench.recipe import RECIPE_DIR, grid_size, load_recipe, recipe_names

    table = Table(title=f"recipes ({RECIPE_DIR})")
    for col in ("name", "runs", "needs", "description"):
        table.add_column(col)
    for name in recipe_names():
        rec, _ = load_recipe(name)
        needs = ["GPU"] if rec.requires.gpu else ["CPU"]
        if rec.data.path:
            needs.append(f"data: {rec.data.path}")
        table.add_row(name, str(grid_size(rec)), "\n".join(needs), " ".join(rec.description.split()))
    console.print(table)


# --------------------------------------------------------------------------------------------------
# bench


@bench_app.command("ot")
@handle_errors
def bench_ot(
    sizes: Annotated[str | None, typer.Option("--sizes", help="Token-set sizes NxM (default 49x77,16x24).")] = None,
    batches: Annotated[
        str | None, typer.Option("--batches", help="Pairs per batch (default 1024,4096,16384; +65536 on CUDA).")
    ] = None,
    dims: Annotated[str | None, typer.Option("--dims", help="Feature dims (default 128,512).")] = None,
    device: Annotated[str, typer.Option("--device", help="cpu, cuda or all (CUDA skipped if absent).")] = "cpu",
    iters: Annotated[int | None, typer.Option("--iters", help="Sinkhorn iterations (default 50).")] = None,
    eps: Annotated[float, typer.Option("--eps", help="Entropic regularisation.")] = 0.05,
    repeats: Annotated[int | None, typer.Option("--repeats", help="Best of N runs (default 3).")] = None,
    loop_pairs: Annotated[
        int | None, typer.Option("--loop-pairs", help="Pairs timed in the POT per-pair loop (default 32).")
    ] = None,
    threads: Annotated[int | None, typer.Option("--threads", help="torch CPU threads (default: torch's).")] = None,
    no_pot_batch: Annotated[bool, typer.Option("--no-pot-batch", help="Skip POT's (slow) batch solver.")] = False,
    pot_block: Annotated[
        int | None, typer.Option("--pot-block", help="Problems per POT batch call (default: 256 on CPU, its best).")
    ] = None,
    quick: Annotated[bool, typer.Option("--quick", help="Tiny grid (seconds), for smoke tests.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the rows as JSON.")] = False,
    no_progress: Annotated[bool, typer.Option("--no-progress")] = False,
) -> None:
    """Time otcbench's batched Sinkhorn against POT's batch solver and a POT per-pair loop on the same problems.

    Cost = 1 - cos of random unit features, uniform marginals, same eps and iterations everywhere; reports
    pairs/s, speedups and the largest distance difference. The POT loop runs on --loop-pairs pairs per case and
    is extrapolated.

    Examples: otcbench bench ot; otcbench bench ot --sizes 49x77 --batches 4096 --dims 512 --json;
    otcbench bench ot --device all --batches 65536
    """
    from rich.progress import Progress

    from otcbench.bench import ot_bench as ob

    if threads is not None:
        if threads < 1:
            raise UserError("--threads must be at least 1")
        import torch

        torch.set_num_threads(threads)
    base: dict[str, Any] = dict(ob.QUICK) if quick else {}
    size_list = ob.parse_sizes(sizes) if sizes else list(base.get("sizes", ob.DEFAULT_SIZES))
    batch_list = ob.parse_ints(batches, "--batches") if batches else base.get("batches")
    dim_list = ob.parse_ints(dims, "--dims") if dims else list(base.get("dims", ob.DEFAULT_DIMS))
    devices, notes = ob.resolve_devices(device)
    given = dict(iters=iters, repeats=repeats, loop_pairs=loop_pairs)
    opts: dict[str, Any] = {k: v if v is not None else base.get(k, ob.DEFAULTS[k]) for k, v in given.items()}
    opts.update(eps=eps, pot_batch=not no_pot_batch, pot_block=pot_block)
    total = len(ob.plan_cases(size_list, batch_list, dim_list, devices))
    with Progress(disable=not _progress_enabled(no_progress), console=err_console, transient=True) as progress:
        task = progress.add_task("bench ot", total=total)

        started = [0]

        def step(desc: str) -> None:  # called before each case: the previous one is done
            progress.update(task, description=desc, completed=started[0])
            started[0] += 1

        rows = ob.run_ot_bench(size_list, batch_list, dim_list, devices, progress=step, **opts)
        progress.update(task, completed=total)
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    console.print(ob.render_table(rows))
    for note in notes + ob.table_notes(rows):
        console.print(note, highlight=False)


@bench_app.command("train")
@handle_errors
def bench_train(
    defense: Annotated[
        list[str] | None, typer.Option("--defense", help="Defense to time (repeat; default all).")
    ] = None,
    model: Annotated[str, typer.Option("--model", help="open_clip model name.")] = "otc-rn-nano",
    batch_size: Annotated[int, typer.Option("--batch-size", help="Global batch size.")] = 128,
    steps: Annotated[int, typer.Option("--steps", help="Steps per epoch of the benchmark data.")] = 12,
    epochs: Annotated[int, typer.Option("--epochs", help="Epochs per defense (data-side steps run per epoch).")] = 2,
    data: Annotated[Path | None, typer.Option("--data", help="Pair dataset (default: a synthetic world).")] = None,
    device: Annotated[str, typer.Option("--device", help="auto, cpu, cuda, cuda:N.")] = "auto",
    amp: Annotated[str, typer.Option("--amp", help="auto (bf16 on CUDA), bf16, fp16 or none.")] = "auto",
    threads: Annotated[int | None, typer.Option("--threads", help="torch CPU threads.")] = None,
    set_: SetOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the rows as JSON.")] = False,
) -> None:
    """Training throughput of each defense at one model and batch: step time, images/s, data-side time, epoch ratio.

    Every defense trains through the real trainer in its steady-state regime (e.g. matching from the first
    epoch); --set NAME.key=value overrides a defense option, --set train.key=value / model.key=value a trainer
    or model option for every defense (e.g. the streamed data path: --set train.data_mode=stream
    --set train.num_workers=8).

    Examples: otcbench bench train --defense none --defense otcclip --model otc-rn-tiny;
    otcbench bench train --model RN50 --batch-size 256 --device cuda --set train.data_mode=stream
    --set train.num_workers=8 --json
    """
    from otcbench.bench.train_bench import run_train_bench, split_overrides
    from otcbench.defenses import DEFENSES

    _quiet_datasets()
    names = defense or sorted(DEFENSES.names())
    if amp not in ("auto", "bf16", "fp16", "none"):
        raise UserError(f"--amp {amp!r}: use auto, bf16, fp16 or none")
    options, train_opts, model_opts = split_overrides(set_)
    rows = run_train_bench(names, model=model, batch_size=batch_size, steps_per_epoch=steps, epochs=epochs,
                           data=data, device=device, amp=amp, options=options, threads=threads, train=train_opts,
                           model_options=model_opts)
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    r0 = rows[0]
    nw = r0["num_workers"]
    streamed = f", streamed ({nw} worker{'' if nw == 1 else 's'})" if r0["data_mode"] == "stream" else ""
    table = Table(title=f"bench train: {model}, batch {batch_size}, {r0['device']} {r0['amp']}{streamed}")
    for col in ("defense", "step ms", "images/s", "data-side s/epoch", "epoch s", "× none (epoch)", "× none (step)"):
        table.add_column(col, justify="left" if col == "defense" else "right")
    for r in rows:
        table.add_row(r["defense"], f"{r['step_ms']:.1f}", f"{r['images_per_s']:.0f}", f"{r['data_side_s']:.2f}",
                      f"{r['epoch_s']:.2f}", "" if r["epoch_ratio"] is None else f"{r['epoch_ratio']:.2f}",
                      "" if r["step_ratio"] is None else f"{r['step_ratio']:.2f}")
    console.print(table)


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()
