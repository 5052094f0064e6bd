"""The attack-kind interface and registry: what an attack's *kind* decides beyond poisoning.

Every attack declares a kind (``Attack.kind``, a name registered here). The kind says how one entry of the
poison manifest is evaluated (:meth:`AttackKind.evaluate`, called by
:func:`otcbench.eval.asr.attack_success`), which headline metrics it fills in ``metrics.json`` (from the
first attack of the kind in the manifest), what the poison table says about an entry
(:meth:`AttackKind.describe`) and how the bench tables and plots name its metrics (:attr:`AttackKind.labels`).
A new kind is one module with a ``@KINDS.register`` class, imported in ``otcbench/attacks/kinds/__init__.py``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import datasets
import torch

from otcbench.data.format import PairDataset, images_to_tensor
from otcbench.errors import UserError
from otcbench.registry import Registry

if TYPE_CHECKING:
    from otcbench.eval.linear_probe import LinearProbe

#: Where a poisoned dataset keeps its held-out target images (``OUT/targets``).
TARGETS_DIR = "targets"

KINDS: Registry[AttackKind] = Registry("attack kind", listing="otcbench list attacks")


@dataclass
class EvalContext:
    """What a kind's evaluation may read: the poisoned dataset and its manifest, the eval set's classes and
    test split, and the model under test (``features(images_uint8, transform=None)`` → normalised image
    features; ``classifier``: the zero-shot class embeddings; ``probe``: the linear probe, when fitted)."""

    poisoned: PairDataset
    manifest: dict[str, Any]
    classnames: list[str]
    features: Callable[..., torch.Tensor]
    classifier: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    probe: LinearProbe | None = None
    test_features: torch.Tensor | None = None  # the already computed features of test_images, when given
    _targets: torch.Tensor | None = field(default=None, repr=False)

    def target_images(self) -> torch.Tensor:
        """The poisoned dataset's target images (uint8), read once for all attacks of one evaluation."""
        if self._targets is None:
            tds = datasets.load_from_disk(str(self.poisoned.path / TARGETS_DIR))
            self._targets = images_to_tensor(tds)
        return self._targets

    def class_index(self, name: str, where: str) -> int:
        """Index of a class name in the eval set; an unknown name is a one-line error."""
        if name not in self.classnames:
            raise UserError(f"{where}: class {name!r} is not in the eval set's classes ({', '.join(self.classnames)}); "
                            "evaluate on the eval set of the poisoned dataset's world")
        return self.classnames.index(name)


class AttackKind:
    """Base class: subclasses set :attr:`headline` and :attr:`labels` and implement :meth:`evaluate` and
    :meth:`describe`."""

    name: ClassVar[str]
    #: ``metrics.json`` key → the key of the kind's per-attack result it copies, from the first attack of the
    #: kind in the manifest (a key the result lacks is left out). Kinds fill theirs in registration order.
    headline: ClassVar[dict[str, str]] = {}
    #: The headline metrics tables and plots show, with their display names, in column order; the first is
    #: the one the bench overview gives per attack. All are attack success rates (lower is better).
    labels: ClassVar[dict[str, str]] = {}

    def evaluate(self, entry: dict[str, Any], index: int, ctx: EvalContext) -> dict[str, Any]:
        """The result of manifest entry ``entry`` (the ``index``-th attack): a dict with at least ``kind``
        (this kind's name), ``asr`` and ``n``."""
        raise NotImplementedError

    def describe(self, entry: dict[str, Any]) -> str:
        """One line about a manifest entry for the poison table (what it targets, how)."""
        raise NotImplementedError


def attack_kind(name: Any, where: str) -> AttackKind:
    """The registered kind ``name``, ready to use; an unknown (or missing) kind is a one-line error."""
    if not isinstance(name, str):
        raise UserError(f"{where} declares no kind; set `kind = ...` to one of {', '.join(KINDS.names())}")
    try:
        return KINDS.get(name)()
    except UserError as e:
        raise UserError(f"{where}: {e}") from None


def kind_labels() -> dict[str, str]:
    """Every kind's headline metrics and their display names, kind by kind in registration order."""
    return {key: label for kind in KINDS.registered() for key, label in kind.labels.items()}


def overview_metrics() -> list[str]:
    """Each kind's first labelled metric: the attack success the bench overview shows per attack."""
    return [next(iter(kind.labels)) for kind in KINDS.registered() if kind.labels]
