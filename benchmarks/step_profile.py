"""Where one training step's CPU time goes, and what the speed levers buy, for a model at the quickstart's batch.

    python benchmarks/step_profile.py [--model otc-rn-micro] [--batch 128] [--rounds 4] [--steps 5] [--compile]

One torch thread. A step is forward + backward of the CLIP loss (plus the fused AdamW step in the totals), on
random pixels and captions of the world's length (10-11 tokens, padded to the context). It prints, in CPU
milliseconds per step (``time.process_time``, so a loaded machine inflates the absolute numbers less than wall
time; still compare only within one run of this script):

* the split: image tower forward, forward + backward; text tower the same; the AdamW step;
* the variants, each timed in alternating rounds in the same process so that drifting load hits them alike:
  ``eager`` (what the trainer runs: channels-last convolutions, fp32), ``bf16`` (CPU autocast), and with
  ``--compile`` ``compiled`` (``torch.compile`` of the image tower and the text transformer, as modules) and
  ``bf16+compiled``. The first compile of a process is timed separately (the inductor cache under
  ``TORCHINDUCTOR_CACHE_DIR`` makes later processes cheaper).

The results and the machine they came from are in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import copy
import platform
import statistics
import time
from collections.abc import Callable

import torch

from otcbench.config import TrainConfig
from otcbench.models import create_model, prepare_images
from otcbench.provenance import cpu_info
from otcbench.train.loop import is_convnet, make_optimizer
from otcbench.train.losses import clip_loss


def _cpu_ms(fn: Callable[[], object], steps: int) -> float:
    t = time.process_time()
    for _ in range(steps):
        fn()
    return (time.process_time() - t) / steps * 1000


def _inputs(model: torch.nn.Module, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (batch, 3, 32, 32), dtype=torch.uint8, generator=g)
    ctx = model.context_length
    tokens = torch.zeros(batch, ctx, dtype=torch.long)
    lengths = torch.randint(8, 14, (batch,), generator=g)
    for i, n in enumerate(lengths.tolist()):  # start token, words, end token (the highest id: argmax pooling)
        tokens[i, 0] = 49406
        tokens[i, 1 : n - 1] = torch.randint(200, 2000, (n - 2,), generator=g)
        tokens[i, n - 1] = 49407
    return prepare_images(model, images), tokens


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="otc-rn-micro")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--compile", action="store_true", help="also time torch.compile'd towers")
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = create_model(args.model)
    if is_convnet(model):
        model = model.to(memory_format=torch.channels_last)
    model.train()
    x, tok = _inputs(model, args.batch)
    opt = make_optimizer(model, TrainConfig())

    def split() -> dict[str, float]:
        def img_fb() -> None:
            model.zero_grad(set_to_none=True)
            model.encode_image(x).sum().backward()

        def txt_fb() -> None:
            model.zero_grad(set_to_none=True)
            model.encode_text(tok).sum().backward()

        out = {}
        for name, fn in (("image forward", lambda: model.encode_image(x)), ("image forward+backward", img_fb),
                         ("text forward", lambda: model.encode_text(tok)), ("text forward+backward", txt_fb),
                         ("AdamW step", opt.step)):
            fn()
            out[name] = _cpu_ms(fn, args.steps)
        return out

    def step_of(m: torch.nn.Module, amp: bool) -> Callable[[], None]:
        o = make_optimizer(m, TrainConfig())

        def step() -> None:
            o.zero_grad(set_to_none=True)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
                loss = clip_loss(m.encode_image(x, normalize=True).float(), m.encode_text(tok, normalize=True).float(),
                                 m.logit_scale.exp())
            loss.backward()
            o.step()
        return step

    variants = {"eager": step_of(model, False), "bf16": step_of(model, True)}
    compile_s = None
    if args.compile:
        mc = copy.deepcopy(model)
        mc.visual.compile()
        mc.transformer.compile()
        t0 = time.perf_counter()
        variants["compiled"] = step_of(mc, False)
        variants["compiled"]()
        compile_s = time.perf_counter() - t0
        variants["bf16+compiled"] = step_of(mc, True)
    for fn in variants.values():
        fn()  # warm-up (and the bf16 graph's compile)
    times: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(args.rounds):
        for k, fn in variants.items():
            times[k].append(_cpu_ms(fn, args.steps))

    info = cpu_info()
    print(f"{info.get('cpu')} ({info.get('isa')}), torch {torch.__version__}, Python {platform.python_version()}, "
          f"1 thread, {args.model}, batch {args.batch}")
    for k, v in split().items():
        print(f"  {k:24s} {v:7.1f} ms")
    base = statistics.median(times["eager"])
    for k, v in times.items():
        med = statistics.median(v)
        print(f"  step {k:19s} {med:7.1f} ms  ({med / base:.2f}x eager; rounds {', '.join(f'{t:.0f}' for t in v)})")
    if compile_s is not None:
        print(f"  first compiled step of this process: {compile_s:.1f} s wall")


if __name__ == "__main__":
    main()
