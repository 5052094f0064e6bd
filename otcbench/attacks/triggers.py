"""Backdoor triggers as pure functions of (spec, uint8 images, numpy Generator).

The same code triggers the poisoned training images (``otcbench poison``) and the test images
(``otcbench eval --asr``), so a trigger is fully described by a :class:`TriggerSpec` (stored as JSON in the
poison manifest) plus the state of the ``numpy.random.Generator`` handed in. Nothing here touches global
random state (no ``torch.rand``/``random``), so results do not depend on what else ran before.

Triggers follow CleanCLIP's official ``backdoor/utils.py::apply_trigger``, on images
of any size, with these documented differences:

- ``badnet``: the patch (image mean + noise) is clipped to [0, 1] before quantisation. CleanCLIP does
  not clip and converts with ``mul(255).byte()``, which wraps out-of-range values; clipping keeps the patch a
  valid image and is what the trigger obviously intends.
- Float → uint8 conversion rounds to the nearest integer (ties to even) instead of truncating, so a
  trigger whose effect is zero (e.g. ``alpha=0``) returns the input unchanged.
- Random patch positions are uniform over *all* valid top-left corners (CleanCLIP's
  ``randint(0, 223 - patch_size)`` never uses the last row/column).
- ``sig`` is *blended*: ``(1 - alpha)·x + alpha·amplitude·sin(2π·f·j/W)`` (with alpha = 0.2 by default), because
  that is what CleanCLIP's code does (SIG only works with ``patch_location='blended'`` there).
  The original SIG paper's additive form ``x + amplitude·sin(…)`` is ``sig_mode="add"``.
- ``wanet``: the control grid is drawn with numpy from ``pattern_seed`` (CleanCLIP draws it once with an
  unseeded ``torch.rand`` and caches it in a file), the default is WaNet's ``k=4, s=0.5`` (CleanCLIP's
  file uses ``k=224, s=1``: set ``wanet_k``/``wanet_s``), and sampling uses ``padding_mode="border"``.
  For square images the grid is CleanCLIP's ``identity + s·noise/H``; for non-square ones the x offset is
  divided by W and the y offset by H, so the warp has the same strength in pixels along both axes.

Reproducibility contract (the rng draw order). Draws are made image by image in batch order, and the
draws for one image depend only on (spec, H, W), never on the batch size:

- ``badnet``: for each image, ``rng.integers(0, H - p + 1)`` (top) then ``rng.integers(0, W - p + 1)``
  (left) when ``location == "random"``; then, unless ``fixed_pattern``, ``rng.standard_normal((3, c, c))``
  (channel, row, column) with ``c = ceil(p / noise_cell)`` (``c = p`` by default); each value fills a
  ``noise_cell``-pixel square, and the patch keeps its top-left p×p.
- ``yellow``: for each image, top then left as above when ``location == "random"``; nothing otherwise.
- ``blended``: for each image, unless ``fixed_pattern``, ``rng.random((3, H, W))``.
- ``sig``, ``wanet``: no draws (both are deterministic; wanet's grid comes from ``pattern_seed``).

Fixed patterns (``fixed_pattern``, the wanet grid) are drawn from ``numpy.random.default_rng(pattern_seed)``
at the size they are used at (badnet: ``standard_normal((3, c, c))``, blended: ``random((3, H, W))``,
wanet: ``random((1, 2, k, k))``), so they are the same in poisoning and eval at the same image size.

Hence applying a trigger to a batch in one call, or to consecutive slices of it with the same rng, gives
identical images and leaves the rng in the same state. The arithmetic (cheap next to drawing) is
vectorised over the batch, in float64 so that the outputs are exact to the formulas below.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field

__all__ = [
    "PATCH_KINDS",
    "TriggerKind",
    "TriggerSpec",
    "apply_trigger",
    "patch_side",
    "sig_signal",
    "trigger_mask",
    "wanet_grid",
]

TriggerKind = Literal["badnet", "yellow", "blended", "sig", "wanet"]

#: Triggers that paste a square patch (and so have a :func:`trigger_mask`); the others touch every pixel.
PATCH_KINDS: frozenset[str] = frozenset({"badnet", "yellow"})

# Float work is done in chunks of at most this many elements, so a large batch of 224 px images does not
# need gigabytes of float64 at once (every operation is per image, so chunking cannot change results).
_CHUNK_ELEMENTS = 1 << 22


class TriggerSpec(BaseModel):
    """A backdoor trigger: which kind, and its parameters (options irrelevant to ``kind`` are ignored).

    Stored in the poison manifest as JSON and re-read by eval, so the test-time trigger is exactly the
    training-time one. Unknown keys, out-of-range values and NaN/inf are validation errors.
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    kind: TriggerKind = Field(description="badnet | yellow | blended | sig | wanet")
    size: float = Field(16 / 224, gt=0, le=1, description="patch side as a fraction of the image side (badnet, yellow)")
    location: Literal["random", "bottom_right", "top_left", "center"] = Field(
        "random", description="patch position (badnet, yellow); random = uniform over valid corners, per image"
    )
    noise_std: float = Field(
        1.0, ge=0, description="badnet: std of the Gaussian noise added to the image mean, in [0, 1] units"
    )
    noise_cell: int = Field(
        1, ge=1, le=1024, description="badnet: side in pixels of one noise cell (1 = per-pixel noise, CleanCLIP's); "
        "cells as large as a tiny model's first downsampling survive its pooling (docs/attacks.md)"
    )
    fixed_pattern: bool = Field(
        False,
        description="badnet/blended: one noise pattern drawn from pattern_seed instead of fresh noise per image",
    )
    pattern_seed: int = Field(
        0, ge=0, description="seeds the fixed patterns (badnet/blended fixed_pattern, the wanet grid)"
    )
    alpha: float = Field(0.2, ge=0, le=1, description="blend weight of the noise (blended) or sinusoid (sig)")
    sig_amplitude: float = Field(60 / 255, ge=0, le=1, description="sig: sinusoid amplitude in [0, 1] units")
    sig_frequency: float = Field(6, gt=0, description="sig: periods across the image width")
    sig_mode: Literal["blend", "add"] = Field(
        "blend",
        description="sig: blend = (1-alpha)·x + alpha·signal (CleanCLIP); add = x + signal (SIG paper)",
    )
    wanet_k: int = Field(4, ge=1, le=1024, description="wanet: control grid side (WaNet paper 4; CleanCLIP 224)")
    wanet_s: float = Field(0.5, ge=0, description="wanet: warping strength (WaNet paper 0.5; CleanCLIP 1)")


