"""``otcbench train``, ``eval``, ``poison``, ``defend``: the stages of one experiment (registered by otcbench.cli)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from otcbench import render
from otcbench.commands.common import SetOpt, console, flag, handle_errors, progress_enabled, quiet_datasets


@handle_errors
def train(
    data: Annotated[Path, typer.Argument(help="Pair dataset directory.")],
    out: Annotated[Path, typer.Argument(help="Run directory to write.")],
    defense: Annotated[str, typer.Option("--defense", help="Defense (see `otcbench list defenses`).")] = "none",
    model: Annotated[str | None, typer.Option("--model", help="open_clip model name.")] = None,
    epochs: Annotated[int | None, typer.Option(
        "--epochs", help="Training epochs (default: train.epochs, 8).")] = None,
    init: Annotated[Path | None, typer.Option("--init", help="Start from this checkpoint.")] = None,
    resume: Annotated[bool, flag("--resume", help="Continue the run in OUT.")] = False,
    config: Annotated[Path | None, typer.Option("--config", help="YAML file of options.")] = None,
    seed: Annotated[int | None, typer.Option(
        "--seed", help="Training seed: initialisation, data order, augmentation (default: train.seed, 0).")] = None,
    set_: SetOpt = None,
    no_progress: Annotated[bool, flag("--no-progress", help="No progress bars (shown on a terminal only).")] = False,
) -> None:
    """Pre-train (or fine-tune with --init) a CLIP model on a pair dataset with a defense.

    Example: otcbench train data/world runs/clip --defense none --epochs 6 --set train.lr=3e-3
    """
    from otcbench.defenses.base import build_defense, check_defense
    from otcbench.options import train_job
    from otcbench.train.loop import Trainer

    quiet_datasets()
    job = train_job(data, defense=defense, model=model, init=init, epochs=epochs, seed=seed, config=config,
                    overrides=set_)

    check_defense(job.defense.name, job.defense.options, job.train.epochs, f"defense {job.defense.name}")
    trainer = Trainer(job, out, defense=build_defense(job.defense), resume=resume,
                      show_progress=progress_enabled(no_progress))
    try:
        last = trainer.fit()
    finally:
        from otcbench.train import distributed

        distributed.destroy()
    if trainer.dist.is_main:
        console.print(f"trained {job.train.epochs} epochs of [bold]{job.model.name}[/] "
                  f"(defense {job.defense.name}); checkpoint: [bold]{last}[/]")


@handle_errors
def eval_cmd(
    checkpoint: Annotated[Path, typer.Argument(help="Run directory or checkpoint file.")],
    eval_data: Annotated[Path, typer.Option("--eval-data", help="Eval set (or the synthetic world dir).")],
    zeroshot: Annotated[bool, flag("--zeroshot", help="Zero-shot top-1/top-5.")] = False,
    linear_probe: Annotated[bool, flag("--linear-probe", help="Linear-probe top-1.")] = False,
    asr: Annotated[bool, flag("--asr", help="Attack success rates (needs --poison).")] = False,
    poison: Annotated[
        Path | None, typer.Option("--poison", help="Poisoned dataset whose manifest defines the attacks.")
    ] = None,
    model: Annotated[str | None, typer.Option("--model", help="Model name if the checkpoint lacks it.")] = None,
    out: Annotated[Path | None, typer.Option("--out", help="metrics.json path (default: run dir).")] = None,
    set_: SetOpt = None,
    as_json: Annotated[bool, flag("--json", help="Print the metrics as JSON.")] = False,
) -> None:
    """Evaluate a checkpoint: zero-shot, linear probe and, with --poison, attack success rates
    (all of them when no metric flag is given).

    Example: otcbench eval runs/clip --eval-data data/world --poison data/poisoned --asr
    """
    from otcbench.eval.run import evaluate
    from otcbench.options import eval_config

    quiet_datasets()
    cfg = eval_config(zeroshot=zeroshot, linear_probe=linear_probe, asr=asr, poison=poison is not None,
                      overrides=set_)
    metrics = evaluate(checkpoint, eval_data, cfg, model_name=model, out=out, poison=poison)
    if as_json:
        console.print_json(json.dumps(metrics))
        return
    console.print(render.metrics_table(metrics))
    if metrics.get("asr"):
        console.print(render.asr_table(metrics["asr"]))
    console.print(f"metrics written to [bold]{metrics['metrics_file']}[/]")


@handle_errors
def poison_cmd(
    data: Annotated[Path, typer.Argument(help="Clean pair dataset (never modified).")],
    out: Annotated[Path, typer.Argument(help="Poisoned dataset directory to write.")],
    attack: Annotated[list[str], typer.Option("--attack", help="Attack name (repeat for several).")],
    set_: SetOpt = None,
    seed: Annotated[int, typer.Option("--seed", help="Poisoning seed.")] = 0,
    overwrite: Annotated[bool, flag("--overwrite", help="Replace an existing OUT.")] = False,
) -> None:
    """Poison a pair dataset with one or several attacks; writes the poisoned copy and its manifest.

    Examples: otcbench poison data/world data/badnet --attack badnet --set rate=0.01 --set trigger.size=0.25;
    otcbench poison data/world data/mixed --attack targeted --attack badnet --set targeted.n_targets=8
    """
    from otcbench.attacks.poison import attack_options, poison_dataset

    quiet_datasets()
    meta = poison_dataset(data, out, attack_options(attack, set_), seed=seed,
                          command=" ".join(["otcbench", *sys.argv[1:]]), overwrite=overwrite)
    console.print(render.poison_table(out, meta))


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
    no_progress: Annotated[bool, flag("--no-progress", help="No progress bars (shown on a terminal only).")] = False,
    as_json: Annotated[bool, flag("--json", help="Print the report as JSON.")] = False,
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
    from otcbench.defenses.defend import data_options, detector_specs, run_defend

    quiet_datasets()
    options = apply_overrides({}, set_)
    loading = data_options(options.pop("train", None))  # how images are read; the rest is the defense's
    detectors = detector_specs(detector or [], options.pop("detector", None))
    if set(options) == {"defense"} and isinstance(options["defense"], dict):  # train-style keys work too
        options = options["defense"].get("options", {})
    report = run_defend(data, out, defense=defense, checkpoint=checkpoint, options=options, model_name=model,
                        batch_size=batch_size, device=device, loading=loading,
                        show_progress=progress_enabled(no_progress), command=" ".join(["otcbench", *sys.argv[1:]]),
                        detectors=detectors)
    if as_json:
        console.print_json(json.dumps(report))
        return
    console.print(render.defend_table(report))
    console.print(f"defended dataset written to [bold]{report['out']}[/]")
