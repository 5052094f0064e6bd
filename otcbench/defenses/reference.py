"""``none+aug``: an otcbench reference, not a published method — plain CLIP on RoCLIP's augmented inputs.

RoCLIP trains every epoch on augmented images and one EDA caption per pair (computed once), and only its
matching epochs differ from plain CLIP. Comparing RoCLIP with ``none`` therefore mixes two causes: the
augmentation (which at 32 px costs points on its own, docs/baselines.md) and the matching. ``none+aug``
is RoCLIP with the matching removed: the same ``augmented_batch_images`` and ``eda_tokens`` calls in the same
order, so with the same seed and options its steps are RoCLIP's plain epochs bit for bit.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from pydantic import Field

from otcbench.config import Options
from otcbench.data.augment import ImageAugOptions
from otcbench.defenses.base import DEFENSES, Defense
from otcbench.defenses.unimodal import EDAOptions, augmented_batch_images, eda_tokens
from otcbench.train.losses import clip_loss


class AugmentedReferenceOptions(Options):
    """The augmentation options of RoCLIP (same names and defaults), without its pool."""

    image_aug: ImageAugOptions = Field(default_factory=ImageAugOptions, description="as roclip's image_aug")
    eda: EDAOptions = Field(default_factory=EDAOptions, description="as roclip's eda")
    eda_once: bool = Field(True, description="one EDA variant per caption for the whole run (as roclip)")


@DEFENSES.register("none+aug")
class AugmentedReference(Defense):
    """otcbench reference (not a published method): plain CLIP with RoCLIP's image augmentation and EDA captions."""

    Options = AugmentedReferenceOptions
    relative_cost = 1.05  # one augmented view per image, EDA once
    variant_phrases: ClassVar[dict[str, Any]] = {"eda_once": lambda v: None if v else "fresh EDA per epoch"}
    options: AugmentedReferenceOptions

    def __init__(self, options: AugmentedReferenceOptions) -> None:
        super().__init__(options)
        self.text_tokens: torch.Tensor | None = None
        self._seed = 0

    def on_train_start(self, trainer: Any) -> None:
        self._seed = trainer.cfg.seed
        if self.options.eda_once:  # the seed roclip uses, so the captions are roclip's
            self.text_tokens = eda_tokens(trainer, self._seed, self.options.eda)

    def on_epoch_start(self, trainer: Any, epoch: int) -> None:
        if not self.options.eda_once:
            self.text_tokens = eda_tokens(trainer, self._seed * 1_000 + epoch + 1, self.options.eda)

    def batch_loss(self, trainer: Any, batch: Any) -> tuple[torch.Tensor, dict[str, float]]:
        images = augmented_batch_images(trainer, batch.rows, self.options.image_aug)
        assert self.text_tokens is not None
        tokens = self.text_tokens[batch.caption_rows].to(trainer.device, non_blocking=True)
        img, txt = trainer.encode(images, tokens)
        return clip_loss(trainer.gather(img), trainer.gather(txt), trainer.logit_scale()), {}
