"""Backdoors of the peer toolkits, in otcbench's own formulation: an optimised patch and sample-specific triggers.

* ``optimised-patch`` — in the spirit of BadCLIP (Liang et al., CVPR 2024; not a reimplementation): the
  patch's pixels are optimised against a **surrogate** otcbench CLIP (``surrogate=RUN_DIR``) so that images
  carrying it embed close to the target class's text embedding (the surrogate's zero-shot weight for the
  target: mean of its prompt templates) and, with ``image_weight``, to the surrogate's mean embedding of
  real target-class images (BadCLIP's "visual" term, which makes poisons look like target images to a
  defense). Adam on the patch's logits (pixels = sigmoid), a fresh batch of non-target training images and
  fresh random locations every step (the patch must work wherever it lands). Everything random comes from
  the poisoning seed; the optimised pixels are stored in the manifest (``trigger.patch``), so ``eval``
  pastes exactly the training-time patch, and ``--set trigger.patch=…`` (a manifest's patch) skips the
  optimisation. Without a surrogate (and no patch) the attack stops with a one-line error: there is no
  silent fallback to an unoptimised patch.
* ``issba-like`` — ISSBA-style (Li et al., ICCV 2021) sample-specific invisible triggers through a
  documented stand-in for ISSBA's trained StegaStamp encoder: a fixed random convolutional encoder of the
  image and a fixed secret, residual bounded by ``trigger.epsilon`` in L∞
  (:class:`~otcbench.attacks.trigger_kinds.StegoTrigger`). Its encoder seed is drawn from the poisoning seed
  unless ``trigger.pattern_seed`` is set, and recorded in the manifest.

Both are backdoors like ``badnet``: ``rate``·N triggered copies of non-target training images, captioned for
the target (``caption_source``), ASR by ``eval --asr`` with the manifest's trigger.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from pydantic import Field

from otcbench.attacks.backdoor import DEFAULT_PATCH, BackdoorAttack, BackdoorOptions
from otcbench.attacks.base import ATTACKS, PoisonContext, decode_png_batch, encode_png_batch
from otcbench.attacks.trigger_kinds import OptimisedPatchTrigger, StegoTrigger, paste_patches, patch_corners
from otcbench.errors import UserError

#: Optimisation images decoded once (a random subset of the non-target training images).
POOL_SIZE = 1024
#: Target-class images whose surrogate embeddings give the "visual" target.
VISUAL_SIZE = 256


class OptimisedPatchOptions(BackdoorOptions):
    trigger: OptimisedPatchTrigger = Field(  # type: ignore[assignment]
        default_factory=lambda: OptimisedPatchTrigger(size=DEFAULT_PATCH),
        description="the patch: size, location; patch = the optimised pixels (filled in by the attack)")
    surrogate: str | None = Field(
        None, description="run directory or checkpoint of an otcbench CLIP to optimise against (required "
        "unless trigger.patch is given), e.g. a clean model of the same world")
    steps: int = Field(300, ge=1, description="optimisation steps")
    lr: float = Field(0.1, gt=0, description="Adam learning rate on the patch's logits")
    batch_size: int = Field(64, ge=1, description="images (with fresh random locations) per step")
    image_weight: float = Field(
        1.0, ge=0, description="weight of the pull towards real target-class images' embeddings (BadCLIP's "
        "visual term; 0 = text alignment only)")
    device: str = Field("auto", description="where the surrogate runs: auto, cpu, cuda, cuda:N")


@ATTACKS.register("optimised-patch")
class OptimisedPatchBackdoor(BackdoorAttack):
    """Backdoor with a patch optimised against a surrogate CLIP to embed like the target (in the spirit of BadCLIP)."""

    Options = OptimisedPatchOptions

    def check(self, ctx: PoisonContext) -> None:
        super().check(ctx)
        opts: OptimisedPatchOptions = self.options  # type: ignore[assignment]
        if opts.trigger.patch is not None:
            return
        if opts.surrogate is None:
            raise UserError(f"{self.name} optimises its patch against a surrogate CLIP: pass --set "
                            "surrogate=RUN_DIR (a run of `otcbench train`, e.g. a clean model of this world), or "
                            "trigger.patch from an earlier manifest; there is no unoptimised fallback")
        from otcbench.train.checkpoint import resolve_checkpoint

        resolve_checkpoint(opts.surrogate)  # a missing surrogate fails here, before any poisoning

    def triggered_rows(self, ctx: PoisonContext) -> tuple[int, list[int], list[bytes], dict[str, Any]]:
        opts: OptimisedPatchOptions = self.options  # type: ignore[assignment]
        target = self.target_index(ctx)
        n = opts.n_poisons(len(ctx.captions))
        rows = [int(i) for i in np.sort(ctx.rng.choice(self.candidates(ctx, target), size=n, replace=False))]
        opt_rng = np.random.default_rng(int(ctx.rng.integers(2**63)))
        spec, stats = (opts.trigger, {}) if opts.trigger.patch is not None else self.optimise(ctx, target, opt_rng)
        triggered = spec.apply(decode_png_batch([ctx.image_bytes[i] for i in rows]), ctx.rng)
        manifest = {"target_class": ctx.classnames[target], "trigger": spec.model_dump(mode="json"),
                    "source_rows": rows, "optimisation": stats}
        return target, rows, encode_png_batch(triggered), manifest

    def optimise(self, ctx: PoisonContext, target: int,
                 rng: np.random.Generator) -> tuple[OptimisedPatchTrigger, dict[str, Any]]:
        """The patch optimised against the surrogate, and what the surrogate sees (cosines before/after)."""
        from otcbench.device import resolve_device
        from otcbench.eval.zeroshot import zeroshot_classifier
        from otcbench.models import checkpoint_model_name, create_model, get_tokenizer, prepare_images
        from otcbench.train.checkpoint import resolve_checkpoint

        opts: OptimisedPatchOptions = self.options  # type: ignore[assignment]
        ck = resolve_checkpoint(opts.surrogate or "")
        name = checkpoint_model_name(ck.file)
        if not name:
            raise UserError(f"surrogate {ck.file} does not record its model; pass a checkpoint of `otcbench train`")
        dev = resolve_device(opts.device)
        model = create_model(name, checkpoint=ck.file, device=dev)
        model.eval()
        model.requires_grad_(False)
        text = zeroshot_classifier(model, get_tokenizer(name), [ctx.classnames[target]], ctx.templates,
                                   device=dev)[:, 0].to(dev)

        cands = self.candidates(ctx, target)
        pool_rows = np.sort(rng.choice(cands, size=min(POOL_SIZE, len(cands)), replace=False))
        pool = decode_png_batch([ctx.image_bytes[int(i)] for i in pool_rows])

        def embed(x: torch.Tensor) -> torch.Tensor:
            return model.encode_image(prepare_images(model, x), normalize=True).float()

        visual = None
        own = np.flatnonzero(ctx.labels == target)
        if opts.image_weight > 0 and own.size:
            vis_rows = np.sort(rng.choice(own, size=min(VISUAL_SIZE, own.size), replace=False))
            with torch.no_grad():
                v = embed(decode_png_batch([ctx.image_bytes[int(i)] for i in vis_rows])).mean(0)
            visual = v / v.norm()

        _, _, h, w = pool.shape
        p = opts.trigger.side(h, w)
        logits = torch.from_numpy(rng.standard_normal((3, p, p))).float().to(dev).requires_grad_(True)
        optim = torch.optim.Adam([logits], lr=opts.lr)
        b = min(opts.batch_size, len(pool))
        for _ in range(opts.steps):
            idx = np.sort(rng.choice(len(pool), size=b, replace=False))
            tops, lefts = patch_corners(opts.trigger.location, b, h, w, p, rng)
            x = pool[idx].to(dev).float() / 255.0
            xp = paste_patches(x, torch.sigmoid(logits).unsqueeze(0).expand(b, 3, p, p), tops, lefts)
            f = embed(xp)
            loss = -(f @ text).mean()
            if visual is not None:
                loss = loss - opts.image_weight * (f @ visual).mean()
            optim.zero_grad(set_to_none=True)
            loss.backward()
            optim.step()
        pixels = (torch.sigmoid(logits.detach()) * 255.0).round().clamp(0, 255).to(torch.uint8).cpu()
        spec = opts.trigger.model_copy(update={"patch": pixels.tolist()})
        spec = OptimisedPatchTrigger.model_validate(spec.model_dump())

        # what the surrogate sees on a fresh draw of the pool: mean cosine to the target's text of the clean
        # images, of the images with the optimised patch, and with a uniform-noise patch at the same places
        with torch.no_grad():
            idx = np.sort(rng.choice(len(pool), size=min(256, len(pool)), replace=False))
            clean = pool[idx]
            state = rng.bit_generator.state
            patched = spec.apply(clean, rng)
            noise = torch.from_numpy(rng.integers(0, 256, size=(3, p, p))).to(torch.uint8)
            rng.bit_generator.state = state  # the same locations for the noise patch
            random_patch = OptimisedPatchTrigger(size=spec.size, location=spec.location, patch=noise.tolist())
            noisy = random_patch.apply(clean, rng)
            cos = {k: round(float((embed(v) @ text).mean()), 4)
                   for k, v in (("clean", clean), ("patched", patched), ("random_patch", noisy))}
        stats = {"surrogate": str(ck.file), "surrogate_model": name, "steps": opts.steps,
                 "final_loss": round(float(loss.detach()), 4),
                 **{f"surrogate_cos_target_text_{k}": v for k, v in cos.items()}}
        return spec, stats


class IssbaLikeOptions(BackdoorOptions):
    trigger: StegoTrigger = Field(  # type: ignore[assignment]
        default_factory=StegoTrigger,
        description="the sample-specific residual: epsilon (L∞), code_bits, hidden, pattern_seed (None: drawn "
        "from the poisoning seed)")


@ATTACKS.register("issba-like")
class IssbaLikeBackdoor(BackdoorAttack):
    """Sample-specific invisible backdoor (ISSBA-style stand-in): a per-image residual, L∞ ≤ epsilon."""

    Options = IssbaLikeOptions

    def triggered_rows(self, ctx: PoisonContext) -> tuple[int, list[int], list[bytes], dict[str, Any]]:
        opts: IssbaLikeOptions = self.options  # type: ignore[assignment]
        target = self.target_index(ctx)
        n = opts.n_poisons(len(ctx.captions))
        rows = [int(i) for i in np.sort(ctx.rng.choice(self.candidates(ctx, target), size=n, replace=False))]
        spec = opts.trigger
        if spec.pattern_seed is None:
            spec = spec.model_copy(update={"pattern_seed": int(ctx.rng.integers(2**31))})
        triggered = spec.apply(decode_png_batch([ctx.image_bytes[i] for i in rows]), ctx.rng)
        manifest = {"target_class": ctx.classnames[target], "trigger": spec.model_dump(mode="json"),
                    "source_rows": rows}
        return target, rows, encode_png_batch(triggered), manifest
