"""``safeclip`` (Yang, Gao, Mirzasoleiman, ICML 2024): unimodal warm-up, then train CLIP only on "safe" pairs.

Phases, in epochs of the one trainer (``train.epochs`` counts all of them; the official run: 5 + 1 + 26):

A. ``unimodal_epochs`` (5): NNCLR-style unimodal loss per modality on all data — two augmented views of
   each image and two EDA variants of each caption; the positive of view 2 is view 1's nearest neighbour
   in a FIFO bank of that modality (256 entries), looked up before view 1 enters the bank.
B. ``slow_epochs`` (1): CLIP loss on all data at a constant ``slow_lr_factor`` (0.01) × the base learning
   rate; with ``cross_aug`` (official default) image view 1 pairs with caption view 2 and caption view 1
   with image view 2.
C. every remaining epoch: the cosine similarity of every pair (model in eval mode) → a 2-component 1-D
   Gaussian mixture (EM, :func:`fit_gmm_1d`) → P(clean) = posterior of the higher-mean component. First
   epoch of C: safe = {P ≥ ``threshold``} (0.9) and r = |safe| / N; later epochs: safe = the top r·N pairs by
   P, after r ← min(r + ``ratio_step``, ``ratio_cap``) (0.01, 0.85). The epoch runs one pass of the unimodal
   loss over the risky pairs, then one pass of the CLIP loss over the safe pairs (each pass drops its last
   incomplete batch, as the official loaders do).

Differences from the official code, each an option: pairs are scored on the images and captions as they
are (``score_views="clean"``; the official code scores its first augmented view, ``"augmented"``); the
learning-rate schedule ``"restart"`` follows the official shape (phase A: warm-up and cosine over phases A+B,
phase B constant, phase C a fresh cosine decay spanning its epochs, positioned by epoch progress as the
official per-epoch scheduler index) without its 10,000-step warm-ups; a phase-C epoch without a full batch
of safe pairs trains nothing (not the unimodal loss on nearly all data); ``"global"`` uses the
trainer's one schedule everywhere except phase B. The split and the ratio are kept in checkpoints, so a
resumed run continues exactly (the official code cannot resume after the warm-up).
"""

from __future__ import annotations

import math
from typing import Any, ClassVar, Literal

import torch
from pydantic import Field

from otcbench.config import Options
from otcbench.data.augment import ImageAugOptions, augment_images
from otcbench.defenses.base import DEFENSES, DataContext, DataStepResult, Defense
from otcbench.defenses.embed import embed_captions, embed_images, pair_cosine
from otcbench.defenses.pool import EmbeddingPool
from otcbench.defenses.unimodal import (
    EDAOptions,
    augmented_batch_images,
    cross_view_clip_loss,
    eda_tokens,
    nn_contrastive_loss,
)
from otcbench.errors import UserError
from otcbench.models import prepare_images
from otcbench.models.mode import eval_mode
from otcbench.train.schedule import cosine_lr, warmup_steps

# --------------------------------------------------------------------------------------------------
# a two-component Gaussian mixture in one dimension


