"""Batched image augmentation on uint8 tensors (CPU or CUDA), deterministic for a seeded generator.

:func:`augment_images` is the baselines' "cross_aug" pipeline (RoCLIP/SafeCLIP official code): horizontal
flip → RandomResizedCrop → ColorJitter(0.5, 0.5, 0.5, 0.1) with p = 0.8 → RandomGrayscale(0.2) →
GaussianBlur, with those values for images larger than 64 px and a milder preset of the same steps for
smaller ones (:class:`ImageAugOptions`, :data:`SMALL`; the published ones are kept in :data:`PUBLISHED`).
It is written as whole-batch tensor ops (one ``grid_sample`` for every crop, masked
colour ops, one grouped convolution for every blur) instead of a PIL loop per image, so that it costs
little next to the forward pass on either device.

:func:`autoaugment_images` is CleanCLIP's view: torchvision's ``AutoAugment`` (ImageNet policy) applied to
each image.

Randomness: every draw comes from ``generator`` when given (drawn on the generator's device), else from the
global torch RNG of the images' device — which the trainer reseeds at every step, so a run (and a resumed
run) sees the same augmentations.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from otcbench.config import Options

#: The resolution the published augmentation constants (blur kernel 21, sigma 0.1–2) were chosen for.
REFERENCE_SIDE = 224

#: Images whose shorter side is at most this use the ``small`` preset under ``preset="auto"``.
SMALL_SIDE = 64

#: The official "cross_aug" values (RoCLIP/SafeCLIP ``utils/augment_image.py``; torchvision's crop defaults).
PUBLISHED: dict[str, Any] = {
    "flip_p": 0.5,
    "crop_scale": (0.08, 1.0),
    "crop_ratio": (3 / 4, 4 / 3),
    "jitter_p": 0.8,
    "brightness": 0.5,
    "contrast": 0.5,
    "saturation": 0.5,
    "hue": 0.1,
    "grayscale_p": 0.2,
    "blur_p": 1.0,
    "blur_sigma": (0.1, 2.0),
    "blur_kernel": 21,
}

#: The same pipeline, milder, for images of at most :data:`SMALL_SIDE` px: every step stays, with the
#: published probabilities except grayscale. Measured on the 32-px synthetic world (otc-rn-micro, 8 epochs,
#: plain CLIP loss with EDA captions; zero-shot top-1 0.652 without image augmentation, 0.348 with the
#: published values but crop (0.5, 1)); docs/baselines.md "Augmentation at 32 px" has the runs:
#:
#: * ``crop_scale`` (0.8, 1): alone, (0.5, 1) cost 22 points (0.436) and (0.8, 1) 12 (0.531) — the shapes
#:   are 5–15 px and captions name up to three of them, so a smaller crop cuts captioned objects away;
#: * ``brightness``/``contrast``/``saturation`` 0.2, ``hue`` 0.02: the published jitter alone cost 17 points
#:   (0.484); the shapes are flat-coloured and a third of the captions name their colour, which a ±36° hue
#:   shift (0.1) turns into another colour word (red → orange/magenta); ±7° keeps it;
#: * ``grayscale_p`` 0.05: alone, 0.2 cost 11 points (0.538), again by erasing captioned colours;
#: * flip, jitter probability and blur stay published: the flip changes no pixel statistics (left/right is in
#:   9 % of the captions), and the blur scaled to 32 px (kernel 3, sigma ≤ 0.29 px) is nearly the identity
#:   (removing it changed nothing: 0.359 vs 0.348).
#:
#: Together: 0.492 (a milder variant, crop (0.9, 1), jitter p 0.4, grayscale 0.02: 0.535, within run-to-run
#: noise). No single step explains the published values' 0.348 — removing any one leaves 0.34–0.38 — the
#: costs add up in a short schedule; what is left of the gap to 0.652 is what any of the steps alone costs.
SMALL: dict[str, Any] = {
    **PUBLISHED,
    "crop_scale": (0.8, 1.0),
    "brightness": 0.2,
    "contrast": 0.2,
    "saturation": 0.2,
    "hue": 0.02,
    "grayscale_p": 0.05,
}

PRESETS: dict[str, dict[str, Any]] = {"published": PUBLISHED, "small": SMALL}


class ImageAugOptions(Options):
    """The "cross_aug" image augmentation: a preset of values, any of which an explicit option overrides.

    ``preset="auto"`` (the default) takes the ``published`` values for images larger than
    :data:`SMALL_SIDE` px and the ``small`` ones otherwise (the rule is applied per batch, from its image
    side, by :meth:`resolve`); ``"published"`` / ``"small"`` force one. An option left unset (None) comes
    from the preset; a set one always wins. Sizes that the official code gives in pixels at 224 px (the
    blur) are in units of a 224-px image and scaled to the actual side.
    """

    preset: Literal["auto", "published", "small"] = Field(
        "auto", description=f"auto: 'small' for images of at most {SMALL_SIDE} px, else 'published'"
    )
    flip_p: float | None = Field(None, ge=0, le=1, description="probability of a horizontal flip (both: 0.5)")
    crop_scale: tuple[float, float] | None = Field(
        None, description="RandomResizedCrop area range (published: torchvision's (0.08, 1.0); small: (0.8, 1.0))"
    )
    crop_ratio: tuple[float, float] | None = Field(
        None, description="RandomResizedCrop aspect-ratio range (both: (3/4, 4/3))"
    )
    jitter_p: float | None = Field(None, ge=0, le=1, description="probability of colour jitter (both: 0.8)")
    brightness: float | None = Field(
        None, ge=0, description="brightness factor from [1-b, 1+b] (published 0.5, small 0.2)"
    )
    contrast: float | None = Field(None, ge=0, description="contrast factor from [1-c, 1+c] (published 0.5, small 0.2)")
    saturation: float | None = Field(
        None, ge=0, description="saturation factor from [1-s, 1+s] (published 0.5, small 0.2)"
    )
    hue: float | None = Field(
        None, ge=0, le=0.5,
        description="hue shift from [-h, h], fraction of the colour wheel (published 0.1, small 0.02)",
    )
    grayscale_p: float | None = Field(
        None, ge=0, le=1, description="probability of grayscale (published 0.2, small 0.05)"
    )
    blur_p: float | None = Field(
        None, ge=0, le=1, description="probability of Gaussian blur (the official code: always, 1.0)"
    )
    blur_sigma: tuple[float, float] | None = Field(
        None, description="blur sigma range in pixels at 224 px (published (0.1, 2.0)), scaled to the side"
    )
    blur_kernel: int | None = Field(
        None, ge=1, description="blur kernel size at 224 px (published 21; scaled to the side, kept odd, >= 3)"
    )

    def preset_for(self, side: int) -> str:
        """The preset used for images whose shorter side is ``side`` px."""
        if self.preset != "auto":
            return self.preset
        return "small" if side <= SMALL_SIDE else "published"

    def resolve(self, side: int) -> ImageAugOptions:
        """Concrete options for images of shorter side ``side``: the preset's values under the explicit ones."""
        preset = self.preset_for(side)
        values = {k: v if (v := getattr(self, k)) is not None else d for k, d in PRESETS[preset].items()}
        return ImageAugOptions(preset=preset, **values)


