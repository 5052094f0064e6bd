"""``otcbench defend``: a defense's data-side step alone, with a given model, on a pair dataset.

Runs :meth:`Defense.data_step` of any matching/filtering defense (otcclip, safeclip, …) with the model of
a checkpoint, and writes OUT:

* the re-paired pair dataset (standard format, loadable by ``train``/``eval``/``data show``): every row of
  the source, in order, each image with the caption the defense assigned (``caption_index``); labels,
  ``poison`` flags (ground truth of the *row*), origins, the poison manifest, the eval set and the target
  images are kept, so ``eval --poison OUT`` works on it. Rows a filtering defense would not train on
  (``keep=False``) are **kept** in the dataset; the split is recorded in ``pair_scores.parquet`` (column
  ``keep``) and counted in ``defend.json`` — the dataset format stays the standard one.
* ``pair_scores.parquet``: one line per row — ``row``, ``caption_row``, ``poison``, ``flagged``,
  ``repaired``, ``keep`` and every score of the step as ``score_<name>`` (higher = more likely clean).
* ``defend.json``: what ran (defense, options, checkpoint, model, data, how images were held), counts, the
  step's summary and, when the dataset has poisoned rows, the detection metrics (``detect_*``,
  ``poison_repaired``, ``clean_repaired``; one AUROC per score, side by side).

Images are held as the trainer holds them (:func:`~otcbench.train.data.load_for_model`: ``data_mode``
``auto``/``memory``/``stream``, ``num_workers``, ``max_bad_fraction`` — ``--set train.data_mode=stream``
on the command line), so ``defend`` runs on datasets larger than memory and gives the same scores either
way. A path-based source is never read whole to write OUT either: as ``poison`` does, OUT links to the
source (``OUT/source``) and its rows keep their paths under the link.

Everything is written atomically (one rename), and every bad input is a one-line error before the model
runs.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import torch
from pydantic import Field

from otcbench import __version__
from otcbench.config import Options, TrainConfig, validate
from otcbench.data.format import (
    SOURCE_LINK,
    build_pair_dataset,
    has_image_paths,
    image_cells,
    load_pair_dataset,
    save_pair_dataset,
    staged_extras,
)
from otcbench.defenses.base import DEFENSES, DataStepResult, Defense
from otcbench.defenses.detectors import DETECTORS, EmbeddingSet, run_detectors
from otcbench.defenses.embed import embed_captions, embed_images
from otcbench.errors import UserError
from otcbench.eval.detection import detection_metrics, per_attack_detection, poison_mask, precision_at_count
from otcbench.models import checkpoint_model_name, create_model, get_tokenizer, image_size
from otcbench.train.data import DataMode, LoaderOptions, TrainData, load_for_model

__all__ = ["PAIR_SCORES", "REPORT", "DataOptions", "StandaloneContext", "data_options", "data_step_defenses",
           "detector_specs", "run_defend"]

PAIR_SCORES = "pair_scores.parquet"
REPORT = "defend.json"
#: directories of the source dataset carried into OUT (eval set, targeted-attack target images)
CARRIED_DIRS = ("eval", "targets")


@dataclass
class StandaloneContext:
    """A :class:`~otcbench.defenses.base.DataContext` built from a checkpoint, outside any training run."""

    model: torch.nn.Module
    data: TrainData
    device: torch.device
    caption_index: torch.Tensor
    amp_dtype: torch.dtype | None
    batch_size: int
    show_progress: bool = False

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    @property
    def embed_batch_size(self) -> int:
        return self.batch_size


class DataOptions(Options):
    """How ``defend`` holds the dataset's images: the ``train.*`` options of the same names."""

    # the trainer's own fields (default, bounds, description): defend reads images exactly as train does
    data_mode: Annotated[DataMode, TrainConfig.model_fields["data_mode"]]
    num_workers: Annotated[int, TrainConfig.model_fields["num_workers"]]
    max_bad_fraction: Annotated[float, TrainConfig.model_fields["max_bad_fraction"]]


class _DefendSet(Options):
    train: DataOptions = Field(default_factory=DataOptions)


def data_options(train: dict[str, Any] | None) -> DataOptions:
    """``DataOptions`` from the ``train`` section of ``defend --set train.KEY=VALUE`` overrides.

    Only the keys that decide how images are read apply; any other ``train.*`` key (``train.lr``…) would be
    silently meaningless for a step that trains nothing, so it is a one-line error.
    """
    train = train or {}
    if not isinstance(train, dict):
        raise UserError("--set train=...: use --set train.data_mode=stream, train.num_workers=N or "
                        "train.max_bad_fraction=F")
    other = sorted(set(train) - set(DataOptions.model_fields))
    if other:
        raise UserError(f"defend: --set train.{other[0]} does not apply (defend trains nothing); it reads "
                        f"{', '.join('train.' + k for k in DataOptions.model_fields)}")
    return validate(_DefendSet, {"train": train}, where="defend").train


