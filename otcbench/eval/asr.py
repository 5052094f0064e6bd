"""Attack success rates from a poisoned dataset's manifest (DESIGN §6, §8).

* targeted: fraction of the manifest's target images whose zero-shot top-1 is their adversarial class;
* backdoor: the manifest's trigger applied (same code, seeded from the manifest) to every test image
  whose true class is not the target; the fraction classified as the target, by zero-shot
  (``asr_backdoor``) and by the linear probe (``asr_backdoor_probe``). Classes are looked up by name.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch

from otcbench.attacks.poison import TARGETS_DIR
from otcbench.attacks.trigger_kinds import apply_manifest_trigger, manifest_trigger
from otcbench.data.format import PairDataset, fingerprint_dataset, images_to_tensor, load_pair_dataset
from otcbench.errors import UserError
from otcbench.eval.linear_probe import LinearProbe

#: Seed stream of eval-time triggers (poisoning uses stream ``attack index``).
EVAL_STREAM = 1_000_003


def load_poisoned(path: str | Path) -> tuple[PairDataset, dict[str, Any]]:
    """Load a poisoned dataset and check its manifest against the data (fingerprints, poison flags)."""
    pd = load_pair_dataset(path)  # verifies the dataset fingerprint
    man = pd.meta.poison
    if not man or not man.get("attacks"):
        raise UserError(f"{pd.path} has no poison manifest; pass a dataset written by `otcbench poison`")
    flags = pd.poison_flags
    for a in man["attacks"]:
        rows = a.get("rows", [])
        if any(r >= len(flags) or flags[r] != a["name"] for r in rows):
            raise UserError(f"{pd.path}: the manifest's rows of {a['name']!r} do not match the dataset's poison "
                            "column; the dataset was modified — recreate it with `otcbench poison`")
    if man.get("targets_fingerprint"):
        tdir = pd.path / TARGETS_DIR
        if not tdir.is_dir():
            raise UserError(f"{pd.path}: target images ({TARGETS_DIR}/) are missing; recreate the dataset")
        if fingerprint_dataset(datasets.load_from_disk(str(tdir))) != man["targets_fingerprint"]:
            raise UserError(f"{pd.path}/{TARGETS_DIR} does not match the manifest's fingerprint; recreate it")
    return pd, man


def _class(classnames: list[str], name: str, where: str) -> int:
    if name not in classnames:
        raise UserError(f"{where}: class {name!r} is not in the eval set's classes ({', '.join(classnames)}); "
                        "evaluate on the eval set of the poisoned dataset's world")
    return classnames.index(name)


def attack_success(
    poisoned: PairDataset,
    manifest: dict[str, Any],
    classnames: list[str],
    features: Any,
    classifier: torch.Tensor,
    test_images: torch.Tensor,
    test_labels: torch.Tensor,
    probe: LinearProbe | None,
    test_features: torch.Tensor | None = None,
) -> dict[str, Any]:
    """ASR metrics for every attack of ``manifest``.

    ``features(images_uint8, transform=None)`` returns normalised image features (the model under test);
    ``test_features``, when given, are the already computed features of ``test_images``.
    """
    per_attack: dict[str, dict[str, Any]] = {}
    targets = None
    for i, a in enumerate(manifest["attacks"]):
        name = a["name"]
        if a["kind"] == "targeted":
            if targets is None:
                tds = datasets.load_from_disk(str(poisoned.path / TARGETS_DIR))
                targets = images_to_tensor(tds)
            rows = a["target_rows"]
            adv = torch.tensor([_class(classnames, t["adversarial_class"], name) for t in a["targets"]])
            true = torch.tensor([_class(classnames, t["true_class"], name) for t in a["targets"]])
            pred = (features(targets[rows]) @ classifier).argmax(1)
            per_attack[name] = {
                "kind": "targeted",
                "asr": float((pred == adv).float().mean()),
                "n": len(rows),
                "target_still_correct": float((pred == true).float().mean()),
            }
        else:
            target = _class(classnames, a["target_class"], name)
            keep = test_labels != target
            imgs = test_images[keep]
            spec = manifest_trigger(a["trigger"])  # any trigger kind, exactly as poisoning applied it
            rng = np.random.default_rng([int(manifest["seed"]), i, EVAL_STREAM])
            trig = features(imgs, transform=lambda x, spec=spec, rng=rng: apply_manifest_trigger(spec, x, rng))
            clean = test_features[keep] if test_features is not None else features(imgs)
            res = {
                "kind": "backdoor",
                "target_class": a["target_class"],
                "asr": float(((trig @ classifier).argmax(1) == target).float().mean()),
                "n": int(keep.sum()),
                "clean_rate": float(((clean @ classifier).argmax(1) == target).float().mean()),
            }
            if probe is not None:
                res["asr_probe"] = float((probe.predict(trig).cpu() == target).float().mean())
                res["clean_rate_probe"] = float((probe.predict(clean).cpu() == target).float().mean())
            per_attack[name] = res
    out: dict[str, Any] = {"asr": per_attack}
    first_t = next((v for v in per_attack.values() if v["kind"] == "targeted"), None)
    first_b = next((v for v in per_attack.values() if v["kind"] == "backdoor"), None)
    if first_t is not None:
        out["asr_targeted"] = first_t["asr"]
        out["asr_targeted_n"] = first_t["n"]
    if first_b is not None:
        out["asr_backdoor"] = first_b["asr"]
        out["asr_backdoor_n"] = first_b["n"]
        if "asr_probe" in first_b:
            out["asr_backdoor_probe"] = first_b["asr_probe"]
    return out
