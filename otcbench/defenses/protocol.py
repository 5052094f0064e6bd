"""What a defense may use of the code that runs it: two small protocols, so that defenses never import the trainer.

* :class:`DataContext` — a model and the decoded dataset: all a data-side step (re-pairing, filtering) needs.
  The trainer satisfies it during training; ``otcbench defend`` builds a standalone one from a checkpoint.
* :class:`TrainerContext` — a :class:`DataContext` plus the training state and helpers the trainer hooks
  use. :class:`otcbench.train.loop.Trainer` satisfies it; a test may pass any object that does.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any, Protocol

import torch

if TYPE_CHECKING:
    from otcbench.config import TrainConfig, TrainJob
    from otcbench.data.format import PairDataset
    from otcbench.train.batch import Batch
    from otcbench.train.data import TrainData


class DataContext(Protocol):
    """What a data-side step needs: a model and the decoded dataset.

    The trainer satisfies it during training; ``otcbench defend`` builds a standalone one from a checkpoint.
    Data-side code must only use these attributes.
    """

    model: torch.nn.Module
    data: TrainData
    device: torch.device
    caption_index: torch.Tensor  # (N,) caption row currently paired with each image row

    def autocast(self) -> AbstractContextManager: ...

    @property
    def embed_batch_size(self) -> int: ...


class TrainerContext(DataContext, Protocol):
    """What the trainer hooks of a defense (``on_epoch_start``, ``batch_loss``, …) may use of the trainer."""

    job: TrainJob
    cfg: TrainConfig  # job.train
    data_info: PairDataset  # the dataset on disk (``DATA``), before :meth:`Defense.train_data`
    tokenizer: Any
    optimizer: torch.optim.Optimizer
    epoch: int  # completed epochs
    step_in_epoch: int
    global_step: int
    steps_per_epoch: int
    total_steps: int

    def log(self, record: dict[str, Any]) -> None:
        """Append a record to the run's ``log.jsonl``."""

    def encode(self, images: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised image and text features."""

    def logit_scale(self) -> torch.Tensor:
        """The (exponentiated) learnt temperature."""

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """This step's per-row tensors of every process, in global-batch order, with gradient."""

    def raw_images(self, rows: torch.Tensor) -> torch.Tensor:
        """Raw uint8 images ``[B,3,H,W]`` (CPU) of ``rows``."""

    def clip_batch_loss(self, batch: Batch) -> torch.Tensor:
        """The plain CLIP loss of a batch over the global batch."""
