"""Backdoor attacks: triggered copies of training images paired with captions naming the target class.

One registered attack per trigger (``badnet``, ``yellow``, ``blended``, ``sig``, ``wanet``) with the
trigger's options under ``trigger.*``, and ``label-consistent``: trigger only training images whose
caption already names the target, keeping their captions (no mislabelled pair for a filter to spot).
Success (``eval --asr``): triggered test images whose true class is not the target, classified as the
target.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
from pydantic import Field, model_validator

from otcbench.attacks.base import (
    ATTACKS,
    NAME_CAPTIONS,
    Attack,
    PoisonContext,
    PoisonRows,
    decode_png_batch,
    encode_png_batch,
)
from otcbench.attacks.triggers import TriggerSpec, apply_trigger
from otcbench.config import Options
from otcbench.errors import UserError

#: Calibrated for the 32 px synthetic world (docs/attacks.md); the published setting is 16/224.
DEFAULT_PATCH = 0.375


class BackdoorOptions(Options):
    target: str | None = Field(None, description="target class name (default: the first class)")
    rate: float | None = Field(
        0.01, gt=0, le=1, description="poisoned pairs as a fraction of the clean dataset (ignored if count is set)"
    )
    count: int | None = Field(None, ge=1, description="number of poisoned pairs (overrides rate)")
    caption_source: Literal["templates", "training", "names"] = Field(
        "training",
        description="training captions naming the target (default: the only source that backdoored every "
        "training seed without costing zero-shot accuracy, docs/attacks.md), eval prompt templates with the "
        "target name (CleanCLIP), or short captions that only name it",
    )
    exclude_target_images: bool = Field(True, description="trigger only images whose label is not the target")
    trigger: TriggerSpec

    def n_poisons(self, n_clean: int) -> int:
        if self.count is not None:
            return self.count
        return max(1, int(round((self.rate or 0) * n_clean)))


def _options_for(kind: str, **trigger_defaults: Any) -> type[BackdoorOptions]:
    """An options model whose ``trigger`` defaults to ``kind`` (``--set trigger.size=…`` still works)."""

    class _Opts(BackdoorOptions):
        trigger: TriggerSpec = Field(
            default_factory=lambda: TriggerSpec(kind=kind, **trigger_defaults),  # type: ignore[arg-type]
            description=f"the {kind} trigger (see TriggerSpec)",
        )

        @model_validator(mode="before")
        @classmethod
        def _fill_kind(cls, data: Any) -> Any:
            # --set trigger.size=0.2 alone must still give a badnet trigger, not a missing-kind error.
            if isinstance(data, dict) and isinstance(data.get("trigger"), dict):
                data = {**data, "trigger": {"kind": kind, **trigger_defaults, **data["trigger"]}}
            return data

    _Opts.__name__ = f"{kind.capitalize()}Options"
    return _Opts


class BackdoorAttack(Attack):
    """Triggered copies of non-target training images, captioned with the target class."""

    kind = "backdoor"

    def target_index(self, ctx: PoisonContext) -> int:
        opts: BackdoorOptions = self.options  # type: ignore[assignment]
        if opts.target is None:
            return 0
        return ctx.class_index(opts.target, "target")

    def candidates(self, ctx: PoisonContext, target: int) -> np.ndarray:
        opts: BackdoorOptions = self.options  # type: ignore[assignment]
        rows = np.arange(len(ctx.captions))
        if opts.exclude_target_images and (ctx.labels >= 0).any():
            rows = rows[ctx.labels != target]
        return rows

    def check(self, ctx: PoisonContext) -> None:
        opts: BackdoorOptions = self.options  # type: ignore[assignment]
        target = self.target_index(ctx)
        n = opts.n_poisons(len(ctx.captions))
        avail = len(self.candidates(ctx, target))
        if n > avail:
            raise UserError(f"{self.name}: {n} poisons requested but only {avail} eligible training images; "
                            "lower rate/count")

    def captions(self, ctx: PoisonContext, target: int, n: int) -> list[str]:
        opts: BackdoorOptions = self.options  # type: ignore[assignment]
        name = ctx.classnames[target]
        pool = ctx.captions_naming(name) if opts.caption_source == "training" else []
        out = []
        for _ in range(n):
            if opts.caption_source == "names":
                out.append(NAME_CAPTIONS[int(ctx.rng.integers(len(NAME_CAPTIONS)))].format(name))
            elif pool:
                out.append(ctx.captions[int(pool[int(ctx.rng.integers(len(pool)))])])
            else:
                out.append(ctx.templates[int(ctx.rng.integers(len(ctx.templates)))].format(name))
        return out

    def triggered_rows(self, ctx: PoisonContext) -> tuple[int, list[int], list[bytes], dict[str, Any]]:
        """Draw the source rows, trigger their images: (target, rows, encoded images, manifest entry)."""
        opts: BackdoorOptions = self.options  # type: ignore[assignment]
        target = self.target_index(ctx)
        n = opts.n_poisons(len(ctx.captions))
        rows = [int(i) for i in np.sort(ctx.rng.choice(self.candidates(ctx, target), size=n, replace=False))]
        triggered = apply_trigger(opts.trigger, decode_png_batch([ctx.image_bytes[i] for i in rows]), ctx.rng)
        manifest = {"target_class": ctx.classnames[target], "trigger": opts.trigger.model_dump(mode="json"),
                    "source_rows": rows}
        return target, rows, encode_png_batch(triggered), manifest

    def poison(self, ctx: PoisonContext) -> PoisonRows:
        target, rows, images, manifest = self.triggered_rows(ctx)
        return PoisonRows(
            images=images,
            captions=self.captions(ctx, target, len(rows)),
            labels=[int(ctx.labels[i]) for i in rows],
            origin=rows,
            manifest=manifest,
        )


def _register(kind: str) -> None:
    cls = type(
        f"{kind.capitalize()}Backdoor",
        (BackdoorAttack,),
        {
            "Options": _options_for(kind, **({"size": DEFAULT_PATCH} if kind in ("badnet", "yellow") else {})),
            "__doc__": f"Backdoor with the {kind} trigger: triggered non-target images captioned with the target.",
        },
    )
    ATTACKS.register(kind)(cls)


for _kind in ("badnet", "yellow", "blended", "sig", "wanet"):
    _register(_kind)


@ATTACKS.register("label-consistent")
class LabelConsistentBackdoor(BackdoorAttack):
    """Clean-label backdoor: trigger only images whose caption already names the target; keep captions."""

    Options = _options_for("badnet", size=DEFAULT_PATCH)

    def candidates(self, ctx: PoisonContext, target: int) -> np.ndarray:
        return np.asarray(ctx.captions_naming(ctx.classnames[target]), dtype=np.int64)

    def poison(self, ctx: PoisonContext) -> PoisonRows:
        _, rows, images, manifest = self.triggered_rows(ctx)
        replace = {i: (blob, ctx.captions[i]) for i, blob in zip(rows, images, strict=True)}
        return PoisonRows(replace=replace, manifest=manifest)
