"""``otcclip``: optimal-transport caption matching and fine-grained alignment (Zhang, Gao, Bai et al., EMNLP 2025).

This is otcbench's reading of the paper's abstract (DESIGN §7; the body text and code were not available),
every choice an option with a documented default (``docs/otcclip.md``):

* **OT distance** between an image's token set V (patches / grid cells) and a caption's token set W
  (real tokens): cost 1 − cos, uniform marginals (or token-to-global weights), entropic OT by log-domain
  Sinkhorn (:mod:`otcbench.ot`), d_OT = ⟨T*, C⟩ with the plan treated as a constant in the backward pass.
* **Matching** (a data-side step: :meth:`OTCCLIP.data_step`, run from :meth:`OTCCLIP.on_epoch_start`
  every ``match_every`` epochs after ``warmup_epochs``): for each image the ``top_k`` captions of a pool by
  global cosine, plus its own caption, are re-ranked by s = α·cos(g_I, g_T) + (1 − α)·(1 − d_OT(V, W)); the
  image trains with the best one (``trainer.caption_index``). Batched on the device, chunked, no Python
  loop over pairs, and sharded by rank under torch.distributed ("score rows [lo, hi)" + all-gather). As in
  RoCLIP, only the matching epochs train on the matches (``between``), re-paired captions do not train the
  text tower (``repaired_text_grad``), and the features come from the previous epoch's training forwards
  (``match_features=train``) so a matching costs no extra pass.
* **Losses**: L = L_CLIP(matched pairs) + λ_inter·L_inter + λ_intra·L_intra, with L_inter the OT distance
  between each image and its assigned caption (mean over pairs, or an InfoNCE over logits −d_OT/τ), and
  L_intra the OT distance between the token sets of two views of the same image and of a caption and its
  EDA variant — on a fraction of the batch, reusing the main forward as one view (the cost trade-off of
  ``intra_fraction`` / ``intra_views`` is measured in docs/otcclip.md).
"""

from __future__ import annotations

import os
import time
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from otcbench.config import Options
from otcbench.defenses.base import DEFENSES, DataContext, DataStepResult, Defense
from otcbench.errors import UserError
from otcbench.models import encode_fine_grained, encode_image_tokens, encode_text_tokens
from otcbench.train import distributed
from otcbench.train.losses import clip_loss

if TYPE_CHECKING:
    from otcbench.train.loop import Batch, Trainer

__all__ = ["OTCCLIP", "OTCCLIPOptions", "cap_caption_uses", "rank_candidates"]


