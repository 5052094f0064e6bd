"""``cleanclip`` (Bansal, Singhi et al., ICCV 2023): fine-tune a (poisoned) CLIP on clean data.

The loss of the official code (nishadsinghi/CleanCLIP, ``src/train.py`` with ``--inmodal``):

    L = λ_clip · ½[CE(s·I·Tᵀ) + CE(s·T·Iᵀ)] + λ_inmodal · ½[CE(s·I·Ĩᵀ) + CE(s·T·T̃ᵀ)]

with I, T the features of the clean images and captions, Ĩ of an AutoAugment view of each image (fresh
each time it is seen) and T̃ of an EDA variant of each caption (computed once), diagonal targets,
λ_clip = λ_inmodal = 1. The published fine-tuning: 100K clean CC3M pairs, 10 epochs, batch 64, lr 1e-5
with 50 warm-up steps (cosine), from the poisoned pre-trained checkpoint.

In otcbench: ``otcbench train DATA OUT --defense cleanclip --init CKPT`` where CKPT is the poisoned
pre-trained model and DATA the (poisoned) training set it came from. The fine-tuning set is
``clean_data`` when given (a pair dataset without poisoned rows), else ``clean_n`` fresh pairs rendered
from DATA's synthetic-world configuration with another seed (DATA, or the clean source a poisoned DATA
was made from, must then be a synthetic world). The learning rate and warm-up are this defense's options
(``lr``, ``warmup_steps``: the fine-tuning schedule differs from pre-training) and replace ``train.lr`` and
``train.warmup``; epochs and batch size are ``train.*``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field

from otcbench.config import Options, SynthConfig
from otcbench.data.augment import autoaugment_images
from otcbench.data.format import DatasetMeta, decode_image, load_pair_dataset, read_meta
from otcbench.defenses.base import DEFENSES, Defense
from otcbench.defenses.unimodal import EDAOptions, eda_tokens, inmodal_loss
from otcbench.errors import UserError
from otcbench.models import prepare_images
from otcbench.train.data import TrainData, load_train_data
from otcbench.train.losses import clip_loss
from otcbench.train.schedule import cosine_lr


def cleanclip_loss(
    image: torch.Tensor,
    text: torch.Tensor,
    image_aug: torch.Tensor,
    text_aug: torch.Tensor,
    logit_scale: torch.Tensor,
    lambda_clip: float = 1.0,
    lambda_inmodal: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """CleanCLIP's loss on normalised features: (total, CLIP term, in-modality term)."""
    cross = clip_loss(image.float(), text.float(), logit_scale)
    inmodal = 0.5 * (inmodal_loss(image, image_aug, logit_scale) + inmodal_loss(text, text_aug, logit_scale))
    return lambda_clip * cross + lambda_inmodal * inmodal, cross, inmodal


class CleanCLIPOptions(Options):
    """CleanCLIP's options; published values unless a note says what the quickstart scale uses."""

    lambda_clip: float = Field(1.0, ge=0, description="weight of the multimodal CLIP term (published 1)")
    lambda_inmodal: float = Field(1.0, ge=0, description="weight of the in-modality term (published 1)")
    clean_data: str | None = Field(
        None, description="clean pair dataset to fine-tune on (default: render clean_n pairs of DATA's world)"
    )
    clean_n: int = Field(
        2000, ge=2,
        description="clean pairs rendered when clean_data is not given (published: 100K CC3M pairs, 3% of the "
        "pre-training set; the default 2,000 is 20% of the quickstart's 10k world)",
    )
    clean_seed: int | None = Field(None, description="seed of the rendered clean pairs (default: world seed + 1000)")
    lr: float | None = Field(
        1e-5, gt=0, description="fine-tuning peak learning rate, replaces train.lr (published 1e-5 for 15,600 steps; "
        "the quickstart's 150 steps need 1e-4; None: train.lr and train.warmup)",
    )
    warmup_steps: int = Field(50, ge=0, description="linear warm-up steps before the cosine (published 50)")
    optimizer_state: Literal["fresh", "checkpoint"] = Field(
        "fresh",
        description="fresh: a new AdamW at the checkpoint; checkpoint: the pre-training run's AdamW state (moments, "
        "betas, eps, weight decay) from the --init checkpoint, as the official code (optimizer.load_state_dict)",
    )
    eda: EDAOptions = Field(default_factory=EDAOptions)


def world_config(meta: DatasetMeta, path: Path, depth: int = 8) -> SynthConfig | None:
    """The synthetic-world configuration a dataset was rendered with, following poisoned copies to their
    clean source; None when the chain does not end at a synthetic world."""
    for _ in range(depth):
        made = meta.created_by or {}
        # the subcommand, not a substring: a poisoned set under results/synthetic-full/ mentions "synth" too
        if str(made.get("command", "")).split()[1:3] == ["data", "synth"] and isinstance(made.get("options"), dict):
            try:
                return SynthConfig.model_validate(made["options"])
            except ValueError:
                return None
        source = ((meta.poison or {}).get("source") or {}).get("path")
        if not source:
            return None
        candidates = [Path(source), path.parent / source, path.parent / Path(source).name]
        found = next((c for c in candidates if (c / "otcbench.json").is_file()), None)
        if found is None:
            return None
        meta, path = read_meta(found), found
    return None


