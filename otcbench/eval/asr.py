"""Attack success rates from a poisoned dataset's manifest (definitions: docs/attacks.md).

Each attack is evaluated by its kind (:mod:`otcbench.attacks.kinds`: ``targeted``, ``backdoor``, …), which also
names the headline metrics it fills (``asr_targeted``, ``asr_backdoor``, ``asr_backdoor_probe``, …).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import datasets
import torch

from otcbench.attacks.kinds import KINDS, TARGETS_DIR, EvalContext, attack_kind
from otcbench.data.format import PairDataset, fingerprint_dataset, load_pair_dataset
from otcbench.errors import UserError
from otcbench.eval.linear_probe import LinearProbe


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
    """ASR metrics for every attack of ``manifest``, each evaluated by its kind; then each kind's headline
    metrics from its first attack.

    ``features(images_uint8, transform=None)`` returns normalised image features (the model under test);
    ``test_features``, when given, are the already computed features of ``test_images``.
    """
    ctx = EvalContext(poisoned, manifest, classnames, features, classifier, test_images, test_labels, probe,
                      test_features)
    per_attack: dict[str, dict[str, Any]] = {}
    for i, a in enumerate(manifest["attacks"]):
        kind = attack_kind(a.get("kind"), f"{poisoned.path}: attack {a['name']!r}")
        per_attack[a["name"]] = kind.evaluate(a, i, ctx)
    out: dict[str, Any] = {"asr": per_attack}
    for kind_cls in KINDS.registered():
        first = next((per_attack[a["name"]] for a in manifest["attacks"] if a["kind"] == kind_cls.name), None)
        if first is not None:
            out.update({key: first[src] for key, src in kind_cls.headline.items() if src in first})
    return out
