"""The ``otcclip`` defense's hooks (schedule, data-side step, features for the next matching, the loss, checkpoint
state) and otcbench's registered variant ``otcclip+filter``.

``otcclip`` is otcbench's reading of the paper (Zhang, Gao, Bai et al., EMNLP 2025) from its abstract — the body
text and code are not retrievable here (docs/otcclip.md):

* **OT distance** between an image's token set V (patches / grid cells) and a caption's token set W
  (real tokens): cost 1 − cos, token-to-global-weighted (or uniform) marginals, entropic OT by log-domain
  Sinkhorn (:mod:`otcbench.ot`), d_OT = ⟨T*, C⟩ with the plan a constant in the backward pass
  (:mod:`.transport`).
* **Matching** ("previous defenses correct poisoned pairs by matching a new caption for each image … we
  re-assign new captions based on the OT distance"): RoCLIP's protocol with the OT score. Every
  ``match_every`` epochs after ``warmup_epochs`` each image trains on the best of its candidates — the
  ``top_k`` pool captions by global cosine, re-ranked by s = α·cos(g_I, g_T) + (1 − α)·(1 − d_OT(V, W)) — its
  own caption not among them (``own_competes``); the epochs in between train on the own pairs (``between``);
  re-paired captions do not train the text tower (``repaired_text_grad``); features come from the previous
  epoch's training forwards (``match_features``). Batched, chunked, sharded by rank (:mod:`.matching`).
* **Losses**: L = L_CLIP(matched pairs) + λ_inter·L_inter + λ_intra·L_intra (:mod:`.losses`).

``otcclip+filter`` is otcbench's extension, not the paper's: the own caption competes (with a margin), a
caption replaces at most one image's, and the lowest-scoring pairs are filtered out of training.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.nn.functional as F

from otcbench.defenses.base import DEFENSES, DataContext, DataStepResult, Defense
from otcbench.defenses.otcclip import features
from otcbench.defenses.otcclip.features import FeatureStore
from otcbench.defenses.otcclip.losses import AlignmentLosses, augmenters
from otcbench.defenses.otcclip.matching import CaptionMatching, cap_caption_uses
from otcbench.defenses.otcclip.options import OTCCLIPFilterOptions, OTCCLIPOptions
from otcbench.defenses.otcclip.transport import TokenOT
from otcbench.eval.matching import match_statistics
from otcbench.models import encode_fine_grained
from otcbench.models.mode import eval_mode
from otcbench.train import distributed
from otcbench.train.losses import clip_loss

if TYPE_CHECKING:
    from otcbench.defenses.protocol import TrainerContext
    from otcbench.train.batch import Batch

__all__ = ["OTCCLIP", "OTCCLIPFilter"]


@DEFENSES.register("otcclip")
class OTCCLIP(CaptionMatching, AlignmentLosses, TokenOT, Defense):
    """OTCCLIP (paper reading): RoCLIP-style re-assignment by the global + OT score; OT alignment losses."""

    Options = OTCCLIPOptions
    # `bench train` times the steady state: matching from the first epoch
    bench_options: ClassVar[dict[str, Any]] = {"warmup_epochs": 0}
    relative_cost = 1.3  # matching + OT losses (measured 1.20-1.28x; docs/otcclip.md)
    variant_phrases: ClassVar[dict[str, Any]] = {
        "score": lambda v: "global score" if v == "global" else None,
        "own_competes": lambda v: "own caption competes" if v else "own caption excluded",
        "filter_fraction": lambda v: f"filter {v:g}" if v else "no filter",
        "max_uses": lambda v: "no use cap" if v is None else f"max {v} use" + ("s" if v > 1 else ""),
        "inter_weight": lambda v: "no inter loss" if v == 0 else None,
        "intra_weight": lambda v: "no intra loss" if v == 0 else None,
    }
    # execution knobs: how the matching is computed, not what it computes
    label_ignore: ClassVar[frozenset[str]] = frozenset({"match_chunk", "token_cache_mb"})
    options: OTCCLIPOptions

    def __init__(self, options: OTCCLIPOptions) -> None:
        super().__init__(options)
        self.matched_epoch = -1  # the last epoch whose matching is reflected in trainer.caption_index
        self._syn: Any = None
        self._store: FeatureStore | None = None  # training-forward features collected for the next matching
        self._keys: torch.Tensor | None = None  # image keys of the rows (image ids, else pixel hashes)
        self.keep: torch.Tensor | None = None  # rows trained on until the next matching (filter_fraction)


    # ---- schedule ------------------------------------------------------------------------------

    def due(self, epoch: int) -> bool:
        """Whether matching runs at the start of ``epoch`` (0-based)."""
        o = self.options
        return epoch >= o.warmup_epochs and (epoch - o.warmup_epochs) % o.match_every == 0

    # ---- hooks ---------------------------------------------------------------------------------

    def on_train_start(self, trainer: TrainerContext) -> None:
        """Fail fast (before any step) on a model without fine-grained tokens or missing augmentations; probe the
        fewest rows the intra loss's augmented image view may have (BatchNorm: :func:`.losses.intra_rows`)."""
        with torch.no_grad(), eval_mode(trainer.model):
            features.image_features(trainer.model, trainer.data.image_rows(torch.arange(1)).to(trainer.device))
            features.text_features(trainer.model, trainer.data.tokens[:1].to(trainer.device))
        if self.options.intra_weight > 0:
            augmenters(self.options.intra_modalities)
            if self.options.intra_modalities in ("both", "image"):
                self._view_rows(trainer)

    def on_epoch_start(self, trainer: TrainerContext, epoch: int) -> None:
        """Re-match captions when the schedule says so (once per epoch, also across a resume); in the other
        epochs train on the dataset's own pairs (``between=own``) or keep the last assignment."""
        if not self.due(epoch):
            if self.options.between == "own":
                trainer.caption_index = torch.arange(len(trainer.data))
            return
        if self.matched_epoch == epoch:  # resumed inside a matched epoch: the checkpoint holds its pairs
            return
        t0 = time.perf_counter()
        result = self.data_step(trainer, epoch)
        trainer.caption_index = result.caption_index.cpu()
        self.keep = result.keep.cpu() if result.keep is not None else None
        self.matched_epoch = epoch
        self._store = None  # used: free it (and keep it out of the next checkpoints)
        # step = the epoch's first step: a resume from the previous epoch's checkpoint drops this line
        # (matching runs again), a resume from inside this epoch keeps it (matching is not repeated)
        trainer.log({"type": "otcclip_match", "epoch": epoch, "step": trainer.global_step + 1,
                     "seconds": round(time.perf_counter() - t0, 2), **result.summary})

    def data_step(self, ctx: DataContext, epoch: int | None = None) -> DataStepResult:
        """Match every image with the best caption of its candidates (see the module docstring).

        ``scores``: ``match`` (the score the matching ranks by, of the image with its own caption), ``ot``
        (1 − d_OT of the own pair) and ``global`` (cosine of the own pair) — higher = more likely clean.
        """
        n = len(ctx.data)
        pool = self._pool_rows(ctx, epoch)
        store = self._usable_store(ctx, epoch)
        feats = self.pool_features(ctx, pool, store)
        if self.options.exclude_duplicates:
            feats.image_keys = self._image_keys(ctx).to(feats.rows.device)
        # under torchrun every rank scores its own rows; the gathered result is identical on all ranks
        lo, hi = distributed.shard(n)
        assigned, stats = self.score_rows(ctx, lo, hi, feats, store)
        assigned = distributed.all_gather_rows(assigned).cpu()
        stats = type(stats).unstack(distributed.all_gather_rows(stats.stack()).cpu())
        n_before = int((assigned != torch.arange(n)).sum())
        if self.options.max_uses is not None:
            assigned = cap_caption_uses(assigned, stats.best, self.options.max_uses)
        repaired = assigned != torch.arange(n)
        keep = self.filter_rows(ctx, stats.match) if self.options.filter_fraction > 0 else None
        flagged = repaired if keep is None else repaired | ~keep
        # gap: own caption's score minus the best rival's, a relative score
        scores = {"match": stats.match, "ot": stats.ot, "global": stats.cos, "gap": stats.match - stats.best}
        summary: dict[str, Any] = {"repaired": float(repaired.float().mean()), "repaired_n": int(repaired.sum()),
                                   "pool": int(pool.numel()), "token_cache": feats.tokens is not None,
                                   "train_features": float(store.img_ok.float().mean()) if store is not None else 0.0,
                                   "image_tokens": int(stats.n_tokens[0]) if n else 0,
                                   "capped_n": n_before - int(repaired.sum()),
                                   "distinct_captions": int(assigned.unique().numel())}
        # match precision of the assignment trained on, and of what each score alone would pick (before the cap)
        summary.update(match_statistics(ctx.data, assigned, {"ot": stats.choice_ot, "global": stats.choice_global}))
        if keep is not None:
            summary.update({"filtered": float((~keep).float().mean()), "filtered_n": int((~keep).sum())})
        poison = [bool(p) for p in ctx.data.poison]
        if any(poison):
            from otcbench.eval.detection import detection_metrics

            m = detection_metrics(flagged, scores, poison, caption_index=assigned)
            summary.update({k: m[k] for k in ("poison_repaired", "clean_repaired", "detect_auroc_match",
                                              "detect_auroc_ot", "detect_auroc_global", "detect_auroc_gap")})
            if keep is not None:
                summary.update(_filtered_by_attack(keep, ctx.data.poison))
        return DataStepResult(caption_index=assigned, flagged=flagged, keep=keep, scores=scores, summary=summary)


    # ---- features from the training forward passes ------------------------------------------------

    def epoch_indices(self, trainer: TrainerContext, epoch: int, order: torch.Tensor) -> torch.Tensor:
        """With ``filter_fraction``: the rows the last matching kept (the whole order before the first matching)."""
        return self._kept(order, len(trainer.data))


    def _collecting(self, trainer: TrainerContext) -> bool:
        """Whether this epoch's training forwards should be kept for the matching at the next epoch start."""
        o = self.options
        return (o.match_features == "train" and self.due(trainer.epoch + 1) and not distributed.current().enabled
                and trainer.epoch + 1 < trainer.cfg.epochs)

    def _collect(self, trainer: TrainerContext, batch: Batch, fg: Any) -> None:
        n = len(trainer.data)
        if self._store is None or self._store.epoch != trainer.epoch:
            d = fg.image_global.shape[1]
            need = n * (fg.image_tokens.shape[1] + fg.text_tokens.shape[1] + 2) * d * 4
            if need > self.options.token_cache_mb * 2**20:
                return  # too big to keep: the matching encodes fresh
            self._store = FeatureStore.empty(trainer.epoch, n, fg.image_tokens.shape[1], fg.text_tokens.shape[1],
                                             d, trainer.device)
        st = self._store = self._store.to(trainer.device)  # a no-op unless just loaded from a checkpoint
        with torch.no_grad():
            rows, caps = batch.rows.to(st.img_ok.device), batch.caption_rows.to(st.img_ok.device)
            st.img_g[rows] = F.normalize(fg.image_global.detach().float(), dim=-1)
            st.img_t[rows] = fg.image_tokens.detach().float()
            st.img_ok[rows] = True
            st.txt_g[caps] = F.normalize(fg.text_global.detach().float(), dim=-1)
            st.txt_t[caps] = fg.text_tokens.detach().float()
            st.txt_m[caps] = self._text_mask(fg.text_mask)
            st.txt_ok[caps] = True

    def _usable_store(self, ctx: DataContext, epoch: int | None) -> FeatureStore | None:
        st = self._store
        if epoch is None or st is None or st.epoch != epoch - 1 or st.img_ok.numel() != len(ctx.data):
            return None
        return st.to(ctx.device)

    # ---- losses --------------------------------------------------------------------------------

    def batch_loss(self, trainer: TrainerContext, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        """L_CLIP on the matched pairs + λ_inter·L_inter + λ_intra·L_intra, one forward per tower."""
        o = self.options
        collect = self._collecting(trainer)
        # re-paired captions' text features carry no gradient unless asked (RoCLIP's matched captions are
        # detached pool entries): the text tower is not pulled towards the model's own matches
        repaired = batch.caption_rows != batch.rows  # cpu: no device sync
        detach = not o.repaired_text_grad and bool(repaired.any())
        extras: dict[str, float] = {"repaired": float(repaired.float().mean())} if detach else {}
        if o.inter_weight == 0 and o.intra_weight == 0 and not collect:
            if not detach:
                return trainer.clip_batch_loss(batch), {}
            img, txt = trainer.encode(batch.images, batch.tokens)
            txt = torch.where(repaired.to(txt.device)[:, None], txt.detach(), txt)
            loss = clip_loss(trainer.gather(img), trainer.gather(txt), trainer.logit_scale())
            return loss, {"loss_clip": float(loss.detach()), **extras}
        fg = encode_fine_grained(trainer.model, batch.images, batch.tokens)
        if collect:
            self._collect(trainer, batch, fg)
        text_global, text_tokens = fg.text_global, fg.text_tokens
        if detach:
            r = repaired.to(text_global.device)[:, None]
            text_global = torch.where(r, text_global.detach(), text_global)
            text_tokens = torch.where(r[..., None], text_tokens.detach(), text_tokens)
        img = F.normalize(fg.image_global, dim=-1)
        txt = F.normalize(text_global, dim=-1)
        # over the global batch under torchrun (the identity in one process), as the plain CLIP loss
        loss_clip = clip_loss(trainer.gather(img), trainer.gather(txt), trainer.logit_scale())
        t_mask = self._text_mask(fg.text_mask)
        loss = loss_clip
        extras["loss_clip"] = float(loss_clip.detach())
        if o.inter_weight > 0:
            loss_inter = self.inter_loss(fg.image_tokens, fg.image_global, text_tokens, t_mask, text_global)
            loss = loss + o.inter_weight * loss_inter
            extras["loss_inter"] = float(loss_inter.detach())
        if o.intra_weight > 0:
            loss_intra = self.intra_loss(trainer, batch, fg.image_tokens, fg.image_global, text_tokens, t_mask,
                                         text_global)
            loss = loss + o.intra_weight * loss_intra
            extras["loss_intra"] = float(loss_intra.detach())
        return loss, extras


    # ---- checkpoints ---------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        # the feature store is part of the state while it is being filled (a resume must match with the same
        # features as an uninterrupted run); it is dropped once the matching has used it
        state: dict[str, Any] = {"matched_epoch": self.matched_epoch}
        if self.keep is not None:
            state["keep"] = self.keep.clone()
        if self._store is not None:
            state["store"] = self._store.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.matched_epoch = int(state.get("matched_epoch", -1))
        self.keep = state["keep"].clone() if state.get("keep") is not None else None
        self._store = FeatureStore.from_state(state["store"]) if "store" in state else None



@DEFENSES.register("otcclip+filter")
class OTCCLIPFilter(OTCCLIP):
    """otcbench's extension of OTCCLIP (not the paper's): own caption competes with a margin, one use per caption,
    and the lowest-scoring 20 % of pairs (with their pixel-identical copies) filtered out until the next matching."""

    Options = OTCCLIPFilterOptions
    options: OTCCLIPFilterOptions


def _filtered_by_attack(keep: torch.Tensor, poison: list[str]) -> dict[str, float | None]:
    """Fractions filtered (``~keep``) of the poisoned rows, the clean rows and each attack's rows."""
    names = [str(p) if p else "" for p in poison]
    is_poison = torch.tensor([bool(x) for x in names])
    clean = ~is_poison
    out: dict[str, float | None] = {
        "poison_filtered": float((~keep[is_poison]).float().mean()),
        "clean_filtered": float((~keep[clean]).float().mean()) if bool(clean.any()) else None,
    }
    for name in sorted({x for x in names if x}):  # per attack: which poison gets through
        rows = torch.tensor([x == name for x in names])
        out[f"poison_filtered_{name}"] = float((~keep[rows]).float().mean())
    return out