def fit_gmm_1d(
    x: torch.Tensor, max_iter: int = 100, tol: float = 1e-3, reg_covar: float = 1e-6
) -> dict[str, torch.Tensor]:
    """Fit a 2-component Gaussian mixture to the values ``x`` [N] by EM (float64, deterministic).

    Initialised like scikit-learn's default: a 1-D k-means (here from the 25th and 75th percentiles) gives
    hard responsibilities; EM then runs until the mean log-likelihood improves by less than ``tol``.
    ``reg_covar`` is added to the variances (sklearn's default).

    Returns ``weights``, ``means``, ``variances`` (each [2], components ordered by mean) and ``posterior``
    [N, 2] (responsibilities; column 1 is the higher-mean component).
    """
    v = x.detach().double().cpu().flatten()
    n = v.numel()
    if n < 2:
        raise ValueError("a 2-component mixture needs at least 2 values")
    centres = torch.quantile(v, torch.tensor([0.25, 0.75], dtype=torch.float64))
    if centres[0] == centres[1]:
        centres = torch.stack([v.min(), v.max()])
    for _ in range(100):
        assign = (v.unsqueeze(1) - centres).abs().argmin(1)
        new = torch.stack([v[assign == k].mean() if bool((assign == k).any()) else centres[k] for k in range(2)])
        if torch.equal(new, centres):
            break
        centres = new
    resp = torch.nn.functional.one_hot(assign, 2).double()
    prev = -math.inf
    log_two_pi = math.log(2 * math.pi)
    for _ in range(max_iter):
        nk = resp.sum(0) + 10 * torch.finfo(torch.float64).eps
        weights = nk / n
        means = (resp * v.unsqueeze(1)).sum(0) / nk
        variances = (resp * (v.unsqueeze(1) - means) ** 2).sum(0) / nk + reg_covar
        log_p = -0.5 * (log_two_pi + variances.log() + (v.unsqueeze(1) - means) ** 2 / variances) + weights.log()
        norm = torch.logsumexp(log_p, dim=1, keepdim=True)
        resp = (log_p - norm).exp()
        ll = float(norm.mean())
        if abs(ll - prev) < tol:
            break
        prev = ll
    order = torch.argsort(means)
    return {"weights": weights[order], "means": means[order], "variances": variances[order],
            "posterior": resp[:, order]}


def clean_probability(cosine: torch.Tensor, **gmm: Any) -> torch.Tensor:
    """P(clean) of each pair: the posterior of the higher-mean component of a 2-GMM on the cosines (float32)."""
    return fit_gmm_1d(cosine, **gmm)["posterior"][:, 1].float().to(cosine.device)


# --------------------------------------------------------------------------------------------------


class SafeCLIPOptions(Options):
    """SafeCLIP's options; defaults are the official code's (README command: ``--memory_bank``)."""

    unimodal_epochs: int = Field(
        5, ge=0, description="phase A epochs of unimodal warm-up (official 5 of 32; the quickstart's 8 epochs use 2)"
    )
    slow_epochs: int = Field(1, ge=0, description="phase B epochs of CLIP at slow_lr_factor x lr (official 1)")
    slow_lr_factor: float = Field(
        0.01, gt=0,
        description="phase B learning rate / base (official 5e-6 / 5e-4; at the quickstart's 8 epochs neither 0.01, "
        "0.2 nor 1.0 makes SafeCLIP learn: docs/baselines.md, 'Augmentation at 32 px')",
    )
    threshold: float = Field(0.9, ge=0, le=1, description="first phase-C epoch: safe = P(clean) >= threshold")
    ratio_step: float = Field(0.01, ge=0, le=1, description="safe ratio increase per later phase-C epoch")
    ratio_cap: float = Field(0.85, ge=0, le=1, description="largest safe ratio")
    bank_size: int = Field(256, ge=1, description="entries of each modality's nearest-neighbour bank (official 256)")
    nn_bank: bool = Field(
        True, description="NNCLR positives from the banks (official README); False: view 1 itself (in-batch)"
    )
    cross_aug: bool = Field(True, description="CLIP passes on two augmented views, crossed (official default)")
    unimodal_on_risky: bool = Field(True, description="phase C trains the unimodal loss on the risky pairs")
    score_views: Literal["clean", "augmented"] = Field(
        "clean", description="what the phase-C cosine is computed on (official code: its first augmented view)"
    )
    lr_schedule: Literal["restart", "global"] = Field(
        "restart", description="restart: official shape (A+B one cosine, C a fresh one); global: the trainer's"
    )
    gmm_max_iter: int = Field(100, ge=1, description="EM iterations (sklearn's default)")
    gmm_tol: float = Field(1e-3, gt=0, description="EM tolerance on the mean log-likelihood (sklearn's default)")
    image_aug: ImageAugOptions = Field(default_factory=ImageAugOptions)
    eda: EDAOptions = Field(default_factory=EDAOptions)


