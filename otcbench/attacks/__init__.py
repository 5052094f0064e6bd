"""Attack registry. Adding an attack: one module with an ``@ATTACKS.register`` class, imported here."""

from otcbench.attacks import adaptive, adaptive_describe, backdoor, peer_backdoors, targeted  # noqa: F401  (registers)
from otcbench.attacks.base import ATTACKS, Attack

__all__ = ["ATTACKS", "Attack"]
