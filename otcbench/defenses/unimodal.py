"""Contrastive losses of the baselines beyond plain CLIP, on L2-normalised features.

* :func:`nn_contrastive_loss` — SafeCLIP's unimodal loss (NNCLR-style): the positive of view 2 is the
  nearest pool entry to view 1 (looked up before view 1 is added to the pool).
* :func:`cross_view_clip_loss` — the CLIP loss with two augmented views (SafeCLIP's ``cross_aug``): image
  view 1 against caption view 2 and caption view 1 against image view 2.
* :func:`matched_clip_loss` — RoCLIP's loss: each image against the caption embedding it was matched to.
* :func:`inmodal_loss` — CleanCLIP's in-modality term: each feature against its augmented view.

All take the (clamped) logit scale ``s = exp(t)`` and use diagonal targets.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from pydantic import Field

from otcbench.config import Options
from otcbench.data.augment import ImageAugOptions, augment_images
from otcbench.data.text_augment import Thesaurus, eda_batch
from otcbench.defenses.pool import EmbeddingPool
from otcbench.models import prepare_images

if TYPE_CHECKING:
    from otcbench.defenses.protocol import TrainerContext


def _ce_diag(logits: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float(), torch.arange(logits.shape[0], device=logits.device))


def nn_contrastive_loss(
    view1: torch.Tensor,
    view2: torch.Tensor,
    logit_scale: torch.Tensor,
    pool: EmbeddingPool | None = None,
    rows: torch.Tensor | None = None,
    update: bool = True,
) -> torch.Tensor:
    """NNCLR-style loss of one modality: ``CE(s · view2 · nn(view1)ᵀ)`` with diagonal targets.

    ``nn(view1)`` is the nearest pool entry to each view-1 feature, looked up before view 1 is pushed into
    the pool (``update``); the entries are detached, so only view 2 carries gradient (as in the official
    code). Without a pool the positive is view 1 itself (the official code's in-batch variant).
    """
    if pool is None:
        positives = view1
    else:
        positives = pool.nearest(view1).vectors.to(view2.device)
        if update:
            pool.push(view1, rows)
    return _ce_diag(logit_scale * view2.float() @ positives.float().t())


def cross_view_clip_loss(
    image1: torch.Tensor, text1: torch.Tensor, image2: torch.Tensor, text2: torch.Tensor, logit_scale: torch.Tensor
) -> torch.Tensor:
    """``½[CE(s · I₁ · T₂ᵀ) + CE(s · T₁ · I₂ᵀ)]`` — the two views' CLIP loss of SafeCLIP's cross_aug."""
    return 0.5 * (_ce_diag(logit_scale * image1.float() @ text2.float().t())
                  + _ce_diag(logit_scale * text1.float() @ image2.float().t()))


def matched_clip_loss(image: torch.Tensor, matched_text: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """RoCLIP's loss: symmetric CE over ``s · nn · Iᵀ`` where row i of ``matched_text`` is image i's match."""
    logits = logit_scale * matched_text.float() @ image.float().t()
    return 0.5 * (_ce_diag(logits) + _ce_diag(logits.t()))


def inmodal_loss(features: torch.Tensor, augmented: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """CleanCLIP's in-modality term for one modality: ``CE(s · X · X̃ᵀ)`` (one direction, as the official code)."""
    return _ce_diag(logit_scale * features.float() @ augmented.float().t())


# --------------------------------------------------------------------------------------------------
# augmented views shared by the baselines


class EDAOptions(Options):
    """EDA caption augmentation rates (the RoCLIP/SafeCLIP/CleanCLIP code: 0.1 each, one sentence)."""

    alpha_sr: float = Field(0.1, ge=0, le=1, description="synonym replacement rate")
    alpha_ri: float = Field(0.1, ge=0, le=1, description="random insertion rate")
    alpha_rs: float = Field(0.1, ge=0, le=1, description="random swap rate")
    p_rd: float = Field(0.1, ge=0, le=1, description="random deletion probability")
    wordnet: bool = Field(True, description="use WordNet synonyms (with the dataset's own) when installed")


def eda_tokens(trainer: TrainerContext, seed: int, options: EDAOptions) -> torch.Tensor:
    """Token ids ``[N, L]`` (CPU) of one EDA variant of every caption of the trainer's data.

    The dataset's own thesaurus (``otcbench.json`` ``synonyms``) is merged with WordNet.
    """
    meta = getattr(getattr(trainer, "data_info", None), "meta", None)
    thesaurus = Thesaurus(getattr(meta, "synonyms", None), use_wordnet=options.wordnet)
    captions = eda_batch(trainer.data.captions, seed, thesaurus, alpha_sr=options.alpha_sr,
                         alpha_ri=options.alpha_ri, alpha_rs=options.alpha_rs, p_rd=options.p_rd)
    return trainer.tokenizer(captions)


def augmented_batch_images(trainer: TrainerContext, rows: torch.Tensor, options: ImageAugOptions) -> torch.Tensor:
    """Model input of an augmented view of the images of ``rows`` (augmented on the device, global RNG).

    The pixels come from the trainer's ``raw_images``: a training batch's own images, not a second read.
    """
    raw = trainer.raw_images(rows).to(trainer.device, non_blocking=True)
    return prepare_images(trainer.model, augment_images(raw, None, options))
