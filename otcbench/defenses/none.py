"""``none``: plain CLIP — symmetric InfoNCE with a learnable temperature (clamped in the trainer)."""

from __future__ import annotations

from otcbench.config import Options
from otcbench.defenses.base import DEFENSES, Defense


class NoneOptions(Options):
    """Plain CLIP has no options of its own (see ``train.*`` for the loop)."""


@DEFENSES.register("none")
class NoDefense(Defense):
    """Undefended CLIP pre-training: the reference every defense is compared with."""

    Options = NoneOptions