class OTCCLIPOptions(Options):
    """Options of ``--defense otcclip`` (set with ``--set defense.options.KEY=VALUE``)."""

    # ---- matching ------------------------------------------------------------------------------
    warmup_epochs: int = Field(
        1, ge=0, description="epochs before the first matching (the model must know something first; later, it "
        "has fitted the poison too)"
    )
    match_every: int = Field(
        2, ge=1, description="re-match captions every N epochs after the warm-up (RoCLIP's default 2); what the "
        "epochs in between train on: see between"
    )
    top_k: int = Field(5, ge=1, description="pool captions per image pre-selected by global cosine")
    alpha: float = Field(
        0.5, ge=0, le=1, description="matching score s = alpha·cos(g_I,g_T) + (1-alpha)·(1 - d_OT(V,W))"
    )
    score: Literal["ot", "global"] = Field(
        "ot", description="ot: re-rank by s; global: by global cosine only (the ablation: RoCLIP-style matching)"
    )
    pool_size: int | None = Field(
        None, ge=1, description="caption pool: None = every caption of the dataset; N = the N most recently "
        "trained captions (the FIFO a streaming trainer holds)"
    )
    between: Literal["own", "keep"] = Field(
        "own", description="epochs without a matching train on the dataset's own pairs (RoCLIP's protocol); keep: "
        "the last assignment persists (the model then trains only on its own matches: clean accuracy collapsed "
        "to 0.14 zero-shot in our measurement, docs/otcclip.md)"
    )
    repaired_text_grad: bool = Field(
        False, description="let re-paired captions train the text tower; false (default): their text features carry "
        "no gradient (RoCLIP's matched captions are detached pool entries), so the text tower is not pulled "
        "towards the model's own matches — own captions train it as usual"
    )
    max_uses: int | None = Field(
        1, ge=1, description="a caption replaces the captions of at most this many images (the best-scoring ones; "
        "the others keep their own): without a cap a few 'hub' captions take most images (one caption for 554 "
        "images, 694 distinct captions for 10,500 in our measurement) and training on them collapses; None: no cap"
    )
    margin: float = Field(
        0.05, ge=0, description="re-pair only when the best candidate beats the own caption by more than this "
        "(0: the abstract's rule; with the filter on, 0.05 gave 94.5 % zero-shot against 89.2 % for 0 on the "
        "quickstart, one seed: docs/otcclip.md)"
    )
    exclude_duplicates: bool = Field(
        False, description="leave out of an image's candidates the captions of rows with the pixel-identical image "
        "(the copies of a targeted poison, which otherwise vouch for each other's captions); false: the "
        "abstract's matching (docs/otcclip.md). Image embeddings cannot do this: on the synthetic world an "
        "image's nearest *other* image has cosine 0.99 (median)"
    )
    filter_fraction: float = Field(
        0.2, ge=0, lt=1, description="at each matching, leave the pairs whose own-pair matching score is in this "
        "lowest fraction out of training until the next matching (every loss; docs/otcclip.md, section 6). An "
        "otcbench addition: 0 gives the abstract's method, which only re-pairs and cannot undo a poison the model "
        "has fitted. The matching re-scores every pair, so a filtered pair can come back"
    )
    filter_duplicates: bool = Field(
        True, description="a filtered pair takes the rows with the pixel-identical image with it: a targeted "
        "poison's copies share one fate, the weakest copy's score decides for all (false: each row on its own)"
    )
    match_chunk: int = Field(256, ge=1, description="images scored per chunk (memory: chunk·(top_k+1) OT problems)")
    match_features: Literal["train", "fresh"] = Field(
        "train", description="train: match with the features the training forward passes of the previous epoch "
        "computed anyway (no extra pass; up to one epoch stale, like RoCLIP's pool; rows that epoch did not "
        "encode are encoded fresh); fresh: one no-grad pass over the data at matching time. train needs the "
        "features to fit in token_cache_mb and one process (torchrun uses fresh)"
    )
    token_cache_mb: int = Field(
        1024, ge=0, description="keep the pool captions' token features from the pool pass when they fit in this "
        "many MB (no re-encoding of candidates); larger pools re-encode each chunk's candidates"
    )
    # ---- optimal transport ---------------------------------------------------------------------
    eps: float = Field(0.05, gt=0, description="entropic regularisation of Sinkhorn (cost 1 - cos is in [0, 2])")
    sinkhorn_iters: int = Field(50, ge=1, description="Sinkhorn iterations (upper bound when sinkhorn_tol is set)")
    sinkhorn_tol: float | None = Field(None, gt=0, description="stop early when the marginal error is below this")
    marginals: Literal["uniform", "weighted"] = Field(
        "weighted", description="token masses: weighted = softmax of token-to-global similarity (background "
        "patches and filler words carry little mass; separated poison better in every measurement), or uniform "
        "over real tokens"
    )
    drop_sot: bool = Field(
        True, description="leave the start-of-text token out of caption token sets: under the causal mask its "
        "state is the same for every caption, so it carries no information"
    )
    # ---- alignment losses ----------------------------------------------------------------------
    inter_weight: float = Field(0.1, ge=0, description="λ_inter: inter-modality OT loss weight (0 = off)")
    inter_loss: Literal["pairwise", "contrastive"] = Field(
        "pairwise", description="pairwise: mean d_OT(image, its caption); contrastive: InfoNCE over -d_OT/tau "
        "within the batch (B² OT problems)"
    )
    inter_tau: float = Field(0.1, gt=0, description="temperature of the contrastive inter-modality loss")
    intra_weight: float = Field(0.1, ge=0, description="λ_intra: intra-modality OT loss weight (0 = off)")
    intra_modalities: Literal["both", "image", "text"] = Field(
        "both", description="image: two views of an image; text: a caption and its EDA variant; both: their mean"
    )
    intra_fraction: float = Field(
        0.125, gt=0, le=1, description="fraction of each batch that gets the intra-modality loss (extra forwards: "
        "the cost lever, docs/otcclip.md)"
    )
    intra_views: Literal["reuse", "two"] = Field(
        "reuse", description="reuse: the main (un-augmented) forward is view 1, one augmented view is encoded; "
        "two: two fresh augmented views (one more image forward)"
    )
    intra_view_grad: bool = Field(
        False, description="backpropagate through the augmented image view and the EDA caption too; false "
        "(default, cheaper): they are fixed targets encoded without gradient (no backward pass for them), the "
        "gradient flows through the main forward"
    )


