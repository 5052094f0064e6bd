"""Batched image augmentation on uint8 tensors (CPU or CUDA), deterministic for a seeded generator.

:func:`augment_images` is the baselines' "cross_aug" pipeline (RoCLIP/SafeCLIP official code): horizontal
flip → RandomResizedCrop → ColorJitter(0.5, 0.5, 0.5, 0.1) with p = 0.8 → RandomGrayscale(0.2) →
GaussianBlur. It is written as whole-batch tensor ops (one ``grid_sample`` for every crop, masked
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

import torch
import torch.nn.functional as F
from pydantic import Field

from otcbench.config import Options

#: The resolution the published augmentation constants (blur kernel 21, sigma 0.1–2) were chosen for.
REFERENCE_SIDE = 224


class ImageAugOptions(Options):
    """The "cross_aug" image augmentation. Defaults are the published ones except the crop scale.

    Sizes that the official code gives in pixels at 224 px (the blur) are given here in units of a
    224-px image and scaled to the actual image side.
    """

    flip_p: float = Field(0.5, ge=0, le=1, description="probability of a horizontal flip")
    crop_scale: tuple[float, float] = Field(
        (0.5, 1.0),
        description="RandomResizedCrop area range. Published: torchvision's (0.08, 1.0) at 224 px; at 32-64 px a "
        "crop of 8% of the area (9x9 px) rarely keeps the captioned object, so the default is (0.5, 1.0)",
    )
    crop_ratio: tuple[float, float] = Field((3 / 4, 4 / 3), description="RandomResizedCrop aspect-ratio range")
    jitter_p: float = Field(0.8, ge=0, le=1, description="probability of colour jitter")
    brightness: float = Field(0.5, ge=0, description="brightness factor drawn from [1-b, 1+b]")
    contrast: float = Field(0.5, ge=0, description="contrast factor drawn from [1-c, 1+c]")
    saturation: float = Field(0.5, ge=0, description="saturation factor drawn from [1-s, 1+s]")
    hue: float = Field(0.1, ge=0, le=0.5, description="hue shift drawn from [-h, h] (fraction of the colour wheel)")
    grayscale_p: float = Field(0.2, ge=0, le=1, description="probability of converting to grayscale")
    blur_p: float = Field(1.0, ge=0, le=1, description="probability of Gaussian blur (the official code: always)")
    blur_sigma: tuple[float, float] = Field(
        (0.1, 2.0), description="blur sigma range in pixels at 224 px (torchvision's default), scaled to the side"
    )
    blur_kernel: int = Field(21, ge=1, description="blur kernel size at 224 px (scaled to the side, kept odd, >= 3)")


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
        options: the pipeline's probabilities and strengths (default :class:`ImageAugOptions`).
    """
    _check_images(images)
    o = options or ImageAugOptions()
    b, _, h, w = images.shape
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
