"""Throughput of the streaming data path against the in-memory one, on a small path-based dataset.

Writes ``--n`` random JPEG images of ``--image-px`` px as a path-based pair dataset (``--copy-images``), then
for ``train.data_mode=memory`` and ``stream`` with each ``--workers`` count measures

* ``load_s`` — building the training data (memory: decoding every image up front; stream: nothing);
* ``read_images_per_s`` — one pass over the data in training batches (``TrainData.image_batches``);
* ``train_images_per_s`` — an epoch of the real trainer (``--model``, ``--batch``), from ``log.jsonl``.

Usage: python benchmarks/stream.py [--n 1024] [--image-px 256] [--model otc-rn-nano] [--batch 64]
       [--workers 0 2] [--threads 1] [--device cpu|cuda] [--json]
Results go in docs/benchmarks.md with the machine they were measured on.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from otcbench.config import TrainConfig, TrainJob
from otcbench.data.format import load_pair_dataset
from otcbench.data.importers import import_dataset
from otcbench.models import create_model, get_tokenizer, image_size
from otcbench.train.data import LoaderOptions, load_for_model
from otcbench.train.loop import Trainer, resolve_device


def write_dataset(root: Path, n: int, px: int) -> Path:
    """``n`` random-noise-plus-gradient JPEGs (realistic decode cost) imported as a path-based pair dataset."""
    rng = np.random.default_rng(0)
    src = root / "src"
    (src / "images").mkdir(parents=True)
    ramp = np.linspace(0, 255, px, dtype=np.float32)
    lines = ["image,caption"]
    for i in range(n):
        noise = rng.normal(0, 30, (px, px, 3)).astype(np.float32)
        img = np.clip(ramp[None, :, None] * (i % 3 + 1) / 3 + noise, 0, 255).astype(np.uint8)
        Image.fromarray(img).save(src / "images" / f"{i:05d}.jpg", quality=90)
        lines.append(f"images/{i:05d}.jpg,a photo number {i}")
    (src / "t.csv").write_text("\n".join(lines) + "\n")
    out = root / "data"
    import_dataset(src / "t.csv", out, "csv", {"storage": "copy", "verify": "none"})
    return out


def bench_mode(data: Path, mode: str, workers: int, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    device = resolve_device(args.device)
    model = create_model(args.model, device="cpu")
    side = image_size(model)[0]
    pd = load_pair_dataset(data)
    t0 = time.perf_counter()
    td = load_for_model(pd, get_tokenizer(args.model), side, mode,  # type: ignore[arg-type]
                        LoaderOptions(num_workers=workers, pin_memory=device.type == "cuda"))
    load_s = time.perf_counter() - t0
    batches = list(torch.randperm(len(td)).split(args.batch))
    t0 = time.perf_counter()
    seen = sum(len(raw) for raw in td.image_batches(batches))
    read_ips = seen / (time.perf_counter() - t0)
    td.close()
    run = work / f"run-{mode}-{workers}"
    job = TrainJob.model_validate({"data": str(data), "model": {"name": args.model}, "train": TrainConfig(
        epochs=1, batch_size=args.batch, threads=args.threads, device=args.device, data_mode=mode,
        num_workers=workers, log_every=10**9, save_every_epochs=10**6).model_dump(mode="json")})
    Trainer(job, run, show_progress=False).fit()
    epoch = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()][-1]
    return {"mode": mode, "workers": workers, "side": side, "load_s": round(load_s, 3),
            "read_images_per_s": round(read_ips, 1), "train_images_per_s": epoch["images_per_s"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1024)
    ap.add_argument("--image-px", type=int, default=256)
    ap.add_argument("--model", default="otc-rn-nano")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    import datasets

    datasets.disable_progress_bars()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        data = write_dataset(work, args.n, args.image_px)
        rows = [bench_mode(data, "memory", 0, args, work)]
        rows += [bench_mode(data, "stream", w, args, work) for w in args.workers]
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    print(f"{args.n} JPEGs of {args.image_px}px, model {args.model}, batch {args.batch}, {args.device}")
    print(f"{'mode':8} {'workers':>7} {'load s':>8} {'read img/s':>11} {'train img/s':>12}")
    for r in rows:
        print(f"{r['mode']:8} {r['workers']:>7} {r['load_s']:>8} {r['read_images_per_s']:>11} "
              f"{r['train_images_per_s']:>12}")


if __name__ == "__main__":
    main()
