"""Training data in the form the loop consumes: uint8 image tensors and token ids, indexed by row.

Small datasets (the synthetic world, a few hundred MB of pixels at most) are decoded once into one
uint8 tensor; epochs then cost no decoding at all. Re-pairing defenses change which caption an image
is trained with through ``Trainer.caption_index``, so captions are kept as a separate token table.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from otcbench.data.format import PairDataset, images_to_tensor
from otcbench.errors import UserError

#: Above this many bytes of decoded pixels the in-memory path refuses (streaming is the scale path).
MAX_IN_MEMORY_BYTES = 8 * 1024**3


@dataclass
class TrainData:
    """Decoded images, tokenised captions and metadata of a pair dataset."""

    images: torch.Tensor  # uint8 [N,3,H,W]
    tokens: torch.Tensor  # int64 [N,L]
    labels: torch.Tensor  # int64 [N]
    poison: list[str]
    captions: list[str]

    def __len__(self) -> int:
        return self.images.shape[0]


def load_train_data(data: PairDataset, tokenizer, image_size: int | None = None) -> TrainData:
    """Decode a pair dataset for training (images resized to ``image_size`` when they differ)."""
    n = len(data)
    if n == 0:
        raise UserError(f"dataset {data.path} is empty; nothing to train on")
    side = image_size or 224
    if n * 3 * side * side > MAX_IN_MEMORY_BYTES:
        raise UserError(
            f"dataset {data.path} ({n} images at {side}px) is too large to decode into memory; "
            "use a smaller subset"
        )
    images = images_to_tensor(data.ds, size=image_size, root=data.path)
    captions = data.captions
    tokens = tokenizer(captions)
    labels = torch.tensor(data.ds["label"], dtype=torch.long)
    return TrainData(images, tokens, labels, data.poison_flags, captions)
