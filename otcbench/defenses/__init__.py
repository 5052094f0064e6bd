"""Defense registry. Adding a defense: one module with a ``@DEFENSES.register`` class, imported here."""

from otcbench.defenses import cleanclip, none, otcclip, reference, roclip, safeclip  # noqa: F401  (registers)
from otcbench.defenses.base import DEFENSES, Defense, build_defense

__all__ = ["DEFENSES", "Defense", "build_defense"]