def detector_specs(names: Sequence[str], options: dict[str, Any] | None) -> list[tuple[str, dict[str, Any]]]:
    """``(name, options)`` of ``defend --detector NAME``, options from ``--set detector.NAME.KEY=VALUE``.

    An unknown detector, options for a detector not asked for, or a bad option is a one-line error.
    """
    options = options or {}
    if not isinstance(options, dict) or any(not isinstance(v, dict) for v in options.values()):
        raise UserError("--set detector...: give detector options as --set detector.NAME.KEY=VALUE, e.g. "
                        "--set detector.knn.k=32")
    if len(set(names)) != len(names):
        raise UserError(f"a detector is given twice ({', '.join(names)}); give each --detector once")
    stray = sorted(set(options) - set(names))
    if stray:
        raise UserError(f"--set detector.{stray[0]}...: add --detector {stray[0]} to run it")
    specs = [(n, dict(options.get(n, {}))) for n in names]
    for n, o in specs:
        DETECTORS.options(n, o)
    return specs


def data_step_defenses() -> list[str]:
    """Names of the registered defenses that implement a data-side step."""
    return [n for n in DEFENSES.names() if DEFENSES.get(n).data_step is not Defense.data_step]


def _check_out(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise UserError(f"output {out} is a file; choose a new directory for the defended dataset")
    if out.is_dir() and any(out.iterdir()):
        raise UserError(f"output {out} exists and is not empty; choose a new directory or remove it first")


def run_defend(
    data: str | Path,
    out: str | Path,
    *,
    defense: str,
    checkpoint: str | Path,
    options: dict[str, Any] | None = None,
    model_name: str | None = None,
    batch_size: int = 512,
    device: str = "auto",
    loading: DataOptions | None = None,
    show_progress: bool = True,
    command: str = "otcbench defend",
    detectors: Sequence[tuple[str, dict[str, Any]]] = (),
) -> dict[str, Any]:
    """Run ``defense``'s data-side step with the model of ``checkpoint`` on ``data``; write and return the report.

    Args:
        data: pair dataset directory.
        out: new (or empty) directory for the defended dataset and its reports.
        defense: registry name of a defense with a data-side step (``data_step_defenses()``).
        checkpoint: run directory (its ``checkpoints/last.pt``) or checkpoint file.
        options: the defense's options (validated by its options model).
        model_name: architecture, when the checkpoint does not record it.
        batch_size: images per no-grad chunk for whole-dataset passes.
        device: ``auto``, ``cpu``, ``cuda``, ``cuda:N``.
        loading: how images are held (``data_mode``, ``num_workers``, ``max_bad_fraction``; the trainer's
            defaults when None): in memory, or streamed for datasets larger than memory.
        show_progress: rich progress bars (also off when ``OTCBENCH_NO_PROGRESS`` is set).
        command: recorded as the dataset's provenance.
        detectors: ``(name, options)`` of poisoned-sample detectors (:mod:`otcbench.defenses.detectors`) run on
            the same model's embeddings of the dataset's own pairs; their scores join the defense's own
            (``score_<name>`` in ``pair_scores.parquet``, one AUROC each) after them.

    Returns:
        The report written to ``OUT/defend.json`` (plus ``"out"``).
    """
    from otcbench.device import autocast_dtype, resolve_device
    from otcbench.eval.run import resolve_checkpoint

    t0 = time.perf_counter()
    out = Path(out)
    if batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {batch_size}")
    _check_out(out)
    cls = DEFENSES.get(defense)
    if cls.data_step is Defense.data_step:
        raise UserError(f"defense {defense!r} has no data-side step, so there is nothing to run alone; defend "
                        f"works with {', '.join(data_step_defenses()) or 'none registered'}")
    opts = DEFENSES.options(defense, options)
    d: Defense = cls(opts)
    for det_name, det_values in detectors:  # bad detector options fail here, before the model runs
        DETECTORS.options(det_name, det_values)
    ck = resolve_checkpoint(checkpoint)
    name = model_name or checkpoint_model_name(ck.file)
    if not name:
        raise UserError(f"checkpoint {ck.file} does not record its model; pass --model NAME")
    src = load_pair_dataset(data)
    if out.resolve() == src.path.resolve():
        raise UserError("the output must differ from the source dataset; defend never modifies its input")
    dev = resolve_device(device)
    model = create_model(name, checkpoint=ck.file, device=dev)
    model.eval()
    tokenizer = get_tokenizer(name)
    side = image_size(model)[0]
    lo = loading or DataOptions()
    # the trainer's choice (memory when it fits, else streamed), so a dataset it trains on defends too
    td = load_for_model(src, tokenizer, side, lo.data_mode,
                        LoaderOptions(num_workers=lo.num_workers, pin_memory=dev.type == "cuda",
                                      max_bad_fraction=lo.max_bad_fraction))
    ctx = StandaloneContext(model=model, data=td, device=dev, caption_index=torch.arange(len(td)),
                            amp_dtype=autocast_dtype("auto", dev), batch_size=batch_size,
                            show_progress=show_progress)
    try:
        result = d.data_step(ctx, None)
        if detectors:
            emb = EmbeddingSet(embed_images(ctx).cpu(), embed_captions(ctx, torch.arange(len(td))).cpu())
            extra = run_detectors(detectors, emb)
            clash = sorted(set(extra) & set(result.scores))
            if clash:
                raise UserError(f"detector {clash[0]!r} has the name of a score of {defense}; it cannot be shown "
                                "beside it")
            result.scores = {**result.scores, **extra}
    finally:
        td.close()  # streaming threads and workers
    _check_result(result, len(td), defense)

    n = len(td)
    ci = result.caption_index.cpu().long()
    flagged = result.flagged.cpu().bool()
    keep = result.keep.cpu().bool() if result.keep is not None else torch.ones(n, dtype=torch.bool)
    repaired = ci != torch.arange(n)
    poison = td.poison
    report: dict[str, Any] = {
        "defense": defense,
        "options": opts.model_dump(mode="json"),
        "checkpoint": str(ck.file),
        "model": name,
        "data": str(src.path),
        "data_fingerprint": src.meta.fingerprint,
        "data_mode": td.mode,
        "num_workers": lo.num_workers,
        "bad_images": td.n_bad_images,
        "n": n,
        "n_flagged": int(flagged.sum()),
        "n_repaired": int(repaired.sum()),
        "n_keep": int(keep.sum()),
        "scores": list(result.scores),
        "summary": result.summary,
    }
    if td.n_bad_images:
        report["bad_image_examples"] = td.bad_image_examples
    if detectors:
        report["detectors"] = [[n, DETECTORS.options(n, o).model_dump(mode="json")] for n, o in detectors]
    if any(poison):
        report.update(detection_metrics(flagged, result.scores or None, poison, caption_index=ci))
        for name, s in result.scores.items():
            report[f"detect_precision_at_n_{name}"] = precision_at_count(s, poison_mask(poison))
        report["detect_by_attack"] = per_attack_detection(result.scores, poison)

    captions = td.captions
    new_captions = [captions[int(j)] for j in ci]
    # Stored bytes stay bytes; a stored path is re-rooted under a link to the source (as poison does), so a
    # path-based dataset of millions of images is never read to be written out.
    linked = has_image_paths(src.ds)
    images = [c["bytes"] if c["bytes"] is not None else f"{SOURCE_LINK}/{c['path']}" for c in image_cells(src.ds)]
    # content describes the image, which every row keeps: it travels unchanged (match precision downstream)
    ds = build_pair_dataset(images, new_captions, list(src.ds["label"]), list(poison),
                            list(src.ds["origin"]), content=src.content,
                            image_id=src.image_ids if src.has_image_id_column else None)
    meta = src.meta.model_copy(deep=True)
    meta.otcbench_version = __version__
    meta.created_by = {"command": command, "options": {"defense": defense, "defense_options": report["options"],
                                                       "checkpoint": str(ck.file), "model": name,
                                                       "source": str(src.path),
                                                       "source_fingerprint": src.meta.fingerprint,
                                                       "source_link": SOURCE_LINK if linked else None},
                       "seed": None}
    with staged_extras(out, src.path if linked else None) as (staging, extra):
        for sub in CARRIED_DIRS:
            if (src.path / sub).is_dir():
                shutil.copytree(src.path / sub, staging / sub)
                extra[sub] = staging / sub
        _write_scores(staging / PAIR_SCORES, ci, poison, flagged, repaired, keep, result.scores)
        extra[PAIR_SCORES] = staging / PAIR_SCORES
        report["seconds"] = round(time.perf_counter() - t0, 2)
        (staging / REPORT).write_text(json.dumps(report, indent=2))
        extra[REPORT] = staging / REPORT
        save_pair_dataset(ds, out, meta, overwrite=out.exists(), extra_dirs=extra)
    return {**report, "out": str(out)}


def _check_result(result: DataStepResult, n: int, defense: str) -> None:
    """A defense bug (wrong shapes) is reported plainly rather than as a confusing write error."""
    problems = []
    if result.caption_index.shape != (n,):
        problems.append(f"caption_index has shape {tuple(result.caption_index.shape)}")
    if result.flagged.shape != (n,):
        problems.append(f"flagged has shape {tuple(result.flagged.shape)}")
    if result.keep is not None and result.keep.shape != (n,):
        problems.append(f"keep has shape {tuple(result.keep.shape)}")
    problems += [f"score {k!r} has shape {tuple(v.shape)}" for k, v in result.scores.items() if v.shape != (n,)]
    if problems:
        raise RuntimeError(f"defense {defense!r} returned a malformed data-side step for {n} rows: "
                           + "; ".join(problems))


def _write_scores(path: Path, ci: torch.Tensor, poison: list[str], flagged: torch.Tensor, repaired: torch.Tensor,
                  keep: torch.Tensor, scores: dict[str, torch.Tensor]) -> None:
    import pandas as pd

    n = ci.numel()
    table = {
        "row": torch.arange(n).numpy(),
        "caption_row": ci.numpy(),
        "poison": poison,
        "flagged": flagged.numpy(),
        "repaired": repaired.numpy(),
        "keep": keep.numpy(),
    }
    for k, v in scores.items():
        table[f"score_{k}"] = v.detach().float().cpu().numpy()
    pd.DataFrame(table).to_parquet(path, index=False)
