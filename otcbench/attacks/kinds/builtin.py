"""The two built-in attack kinds (docs/attacks.md), registered in this order (their headline metrics' order).

* ``targeted``: fraction of the manifest's target images whose zero-shot top-1 is their adversarial class
  (``asr_targeted``);
* ``backdoor``: the manifest's trigger applied (same code, seeded from the manifest) to every test image
  whose true class is not the target; the fraction classified as the target, by zero-shot
  (``asr_backdoor``) and by the linear probe (``asr_backdoor_probe``). Classes are looked up by name.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from otcbench.attacks.kinds.base import KINDS, AttackKind, EvalContext
from otcbench.attacks.trigger_kinds import apply_manifest_trigger, manifest_trigger

#: Seed stream of eval-time triggers (poisoning uses stream ``attack index``).
EVAL_STREAM = 1_000_003


@KINDS.register("targeted")
class TargetedKind(AttackKind):
    """Chosen target images should be classified as their adversarial class."""

    headline = {"asr_targeted": "asr", "asr_targeted_n": "n"}
    labels = {"asr_targeted": "ASR targeted"}

    def evaluate(self, entry: dict[str, Any], index: int, ctx: EvalContext) -> dict[str, Any]:
        """Zero-shot top-1 of the entry's target images against their adversarial (and true) classes."""
        name = entry["name"]
        targets = ctx.target_images()
        rows = entry["target_rows"]
        adv = torch.tensor([ctx.class_index(t["adversarial_class"], name) for t in entry["targets"]])
        true = torch.tensor([ctx.class_index(t["true_class"], name) for t in entry["targets"]])
        pred = (ctx.features(targets[rows]) @ ctx.classifier).argmax(1)
        return {
            "kind": "targeted",
            "asr": float((pred == adv).float().mean()),
            "n": len(rows),
            "target_still_correct": float((pred == true).float().mean()),
        }

    def describe(self, entry: dict[str, Any]) -> str:
        """How many targets, and the first one's true → adversarial class."""
        first = entry["targets"][0]
        return f"{len(entry['targets'])} targets, e.g. {first['true_class']} → {first['adversarial_class']}"


@KINDS.register("backdoor")
class BackdoorKind(AttackKind):
    """A trigger on any image should make it classified as the target class."""

    headline = {"asr_backdoor": "asr", "asr_backdoor_n": "n", "asr_backdoor_probe": "asr_probe"}
    labels = {"asr_backdoor": "ASR backdoor", "asr_backdoor_probe": "ASR backdoor (probe)"}

    def evaluate(self, entry: dict[str, Any], index: int, ctx: EvalContext) -> dict[str, Any]:
        """The entry's trigger on every non-target test image: how often zero-shot (and the probe) say target."""
        target = ctx.class_index(entry["target_class"], entry["name"])
        keep = ctx.test_labels != target
        imgs = ctx.test_images[keep]
        spec = manifest_trigger(entry["trigger"])  # any trigger kind, exactly as poisoning applied it
        rng = np.random.default_rng([int(ctx.manifest["seed"]), index, EVAL_STREAM])
        trig = ctx.features(imgs, transform=lambda x, spec=spec, rng=rng: apply_manifest_trigger(spec, x, rng))
        clean = ctx.test_features[keep] if ctx.test_features is not None else ctx.features(imgs)
        classifier = ctx.classifier
        res = {
            "kind": "backdoor",
            "target_class": entry["target_class"],
            "asr": float(((trig @ classifier).argmax(1) == target).float().mean()),
            "n": int(keep.sum()),
            "clean_rate": float(((clean @ classifier).argmax(1) == target).float().mean()),
        }
        if ctx.probe is not None:
            res["asr_probe"] = float((ctx.probe.predict(trig).cpu() == target).float().mean())
            res["clean_rate_probe"] = float((ctx.probe.predict(clean).cpu() == target).float().mean())
        return res

    def describe(self, entry: dict[str, Any]) -> str:
        """The target class and the trigger's kind."""
        return f"target {entry['target_class']}, trigger {entry['trigger']['kind']}"