@DEFENSES.register("safeclip")
class SafeCLIP(Defense):
    """Unimodal warm-up, a slow CLIP epoch, then CLIP on GMM-selected safe pairs and unimodal on the rest."""

    Options = SafeCLIPOptions
    # `bench train` times the steady state: filtering (phase C) from the first epoch
    bench_options: ClassVar[dict[str, Any]] = {"unimodal_epochs": 0, "slow_epochs": 0}
    relative_cost = 2.3  # official options: unimodal losses on two views of the risky pairs (554 s vs 238 s)
    # table labels of non-default runs (the quickstart's: "no warm-up, full-rate slow phase, no cross-aug, no
    # risky-set loss"); every SafeCLIP option changes results, so label_ignore stays empty
    variant_phrases: ClassVar[dict[str, Any]] = {
        "unimodal_epochs": lambda v: "no warm-up" if v == 0 else f"warm-up {v}",
        "slow_lr_factor": lambda v: "full-rate slow phase" if v == 1.0 else None,
        "cross_aug": lambda v: None if v else "no cross-aug",
        "unimodal_on_risky": lambda v: None if v else "no risky-set loss",
        "nn_bank": lambda v: None if v else "in-batch positives",
        "score_views": lambda v: f"scored on {v} views",
        "lr_schedule": lambda v: f"{v} lr schedule",
    }
    options: SafeCLIPOptions

    @classmethod
    def estimated_cost(cls, options: Options, epochs: int) -> float:
        """Per phase: an unimodal epoch or a cross_aug CLIP epoch encodes two views (2×); a phase-C epoch
        trains CLIP on the safe share (≈ ratio_cap at most) and the unimodal loss on the risky rest."""
        assert isinstance(options, SafeCLIPOptions)
        clip = 2.0 if options.cross_aug else 1.0
        a = min(epochs, options.unimodal_epochs)
        b = min(epochs - a, options.slow_epochs)
        safe = options.ratio_cap
        mixed = safe * clip + (1 - safe) * (2.0 if options.unimodal_on_risky else 0.0)
        return 2.0 * a + clip * b + mixed * (epochs - a - b)

    def __init__(self, options: SafeCLIPOptions) -> None:
        super().__init__(options)
        self.banks: dict[str, EmbeddingPool] = {}
        self.views: list[torch.Tensor] = []  # two EDA token tables
        self.epoch = 0
        self._seed = 0
        # the phase-C split (kept in checkpoints)
        self.split_epoch = -1
        self.ratio: float | None = None
        self.safe: torch.Tensor | None = None  # (N,) bool
        self._epoch_steps = 0  # optimiser steps of the current phase-C epoch (its lr position)

    # ----------------------------------------------------------------------------------------------
    # phases

    @property
    def first_mixed_epoch(self) -> int:
        return self.options.unimodal_epochs + self.options.slow_epochs

    def phase(self, epoch: int) -> str:
        """``"unimodal"`` (A), ``"slow"`` (B) or ``"mixed"`` (C) for 0-based ``epoch``."""
        if epoch < self.options.unimodal_epochs:
            return "unimodal"
        if epoch < self.first_mixed_epoch:
            return "slow"
        return "mixed"

    @classmethod
    def check(cls, options: Options, epochs: int) -> str | None:
        """Phase C (filtering) needs at least one epoch after phases A and B."""
        assert isinstance(options, SafeCLIPOptions)
        first = options.unimodal_epochs + options.slow_epochs
        if epochs > first:
            return None
        return (f"train.epochs={epochs} leaves no filtering epoch after unimodal_epochs="
                f"{options.unimodal_epochs} + slow_epochs={options.slow_epochs}; set train.epochs (--epochs) to "
                f"{first + 1} or more, or lower defense.options.unimodal_epochs / slow_epochs")

    def on_train_start(self, trainer: Any) -> None:
        problem = self.check(self.options, trainer.cfg.epochs)
        if problem:  # also checked before any work by `otcbench train` and recipe planning
            raise UserError(f"safeclip: {problem}")
        self._seed = trainer.cfg.seed
        self.views = [eda_tokens(trainer, self._seed * 1_000 + k, self.options.eda) for k in (1, 2)]

    def learning_rate(self, trainer: Any, lr: float) -> float:
        o, cfg = self.options, trainer.cfg
        epoch = trainer.epoch
        phase = self.phase(epoch)
        warm = self.first_mixed_epoch * trainer.steps_per_epoch
        if phase == "slow":
            slow = o.slow_lr_factor * cfg.lr  # constant, as the official filter_lr
            n_warm = warmup_steps(cfg.warmup, warm)
            if o.unimodal_epochs == 0 and trainer.global_step < n_warm:
                # phase B is where training starts: warm up as phase A would (a constant full rate from step 0
                # left the CLIP loss ~1 nat above plain CLIP's after 6 epochs, docs/baselines.md)
                return slow * (trainer.global_step + 1) / n_warm
            return slow
        if o.lr_schedule == "global":
            return lr
        if phase == "unimodal":
            return cosine_lr(trainer.global_step, cfg.lr, warmup_steps(cfg.warmup, warm), warm)
        # phase C: one fresh cosine decay over its epochs, positioned by epoch progress. The official code sizes
        # it the same way: its CLIP passes' cosine spans total_train_steps = sum_k (r + k*ratio_step) * batches
        # and advances by total_train_steps / E_C per epoch, whatever the epoch's own number of steps (here
        # the passes shrink with the split). Its offset quirks (absolute epoch index, no clamp) are not kept.
        mixed_epochs = max(1, cfg.epochs - self.first_mixed_epoch)
        n_here = max(1, self._epoch_steps or trainer.steps_per_epoch)
        progress = (epoch - self.first_mixed_epoch + min(trainer.step_in_epoch, n_here) / n_here) / mixed_epochs
        if warm == 0:
            n_warm = warmup_steps(cfg.warmup, trainer.total_steps)
            if trainer.global_step < n_warm:  # a warm-up only when nothing came before phase C
                return cfg.lr * (trainer.global_step + 1) / n_warm
        return 0.5 * cfg.lr * (1 + math.cos(math.pi * min(1.0, progress)))

    # ----------------------------------------------------------------------------------------------
    # the data-side step: score, fit the GMM, split

    def _scores(self, ctx: DataContext, epoch: int | None) -> torch.Tensor:
        if self.options.score_views == "clean":
            return pair_cosine(ctx)
        # the official code's cosine: the first augmented image view with the first EDA caption
        gen = torch.Generator().manual_seed(self._seed * 1_000_003 + 7 * ((epoch or 0) + 1))
        model = ctx.model
        feats = []
        with torch.no_grad(), eval_mode(model):
            for chunk in torch.arange(len(ctx.data)).split(ctx.embed_batch_size):
                raw = ctx.data.image_rows(chunk).to(ctx.device)
                with ctx.autocast():
                    f = model.encode_image(prepare_images(model, augment_images(raw, gen, self.options.image_aug)),
                                           normalize=True)
                feats.append(f.float())
        img = torch.cat(feats)
        if self.views:
            tokens = self.views[0][ctx.caption_index.cpu()]
            txt = []
            with torch.no_grad(), eval_mode(model):
                for chunk in tokens.split(ctx.embed_batch_size):
                    with ctx.autocast():
                        txt.append(model.encode_text(chunk.to(ctx.device), normalize=True).float())
            return (img * torch.cat(txt)).sum(-1)
        return (img * embed_captions(ctx, ctx.caption_index)).sum(-1)

    def data_step(self, ctx: DataContext, epoch: int | None = None) -> DataStepResult:
        """Score every pair and split it into safe (trained with CLIP) and risky (``flagged``) pairs.

        ``epoch`` None (``otcbench defend``) or the first phase-C epoch: safe = P(clean) ≥ threshold.
        A later epoch: the top r·N pairs by P(clean), r = min(previous r + ratio_step, ratio_cap).
        """
        o = self.options
        cos = self._scores(ctx, epoch)
        gmm = fit_gmm_1d(cos, max_iter=o.gmm_max_iter, tol=o.gmm_tol)
        p_clean = gmm["posterior"][:, 1].float().to(cos.device)
        n = cos.numel()
        if epoch is None or epoch <= self.first_mixed_epoch or self.ratio is None:
            safe = p_clean >= o.threshold
            ratio = float(safe.float().mean())
        else:
            ratio = min(self.ratio + o.ratio_step, o.ratio_cap)
            k = int(ratio * n)
            # by P(clean), ties (P saturates at 1) broken by the cosine itself
            rank = torch.from_numpy(_lexsort_desc(p_clean.cpu(), cos.cpu())).to(cos.device)
            safe = torch.zeros(n, dtype=torch.bool, device=cos.device)
            safe[rank[:k]] = True
        summary = {"ratio": ratio, "safe_fraction": float(safe.float().mean()),
                   "gmm_mean_low": float(gmm["means"][0]), "gmm_mean_high": float(gmm["means"][1]),
                   "cosine_mean": float(cos.mean())}
        return DataStepResult(caption_index=ctx.caption_index.clone(), flagged=~safe, keep=safe,
                              scores={"cosine": cos, "p_clean": p_clean}, summary=summary)

    def representation_record(self, trainer: Any, epoch: int, n: int = 512) -> dict[str, Any]:
        """A ``safeclip_repr`` log line: the temperature and the geometry of the embeddings of ``n`` seeded rows
        (mean off-diagonal cosine within images and within captions, mean own-pair cosine, clean views)."""
        rows = torch.randperm(len(trainer.data), generator=torch.Generator().manual_seed(self._seed))[:n].sort().values
        img, txt = embed_images(trainer, rows), embed_captions(trainer, trainer.caption_index[rows])
        off = ~torch.eye(len(rows), dtype=torch.bool, device=img.device)
        return {"type": "safeclip_repr", "epoch": epoch, "step": trainer.global_step,
                "logit_scale": round(float(trainer.logit_scale().detach()), 4),
                "image_cos": round(float((img @ img.t())[off].mean()), 5),
                "text_cos": round(float((txt @ txt.t())[off].mean()), 5),
                "pair_cos": round(float((img * txt).sum(-1).mean()), 5)}

    def on_epoch_start(self, trainer: Any, epoch: int) -> None:
        self.epoch = epoch
        if self.phase(epoch) != "mixed" or self.split_epoch == epoch:
            return  # nothing to do, or the split was restored from a mid-epoch checkpoint
        res = self.data_step(trainer, epoch)
        self.safe = res.keep.cpu()
        self.ratio = res.summary["ratio"]
        self.split_epoch = epoch
        record: dict[str, Any] = {"type": "safeclip", "epoch": epoch, "step": trainer.global_step + 1,
                                  **{k: round(v, 5) for k, v in res.summary.items()}}
        bs = getattr(getattr(trainer, "cfg", None), "batch_size", None)
        if bs is not None and int(self.safe.sum()) < bs:
            record["trained"] = False  # no full safe batch: this epoch trains nothing (epoch_indices)
        poison = torch.tensor([bool(p) for p in trainer.data.poison])
        if bool(poison.any()):
            record["risky_poison_recall"] = round(float((~self.safe[poison]).float().mean()), 5)
        trainer.log(record)

    def on_epoch_end(self, trainer: Any, epoch: int) -> None:
        if epoch + 1 in (self.options.unimodal_epochs, self.first_mixed_epoch):
            # after phase A and after phase B: what the warm-up left (why a split keeps nothing, docs/baselines.md)
            trainer.log(self.representation_record(trainer, epoch))

    def epoch_indices(self, trainer: Any, epoch: int, order: torch.Tensor) -> torch.Tensor:
        if self.phase(epoch) != "mixed":
            return order
        assert self.safe is not None
        bs = trainer.cfg.batch_size
        safe_rows = order[self.safe[order]]
        risky_rows = order[~self.safe[order]] if self.options.unimodal_on_risky else order[:0]
        # one pass over the risky pairs, then one over the safe ones; each drops its incomplete last batch
        # (the official loaders' drop_last), so no batch mixes the two losses
        risky_rows = risky_rows[: len(risky_rows) // bs * bs]
        kept_safe = safe_rows[: len(safe_rows) // bs * bs]
        if not len(kept_safe):
            # no full batch of safe pairs (the first split kept none, or fewer than a batch): the epoch trains
            # nothing. Its risky pass alone would be phase A again on (nearly) all data at phase C's peak rate,
            # which erases the cross-modal alignment the split needs (the official code reaches this case with
            # an empty CLIP loader; its unimodal pass then runs at ~2 % of the rate by a scheduler-index quirk)
            self._epoch_steps = 0
            return order[:0]
        rows = torch.cat([risky_rows, kept_safe])
        self._epoch_steps = len(rows) // bs
        return rows

    # ----------------------------------------------------------------------------------------------
    # losses

    def _bank(self, name: str, dim: int, device: torch.device) -> EmbeddingPool:
        bank = self.banks.get(name)
        if bank is None:
            bank = self.banks[name] = EmbeddingPool(self.options.bank_size, dim, device,
                                                    seed=self._seed * 2 + (name == "text"))
        elif bank.device != device:
            bank.to(device)
        return bank

    def _two_views(self, trainer: Any, batch: Any) -> tuple[torch.Tensor, ...]:
        """Features of two augmented image views and two EDA caption views (one forward per tower)."""
        images = torch.cat([augmented_batch_images(trainer, batch.rows, self.options.image_aug) for _ in range(2)])
        rows = batch.caption_rows
        tokens = torch.cat([self.views[0][rows], self.views[1][rows]]).to(trainer.device, non_blocking=True)
        img, txt = trainer.encode(images, tokens)
        b = len(batch.rows)
        return tuple(trainer.gather(t) for t in (img[:b], txt[:b], img[b:], txt[b:]))

    def unimodal_loss(self, trainer: Any, batch: Any) -> torch.Tensor:
        """½ (image NN loss + text NN loss) over two views of the batch."""
        img1, txt1, img2, txt2 = self._two_views(trainer, batch)
        scale = trainer.logit_scale()
        rows = trainer.gather(batch.rows.to(trainer.device))
        banks = ((self._bank("image", img1.shape[1], trainer.device), self._bank("text", txt1.shape[1], trainer.device))
                 if self.options.nn_bank else (None, None))
        li = nn_contrastive_loss(img1.detach(), img2, scale, banks[0], rows)
        lt = nn_contrastive_loss(txt1.detach(), txt2, scale, banks[1], rows)
        return 0.5 * (li + lt)

    def clip_loss(self, trainer: Any, batch: Any) -> torch.Tensor:
        """The CLIP loss of the phase-B/C passes (crossed augmented views with ``cross_aug``)."""
        if not self.options.cross_aug:
            return trainer.clip_batch_loss(batch)
        img1, txt1, img2, txt2 = self._two_views(trainer, batch)
        return cross_view_clip_loss(img1, txt1, img2, txt2, trainer.logit_scale())

    def batch_loss(self, trainer: Any, batch: Any) -> tuple[torch.Tensor, dict[str, float]]:
        phase = self.phase(self.epoch)
        if phase == "unimodal":
            return self.unimodal_loss(trainer, batch), {"phase": 0.0}
        if phase == "slow":
            return self.clip_loss(trainer, batch), {"phase": 1.0}
        assert self.safe is not None
        if not bool(self.safe[batch.rows[0]]):
            return self.unimodal_loss(trainer, batch), {"phase": 2.0, "risky": 1.0}
        return self.clip_loss(trainer, batch), {"phase": 2.0, "risky": 0.0}

    # ----------------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {
            "banks": {k: b.state_dict() for k, b in self.banks.items()},
            "split_epoch": self.split_epoch,
            "ratio": self.ratio,
            "safe": self.safe.clone() if self.safe is not None else None,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.banks = {k: EmbeddingPool.from_state(s) for k, s in state.get("banks", {}).items()}
        self.split_epoch = int(state.get("split_epoch", -1))
        self.ratio = state.get("ratio")
        self.safe = state["safe"].clone() if state.get("safe") is not None else None


def _lexsort_desc(primary: torch.Tensor, secondary: torch.Tensor):
    """Indices sorting by ``primary`` then ``secondary``, both descending (stable, deterministic)."""
    import numpy as np

    return np.lexsort((-secondary.double().numpy(), -primary.double().numpy())).astype(np.int64)