# ------------------------------------------------------------------------------------------------
# features (module-level so tests can substitute hand-built feature extractors)


def _image_features(model: torch.nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(global [B, D], tokens [B, n, D]) of uint8 images, one forward of the image tower."""
    return encode_image_tokens(model, images)


def _text_features(model: torch.nn.Module, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(global [B, D], tokens [B, m, D], mask [B, m]) of token ids, one forward of the text tower."""
    return encode_text_tokens(model, tokens)


# ------------------------------------------------------------------------------------------------
# pure helpers


def _progress_on(ctx: Any) -> bool:
    return bool(getattr(ctx, "show_progress", False)) and not os.environ.get("OTCBENCH_NO_PROGRESS")


def rank_candidates(
    cos: torch.Tensor,
    ot_sim: torch.Tensor | None,
    alpha: float,
    margin: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick the best candidate per image; column 0 is the image's own caption.

    Args:
        cos: [c, K] global cosine of each image with its K candidates (column 0: own caption).
        ot_sim: [c, K] 1 − d_OT of the same pairs, or None for global-only matching.
        alpha: weight of the global term in s = α·cos + (1 − α)·ot_sim.
        margin: a candidate replaces the own caption only if it scores more than ``margin`` higher.

    Returns:
        (choice [c] column index, score s [c, K]). Ties go to the own caption (argmax keeps the first).
    """
    s = cos if ot_sim is None else alpha * cos + (1.0 - alpha) * ot_sim
    best = s.argmax(dim=1)
    gain = s.gather(1, best[:, None]).squeeze(1) - s[:, 0]
    return torch.where(gain > margin, best, torch.zeros_like(best)), s


@dataclass
class FeatureStore:
    """Detached features of every row from one epoch's training forward passes (for the next matching)."""

    epoch: int
    img_g: torch.Tensor  # [N, D] normalised image globals
    img_t: torch.Tensor  # [N, n, D] image tokens
    img_ok: torch.Tensor  # [N] bool: row encoded this epoch
    txt_g: torch.Tensor  # [N, D] normalised caption globals (by caption row)
    txt_t: torch.Tensor  # [N, L, D]
    txt_m: torch.Tensor  # [N, L] bool (start token dropped as configured)
    txt_ok: torch.Tensor  # [N] bool

    @classmethod
    def empty(cls, epoch: int, n: int, n_img: int, n_txt: int, d: int, device: torch.device) -> FeatureStore:
        def z(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
            return torch.zeros(shape, dtype=dtype, device=device)

        return cls(epoch, z(n, d), z(n, n_img, d), z(n, dtype=torch.bool), z(n, d), z(n, n_txt, d),
                   z(n, n_txt, dtype=torch.bool), z(n, dtype=torch.bool))

    def state_dict(self) -> dict[str, Any]:
        return {k: (v.cpu() if isinstance(v, torch.Tensor) else v) for k, v in self.__dict__.items()}

    def to(self, device: torch.device) -> FeatureStore:
        return FeatureStore(**{k: (v.to(device) if isinstance(v, torch.Tensor) else v)
                               for k, v in self.__dict__.items()})

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> FeatureStore:
        return cls(**state)


class PoolFeatures:
    """The caption pool of one matching: rows [P], normalised globals [P, D], optional token cache."""

    def __init__(self, rows: torch.Tensor, globals_: torch.Tensor, tokens: torch.Tensor | None = None,
                 mask: torch.Tensor | None = None, n_rows: int = 0) -> None:
        self.rows, self.globals, self.tokens, self.mask = rows, globals_, tokens, mask
        self.image_keys: torch.Tensor | None = None  # [N, 2] pixel hashes of every row's image (exclude_duplicates)
        self.position = None
        if tokens is not None:
            # caption row -> index in the pool (-1 when a FIFO pool does not hold it)
            self.position = torch.full((n_rows,), -1, dtype=torch.long, device=rows.device)
            self.position[rows] = torch.arange(rows.numel(), device=rows.device)


def cap_caption_uses(assigned: torch.Tensor, score: torch.Tensor, max_uses: int) -> torch.Tensor:
    """Limit how many images a caption is re-assigned to: per caption, the ``max_uses`` images with the highest
    ``score`` keep it, the others get their own caption back (row i's own caption is row i). Ties keep the lower
    row (stable sorts), so the result is deterministic."""
    n = assigned.numel()
    moved = (assigned != torch.arange(n)).nonzero().flatten()
    if moved.numel() == 0:
        return assigned
    caps, sc = assigned[moved], score[moved]
    order = torch.argsort(-sc, stable=True)
    order = order[torch.argsort(caps[order], stable=True)]  # by caption, best score first within a caption
    _, counts = torch.unique_consecutive(caps[order], return_counts=True)
    starts = torch.repeat_interleave(torch.cumsum(counts, 0) - counts, counts)
    rank = torch.arange(order.numel()) - starts  # 0 for the best image of each caption
    out = assigned.clone()
    drop = moved[order[rank >= max_uses]]
    out[drop] = drop
    return out


# ------------------------------------------------------------------------------------------------
# the defense


@DEFENSES.register("otcclip")
class OTCCLIP(Defense):
    """OTCCLIP: re-pair captions by global + fine-grained OT score; OT inter/intra-modality alignment losses."""

    Options = OTCCLIPOptions
    # `bench train` times the steady state: matching from the first epoch
    bench_options: ClassVar[dict[str, Any]] = {"warmup_epochs": 0}
    relative_cost = 1.3  # matching + OT losses (measured 1.20-1.28x; docs/otcclip.md)
    options: OTCCLIPOptions

    def __init__(self, options: OTCCLIPOptions) -> None:
        super().__init__(options)
        self.matched_epoch = -1  # the last epoch whose matching is reflected in trainer.caption_index
        self._syn: Any = None
        self._store: FeatureStore | None = None  # training-forward features collected for the next matching
        self._keys: torch.Tensor | None = None  # pixel hashes of the rows' images (exclude_duplicates)
        self.keep: torch.Tensor | None = None  # rows trained on until the next matching (filter_fraction)

    # ---- OT ------------------------------------------------------------------------------------

    def ot_distance(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        x_mask: torch.Tensor | None,
        y_mask: torch.Tensor | None,
        x_global: torch.Tensor | None = None,
        y_global: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """d_OT [B] between token sets x [B, n, d] and y [B, m, d] with this defense's OT options."""
        from otcbench import ot  # imported on use: the defense registry must import without OT deps

        o = self.options
        a, b = self._marginals(ot, x, x_mask, x_global, y, y_mask, y_global)
        return ot.ot_distance(x, y, x_mask, y_mask, a=a, b=b, eps=o.eps, n_iters=o.sinkhorn_iters, tol=o.sinkhorn_tol)

    def ot_distance_matrix(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        x_mask: torch.Tensor | None,
        y_mask: torch.Tensor | None,
        x_global: torch.Tensor | None = None,
        y_global: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """d_OT [P, Q] between every token set of x [P, n, d] and every one of y [Q, m, d]."""
        from otcbench import ot

        o = self.options
        a, b = self._marginals(ot, x, x_mask, x_global, y, y_mask, y_global)
        return ot.ot_distance_matrix(x, y, x_mask, y_mask, a=a, b=b, eps=o.eps, n_iters=o.sinkhorn_iters,
                                     tol=o.sinkhorn_tol)

    def _marginals(self, ot: Any, x: torch.Tensor, x_mask: torch.Tensor | None, x_global: torch.Tensor | None,
                   y: torch.Tensor, y_mask: torch.Tensor | None, y_global: torch.Tensor | None,
                   ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        if self.options.marginals == "uniform" or x_global is None or y_global is None:
            return None, None
        # marginals are constants of the transport problem: no gradient through the token weights
        return (ot.token_weights(x, x_global, x_mask).detach(), ot.token_weights(y, y_global, y_mask).detach())

    def _text_mask(self, mask: torch.Tensor) -> torch.Tensor:
        if self.options.drop_sot:
            mask = mask.clone()
            mask[:, 0] = False
        return mask

    # ---- schedule ------------------------------------------------------------------------------

    def due(self, epoch: int) -> bool:
        """Whether matching runs at the start of ``epoch`` (0-based)."""
        o = self.options
        return epoch >= o.warmup_epochs and (epoch - o.warmup_epochs) % o.match_every == 0

    # ---- hooks ---------------------------------------------------------------------------------

    def on_train_start(self, trainer: Trainer) -> None:
        """Fail fast (before any step) on a model without fine-grained tokens or missing augmentations."""
        with torch.no_grad():
            was = trainer.model.training
            trainer.model.eval()
            try:
                _image_features(trainer.model, trainer.data.image_rows(torch.arange(1)).to(trainer.device))
                _text_features(trainer.model, trainer.data.tokens[:1].to(trainer.device))
            finally:
                trainer.model.train(was)
        if self.options.intra_weight > 0:
            _augmenters(self.options.intra_modalities)

    def on_epoch_start(self, trainer: Trainer, epoch: int) -> None:
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
        assigned, own = self.score_rows(ctx, lo, hi, feats, store)
        assigned = distributed.all_gather_rows(assigned).cpu()
        own = distributed.all_gather_rows(own).cpu()
        n_before = int((assigned != torch.arange(n)).sum())
        if self.options.max_uses is not None:
            assigned = cap_caption_uses(assigned, own[:, 4], self.options.max_uses)
        repaired = assigned != torch.arange(n)
        keep = self.filter_rows(ctx, own[:, 0]) if self.options.filter_fraction > 0 else None
        flagged = repaired if keep is None else repaired | ~keep
        # gap: own caption's score minus the best candidate's (0 when the own caption wins), a relative score
        scores = {"match": own[:, 0], "ot": own[:, 1], "global": own[:, 2], "gap": own[:, 0] - own[:, 4]}
        summary: dict[str, Any] = {"repaired": float(repaired.float().mean()), "repaired_n": int(repaired.sum()),
                                   "pool": int(pool.numel()), "token_cache": feats.tokens is not None,
                                   "train_features": float(store.img_ok.float().mean()) if store is not None else 0.0,
                                   "image_tokens": int(own[0, 3]) if n else 0,
                                   "capped_n": n_before - int(repaired.sum()),
                                   "distinct_captions": int(assigned.unique().numel())}
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

    def filter_rows(self, ctx: DataContext, score: torch.Tensor) -> torch.Tensor:
        """Rows kept for training [N] bool: all but the ``filter_fraction`` lowest own-pair scores (ties: the
        lower row is filtered first, so the split is deterministic), with ``filter_duplicates`` a filtered row's
        pixel-identical copies filtered too."""
        n = score.numel()
        k = int(self.options.filter_fraction * n)
        keep = torch.ones(n, dtype=torch.bool)
        if k == 0:
            return keep
        order = torch.argsort(score.cpu().float(), stable=True)
        keep[order[:k]] = False
        if self.options.filter_duplicates:
            _, group = torch.unique(self._image_keys(ctx).cpu(), dim=0, return_inverse=True)
            dropped = torch.zeros(int(group.max()) + 1, dtype=torch.bool)
            dropped[group[~keep]] = True
            keep = ~dropped[group]
        return keep

    # ---- matching internals --------------------------------------------------------------------

    def _pool_rows(self, ctx: DataContext, epoch: int | None) -> torch.Tensor:
        """Caption rows that compete for every image (besides its own caption)."""
        n = len(ctx.data)
        size = self.options.pool_size
        if size is None or size >= n:
            return torch.arange(n)
        cfg = getattr(ctx, "cfg", None)
        if epoch is None or epoch == 0 or cfg is None:
            # standalone: what a FIFO holds after one pass over the data in stored order
            return torch.arange(n - size, n)
        # the captions trained last in the previous epoch: what a FIFO fed by the loop holds now
        from otcbench.train.loop import epoch_order

        order = epoch_order(n, cfg.seed, epoch - 1)
        order = self._kept(order, n)  # the previous epoch skipped the filtered rows
        bs = min(cfg.batch_size, len(order))
        used = order[: max(1, len(order) // bs) * bs]
        return used[-size:].sort().values

    def pool_features(self, ctx: DataContext, pool: torch.Tensor, store: FeatureStore | None = None) -> PoolFeatures:
        """One text pass over the pool (sharded over ranks, then gathered): L2-normalised globals [P, D], and
        the token features [P, L, D] with masks when they fit in ``token_cache_mb``. With a feature ``store``
        (one process) only the captions it lacks are encoded."""
        if store is not None:
            dev = store.txt_ok.device
            rows = pool.to(dev)
            glob, tokens, mask = store.txt_g[rows], store.txt_t[rows], store.txt_m[rows]
            missing = (~store.txt_ok[rows]).nonzero().flatten()
            with _eval_mode(ctx.model), torch.no_grad():
                for part in missing.split(max(1, ctx.embed_batch_size)):
                    with ctx.autocast():
                        g, w, m = _text_features(ctx.model, ctx.data.tokens[rows[part].cpu()].to(ctx.device))
                    glob[part], tokens[part], mask[part] = F.normalize(g.float(), dim=-1), w.float(), self._text_mask(m)
            return PoolFeatures(rows, glob, tokens, mask, n_rows=len(ctx.data))
        lo, hi = distributed.shard(pool.numel())
        model = ctx.model
        # an empty shard (fewer pool rows than ranks) still needs [0, ...] tensors for the gather: encode one
        mine = pool[lo:hi] if hi > lo else pool[:1]
        g_parts, w_parts, m_parts = [], [], []
        cache: bool | None = None
        with _eval_mode(model), torch.no_grad():
            for chunk in mine.split(max(1, ctx.embed_batch_size)):
                with ctx.autocast():
                    g, w, m = _text_features(model, ctx.data.tokens[chunk].to(ctx.device, non_blocking=True))
                if cache is None:  # same decision on every rank: it depends on the global pool size only
                    cache = pool.numel() * w.shape[1] * w.shape[2] * 4 <= self.options.token_cache_mb * 2**20
                g_parts.append(F.normalize(g.float(), dim=-1))
                if cache:
                    w_parts.append(w.float())
                    m_parts.append(self._text_mask(m))
        cut = slice(None) if hi > lo else slice(0, 0)
        glob = distributed.all_gather_rows(torch.cat(g_parts)[cut])
        if not cache:
            return PoolFeatures(pool.to(ctx.device), glob)
        tokens = distributed.all_gather_rows(torch.cat(w_parts)[cut])
        mask = distributed.all_gather_rows(torch.cat(m_parts)[cut].to(torch.uint8)).bool()  # gloo gathers no bool
        return PoolFeatures(pool.to(ctx.device), glob, tokens, mask, n_rows=len(ctx.data))

    def _candidate_features(
        self, ctx: DataContext, chunk: torch.Tensor, top: torch.Tensor | None, pool: PoolFeatures
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Caption rows [c, K] (column 0: the own caption, then the top-k pool entries) with their normalised
        globals [c, K, D], token features [c, K, L, D] and masks [c, K, L]."""
        device = ctx.device
        own = chunk.to(device)[:, None]
        cand = own if top is None else torch.cat([own, pool.rows[top]], dim=1)
        if pool.tokens is None:
            # re-encode the chunk's distinct candidates: one text forward
            uniq, inv = torch.unique(cand, return_inverse=True)
            with ctx.autocast():
                g, w, m = _text_features(ctx.model, ctx.data.tokens[uniq.cpu()].to(device, non_blocking=True))
            return cand, F.normalize(g.float(), dim=-1)[inv], w.float()[inv], self._text_mask(m)[inv]
        pos = pool.position[chunk.to(device)]  # own caption's pool index (-1: not in a FIFO pool)
        missing = pos < 0
        at = pos.clamp_min(0)
        g_own, w_own, m_own = pool.globals[at], pool.tokens[at], pool.mask[at]
        if missing.any():
            rows = chunk[missing.cpu()]
            with ctx.autocast():
                g, w, m = _text_features(ctx.model, ctx.data.tokens[rows].to(device, non_blocking=True))
            g_own[missing], w_own[missing] = F.normalize(g.float(), dim=-1), w.float()
            m_own[missing] = self._text_mask(m)
        if top is None:
            return cand, g_own[:, None], w_own[:, None], m_own[:, None]
        return (cand, torch.cat([g_own[:, None], pool.globals[top]], 1),
                torch.cat([w_own[:, None], pool.tokens[top]], 1), torch.cat([m_own[:, None], pool.mask[top]], 1))

    def _image_keys(self, ctx: DataContext) -> torch.Tensor:
        """Two pixel hashes of every row's image [N, 2] (int64; equal for pixel-identical images), computed once.

        Exact integer arithmetic: 8-bit pixels times 31-bit weights summed over up to 2^24 values cannot
        overflow, so equal pixels give equal keys; two independent keys make a collision of different
        images a 2^-62 event per pair."""
        n = len(ctx.data)
        if self._keys is None or self._keys.shape[0] != n:
            weights: torch.Tensor | None = None
            parts = []
            for chunk in torch.arange(n).split(max(1, self.options.match_chunk)):
                flat = ctx.data.image_rows(chunk).reshape(chunk.numel(), -1).to(torch.int64)
                if weights is None:
                    gen = torch.Generator().manual_seed(0)
                    weights = torch.randint(1, 2**31, (flat.shape[1], 2), generator=gen, dtype=torch.int64)
                parts.append(flat @ weights)
            self._keys = torch.cat(parts) if parts else torch.empty(0, 2, dtype=torch.int64)
        return self._keys

    def _image_chunk(self, ctx: DataContext, chunk: torch.Tensor, store: FeatureStore | None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised image globals [c, D] and tokens [c, n, D] of rows ``chunk``: from the store where it has
        them, else one image-tower forward."""
        device = ctx.device
        if store is None:
            with ctx.autocast():
                g, v = _image_features(ctx.model, ctx.data.image_rows(chunk).to(device, non_blocking=True))
            return F.normalize(g.float(), dim=-1), v.float()
        at = chunk.to(store.img_ok.device)
        g, v = store.img_g[at], store.img_t[at]
        missing = (~store.img_ok[at]).cpu()
        if missing.any():
            with ctx.autocast():
                g2, v2 = _image_features(ctx.model, ctx.data.image_rows(chunk[missing]).to(device, non_blocking=True))
            g[missing.to(g.device)], v[missing.to(g.device)] = F.normalize(g2.float(), dim=-1), v2.float()
        return g, v

    @torch.no_grad()
    def score_rows(self, ctx: DataContext, lo: int, hi: int, pool: PoolFeatures,
                   store: FeatureStore | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Match image rows [lo, hi): returns (assigned caption row [h], own-pair stats [h, 5]).

        The stats columns are the own pair's matching score, 1 − d_OT, cosine, the number of image tokens,
        and the best candidate's matching score. Batched per chunk: one image-tower forward, top-k by a
        matrix product with the pool, the candidates' features from the pool cache (or one text forward over
        the chunk's distinct candidates), one batched OT call.
        """
        o = self.options
        model = ctx.model
        device = ctx.device
        rows = torch.arange(lo, hi)
        k = min(o.top_k, pool.rows.numel())
        out_rows, out_stats = [], []
        chunks = rows.split(o.match_chunk)
        with _eval_mode(model), _chunk_progress(_progress_on(ctx), len(chunks), "otcclip matching") as advance:
            for chunk in chunks:
                c = chunk.numel()
                g_img, v = self._image_chunk(ctx, chunk, store)
                sim = g_img @ pool.globals.t()
                dup = None
                if pool.image_keys is not None:
                    keys = pool.image_keys
                    same = (keys[chunk.to(keys.device)][:, None, :] == keys[pool.rows][None, :, :]).all(-1)
                    sim = sim.masked_fill(same, float("-inf"))
                top = sim.topk(k, dim=1) if k else None
                if top is not None:
                    dup, top = torch.isinf(top.values), top.indices  # dup: fewer than k non-duplicates
                cand, g_txt, w, w_mask = self._candidate_features(ctx, chunk, top, pool)
                cos = (g_img[:, None, :] * g_txt).sum(-1)  # [c, K]
                # the own pair's OT score is always computed (detection reports it); all candidates' only
                # when OT decides the matching
                cols = cand.shape[1] if o.score == "ot" else 1
                vv = v[:, None].expand(c, cols, *v.shape[1:]).reshape(c * cols, *v.shape[1:])
                gg = g_img[:, None].expand(c, cols, -1).reshape(c * cols, -1)
                v_mask = torch.ones(vv.shape[:2], dtype=torch.bool, device=device)
                d = self.ot_distance(vv, w[:, :cols].flatten(0, 1), v_mask, w_mask[:, :cols].flatten(0, 1), gg,
                                     g_txt[:, :cols].flatten(0, 1)).float().view(c, cols)
                ot_sim = 1.0 - d
                if dup is not None and bool(dup.any()):  # a duplicate's caption never wins
                    cos, ot_sim = cos.clone(), ot_sim.clone()
                    cos[:, 1:][dup] = float("-inf")
                    if ot_sim.shape[1] > 1:
                        ot_sim[:, 1:][dup] = float("-inf")
                choice, s = rank_candidates(cos, ot_sim if o.score == "ot" else None, o.alpha, o.margin)
                best = cand.gather(1, choice[:, None]).squeeze(1)
                # a different row with the very same caption text is not a replacement
                same_text = (ctx.data.tokens[best.cpu()] == ctx.data.tokens[chunk]).all(dim=1).to(device)
                best = torch.where(same_text, cand[:, 0], best)
                stats = torch.stack([s[:, 0], ot_sim[:, 0], cos[:, 0],
                                     torch.full_like(cos[:, 0], float(v.shape[1])), s.max(dim=1).values], dim=1)
                out_rows.append(best)
                out_stats.append(stats)
                advance()
        if not out_rows:
            return torch.empty(0, dtype=torch.long, device=device), torch.empty(0, 5, device=device)
        return torch.cat(out_rows), torch.cat(out_stats)

    # ---- features from the training forward passes ------------------------------------------------

    def epoch_indices(self, trainer: Trainer, epoch: int, order: torch.Tensor) -> torch.Tensor:
        """With ``filter_fraction``: the rows the last matching kept (the whole order before the first matching)."""
        return self._kept(order, len(trainer.data))

    def _kept(self, order: torch.Tensor, n: int) -> torch.Tensor:
        """``order`` without the rows the last matching filtered (all of it when nothing is filtered)."""
        if self.keep is None or self.keep.numel() != n:
            return order
        return order[self.keep[order]]

    def _collecting(self, trainer: Trainer) -> bool:
        """Whether this epoch's training forwards should be kept for the matching at the next epoch start."""
        o = self.options
        return (o.match_features == "train" and self.due(trainer.epoch + 1) and not distributed.current().enabled
                and trainer.epoch + 1 < trainer.cfg.epochs)

    def _collect(self, trainer: Trainer, batch: Batch, fg: Any) -> None:
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

    def batch_loss(self, trainer: Trainer, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
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
        trainer: Trainer,
        batch: Batch,
        v: torch.Tensor,
        g_img: torch.Tensor,
        w: torch.Tensor,
        w_mask: torch.Tensor,
        g_txt: torch.Tensor,
    ) -> torch.Tensor:
        """Intra-modality OT loss on the first ``intra_fraction`` of the batch (a random subset: rows are shuffled).

        Image: d_OT between two views' token sets (the main forward and one augmented view, or two augmented
        views). Text: d_OT between a caption's tokens and its EDA variant's. Randomness comes from the
        per-step-seeded global RNG, so a resumed run draws the same views.
        """
        o = self.options
        model = trainer.model
        device = trainer.device
        s = max(1, round(o.intra_fraction * v.shape[0]))
        augment_images, eda_batch = _augmenters(o.intra_modalities)
        parts = []
        if o.intra_modalities in ("both", "image"):
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

    def _thesaurus(self, trainer: Trainer) -> Any:
        """The EDA thesaurus (WordNet + the dataset's synonyms), built once per run."""
        if self._syn is None:
            from otcbench.data.text_augment import Thesaurus

            info = getattr(trainer, "data_info", None)
            self._syn = Thesaurus(info.meta.synonyms if info is not None else None)
        return self._syn

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


# ------------------------------------------------------------------------------------------------
# small utilities


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


def _augmenters(modalities: str) -> tuple[Any, Any]:
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


class _eval_mode(AbstractContextManager):
    """Put a model in eval mode for a no-grad pass and restore its mode afterwards."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model

    def __enter__(self) -> torch.nn.Module:
        self.was_training = self.model.training
        self.model.eval()
        return self.model

    def __exit__(self, *exc: object) -> None:
        self.model.train(self.was_training)


class _chunk_progress(AbstractContextManager):
    """A rich progress bar over chunks (a no-op when disabled); yields ``advance()``."""

    def __init__(self, enabled: bool, total: int, description: str) -> None:
        self.enabled, self.total, self.description = enabled, total, description
        self._cm: AbstractContextManager = nullcontext()

    def __enter__(self):
        if not self.enabled:
            return lambda: None
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                            TimeRemainingColumn(), transient=True)
        self._cm = progress
        progress.__enter__()
        task = progress.add_task(self.description, total=self.total)
        return lambda: progress.advance(task)

    def __exit__(self, *exc: object) -> None:
        self._cm.__exit__(*exc)
