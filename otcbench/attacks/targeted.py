"""Targeted poisoning (Carlini & Terzis 2022; the RoCLIP/SafeCLIP protocol).

For each of ``n_targets`` held-out target images of true class c, pick an adversarial class c' ≠ c and
add ``poisons_per_target`` pairs (target image, caption naming c'). Captions are training captions that
contain the word c' (word boundary), topped up with prompt templates when too few exist. Success: the
target image's zero-shot top-1 is c'.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import Field

from otcbench.attacks.base import ATTACKS, NAME_CAPTIONS, Attack, PoisonContext, PoisonRows
from otcbench.config import Options
from otcbench.data.format import image_bytes
from otcbench.errors import UserError


class TargetedOptions(Options):
    n_targets: int = Field(16, ge=1, description="target images drawn from the held-out split")
    poisons_per_target: int = Field(25, ge=1, description="poisoned pairs per target")
    adversarial_class: str | None = Field(
        None, description="one adversarial class for every target (default: a random other class per target)"
    )
    target_split: str = Field("targets", description="split of the source's eval set holding the targets")
    caption_source: Literal["training", "templates", "names"] = Field(
        "training",
        description="training captions naming the adversarial class (the published protocol), prompt "
        "templates, or short captions that only name it",
    )


@ATTACKS.register("targeted")
class TargetedAttack(Attack):
    """Targeted poisoning: held-out target images paired with captions naming an adversarial class."""

    kind = "targeted"
    Options = TargetedOptions

    def target_pool(self, ctx: PoisonContext) -> tuple[list[bytes], np.ndarray]:
        opts: TargetedOptions = self.options  # type: ignore[assignment]
        if ctx.eval_set is None:
            raise UserError(f"{self.name}: {ctx.source.path} has no eval set to draw target images from; "
                            "poison a dataset written by `otcbench data synth` or with an eval set")
        splits = ctx.eval_set.splits
        if opts.target_split not in splits:
            raise UserError(f"{self.name}: the eval set has no split {opts.target_split!r} "
                            f"(has: {', '.join(splits)}); use --set target_split=NAME")
        ds = splits[opts.target_split]
        return image_bytes(ds, ctx.eval_set.path), np.asarray(ds["label"], dtype=np.int64)

    def check(self, ctx: PoisonContext) -> None:
        opts: TargetedOptions = self.options  # type: ignore[assignment]
        _, labels = self.target_pool(ctx)
        if opts.adversarial_class is not None:
            adv = ctx.class_index(opts.adversarial_class, "adversarial_class")
            labels = labels[labels != adv]
        if opts.n_targets > len(labels):
            raise UserError(f"{self.name}: n_targets={opts.n_targets} but the held-out split "
                            f"{opts.target_split!r} has only {len(labels)} eligible images; lower n_targets")

    def choose_targets(self, ctx: PoisonContext) -> list[tuple[bytes, int, int, int]]:
        """(image, true class, adversarial class, index in the split) for each target."""
        opts: TargetedOptions = self.options  # type: ignore[assignment]
        blobs, labels = self.target_pool(ctx)
        fixed = None if opts.adversarial_class is None else ctx.class_index(opts.adversarial_class, "")
        eligible = np.arange(len(labels)) if fixed is None else np.flatnonzero(labels != fixed)
        chosen = ctx.rng.choice(eligible, size=opts.n_targets, replace=False)
        out = []
        for j in chosen:
            true = int(labels[j])
            if fixed is not None:
                adv = fixed
            else:
                adv = int(ctx.rng.choice([c for c in range(len(ctx.classnames)) if c != true]))
            out.append((blobs[j], true, adv, int(j)))
        return out

    def poison_captions(self, ctx: PoisonContext, true: int, adv: int, n: int) -> list[str]:
        """Captions naming the adversarial class: training captions first, templates to fill up."""
        opts: TargetedOptions = self.options  # type: ignore[assignment]
        name = ctx.classnames[adv]
        caps: list[str] = []
        if opts.caption_source == "names":
            return [NAME_CAPTIONS[int(ctx.rng.integers(len(NAME_CAPTIONS)))].format(name) for _ in range(n)]
        if opts.caption_source == "training":
            rows = ctx.captions_naming(name)
            if rows:
                take = ctx.rng.choice(rows, size=min(n, len(rows)), replace=False)
                caps = [ctx.captions[int(i)] for i in take]
        while len(caps) < n:
            caps.append(ctx.templates[int(ctx.rng.integers(len(ctx.templates)))].format(name))
        return caps

    def poison(self, ctx: PoisonContext) -> PoisonRows:
        opts: TargetedOptions = self.options  # type: ignore[assignment]
        rows = PoisonRows()
        targets = []
        for blob, true, adv, j in self.choose_targets(ctx):
            for img, cap in self.make_pairs(ctx, blob, true, adv, opts.poisons_per_target):
                rows.images.append(img)
                rows.captions.append(cap)
                rows.labels.append(true)
                rows.origin.append(-1)
            rows.targets.append((blob, true, adv))
            targets.append({"split_index": j, "true_class": ctx.classnames[true],
                            "adversarial_class": ctx.classnames[adv]})
        rows.manifest = {"targets": targets, "target_split": opts.target_split}
        return rows

    def make_pairs(
        self, ctx: PoisonContext, image: bytes, true: int, adv: int, n: int
    ) -> list[tuple[bytes, str]]:
        """The poisoned pairs of one target (overridden by adaptive variants)."""
        return [(image, c) for c in self.poison_captions(ctx, true, adv, n)]

