"""The defense interface: small classes with hooks into the one trainer (otcbench.train.loop)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

import torch

from otcbench.config import Options
from otcbench.registry import Registry

if TYPE_CHECKING:
    from otcbench.train.loop import Batch, Trainer

DEFENSES: Registry[Defense] = Registry("defense")


class Defense:
    """Base class: plain behaviour everywhere; a defense overrides the hooks it needs.

    Hooks, in the order the trainer calls them:

    * :meth:`on_train_start` — once, after the model, optimiser and data exist (also after a resume).
    * :meth:`on_epoch_start` — data-side steps: re-pair captions (write ``trainer.caption_index``),
      refresh pools, score pairs.
    * :meth:`epoch_indices` — sample selection: the rows (in order) this epoch trains on.
    * :meth:`batch_loss` — the loss of one batch, plus scalars to log.
    * :meth:`state_dict` / :meth:`load_state_dict` — whatever must survive a checkpoint for ``--resume``.
    """

    name: ClassVar[str]
    Options: ClassVar[type[Options]] = Options

    def __init__(self, options: Options) -> None:
        self.options = options

    def on_train_start(self, trainer: Trainer) -> None:
        """Called once before the first step."""

    def on_epoch_start(self, trainer: Trainer, epoch: int) -> None:
        """Called at the start of every epoch (0-based), before :meth:`epoch_indices`."""

    def epoch_indices(self, trainer: Trainer, epoch: int, order: torch.Tensor) -> torch.Tensor:
        """Rows to train on this epoch, in the order given (default: all of ``order``)."""
        return order

    def batch_loss(self, trainer: Trainer, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        """Loss of one batch (default: the CLIP loss on the batch's image–caption pairs)."""
        return trainer.clip_batch_loss(batch), {}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
