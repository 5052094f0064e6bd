"""open_clip's own trainer as the yardstick: the same model, batch and data trained by ``open_clip_train`` and by
otcbench, images/s of both and their ratio in one run, and open_clip's checkpoint evaluated by ``otcbench eval``.

Usage:
  python benchmarks/openclip_trainer.py DATA [--model otc-rn-micro] [--batch 128] [--epochs 1] [--threads 2]
      [--workers 1] [--device cpu|cuda] [--precision fp32|amp_bf16] [--out DIR] [--json]

DATA is a pair dataset with an eval set (the synthetic world, or a COCO import made with ``--eval-set``: e.g.
``data/coco-format`` of benchmarks/coco_format.sh). Its images are written out as files with a CSV of
``filepath<TAB>title`` — what ``python -m open_clip_train.main --dataset-type csv`` reads — and open_clip trains
one pass in this process (otcbench's bundled model configs registered first, so open_clip knows the model).
otcbench then trains the same model at the same batch on DATA with ``bench train``'s timing (``defense none``).

Throughput of each is the median step time after ``--warmup-steps`` steps, data waits included: open_clip's
``Batch (t)`` log field (its step-to-step time, one log line per step), otcbench's ``bench_defense`` step time.
Differences the two trainers keep by design: open_clip decodes and augments images in dataloader workers
(RandomResizedCrop, normalisation) every step; otcbench decodes once and resizes on the device.
"""

from __future__ import annotations

import argparse
import csv
import json
import platform
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from otcbench.bench.train_bench import bench_defense
from otcbench.config import EvalConfig
from otcbench.data import format as fmt
from otcbench.eval.run import evaluate
from otcbench.models.catalog import register_bundled_configs

BATCH_TIME = re.compile(r"Batch \(t\): ([0-9.]+)")


def write_csv(data: fmt.PairDataset, out: Path) -> Path:
    """The dataset's images as files under ``out/images`` and ``out/train.csv`` (tab-separated filepath, title)."""
    images = out / "images"
    images.mkdir(parents=True)
    table = out / "train.csv"
    blobs = fmt.ImageBlobs(fmt.image_cells(data.ds), data.path)
    with table.open("w", newline="") as f:
        w = csv.writer(f, delimiter="\t")
        w.writerow(["filepath", "title"])
        for i, (blob, caption) in enumerate(zip(blobs, data.captions, strict=True)):
            ext = "jpg" if blob[:3] == b"\xff\xd8\xff" else "png"
            path = images / f"{i:08d}.{ext}"
            path.write_bytes(blob)
            w.writerow([str(path), " ".join(caption.split())])
    return table


def _placeholder_webdataset() -> list[str]:
    """Empty ``braceexpand`` / ``webdataset`` modules when they are not installed; returns their names.

    ``open_clip_train.data`` imports both at module level for its webdataset loader (the ``[training]`` extra of
    open_clip_torch); the CSV loader used here never calls them. Installed packages are always preferred."""
    import importlib.util
    import types

    made = []
    if importlib.util.find_spec("braceexpand") is None:
        sys.modules["braceexpand"] = types.ModuleType("braceexpand")
        made.append("braceexpand")
    if importlib.util.find_spec("webdataset") is None:
        wds = types.ModuleType("webdataset")
        wds.PipelineStage = type("PipelineStage", (), {})  # a base class in open_clip_train.data
        filters, tar = types.ModuleType("webdataset.filters"), types.ModuleType("webdataset.tariterators")
        filters._shuffle = None  # type: ignore[attr-defined]
        for name in ("base_plus_ext", "url_opener", "tar_file_expander", "valid_sample"):
            setattr(tar, name, None)
        wds.filters, wds.tariterators = filters, tar  # type: ignore[attr-defined]
        sys.modules.update({"webdataset": wds, "webdataset.filters": filters, "webdataset.tariterators": tar})
        made.append("webdataset")
    return made


