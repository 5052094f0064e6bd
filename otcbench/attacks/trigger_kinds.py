"""Every trigger a poison manifest can hold, and the one function that applies a manifest's trigger.

The classic triggers (badnet, yellow, blended, sig, wanet) are :class:`~otcbench.attacks.triggers.TriggerSpec`;
two more live here, each a pydantic model stored whole in the manifest and re-read by ``eval --asr``, so the
test-time trigger is exactly the training-time one:

* :class:`OptimisedPatchTrigger` (``kind: optimised_patch``) — a square patch whose pixels are *data* (the
  ``optimised-patch`` attack optimises them against a surrogate CLIP and stores them, uint8, in the spec),
  pasted at a random (per image, from the rng) or fixed location like the badnet patch.
* :class:`StegoTrigger` (``kind: stego``) — a sample-specific, invisible residual in the spirit of ISSBA's
  encoder: a fixed random two-layer convolutional "encoder" (weights drawn from ``pattern_seed``) maps the
  image and a fixed ``code_bits`` secret to a residual bounded by ``epsilon`` in L∞ (a tanh), added to the
  image. The residual depends on the image's content, so it differs from image to image (not a fixed
  pattern), and it uses no draws from the rng, so poisoning and eval give identical images. It is a
  documented stand-in for ISSBA's *trained* StegaStamp encoder (docs/attacks.md): same properties
  (per-image, low-norm, carries a fixed code), no training.

Both leave the rng contract of :mod:`otcbench.attacks.triggers`: draws happen image by image, in batch order
(``optimised_patch``: top then left per image when ``location=random``; ``stego``: none).
"""

from __future__ import annotations

import functools
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator

from otcbench.attacks.triggers import TriggerSpec, apply_trigger, patch_index

__all__ = ["OptimisedPatchTrigger", "StegoTrigger", "apply_manifest_trigger", "manifest_trigger", "paste_patches",
           "patch_corners"]

Location = Literal["random", "bottom_right", "top_left", "center"]


