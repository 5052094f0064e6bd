"""OTCCLIP's OT alignment losses: inter-modality (image tokens with their caption's tokens) and intra-modality
(two views of an image; a caption and its EDA variant)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from otcbench.defenses.otcclip.options import OTCCLIPOptions
from otcbench.errors import UserError
from otcbench.models import encode_image_tokens, encode_text_tokens
from otcbench.models.mode import min_train_rows

if TYPE_CHECKING:
    from otcbench.defenses.protocol import TrainerContext
    from otcbench.train.batch import Batch

__all__ = ["AlignmentLosses", "augmenters", "intra_rows"]


class AlignmentLosses:
    """Mixin of the OTCCLIP defense: the alignment losses under ``self.options`` (needs ``ot_distance``,
    ``ot_distance_matrix`` and ``_text_mask`` from :class:`~otcbench.defenses.otcclip.transport.TokenOT`)."""

    options: OTCCLIPOptions
    _syn: Any = None
    _min_view_rows: int | None = None  # the image tower's fewest train-mode rows, probed once (_view_rows)

    def inter_loss(
        self,
        v: torch.Tensor,
        g_img: torch.Tensor,
        w: torch.Tensor,
        w_mask: torch.Tensor,
        g_txt: torch.Tensor,
    ) -> torch.Tensor:
        """Inter-modality OT loss of a batch: image i with caption i (pairwise mean, or contrastive)."""
        v_mask = torch.ones(v.shape[:2], dtype=torch.bool, device=v.device)
        if self.options.inter_loss == "pairwise":
            return self.ot_distance(v, w, v_mask, w_mask, g_img, g_txt).mean()
        d = self.ot_distance_matrix(v, w, v_mask, w_mask, g_img, g_txt)  # [B, B]
        logits = -d.float() / self.options.inter_tau
        target = torch.arange(d.shape[0], device=d.device)
        return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target))

    def intra_loss(
        self,
        trainer: TrainerContext,
        batch: Batch,
        v: torch.Tensor,
        g_img: torch.Tensor,
        w: torch.Tensor,
        w_mask: torch.Tensor,
        g_txt: torch.Tensor,
    ) -> torch.Tensor:
        """Intra-modality OT loss on the first ``intra_fraction`` of the batch (a random subset: rows are shuffled;
        how many: :func:`intra_rows`).

        Image: d_OT between two views' token sets (the main forward and one augmented view, or two augmented
        views). Text: d_OT between a caption's tokens and its EDA variant's. Randomness comes from the
        per-step-seeded global RNG, so a resumed run draws the same views.
        """
        o = self.options
        model = trainer.model
        device = trainer.device
        images = o.intra_modalities in ("both", "image")
        s = intra_rows(v.shape[0], o.intra_fraction, self._view_rows(trainer) if images else 1)
        augment_images, eda_batch = augmenters(o.intra_modalities)
        parts = []
        if images:
            # augmented on the device with the global RNG, which the trainer reseeds at every step
            raw = trainer.raw_images(batch.rows)[:s].to(device, non_blocking=True)
            grad = torch.enable_grad() if o.intra_view_grad else torch.no_grad()
            if o.intra_views == "reuse":
                view1, g1 = v[:s], g_img[:s]
                with grad:
                    g2, view2 = encode_image_tokens(model, augment_images(raw))
            else:
                g1, view1 = encode_image_tokens(model, augment_images(raw))
                with grad:
                    g2, view2 = encode_image_tokens(model, augment_images(raw))
            ones = torch.ones(view1.shape[:2], dtype=torch.bool, device=device)
            ones2 = torch.ones(view2.shape[:2], dtype=torch.bool, device=device)
            parts.append(self.ot_distance(view1, view2, ones, ones2, g1, g2).mean())
        if o.intra_modalities in ("both", "text"):
            seed = int(torch.randint(0, 2**31 - 1, ()))
            captions = [trainer.data.captions[int(r)] for r in batch.caption_rows[:s]]
            variants = trainer.tokenizer(eda_batch(captions, seed, synonyms=self._thesaurus(trainer))).to(device)
            with torch.enable_grad() if o.intra_view_grad else torch.no_grad():
                g2, w2, m2 = encode_text_tokens(model, variants)
            parts.append(self.ot_distance(w[:s], w2, w_mask[:s], self._text_mask(m2), g_txt[:s], g2).mean())
        return torch.stack(parts).mean()

    def _view_rows(self, trainer: TrainerContext) -> int:
        """The fewest images an augmented view may have: 2 where the image tower's BatchNorm refuses a single image
        in train mode (:func:`~otcbench.models.mode.min_train_rows`, probed once on one image), else 1."""
        if self._min_view_rows is None:
            one = trainer.data.image_rows(torch.arange(1)).to(trainer.device)
            self._min_view_rows = min_train_rows(trainer.model, lambda: encode_image_tokens(trainer.model, one))
        return self._min_view_rows

    def _thesaurus(self, trainer: TrainerContext) -> Any:
        """The EDA thesaurus (WordNet + the dataset's synonyms), built once per run."""
        if self._syn is None:
            from otcbench.data.text_augment import Thesaurus

            info = getattr(trainer, "data_info", None)
            self._syn = Thesaurus(info.meta.synonyms if info is not None else None)
        return self._syn


def intra_rows(batch_rows: int, fraction: float, min_rows: int = 1) -> int:
    """Rows of a (micro-)batch of ``batch_rows`` that get the intra-modality loss: ``round(fraction · B)``, at least
    ``min_rows`` and at most B.

    ``min_rows`` is 1 (a single row is fine) unless the augmented image view must have 2 rows (BatchNorm on a 1×1
    feature map: :meth:`AlignmentLosses._view_rows`): with the default 1/8 a batch under 12 rows would otherwise
    encode a single image and crash. A count of 2 or more is never changed, nor is any count on a model
    without that constraint. (A 1-row micro-batch on such a model fails in the main forward already.)
    """
    return min(batch_rows, max(min_rows, round(fraction * batch_rows)))


def augmenters(modalities: str) -> tuple[Any, Any]:
    """(augment_images, eda_batch) from the shared augmentation modules; one clear line if missing."""
    aug = eda = None
    try:
        if modalities in ("both", "image"):
            from otcbench.data.augment import augment_images as aug
        if modalities in ("both", "text"):
            from otcbench.data.text_augment import eda_batch as eda
    except ImportError as err:  # the augmentation modules ship with the baselines
        raise UserError(f"otcclip's intra-modality loss needs {err.name} (image/text augmentation), which is not "
                        "available; train with --set defense.options.intra_weight=0") from None
    return aug, eda

