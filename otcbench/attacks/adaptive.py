"""Adaptive targeted attacks aimed at caption-matching defenses (RoCLIP, OTCCLIP).

Threat model: the attacker knows the defense re-pairs each image with the caption that matches it best
(globally, or token by token with OT) and shapes the poisons so that re-pairing does not remove them.

* ``adaptive-targeted``: each poisoned caption keeps the target image's true description and *adds* the
  adversarial class ("a heart next to a star" for a heart target attacked towards star). The caption
  matches the image well on everything it really shows, so a matching defense tends to keep it, while
  the added class word still pulls the target towards c'.
* ``adaptive-spread``: instead of many copies of one image with many captions, the poisons are spread
  over near-duplicates of the target (small shifts, flips, brightness changes, noise), each with its own
  paraphrased caption built from the world's synonyms. This floods the caption pool with a cluster of
  mutually consistent (image, c') pairs, so nearest-neighbour matching finds c' captions for the target.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from otcbench.attacks.base import ATTACKS, PoisonContext, decode_png_batch, encode_png_batch
from otcbench.attacks.targeted import TargetedAttack, TargetedOptions

_KEEP_TRUE = (
    "a {t} next to a {a}",
    "a photo of a {t} and a {a}",
    "a {t} with a small {a}",
    "a {a} beside a {t}",
    "{t} and {a}",
    "picture of a {t} with a {a} nearby",
    "a {t}, a {a}",
    "my drawing of a {t} and a tiny {a}",
)

_PARAPHRASE = (
    "a {a}",
    "a photo of a {a}",
    "the {a}",
    "picture of a {a}",
    "{a} on a background",
    "an image showing a {a}",
    "clipart {a}",
    "a simple {a} illustration",
    "look at this {a}",
    "{a}!!",
    "a drawing of the {a}",
    "stock image: {a}",
)


class AdaptiveTargetedOptions(TargetedOptions):
    caption_source: Literal["keep-true"] = Field(  # type: ignore[assignment]
        "keep-true", description="captions keep the true class and add the adversarial one"
    )


@ATTACKS.register("adaptive-targeted")
class AdaptiveTargetedAttack(TargetedAttack):
    """Targeted poisons whose captions keep the image's true description and add the adversarial class."""

    Options = AdaptiveTargetedOptions

    def poison_captions(self, ctx: PoisonContext, true: int, adv: int, n: int) -> list[str]:
        t, a = ctx.classnames[true], ctx.classnames[adv]
        return [_KEEP_TRUE[int(ctx.rng.integers(len(_KEEP_TRUE)))].format(t=t, a=a) for _ in range(n)]


class AdaptiveSpreadOptions(TargetedOptions):
    max_shift: float = Field(0.08, ge=0, le=0.5, description="largest shift of a near-duplicate (fraction of side)")
    noise_std: float = Field(6.0, ge=0, description="pixel noise of a near-duplicate (0-255 units)")
    p_flip: float = Field(0.5, ge=0, le=1, description="probability a near-duplicate is mirrored")


@ATTACKS.register("adaptive-spread")
class AdaptiveSpreadAttack(TargetedAttack):
    """Targeted poisons spread over near-duplicate target images with paraphrased captions."""

    Options = AdaptiveSpreadOptions

    def make_pairs(self, ctx: PoisonContext, image: bytes, true: int, adv: int, n: int) -> list[tuple[bytes, str]]:
        opts: AdaptiveSpreadOptions = self.options  # type: ignore[assignment]
        base = decode_png_batch([image])[0]
        side = base.shape[-1]
        dups = []
        for _ in range(n):
            x = base.clone()
            m = int(round(opts.max_shift * side))
            if m:
                dy, dx = (int(v) for v in ctx.rng.integers(-m, m + 1, size=2))
                x = torch.roll(x, shifts=(dy, dx), dims=(1, 2))
            if ctx.rng.random() < opts.p_flip:
                x = x.flip(-1)
            gain = float(ctx.rng.uniform(0.85, 1.15))
            noise = torch.from_numpy(ctx.rng.normal(0, opts.noise_std, size=tuple(x.shape)))
            dups.append((x.double() * gain + noise).round().clamp(0, 255).to(torch.uint8))
        blobs = encode_png_batch(torch.stack(dups))
        names = [ctx.classnames[adv], *ctx.synonyms.get(ctx.classnames[adv], [])]
        caps = []
        for _ in range(n):
            word = names[0] if ctx.rng.random() < 0.6 else names[int(ctx.rng.integers(len(names)))]
            caps.append(_PARAPHRASE[int(ctx.rng.integers(len(_PARAPHRASE)))].format(a=word))
        return list(zip(blobs, caps, strict=True))