def _uniform(n: int, lo: float, hi: float, gen: torch.Generator | None, device: torch.device) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=gen, device=device)


def _rand_device(images: torch.Tensor, generator: torch.Generator | None) -> torch.device:
    """Where random numbers are drawn: the generator's device, else the images' (global RNG)."""
    return generator.device if generator is not None else images.device


def _gray(x: torch.Tensor) -> torch.Tensor:
    """ITU-R 601-2 luma (what torchvision's rgb_to_grayscale uses), shape [B,1,H,W]."""
    return (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3])


def _crop_boxes(
    b: int, h: int, w: int, scale: tuple[float, float], ratio: tuple[float, float],
    gen: torch.Generator | None, device: torch.device,
) -> torch.Tensor:
    """RandomResizedCrop boxes ``[B, 4]`` (top, left, height, width) in pixels, torchvision's algorithm.

    Ten candidate boxes per image are drawn at once; the first that fits wins; images without one get
    the central crop clamped to the ratio range (torchvision's fallback).
    """
    tries = 10
    area = h * w
    target = area * _uniform(b * tries, scale[0], scale[1], gen, device).view(b, tries)
    log_r = _uniform(b * tries, math.log(ratio[0]), math.log(ratio[1]), gen, device).view(b, tries)
    aspect = torch.exp(log_r)
    cw = torch.round(torch.sqrt(target * aspect))
    ch = torch.round(torch.sqrt(target / aspect))
    ok = (cw > 0) & (ch > 0) & (cw <= w) & (ch <= h)
    u_top = torch.rand(b, tries, generator=gen, device=device)
    u_left = torch.rand(b, tries, generator=gen, device=device)
    top = torch.floor(u_top * (h - ch + 1))
    left = torch.floor(u_left * (w - cw + 1))
    first = torch.where(ok.any(1), ok.float().argmax(1), torch.zeros(b, dtype=torch.long, device=device))
    pick = first.view(b, 1)
    boxes = torch.stack([top.gather(1, pick), left.gather(1, pick), ch.gather(1, pick), cw.gather(1, pick)], -1)
    boxes = boxes.view(b, 4)
    # fallback: whole image cropped to the allowed aspect ratio, centred
    in_ratio = w / h
    if in_ratio < ratio[0]:
        fw, fh = w, round(w / ratio[0])
    elif in_ratio > ratio[1]:
        fh, fw = h, round(h * ratio[1])
    else:
        fw, fh = w, h
    fallback = torch.tensor([(h - fh) // 2, (w - fw) // 2, fh, fw], dtype=boxes.dtype, device=device)
    return torch.where(ok.any(1, keepdim=True), boxes, fallback.expand(b, 4))


def _resized_crop(x: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """Crop each image to its box and resize it back to the full side, bilinearly, in one grid_sample."""
    b, _, h, w = x.shape
    top, left, ch, cw = boxes.unbind(-1)
    theta = torch.zeros(b, 2, 3, device=x.device, dtype=x.dtype)
    # normalised coordinates (align_corners=False): output [-1, 1] spans the box in the input
    theta[:, 0, 0] = cw / w
    theta[:, 0, 2] = (2 * left + cw) / w - 1
    theta[:, 1, 1] = ch / h
    theta[:, 1, 2] = (2 * top + ch) / h - 1
    grid = F.affine_grid(theta, [b, 3, h, w], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def _rgb_to_hsv(x: torch.Tensor) -> torch.Tensor:
    r, g, b = x.unbind(1)
    maxc, _ = x.max(1)
    minc, _ = x.min(1)
    delta = maxc - minc
    s = torch.where(maxc > 0, delta / maxc.clamp_min(1e-12), torch.zeros_like(maxc))
    safe = torch.where(delta > 0, delta, torch.ones_like(delta))
    rc, gc, bc = (maxc - r) / safe, (maxc - g) / safe, (maxc - b) / safe
    h = torch.where(maxc == r, bc - gc, torch.where(maxc == g, 2.0 + rc - bc, 4.0 + gc - rc))
    h = torch.where(delta > 0, (h / 6.0) % 1.0, torch.zeros_like(h))
    return torch.stack([h, s, maxc], 1)


def _hsv_to_rgb(x: torch.Tensor) -> torch.Tensor:
    h, s, v = x.unbind(1)
    i = torch.floor(h * 6.0)
    f = h * 6.0 - i
    i = i.long() % 6
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    choices = torch.stack(
        [torch.stack(c, 1) for c in ((v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q))], 0
    )  # [6, B, 3, H, W]
    idx = i.unsqueeze(0).unsqueeze(2).expand(1, *choices.shape[1:])
    return choices.gather(0, idx).squeeze(0)


def _jitter_op(x: torch.Tensor, op: int, f: torch.Tensor) -> torch.Tensor:
    """One ColorJitter operation with per-image factor ``f`` [B] (0 brightness, 1 contrast, 2 saturation, 3 hue)."""
    fv = f.view(-1, 1, 1, 1)
    if op == 0:
        return (x * fv).clamp(0, 1)
    if op == 1:
        mean = _gray(x).mean(dim=(1, 2, 3), keepdim=True)
        return (fv * x + (1 - fv) * mean).clamp(0, 1)
    if op == 2:
        return (fv * x + (1 - fv) * _gray(x)).clamp(0, 1)
    hsv = _rgb_to_hsv(x)
    hsv = torch.stack([(hsv[:, 0] + f.view(-1, 1, 1)) % 1.0, hsv[:, 1], hsv[:, 2]], 1)
    return _hsv_to_rgb(hsv).clamp(0, 1)


def _colour_jitter(
    x: torch.Tensor, o: ImageAugOptions, gen: torch.Generator | None, device: torch.device
) -> torch.Tensor:
    """ColorJitter with p = ``jitter_p``: per image, the four operations in a random order (as torchvision)."""
    b = x.shape[0]
    o = o.resolve(min(x.shape[-2:]))
    apply = torch.rand(b, generator=gen, device=device) < o.jitter_p
    factors = torch.stack([
        _uniform(b, max(0.0, 1 - o.brightness), 1 + o.brightness, gen, device),
        _uniform(b, max(0.0, 1 - o.contrast), 1 + o.contrast, gen, device),
        _uniform(b, max(0.0, 1 - o.saturation), 1 + o.saturation, gen, device),
        _uniform(b, -o.hue, o.hue, gen, device),
    ], 1).to(x.device)
    order = torch.argsort(torch.rand(b, 4, generator=gen, device=device), dim=1).to(x.device)
    apply = apply.to(x.device)
    identity = torch.tensor([o.brightness == 0, o.contrast == 0, o.saturation == 0, o.hue == 0])
    for pos in range(4):
        for op in range(4):
            if identity[op]:
                continue
            sel = apply & (order[:, pos] == op)
            if bool(sel.any()):
                x[sel] = _jitter_op(x[sel], op, factors[sel, op])
    return x


def _blur(x: torch.Tensor, o: ImageAugOptions, gen: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """Gaussian blur with a per-image sigma, kernel and sigma scaled from 224 px; one grouped separable conv."""
    b, c, h, w = x.shape
    side = min(h, w)
    o = o.resolve(side)
    k = max(3, int(round(o.blur_kernel * side / REFERENCE_SIDE)))
    k = k if k % 2 == 1 else k + 1
    k = min(k, 2 * ((side - 1) // 2) + 1)  # reflect padding needs k // 2 < side
    apply = (torch.rand(b, generator=gen, device=device) < o.blur_p).to(x.device)
    sigma = _uniform(b, o.blur_sigma[0], o.blur_sigma[1], gen, device).to(x.device) * side / REFERENCE_SIDE
    if k < 3 or not bool(apply.any()):
        return x
    half = (k - 1) / 2
    t = torch.linspace(-half, half, k, device=x.device, dtype=x.dtype)
    kern = torch.exp(-0.5 * (t.view(1, k) / sigma.view(b, 1).clamp_min(1e-6)) ** 2)
    kern = kern / kern.sum(1, keepdim=True)
    kern = kern.repeat_interleave(c, 0)  # [B*C, k]
    y = x.reshape(1, b * c, h, w)
    y = F.pad(y, (k // 2, k // 2, 0, 0), mode="reflect")
    y = F.conv2d(y, kern.view(b * c, 1, 1, k), groups=b * c)
    y = F.pad(y, (0, 0, k // 2, k // 2), mode="reflect")
    y = F.conv2d(y, kern.view(b * c, 1, k, 1), groups=b * c)
    y = y.view(b, c, h, w)
    return torch.where(apply.view(b, 1, 1, 1), y, x)


def _check_images(images: torch.Tensor) -> None:
    if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
        got = f"{images.dtype} {tuple(images.shape)}" if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"images must be a uint8 tensor [B, 3, H, W], got {got}")


def augment_images(
    images: torch.Tensor,
    generator: torch.Generator | None = None,
    options: ImageAugOptions | None = None,
) -> torch.Tensor:
    """The "cross_aug" augmentation of a batch: uint8 ``[B,3,H,W]`` in, uint8 ``[B,3,H,W]`` out (same device).

    Args:
        images: uint8 images on any device.
        generator: draws every random number (on its own device); None uses the global torch RNG.
        options: the pipeline's probabilities and strengths (default :class:`ImageAugOptions`: the preset
            for the images' side), resolved with :meth:`ImageAugOptions.resolve`.
    """
    _check_images(images)
    b, _, h, w = images.shape
    o = (options or ImageAugOptions()).resolve(min(h, w))
    if b == 0:
        return images.clone()
    dev = _rand_device(images, generator)
    x = images.float() / 255.0
    flip = (torch.rand(b, generator=generator, device=dev) < o.flip_p).to(x.device)
    x = torch.where(flip.view(b, 1, 1, 1), x.flip(-1), x)
    boxes = _crop_boxes(b, h, w, o.crop_scale, o.crop_ratio, generator, dev).to(x.device, x.dtype)
    x = _resized_crop(x, boxes)
    x = _colour_jitter(x, o, generator, dev)
    gray = (torch.rand(b, generator=generator, device=dev) < o.grayscale_p).to(x.device)
    x = torch.where(gray.view(b, 1, 1, 1), _gray(x).expand_as(x), x)
    x = _blur(x, o, generator, dev)
    return (x * 255.0).round_().clamp_(0, 255).to(torch.uint8)


def autoaugment_images(images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """CleanCLIP's augmented view: torchvision ``AutoAugment`` (ImageNet policy) applied to each image.

    torchvision draws from the global CPU RNG; with a ``generator`` the draws happen inside a forked RNG
    seeded from it, so the result depends only on the generator's state (and the global RNG is left as it
    was). The images stay on their device.
    """
    from torchvision.transforms import AutoAugment, AutoAugmentPolicy

    _check_images(images)
    aug = AutoAugment(AutoAugmentPolicy.IMAGENET)
    if images.shape[0] == 0:
        return images.clone()

    def run() -> torch.Tensor:
        return torch.stack([aug(img) for img in images])

    if generator is None:
        return run()
    seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device).item())
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return run()
