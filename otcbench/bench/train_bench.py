"""``otcbench bench train``: training throughput (images/s, step time) of each defense at a model and batch.

Each defense trains for a few epochs on a synthetic world sized to the model's resolution (or on a given
pair dataset) through the real :class:`~otcbench.train.loop.Trainer`; we time every optimiser step (with a
device synchronisation, so GPU work is counted) and every data-side step (the defense's
``on_epoch_start``: matching, pool refresh, GMM scoring). Reported per defense:

* ``step_ms`` — median optimiser-step time after ``warmup_steps`` (forward, loss, backward, update);
* ``images_per_s`` — ``batch_size / step_ms``;
* ``data_side_s`` — mean seconds of the data-side hook per epoch;
* ``epoch_s`` — measured wall time of the last epoch including its data-side step, and ``epoch_ratio`` —
  that time relative to the ``none`` defense's (the "otcclip epoch ≤ 1.3× a CLIP epoch" number).

Defenses start in their steady-state regime where they declare one (``Defense.bench_options``: e.g.
matching from the first epoch), overridable per defense with ``--set NAME.key=value``. Any other trainer
option goes through ``--set train.key=value`` (e.g. ``train.data_mode=stream``, ``train.num_workers=8``: the
streamed data path) and ``--set model.init=CKPT``; options that have their own flag (``--batch-size``…) are
taken only from the flag, so the rows always say what was measured.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from otcbench.config import SynthConfig, TrainJob, validate
from otcbench.defenses import DEFENSES, build_defense
from otcbench.errors import UserError

#: ``train.*`` keys the benchmark sets from its own arguments (flag name for the error message).
FLAG_KEYS = {"epochs": "--epochs", "batch_size": "--batch-size", "device": "--device", "amp": "--amp",
             "threads": "--threads"}


def split_overrides(items: list[str] | None) -> tuple[dict[str, dict[str, Any]], dict[str, Any], dict[str, Any]]:
    """``--set`` items → (defense options by defense, ``train.*`` overrides, ``model.*`` overrides).

    ``NAME.key=value`` is an option of defense NAME; ``train.key=value`` and ``model.key=value`` go to the
    trainer's options. Keys the benchmark takes from its own flags are refused with the flag to use.
    """
    from otcbench.config import parse_override

    options: dict[str, dict[str, Any]] = {}
    train: dict[str, Any] = {}
    model: dict[str, Any] = {}
    for item in items or []:
        keys, value = parse_override(item)
        if len(keys) != 2:
            raise UserError(f"--set {item!r}: use DEFENSE.option=value, train.option=value or model.option=value, "
                            "e.g. --set otcclip.alpha=0.5 --set train.data_mode=stream")
        section, key = keys
        if section == "train":
            if key in FLAG_KEYS:
                raise UserError(f"--set {item!r}: bench train sets train.{key} from {FLAG_KEYS[key]}; use that")
            train[key] = value
        elif section == "model":
            if key == "name":
                raise UserError(f"--set {item!r}: use --model")
            model[key] = value
        else:
            options.setdefault(section, {})[key] = value
    return options, train, model


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_defense(
    defense: str,
    data: Path,
    out: Path,
    *,
    model: str,
    batch_size: int,
    epochs: int,
    warmup_steps: int,
    device: str,
    amp: str,
    options: dict[str, Any] | None = None,
    threads: int | None = None,
    train: dict[str, Any] | None = None,
    model_options: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Train ``defense`` for ``epochs`` on ``data`` (run dir ``out``) and time its steps and data-side hooks.

    ``train`` / ``model_options``: further ``TrainConfig`` / ``ModelConfig`` fields (validated; one line on
    a bad key or value).
    """
    from otcbench.train.loop import Trainer

    cls = DEFENSES.get(defense)
    opts = {**getattr(cls, "bench_options", {}), **(options or {})}
    train_cfg = {"log_every": 10**9, "save_every_epochs": 10**6, **(train or {}), "epochs": epochs,
                 "batch_size": batch_size, "device": device, "amp": amp, "threads": threads}
    job = validate(TrainJob, {
        "data": str(data),
        "model": {**(model_options or {}), "name": model},
        "train": train_cfg,
        "defense": {"name": defense, "options": opts},
    }, where="bench train")
    step_times: list[float] = []
    epoch_times: list[float] = []
    data_side: list[float] = []
    last = [0.0]

    def on_step(tr: Trainer) -> None:
        _sync(tr.device)
        now = time.perf_counter()
        step_times.append(now - last[0])
        last[0] = now

    built = build_defense(job.defense)
    hook = built.on_epoch_start

    def timed_epoch_start(tr: Trainer, epoch: int) -> None:
        _sync(tr.device)
        t0 = time.perf_counter()
        if epoch > 0:
            epoch_times.append(t0 - epoch_start[0])
        epoch_start[0] = t0
        hook(tr, epoch)
        _sync(tr.device)
        data_side.append(time.perf_counter() - t0)
        last[0] = time.perf_counter()

    epoch_start = [time.perf_counter()]
    built.on_epoch_start = timed_epoch_start  # type: ignore[method-assign]
    trainer = Trainer(job, out, defense=built, show_progress=False, on_step=on_step)
    trainer.fit()  # closes its streaming workers itself
    _sync(trainer.device)
    epoch_times.append(time.perf_counter() - epoch_start[0])
    steady = step_times[warmup_steps:] or step_times
    step_s = statistics.median(steady)
    return {
        "defense": defense,
        "model": model,
        "batch_size": batch_size,
        "device": str(trainer.device),
        "amp": str(trainer.amp_dtype).replace("torch.", "") if trainer.amp_dtype else "fp32",
        "steps_timed": len(steady),
        "step_ms": round(1000 * step_s, 2),
        "images_per_s": round(batch_size / step_s, 1),
        "data_side_s": round(statistics.mean(data_side), 3) if data_side else 0.0,
        "epoch_s": round(epoch_times[-1], 3),
        "steps_per_epoch": trainer.steps_per_epoch,
        "data_mode": trainer.data.mode,
        "num_workers": job.train.num_workers,
        "options": opts,
    }


