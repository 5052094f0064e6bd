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
matching from the first epoch), overridable per defense with ``--set NAME.key=value``.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from otcbench.config import SynthConfig, TrainConfig, TrainJob
from otcbench.defenses import DEFENSES
from otcbench.errors import UserError


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
) -> dict[str, Any]:
    """Train ``defense`` for ``epochs`` on ``data`` (run dir ``out``) and time its steps and data-side hooks."""
    from otcbench.train.loop import Trainer

    cls = DEFENSES.get(defense)
    opts = {**getattr(cls, "bench_options", {}), **(options or {})}
    job = TrainJob.model_validate({
        "data": str(data),
        "model": {"name": model},
        "train": TrainConfig(epochs=epochs, batch_size=batch_size, device=device, amp=amp, threads=threads,
                             log_every=10**9, save_every_epochs=10**6).model_dump(mode="json"),
        "defense": {"name": defense, "options": opts},
    })
    step_times: list[float] = []
    epoch_times: list[float] = []
    data_side: list[float] = []
    last = [0.0]

    def on_step(tr: Trainer) -> None:
        _sync(tr.device)
        now = time.perf_counter()
        step_times.append(now - last[0])
        last[0] = now

    trainer = Trainer(job, out, show_progress=False, on_step=on_step)
    hook = trainer.defense.on_epoch_start

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
    trainer.defense.on_epoch_start = timed_epoch_start  # type: ignore[method-assign]
    trainer.fit()
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
    workdir: Path | None = None,
) -> list[dict[str, Any]]:
    """Benchmark each defense (``none`` first, as the reference of ``epoch_ratio``) on the same data."""
    from otcbench.models import create_model, image_size

    for d in defenses:
        DEFENSES.get(d)  # unknown names fail before any work
    unknown = set(options or {}) - set(defenses)
    if unknown:
        raise UserError(f"options given for defenses not benchmarked: {', '.join(sorted(unknown))}; "
                        f"add them with --defense")
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
                                      options=(options or {}).get(d), threads=threads))
    ref = next((r for r in rows if r["defense"] == "none"), None)
    for r in rows:
        r["epoch_ratio"] = round(r["epoch_s"] / ref["epoch_s"], 3) if ref else None
        r["step_ratio"] = round(r["step_ms"] / ref["step_ms"], 3) if ref else None
    return rows