class OptimisedPatchTrigger(BaseModel):
    """A patch with stored pixels (``patch``: uint8 ``[3][p][p]`` nested lists), pasted like badnet's."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    kind: Literal["optimised_patch"] = "optimised_patch"
    size: float = Field(0.375, gt=0, le=1, description="patch side as a fraction of the image side")
    location: Location = Field("random", description="patch position; random = uniform per image")
    patch: list[list[list[int]]] | None = Field(
        None, description="the optimised pixels, uint8 [3][p][p] (filled in by the attack; not set by hand)")

    @model_validator(mode="after")
    def _check_patch(self) -> OptimisedPatchTrigger:
        if self.patch is not None:
            arr = np.asarray(self.patch)
            if arr.ndim != 3 or arr.shape[0] != 3 or arr.shape[1] != arr.shape[2] or arr.min() < 0 or arr.max() > 255:
                raise ValueError("patch must be uint8 values in [0, 255] of shape [3][p][p]")
        return self

    def side(self, height: int, width: int) -> int:
        """Patch side in pixels on an ``height``×``width`` image (the badnet rule)."""
        return max(1, round(self.size * min(height, width)))

    def pixels(self, side: int) -> torch.Tensor:
        """The stored patch as uint8 ``[3, side, side]`` (nearest-neighbour resampled when sizes differ)."""
        if self.patch is None:
            raise ValueError("this optimised_patch trigger has no pixels yet (the attack fills them in)")
        p = torch.tensor(self.patch, dtype=torch.uint8)
        if p.shape[-1] != side:
            idx = (torch.arange(side) * p.shape[-1]) // side
            p = p[:, idx][:, :, idx]
        return p

    def apply(self, images: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
        """Triggered copy of uint8 ``[B, 3, H, W]`` images."""
        b, _, h, w = images.shape
        p = self.side(h, w)
        tops, lefts = patch_corners(self.location, b, h, w, p, rng)
        return paste_patches(images, self.pixels(p).to(images.device).unsqueeze(0).expand(b, 3, p, p), tops, lefts)


def patch_corners(location: str, b: int, h: int, w: int, p: int,
                  rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Top-left corners of ``b`` patches of side ``p``: drawn per image (top, then left) for ``random``."""
    tops = np.empty(b, dtype=np.int64)
    lefts = np.empty(b, dtype=np.int64)
    if location == "random":
        for i in range(b):
            tops[i] = rng.integers(0, h - p + 1)
            lefts[i] = rng.integers(0, w - p + 1)
    else:
        corner = {"top_left": (0, 0), "bottom_right": (h - p, w - p), "center": ((h - p) // 2, (w - p) // 2)}
        tops[:], lefts[:] = corner[location]
    return tops, lefts


def paste_patches(images: torch.Tensor, patches: torch.Tensor, tops: np.ndarray, lefts: np.ndarray) -> torch.Tensor:
    """``images`` with ``patches[b]`` ([B, 3, p, p], same dtype) pasted at (tops[b], lefts[b]); differentiable."""
    bidx, rows, cols = patch_index(tops, lefts, patches.shape[2], images.device)
    out = images.clone()
    out[bidx, :, rows, cols] = patches.permute(0, 2, 3, 1)
    return out


class StegoTrigger(BaseModel):
    """ISSBA-style sample-specific invisible trigger: ``x + ε·tanh(E(x, code))`` with a fixed random encoder E."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    kind: Literal["stego"] = "stego"
    epsilon: float = Field(8 / 255, gt=0, le=1, description="L∞ bound of the residual, in [0, 1] units")
    code_bits: int = Field(64, ge=1, le=4096, description="length of the fixed secret the encoder hides")
    hidden: int = Field(16, ge=1, le=256, description="channels of the encoder's hidden layer")
    pattern_seed: int | None = Field(
        None, ge=0, description="seeds the encoder weights and the secret (the attack draws it from the poisoning "
        "seed when None)")

    def residual(self, images: torch.Tensor) -> torch.Tensor:
        """The residual in [0, 255] units, float64 ``[B, 3, H, W]``, every entry strictly inside ±255·ε."""
        if self.pattern_seed is None:
            raise ValueError("a stego trigger needs its pattern_seed (the issba-like attack sets it)")
        b, _, h, w = images.shape
        w1, b1, w2, code = _stego_weights(self.code_bits, self.hidden, self.pattern_seed, h, w)
        x = images.to(torch.float64) / 127.5 - 1.0
        planes = code.to(images.device).expand(b, -1, -1, -1)
        z = torch.tanh(F.conv2d(torch.cat([x, planes], 1), w1.to(images.device), b1.to(images.device), padding=1))
        out = F.conv2d(z, w2.to(images.device), padding=1)
        # unit-variance per image, so every image spends the budget alike whatever its contrast
        out = out / (out.flatten(1).std(dim=1).view(b, 1, 1, 1) + 1e-12)
        return (255.0 * self.epsilon) * torch.tanh(out)

    def apply(self, images: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
        """Triggered copy of uint8 ``[B, 3, H, W]`` images (``rng`` unused: the residual is deterministic)."""
        del rng
        return (images.to(torch.float64) + self.residual(images)).clamp_(0, 255).round_().to(torch.uint8)


@functools.lru_cache(maxsize=8)
def _stego_weights(code_bits: int, hidden: int, seed: int, h: int, w: int) -> tuple[torch.Tensor, ...]:
    """Encoder weights and the secret's planes for a seed: (w1 [hidden,6,3,3], b1, w2 [3,hidden,3,3], code planes
    [1,3,H,W]); fan-in scaled so activations stay O(1). The secret (bits in ±1) goes through a fixed random
    linear map to 3 × 8 × 8 and is upsampled bilinearly to the image size, as StegaStamp spreads its code."""
    g = np.random.default_rng([seed, 0x155BA])
    bits = g.integers(0, 2, size=code_bits) * 2.0 - 1.0
    proj = g.standard_normal((3 * 8 * 8, code_bits)) / np.sqrt(code_bits)
    code = torch.from_numpy(proj @ bits).view(1, 3, 8, 8)
    code = F.interpolate(code, size=(h, w), mode="bilinear", align_corners=False)
    w1 = torch.from_numpy(g.standard_normal((hidden, 6, 3, 3)) / np.sqrt(6 * 9))
    b1 = torch.from_numpy(0.1 * g.standard_normal(hidden))
    w2 = torch.from_numpy(g.standard_normal((3, hidden, 3, 3)) / np.sqrt(hidden * 9))
    return w1, b1, w2, code


def manifest_trigger(spec: dict[str, Any]) -> TriggerSpec | OptimisedPatchTrigger | StegoTrigger:
    """The trigger model of a manifest entry's ``trigger`` dict, by its ``kind``."""
    kind = spec.get("kind")
    if kind == "optimised_patch":
        return OptimisedPatchTrigger.model_validate(spec)
    if kind == "stego":
        return StegoTrigger.model_validate(spec)
    return TriggerSpec.model_validate(spec)


def apply_manifest_trigger(spec: dict[str, Any] | BaseModel, images: torch.Tensor,
                           rng: np.random.Generator) -> torch.Tensor:
    """Apply any manifest trigger to uint8 ``[B, 3, H, W]`` images (the one path poisoning and eval share)."""
    trig = manifest_trigger(spec) if isinstance(spec, dict) else spec
    if isinstance(trig, TriggerSpec):
        return apply_trigger(trig, images, rng)
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be uint8 [B, 3, H, W], got {images.dtype} {tuple(images.shape)}")
    return trig.apply(images, rng)  # type: ignore[union-attr]
