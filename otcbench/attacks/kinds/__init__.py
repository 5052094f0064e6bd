"""Attack-kind registry. Adding a kind: one module with an ``@KINDS.register`` class, imported here."""

from otcbench.attacks.kinds import builtin  # noqa: F401  (registers targeted, then backdoor)
from otcbench.attacks.kinds.base import (
    KINDS,
    TARGETS_DIR,
    AttackKind,
    EvalContext,
    attack_kind,
    kind_labels,
    overview_metrics,
)

__all__ = ["KINDS", "TARGETS_DIR", "AttackKind", "EvalContext", "attack_kind", "kind_labels", "overview_metrics"]
