"""One training (micro-)batch as the trainer hands it to a defense's ``batch_loss``."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Batch:
    """One training (micro-)batch: model input on the device, and the raw images it was made from."""

    rows: torch.Tensor  # dataset rows of the images (cpu, int64)
    caption_rows: torch.Tensor  # rows whose captions are paired with them (after re-pairing)
    images: torch.Tensor  # model input
    tokens: torch.Tensor
    raw: torch.Tensor  # uint8 [B,3,H,W] on the CPU (pinned when streaming to CUDA): read via raw_images