def run_train_bench(
    defenses: list[str],
    *,
    model: str = "otc-rn-nano",
    batch_size: int = 128,
    steps_per_epoch: int = 12,
    epochs: int = 2,
    warmup_steps: int = 3,
    data: Path | None = None,
    device: str = "auto",
    amp: str = "auto",
    options: dict[str, dict[str, Any]] | None = None,
    threads: int | None = None,
    train: dict[str, Any] | None = None,
    model_options: dict[str, Any] | None = None,
    workdir: Path | None = None,
) -> list[dict[str, Any]]:
    """Benchmark each defense (``none`` first, as the reference of ``epoch_ratio``) on the same data.

    ``options`` are defense options by defense name; ``train`` and ``model_options`` further trainer and
    model options for every defense (``{"data_mode": "stream", "num_workers": 8}``).
    """
    from otcbench.models import create_model, image_size

    for d in defenses:
        DEFENSES.get(d)  # unknown names fail before any work
    clash = set(train or {}) & set(FLAG_KEYS)
    if clash:
        raise UserError(f"train.{sorted(clash)[0]} is an argument of bench train ({FLAG_KEYS[sorted(clash)[0]]}), "
                        "not a train option here")
    unknown = set(options or {}) - set(defenses)
    if unknown:
        raise UserError(f"options given for defenses not benchmarked: {', '.join(sorted(unknown))}; "
                        f"add them with --defense")
    # bad train.* / model.* values fail here, before the world is drawn or any defense trains
    validate(TrainJob, {"model": {**(model_options or {}), "name": model}, "train": train or {}},
             where="bench train")
    order = (["none"] if "none" in defenses else []) + [d for d in defenses if d != "none"]
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        root = Path(tmp)
        if data is None:
            from otcbench.data.synth import write_world

            side = image_size(create_model(model, device="cpu"))[0]
            data = root / "world"
            write_world(data, SynthConfig(n_train=batch_size * steps_per_epoch, image_size=side,
                                          probe_train_per_class=1, probe_val_per_class=1, test_per_class=1,
                                          targets_per_class=1))
        rows = []
        for d in order:
            rows.append(bench_defense(d, data, root / f"run-{d}", model=model, batch_size=batch_size,
                                      epochs=epochs, warmup_steps=warmup_steps, device=device, amp=amp,
                                      options=(options or {}).get(d), threads=threads, train=train,
                                      model_options=model_options))
    ref = next((r for r in rows if r["defense"] == "none"), None)
    for r in rows:
        r["epoch_ratio"] = round(r["epoch_s"] / ref["epoch_s"], 3) if ref else None
        r["step_ratio"] = round(r["step_ms"] / ref["step_ms"], 3) if ref else None
    return rows