def run_open_clip(table: Path, logs: Path, a: argparse.Namespace) -> dict[str, Any]:
    """Train one open_clip pass over ``table`` in this process; step times from its log, its last checkpoint."""
    placeholders = _placeholder_webdataset()
    from open_clip_train import main as oc_main

    register_bundled_configs()
    argv = ["--train-data", str(table), "--dataset-type", "csv", "--csv-img-key", "filepath",
            "--csv-caption-key", "title", "--model", a.model, "--batch-size", str(a.batch), "--epochs", str(a.epochs),
            "--lr", str(a.lr), "--wd", "0.1", "--warmup", "0", "--workers", str(a.workers),
            "--precision", a.precision, "--device", a.device, "--logs", str(logs), "--name", "openclip",
            "--log-every-n-steps", "1", "--save-frequency", "1", "--zeroshot-frequency", "0",
            "--val-frequency", "0", "--seed", "0", "--report-to", ""]
    t0 = time.perf_counter()
    oc_main.main(argv)
    wall = time.perf_counter() - t0
    log = (logs / "openclip" / "out.log").read_text()
    steps = [float(x) for x in BATCH_TIME.findall(log)]
    steady = steps[a.warmup_steps:] or steps
    step_s = statistics.median(steady)
    ckpts = sorted((logs / "openclip" / "checkpoints").glob("epoch_*.pt"))
    return {"steps_timed": len(steady), "step_ms": round(1000 * step_s, 2),
            "images_per_s": round(a.batch / step_s, 1), "wall_s": round(wall, 1),
            "checkpoint": str(ckpts[-1]) if ckpts else None, "placeholder_modules": placeholders}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("data", type=Path)
    p.add_argument("--model", default="otc-rn-micro")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--threads", type=int, default=None, help="torch threads of both trainers")
    p.add_argument("--workers", type=int, default=1, help="open_clip's dataloader workers")
    p.add_argument("--warmup-steps", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", default="fp32", help="open_clip's --precision (amp_bf16 on CUDA)")
    p.add_argument("--out", type=Path, default=None, help="keep the CSV, logs and runs here")
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    data = fmt.load_pair_dataset(a.data)
    with tempfile.TemporaryDirectory() as tmp:
        root = a.out or Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        table = write_csv(data, root / "csv")
        oc = run_open_clip(table, root / "logs", a)
        amp = "bf16" if a.precision == "amp_bf16" else "none"
        ours = bench_defense("none", a.data, root / "otcbench-run", model=a.model, batch_size=a.batch,
                             epochs=a.epochs, warmup_steps=a.warmup_steps, device=a.device, amp=amp,
                             threads=a.threads, train={"lr": a.lr})
        metrics = {}
        if oc["checkpoint"]:
            m = evaluate(oc["checkpoint"], a.data, EvalConfig(device=a.device, linear_probe=False),
                         model_name=a.model, out=root / "openclip-metrics.json")
            metrics = {k: m[k] for k in ("zeroshot_top1", "zeroshot_top5") if k in m}
        result = {
            "data": str(a.data), "rows": len(data), "model": a.model, "batch_size": a.batch, "epochs": a.epochs,
            "device": a.device, "threads": a.threads or torch.get_num_threads(), "open_clip_workers": a.workers,
            "machine": f"{platform.machine()} {platform.processor() or ''}".strip(), "torch": torch.__version__,
            "open_clip": oc, "otcbench": {k: ours[k] for k in ("step_ms", "images_per_s", "steps_timed", "epoch_s")},
            "ratio_otcbench_over_open_clip": round(ours["images_per_s"] / oc["images_per_s"], 3),
            "open_clip_checkpoint_eval": metrics,
        }
    if a.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"open_clip {oc['images_per_s']} images/s, otcbench {ours['images_per_s']} images/s: "
              f"ratio {result['ratio_otcbench_over_open_clip']} (otcbench / open_clip); open_clip checkpoint "
              f"zero-shot {metrics.get('zeroshot_top1')}")
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