def patch_side(spec: TriggerSpec, height: int, width: int) -> int:
    """Side in pixels of a patch trigger on an ``height``×``width`` image: ``max(1, round(size·min(H, W)))``."""
    # Python's round (ties to even); size <= 1 guarantees the patch fits.
    return max(1, round(spec.size * min(height, width)))


def patch_index(tops: np.ndarray, lefts: np.ndarray, p: int,
                device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(batch [B, 1, 1], rows [B, p, 1], cols [B, 1, p]) indices of the p×p patch at (tops[b], lefts[b]) in image b:
    ``out[bidx, :, rows, cols]`` is every image's patch region, [B, p, p, C]."""
    b = len(tops)
    ar = torch.arange(p, device=device)
    rows = torch.from_numpy(tops).to(device).view(b, 1, 1) + ar.view(1, p, 1)
    cols = torch.from_numpy(lefts).to(device).view(b, 1, 1) + ar.view(1, 1, p)
    return torch.arange(b, device=device).view(b, 1, 1), rows, cols


def apply_trigger(spec: TriggerSpec, images: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """Return a triggered copy of ``images`` (uint8 ``[B, 3, H, W]``); the input is never modified.

    Randomness is drawn only from ``rng``, in the order documented in the module docstring, so the same
    (spec, images, rng state) always gives the same output, and splitting a batch into consecutive calls
    with the same rng gives the same result as one call. Raises ``ValueError`` for images that are not
    uint8 ``[B, 3, H, W]`` and ``TypeError`` for a spec or rng of the wrong type.
    """
    out, _ = _apply(spec, images, rng, want_mask=False)
    return out


def trigger_mask(spec: TriggerSpec, images: torch.Tensor, rng: np.random.Generator) -> torch.Tensor | None:
    """Which pixels a patch trigger overwrites: bool ``[B, H, W]``, or ``None`` for whole-image triggers.

    Consumes exactly the draws :func:`apply_trigger` would, so an rng in the same state (e.g. a
    ``copy.deepcopy`` of it, or one built from the same seed) yields the mask matching that call's output.
    Note that a pixel inside the mask may keep its value when the patch happens to equal the image there.
    """
    _, mask = _apply(spec, images, rng, want_mask=True)
    return mask


def wanet_grid(spec: TriggerSpec, height: int, width: int) -> torch.Tensor:
    """The fixed WaNet sampling grid ``[1, H, W, 2]`` (float64, (x, y) in [-1, 1]) for ``spec.pattern_seed``.

    Depends only on (wanet_k, wanet_s, pattern_seed, H, W), never on the rng passed to
    :func:`apply_trigger`, so poisoning and eval warp identically.
    """
    return _wanet_grid_cached(spec.wanet_k, spec.wanet_s, spec.pattern_seed, height, width).clone()


def sig_signal(spec: TriggerSpec, width: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """The SIG signal ``amplitude·sin(2π·f·j/W)`` per column j, in [0, 255] units (float64, ``[W]``)."""
    j = torch.arange(width, dtype=torch.float64, device=device)
    return (255.0 * spec.sig_amplitude) * torch.sin((2 * math.pi * spec.sig_frequency / width) * j)


# --------------------------------------------------------------------------------------------------------
# implementation


def _check_inputs(spec: object, images: object, rng: object) -> None:
    if not isinstance(spec, TriggerSpec):
        raise TypeError(f"spec must be a TriggerSpec, got {type(spec).__name__}")
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"rng must be a numpy.random.Generator (np.random.default_rng(seed)), got {type(rng).__name__}")
    if not isinstance(images, torch.Tensor):
        raise ValueError(f"images must be a torch.Tensor (uint8 [B, 3, H, W]), got {type(images).__name__}")
    if images.dtype != torch.uint8:
        raise ValueError(f"images must be uint8 in [0, 255] with shape [B, 3, H, W], got dtype {images.dtype}")
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must have shape [B, 3, H, W] (uint8, RGB), got {tuple(images.shape)}")
    if images.shape[2] < 1 or images.shape[3] < 1:
        raise ValueError(f"images must have a non-empty height and width, got {tuple(images.shape)}")


def _apply(
    spec: TriggerSpec, images: torch.Tensor, rng: np.random.Generator, *, want_mask: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    _check_inputs(spec, images, rng)
    if spec.kind in PATCH_KINDS:
        return _apply_patch(spec, images, rng, want_mask=want_mask)
    if spec.kind == "blended":
        out = _apply_blended(spec, images, rng)
    elif spec.kind == "sig":
        out = _apply_sig(spec, images)
    elif spec.kind == "wanet":
        out = _apply_wanet(spec, images)
    else:  # pragma: no cover - the Literal type makes this unreachable
        raise ValueError(f"unknown trigger kind {spec.kind!r}")
    return out, None


def _to_uint8(x: torch.Tensor) -> torch.Tensor:
    """Float in [0, 255] units → uint8, clipping and rounding to nearest (ties to even)."""
    return x.clamp_(0, 255).round_().to(torch.uint8)


def _chunks(n_images: int, per_image: int) -> Iterator[tuple[int, int]]:
    """Consecutive ``(start, end)`` batch slices of at most ``_CHUNK_ELEMENTS`` elements (at least 1 image)."""
    step = max(1, _CHUNK_ELEMENTS // max(1, per_image))
    for start in range(0, n_images, step):
        yield start, min(n_images, start + step)


def _fixed_corner(location: str, height: int, width: int, p: int) -> tuple[int, int]:
    if location == "top_left":
        return 0, 0
    if location == "bottom_right":
        return height - p, width - p
    if location == "center":
        return (height - p) // 2, (width - p) // 2
    raise ValueError(f"not a fixed location: {location!r}")  # pragma: no cover


def _apply_patch(
    spec: TriggerSpec, images: torch.Tensor, rng: np.random.Generator, *, want_mask: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    b, _, h, w = images.shape
    p = patch_side(spec, h, w)
    random_loc = spec.location == "random"
    fresh_noise = spec.kind == "badnet" and not spec.fixed_pattern

    # Draws, image by image (the reproducibility contract): [top, left] then [noise]. This Python loop
    # costs a few microseconds per image; everything after it is vectorised.
    tops = np.empty(b, dtype=np.int64)
    lefts = np.empty(b, dtype=np.int64)
    cell = spec.noise_cell
    c = -(-p // cell)  # noise values per side
    noise = np.empty((b, 3, c, c), dtype=np.float64) if fresh_noise else None
    if not random_loc:
        tops[:], lefts[:] = _fixed_corner(spec.location, h, w, p)
    for i in range(b):
        if random_loc:
            tops[i] = rng.integers(0, h - p + 1)
            lefts[i] = rng.integers(0, w - p + 1)
        if noise is not None:
            noise[i] = rng.standard_normal((3, c, c))

    dev = images.device
    if spec.kind == "yellow":
        patch = torch.tensor([255, 255, 0], dtype=torch.uint8, device=dev).view(1, 3, 1, 1).expand(b, 3, p, p)
    else:  # badnet: per-image, per-channel mean + N(0, noise_std) in [0, 1] units, clipped
        # Mean in float64 over integers is exact whatever the summation order, so images with the same
        # pixel multiset get the same mean (and, with fixed_pattern, the same patch).
        mean = images.to(torch.float64).mean(dim=(2, 3)).view(b, 3, 1, 1)
        if noise is None:
            pattern_rng = np.random.default_rng(spec.pattern_seed)
            z = torch.from_numpy(pattern_rng.standard_normal((3, c, c))).to(dev).unsqueeze(0)
        else:
            z = torch.from_numpy(noise).to(dev)
        if cell > 1:  # each value fills a cell×cell square; the patch keeps the top-left p×p
            z = z.repeat_interleave(cell, dim=2).repeat_interleave(cell, dim=3)[:, :, :p, :p]
        patch = _to_uint8(mean + (255.0 * spec.noise_std) * z)

    # Paste all patches at once with advanced indexing: out[b, :, top_b + r, left_b + c] = patch[b, :, r, c].
    bidx, rows, cols = patch_index(tops, lefts, p, dev)
    out = images.clone()
    # With a slice between advanced indices, the indexed dims come first: the target is [B, p, p, 3].
    out[bidx, :, rows, cols] = patch.permute(0, 2, 3, 1)
    mask = None
    if want_mask:
        mask = torch.zeros((b, h, w), dtype=torch.bool, device=dev)
        mask[bidx, rows, cols] = True
    return out, mask


def _apply_blended(spec: TriggerSpec, images: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    b, _, h, w = images.shape
    dev = images.device
    fixed = None
    if spec.fixed_pattern:
        fixed = torch.from_numpy(np.random.default_rng(spec.pattern_seed).random((3, h, w))).to(dev)
    out = torch.empty_like(images)
    for s, e in _chunks(b, 3 * h * w):
        if fixed is None:
            # One U[0,1) draw of (3, H, W) per image, in batch order.
            u = torch.from_numpy(np.stack([rng.random((3, h, w)) for _ in range(s, e)])).to(dev)
        else:
            u = fixed.unsqueeze(0)
        x = images[s:e].to(torch.float64)
        out[s:e] = _to_uint8((1.0 - spec.alpha) * x + (255.0 * spec.alpha) * u)
    return out


def _apply_sig(spec: TriggerSpec, images: torch.Tensor) -> torch.Tensor:
    b, _, h, w = images.shape
    # Same value for every row and channel of column j (CleanCLIP fills noise[k, i, j] from j only).
    signal = sig_signal(spec, w, images.device).view(1, 1, 1, w)
    out = torch.empty_like(images)
    for s, e in _chunks(b, 3 * h * w):
        x = images[s:e].to(torch.float64)
        if spec.sig_mode == "blend":
            y = (1.0 - spec.alpha) * x + spec.alpha * signal
        else:
            y = x + signal
        out[s:e] = _to_uint8(y)
    return out


@functools.lru_cache(maxsize=32)
def _wanet_grid_cached(k: int, s: float, seed: int, height: int, width: int) -> torch.Tensor:
    # WaNet / CleanCLIP: uniform noise in [-1, 1] on a k×k control grid, normalised by its mean |.|,
    # upsampled bicubically to the image size: a smooth random displacement field.
    ins = np.random.default_rng(seed).random((1, 2, k, k)) * 2 - 1
    ins = ins / np.mean(np.abs(ins))
    noise = F.interpolate(torch.from_numpy(ins), size=(height, width), mode="bicubic", align_corners=True)
    noise = noise.permute(0, 2, 3, 1)  # [1, H, W, 2]: channel 0 moves x (width), channel 1 moves y
    ys = torch.linspace(-1, 1, height, dtype=torch.float64)
    xs = torch.linspace(-1, 1, width, dtype=torch.float64)
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")
    identity = torch.stack((gx, gy), dim=-1).unsqueeze(0)  # grid_sample wants (x, y)
    # Offsets in normalised units: s·noise/size along each axis (= CleanCLIP's s·noise/H for square images).
    scale = torch.tensor([1.0 / width, 1.0 / height], dtype=torch.float64)
    grid = torch.clamp(identity + s * noise * scale, -1, 1)
    return grid


def _apply_wanet(spec: TriggerSpec, images: torch.Tensor) -> torch.Tensor:
    b, _, h, w = images.shape
    grid = _wanet_grid_cached(spec.wanet_k, spec.wanet_s, spec.pattern_seed, h, w).to(images.device)
    out = torch.empty_like(images)
    for s, e in _chunks(b, 3 * h * w):
        x = images[s:e].to(torch.float64)
        # The grid is clamped to [-1, 1] and align_corners=True maps ±1 to the border pixel centres, so
        # "border" padding only guards against float round-off (CleanCLIP's "zeros" is the same in exact
        # arithmetic); it keeps a constant image exactly constant.
        y = F.grid_sample(x, grid.expand(e - s, h, w, 2), mode="bilinear", padding_mode="border", align_corners=True)
        out[s:e] = _to_uint8(y)
    return out