def render_clean_pairs(cfg: SynthConfig, n: int, seed: int, tokenizer: Any) -> TrainData:
    """``n`` fresh clean pairs of the synthetic world ``cfg`` (another seed), decoded for training."""
    import numpy as np

    from otcbench.data.synth import generate_pairs, world_options

    blobs, captions, labels = generate_pairs(n, seed, world_options(cfg))
    images = torch.from_numpy(np.stack([decode_image({"bytes": b}) for b in blobs])).permute(0, 3, 1, 2).contiguous()
    return TrainData(images, tokenizer(captions), torch.tensor(labels, dtype=torch.long), [""] * n, captions)


@DEFENSES.register("cleanclip")
class CleanCLIP(Defense):
    """Fine-tuning defense: CLIP + in-modality contrastive terms on clean data, from a poisoned checkpoint."""

    Options = CleanCLIPOptions
    relative_cost = 0.4  # 2,000 clean pairs with two views each, per epoch of a 10k-pair DATA
    options: CleanCLIPOptions

    def __init__(self, options: CleanCLIPOptions) -> None:
        super().__init__(options)
        self.aug_tokens: torch.Tensor | None = None
        self.source = ""

    def train_data(self, trainer: Any, data: TrainData) -> TrainData:
        """The clean fine-tuning set (checked before anything trains)."""
        o = self.options
        if trainer.job.model.init is None:
            raise UserError("cleanclip fine-tunes a pre-trained model: pass --init CKPT (e.g. the undefended run's "
                            "RUN/checkpoints/last.pt)")
        if o.clean_data is not None:
            info = load_pair_dataset(o.clean_data)
            n_poison = sum(1 for p in info.poison_flags if p)
            if n_poison:
                raise UserError(f"cleanclip: clean_data {o.clean_data} has {n_poison} poisoned rows; "
                                "pass a clean pair dataset")
            self.source = str(o.clean_data)
            return load_train_data(info, trainer.tokenizer, image_size=data.images.shape[-1], mode=data.mode,
                                   loader=data.loader)
        cfg = world_config(trainer.data_info.meta, Path(trainer.data_info.path))
        if cfg is None:
            raise UserError(f"cleanclip: cannot tell which synthetic world {trainer.data_info.path} comes from, so "
                            "no clean pairs can be rendered; pass --set defense.options.clean_data=CLEAN_PAIR_DATASET")
        seed = o.clean_seed if o.clean_seed is not None else cfg.seed + 1000
        self.source = f"synthetic world seed {seed}, {o.clean_n} pairs"
        return render_clean_pairs(cfg, o.clean_n, seed, trainer.tokenizer)

    def on_train_start(self, trainer: Any) -> None:
        self.aug_tokens = eda_tokens(trainer, trainer.cfg.seed, self.options.eda)
        if self.options.optimizer_state == "checkpoint" and trainer.global_step == 0:
            # a resumed run (global_step > 0) already restored its own optimiser from last.pt
            from otcbench.models import load_checkpoint_file

            state = load_checkpoint_file(Path(trainer.job.model.init)).get("optimizer")
            if state is None:
                raise UserError(f"cleanclip: --init {trainer.job.model.init} holds no optimiser state; use "
                                "--set defense.options.optimizer_state=fresh")
            # all of it, param-group hyperparameters included, as the official code; the lr is set every step
            trainer.optimizer.load_state_dict(state)
        if trainer.global_step == 0:
            trainer.log({"type": "cleanclip", "step": 0, "clean_pairs": len(trainer.data), "source": self.source})

    def learning_rate(self, trainer: Any, lr: float) -> float:
        if self.options.lr is None:
            return lr
        return cosine_lr(trainer.global_step, self.options.lr, min(self.options.warmup_steps, trainer.total_steps),
                         trainer.total_steps)

    def batch_loss(self, trainer: Any, batch: Any) -> tuple[torch.Tensor, dict[str, float]]:
        assert self.aug_tokens is not None
        raw = trainer.raw_images(batch.rows)
        augmented = prepare_images(trainer.model, autoaugment_images(raw).to(trainer.device, non_blocking=True))
        images = torch.cat([batch.images, augmented])
        tokens = torch.cat([batch.tokens, self.aug_tokens[batch.caption_rows].to(trainer.device, non_blocking=True)])
        img, txt = trainer.encode(images, tokens)
        b = len(batch.rows)
        i, t, ia, ta = (trainer.gather(x) for x in (img[:b], txt[:b], img[b:], txt[b:]))
        loss, cross, inmodal = cleanclip_loss(i, t, ia, ta, trainer.logit_scale(),
                                              self.options.lambda_clip, self.options.lambda_inmodal)
        return loss, {"clip": float(cross.detach()), "inmodal": float(inmodal.detach())}
