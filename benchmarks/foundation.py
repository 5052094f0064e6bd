"""Speed of the foundation: world rendering and training-step throughput of the bundled models.

Usage: python benchmarks/foundation.py [--threads 2] [--batch 128] [--device cpu|cuda] [--json]
Results go in docs/benchmarks.md with the machine they were measured on.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import torch

from otcbench.config import TrainConfig
from otcbench.data.synth import WorldOptions, generate_pairs
from otcbench.models import create_model, prepare_images
from otcbench.train.loop import is_convnet, make_optimizer
from otcbench.train.losses import clip_loss


def bench_world(n: int) -> dict[str, float]:
    out = {}
    for workers in (1, os.cpu_count() or 1):
        t0 = time.perf_counter()
        generate_pairs(n, 0, WorldOptions(), workers=workers)
        out[f"images_per_s_{workers}_workers"] = n / (time.perf_counter() - t0)
    return out


def bench_model(name: str, batch: int, device: str, steps: int, amp: bool) -> dict[str, float]:
    torch.manual_seed(0)
    model = create_model(name, device=device)
    if is_convnet(model):
        model = model.to(memory_format=torch.channels_last)
    opt = make_optimizer(model, TrainConfig())
    side = model.visual.image_size
    side = side[0] if isinstance(side, tuple) else side
    ctx_len = model.context_length if hasattr(model, "context_length") else 77
    images = torch.randint(0, 256, (batch, 3, side, side), dtype=torch.uint8, device=device)
    tokens = torch.randint(1, 49000, (batch, ctx_len), device=device)

    def step() -> None:
        with torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16, enabled=amp):
            img = model.encode_image(prepare_images(model, images), normalize=True)
            txt = model.encode_text(tokens, normalize=True)
            loss = clip_loss(img, txt, model.logit_scale.exp())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(3):
        step()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    med = sorted(times)[len(times) // 2]
    return {"step_ms": med * 1000, "images_per_s": batch / med}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--models", default="otc-rn-nano,otc-vit-tiny,otc-rn-tiny,otc-vit-small")
    ap.add_argument("--world", type=int, default=10000, help="images to render (0: skip)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    res: dict = {"machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
                 "threads": torch.get_num_threads(), "torch": torch.__version__, "device": args.device}
    if args.device.startswith("cuda"):
        res["gpu"] = torch.cuda.get_device_name()
    if args.world:
        res["world"] = bench_world(args.world)
    res["train_step"] = {
        m: bench_model(m, args.batch, args.device, args.steps, amp=args.device.startswith("cuda"))
        for m in args.models.split(",")
    }
    if args.json:
        print(json.dumps(res, indent=2))
        return
    print(f"{res['machine']} ({res['cpus']} cpus, {res['threads']} threads), torch {res['torch']}, {args.device}")
    for k, v in res.get("world", {}).items():
        print(f"world rendering: {v:8.0f} {k}")
    for m, r in res["train_step"].items():
        print(f"{m:14s} batch {args.batch}: {r['images_per_s']:7.0f} img/s  ({r['step_ms']:.0f} ms/step)")


if __name__ == "__main__":
    main()
