"""``roclip`` (Yang, Gao, Mirzasoleiman, NeurIPS 2023): nearest-pool-caption matching every few epochs.

What the official code (BigML-CS-UCLA/RoCLIP, ``src/train.py``) does, and this class reproduces:

* a FIFO pool of caption embeddings (21,845 entries), detached, initialised with random unit vectors;
* in *matching epochs* — ``epoch % match_every == 0`` with the official 1-based epoch count, i.e. the
  2nd, 4th, … epoch for ``match_every = 2`` — every image is matched to its nearest pool caption
  (cosine, looked up before the batch's own captions enter the pool), and the loss is the symmetric
  cross-entropy over ``s · nn · Iᵀ`` with diagonal targets. Pool entries are detached, so the text tower
  gets no gradient in those epochs (only the ``0 ×`` own-pair term the official code adds, which keeps
  AdamW's momentum and weight decay moving as there);
* the other epochs are plain CLIP;
* images are augmented each time they are seen, captions replaced by one EDA variant computed once.

Quirks of the official code are options (defaults = official behaviour): ``pool_update="matching"``
(the pool is refreshed only during matching epochs, so it is random at the first one and stale later;
``"always"`` refreshes it every epoch), ``eda_once`` (False: a fresh EDA variant every epoch) and
``reencode_matched`` (True: the matched captions are re-encoded with gradient so the text tower learns in
matching epochs too).
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from otcbench.config import Options
from otcbench.data.augment import ImageAugOptions
from otcbench.defenses.base import DEFENSES, DataContext, DataStepResult, Defense
from otcbench.defenses.embed import embed_captions, embed_images
from otcbench.defenses.pool import ROCLIP_POOL_SIZE, EmbeddingPool
from otcbench.defenses.unimodal import EDAOptions, augmented_batch_images, eda_tokens, matched_clip_loss
from otcbench.train.losses import clip_loss


class RoCLIPOptions(Options):
    """RoCLIP's options; defaults are the official code's (``--memory_bank_size 21845 --break_epoch 2``)."""

    pool_size: int = Field(
        ROCLIP_POOL_SIZE, ge=1,
        description="caption pool entries (official 21,845 for 1M pairs, ~2%; the quickstart's 10k pairs use 1024)",
    )
    match_every: int = Field(
        2, ge=1, description="matching epochs are those whose 1-based number is a multiple of this (official 2)"
    )
    warmup_epochs: int = Field(
        0, ge=0,
        description="plain CLIP epochs before matching may start (official 0: its first matching epoch comes after a "
        "full epoch of 1M pairs). Quickstart (8 epochs of ~80 steps): 4 -- with 0 or 2 the plain epoch after the first "
        "match collapses the text tower (docs/baselines.md, 'Augmentation at 32 px')",
    )
    pool_update: Literal["matching", "always"] = Field(
        "matching", description="when captions enter the pool: only in matching epochs (official) or every epoch"
    )
    augment: bool = Field(True, description="image augmentation and EDA captions (official --cross_aug)")
    eda_once: bool = Field(True, description="one EDA variant per caption for the whole run (official)")
    reencode_matched: bool = Field(
        False, description="re-encode matched captions with gradient (official: no text gradient in matching epochs)"
    )
    match_query: Literal["image", "own"] = Field(
        "image",
        description="image: each image queries the caption pool (official code, NeurIPS 2023); own: the later "
        "paper's rule -- the image trains with the pool caption nearest its own caption and the caption with the "
        "pool image nearest its own image (two pools; both towers learn in matching epochs)",
    )
    own_pair_weight: float = Field(
        0.0, ge=0, description="weight of the plain CLIP loss on the own pairs in matching epochs (official 0)"
    )
    image_aug: ImageAugOptions = Field(default_factory=ImageAugOptions)
    eda: EDAOptions = Field(default_factory=EDAOptions)


@DEFENSES.register("roclip")
class RoCLIP(Defense):
    """Robust CLIP pre-training by matching images to their nearest pool caption every few epochs."""

    Options = RoCLIPOptions
    relative_cost = 1.1  # augmented views and EDA captions; matching epochs re-embed the pool
    # table labels of non-default runs (the quickstart's: "pool 1024, warm-up 4"); every RoCLIP option changes
    # results, so label_ignore stays empty
    variant_phrases: ClassVar[dict[str, Any]] = {
        "pool_size": lambda v: f"pool {v}",
        "match_every": lambda v: f"match every {v}",
        "warmup_epochs": lambda v: f"warm-up {v}",
        "pool_update": lambda v: f"pool update {v}",
        "augment": lambda v: None if v else "no augmentation",
        "eda_once": lambda v: None if v else "fresh EDA per epoch",
        "reencode_matched": lambda v: "re-encoded matches" if v else None,
        "match_query": lambda v: "own-pair queries" if v == "own" else None,
    }
    options: RoCLIPOptions

    def __init__(self, options: RoCLIPOptions) -> None:
        super().__init__(options)
        self.pool: EmbeddingPool | None = None
        self.image_pool: EmbeddingPool | None = None  # match_query="own" only
        self.text_tokens: torch.Tensor | None = None  # EDA captions (or the originals)
        self.tokens_epoch = -1
        self.epoch = 0
        self._seed = 0
        self.matched: torch.Tensor | None = None  # [N] pool row each image matched this epoch (-1: none/random)

    # ----------------------------------------------------------------------------------------------

    def is_matching_epoch(self, epoch: int) -> bool:
        """Whether 0-based ``epoch`` matches captions (the official code counts epochs from 1)."""
        return epoch >= self.options.warmup_epochs and (epoch + 1) % self.options.match_every == 0

    def on_train_start(self, trainer: Any) -> None:
        self._seed = trainer.cfg.seed
        self.text_tokens = trainer.data.tokens
        if self.options.augment and self.options.eda_once:
            self.text_tokens = eda_tokens(trainer, self._seed, self.options.eda)

    def on_epoch_start(self, trainer: Any, epoch: int) -> None:
        self.epoch = epoch
        if self.options.augment and not self.options.eda_once and self.tokens_epoch != epoch:
            self.text_tokens = eda_tokens(trainer, self._seed * 1_000 + epoch + 1, self.options.eda)
            self.tokens_epoch = epoch

    def _pool(self, dim: int, device: torch.device) -> EmbeddingPool:
        if self.pool is None:
            self.pool = EmbeddingPool(self.options.pool_size, dim, device, seed=self._seed)
        elif self.pool.device != device:
            self.pool.to(device)  # restored from a checkpoint on the CPU
        return self.pool

    def batch_loss(self, trainer: Any, batch: Any) -> tuple[torch.Tensor, dict[str, float]]:
        o = self.options
        images = augmented_batch_images(trainer, batch.rows, o.image_aug) if o.augment else batch.images
        assert self.text_tokens is not None
        tokens = self.text_tokens[batch.caption_rows].to(trainer.device, non_blocking=True)
        img, txt = trainer.encode(images, tokens)
        img, txt = trainer.gather(img), trainer.gather(txt)
        rows = trainer.gather(batch.caption_rows.to(trainer.device))
        scale = trainer.logit_scale()
        matching = self.is_matching_epoch(self.epoch)
        if not matching:
            if o.pool_update == "always":
                self._pool(txt.shape[1], trainer.device).push(txt, rows)
            return clip_loss(img, txt, scale), {"matching": 0.0}
        pool = self._pool(txt.shape[1], trainer.device)
        if o.match_query == "own":
            return self._own_query_loss(trainer, img, txt, rows, scale)
        match = pool.nearest(img)  # before this batch's captions enter the pool (official order)
        pool.push(txt, rows)
        self._record_matches(trainer, rows, match.rows)
        matched = match.vectors.to(img.dtype)
        if o.reencode_matched:
            real = match.rows >= 0
            if bool(real.any()):
                fresh = trainer.model.encode_text(
                    self.text_tokens[match.rows[real].cpu()].to(trainer.device), normalize=True)
                matched = matched.clone()
                matched[real] = fresh.to(matched.dtype)
        loss = matched_clip_loss(img, matched, scale)
        # the official code adds 0 × CE(own pairs): the text tower then has (zero) gradients, so AdamW keeps
        # applying its momentum and weight decay to it
        loss = loss + o.own_pair_weight * clip_loss(img, txt, scale)
        extras = {
            "matching": 1.0,
            "matched_own": float((match.rows == rows).float().mean()),
            "matched_random": float((match.rows < 0).float().mean()),
            "matched_cos": float(match.similarity.mean()),
        }
        return loss, extras

    def _own_query_loss(self, trainer: Any, img: torch.Tensor, txt: torch.Tensor, rows: torch.Tensor,
                        scale: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        """The later RoCLIP rule: ½[CE(s·I·nn_T(T)ᵀ) + CE(s·T·nn_I(I)ᵀ)], each nearest neighbour looked up in its
        pool (caption pool by the own caption, image pool by the own image) before the batch enters them."""
        pool = self._pool(txt.shape[1], trainer.device)
        if self.image_pool is None:
            self.image_pool = EmbeddingPool(self.options.pool_size, img.shape[1], trainer.device, seed=self._seed + 1)
        elif self.image_pool.device != trainer.device:
            self.image_pool.to(trainer.device)
        nn_t, nn_i = pool.nearest(txt), self.image_pool.nearest(img)
        pool.push(txt, rows)
        self.image_pool.push(img, rows)
        self._record_matches(trainer, rows, nn_t.rows)
        target = torch.arange(len(img), device=img.device)
        loss = 0.5 * (F.cross_entropy((scale * img.float() @ nn_t.vectors.float().t()), target)
                      + F.cross_entropy((scale * txt.float() @ nn_i.vectors.float().t()), target))
        loss = loss + self.options.own_pair_weight * clip_loss(img, txt, scale)
        return loss, {"matching": 1.0, "matched_own": float((nn_t.rows == rows).float().mean()),
                      "matched_random": float((nn_t.rows < 0).float().mean()),
                      "matched_cos": float(nn_t.similarity.mean())}

    def _record_matches(self, trainer: Any, image_rows: torch.Tensor, matched: torch.Tensor) -> None:
        """Remember which caption row each image of a matching epoch trained on (for the epoch's match log)."""
        if self.matched is None or self.matched.numel() != len(trainer.data):
            self.matched = torch.full((len(trainer.data),), -1, dtype=torch.long)
        self.matched[image_rows.cpu()] = matched.cpu().long()

    def on_epoch_end(self, trainer: Any, epoch: int) -> None:
        """After a matching epoch: one ``roclip_match`` log line with match precision and hub statistics."""
        if not self.is_matching_epoch(epoch) or self.matched is None:
            return
        from otcbench.eval.matching import match_statistics

        own = torch.arange(self.matched.numel())
        real = self.matched >= 0
        # a random initial pool entry is no caption: such images count as not re-assigned
        assigned = torch.where(real, self.matched, own)
        trainer.log({"type": "roclip_match", "epoch": epoch, "step": trainer.global_step,
                     "matched_random": float((~real).float().mean()), **match_statistics(trainer.data, assigned)})
        self.matched = None

    # ----------------------------------------------------------------------------------------------

    def data_step(self, ctx: DataContext, epoch: int | None = None) -> DataStepResult:
        """RoCLIP's matching over a whole dataset (``otcbench defend``): every image gets its nearest caption
        in a pool of ``pool_size`` of the dataset's captions (all of them when the dataset is smaller; else a
        random subset, seeded), with the current model. ``flagged`` = the caption changed; the score is the
        cosine of each image with its own caption."""
        g = torch.Generator().manual_seed(self._seed * 1_000_003 + (epoch if epoch is not None else -1))
        n = len(ctx.data)
        pool_rows = torch.arange(n) if n <= self.options.pool_size else torch.randperm(n, generator=g)[
            : self.options.pool_size].sort().values
        img = embed_images(ctx)
        own = embed_captions(ctx, ctx.caption_index)
        pool = embed_captions(ctx, pool_rows)
        best = torch.cat([(chunk @ pool.t()).argmax(1) for chunk in img.split(ctx.embed_batch_size)])
        caption_index = pool_rows.to(best.device)[best].cpu()
        flagged = caption_index != ctx.caption_index.cpu()
        from otcbench.eval.matching import match_statistics

        summary = {"pool": float(len(pool_rows)), "repaired": float(flagged.float().mean()),
                   **match_statistics(ctx.data, caption_index)}
        return DataStepResult(caption_index=caption_index, flagged=flagged,
                              scores={"cosine": (img * own).sum(-1).cpu()}, summary=summary)

    def state_dict(self) -> dict[str, Any]:
        return {"pool": self.pool.state_dict() if self.pool is not None else None,
                "image_pool": self.image_pool.state_dict() if self.image_pool is not None else None,
                "matched": self.matched.clone() if self.matched is not None else None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("pool") is not None:
            self.pool = EmbeddingPool.from_state(state["pool"])
        if state.get("image_pool") is not None:
            self.image_pool = EmbeddingPool.from_state(state["image_pool"])
        self.matched = state["matched"].clone() if state.get("matched") is not None else None
