"""Image input of a model: its towers' input size and normalisation, and raw uint8 pixels turned into model
input on the device (``prepare_images``).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

from otcbench.errors import UserError


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The bare CLIP model inside DDP/DataParallel (``.module``) or torch.compile (``._orig_mod``)."""
    # DDP / DataParallel keep the CLIP model in .module, torch.compile in ._orig_mod.
    for attr in ("module", "_orig_mod"):
        inner = getattr(model, attr, None)
        if isinstance(inner, torch.nn.Module):
            return unwrap_model(inner)
    return model


def _visual(model: torch.nn.Module) -> torch.nn.Module:
    visual = getattr(unwrap_model(model), "visual", None)
    if not isinstance(visual, torch.nn.Module):
        raise UserError(f"{type(model).__name__} has no .visual tower; pass a CLIP model from create_model()")
    return visual


def _pair(size: Any) -> tuple[int, int]:
    if isinstance(size, (list, tuple)):
        return int(size[0]), int(size[-1])
    return int(size), int(size)


def image_size(model: torch.nn.Module) -> tuple[int, int]:
    """The (height, width) the model's image tower expects."""
    visual = _visual(model)
    size = getattr(visual, "image_size", None)
    if size is None:
        size = getattr(visual, "preprocess_cfg", {}).get("size", 224)
    return _pair(size)


def image_mean_std(model: torch.nn.Module) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel normalisation (mean, std) for the model's inputs (images scaled to [0, 1])."""
    visual = _visual(model)
    cfg = getattr(visual, "preprocess_cfg", None) or {}
    mean = cfg.get("mean", getattr(visual, "image_mean", None)) or OPENAI_DATASET_MEAN
    std = cfg.get("std", getattr(visual, "image_std", None)) or OPENAI_DATASET_STD
    return tuple(float(m) for m in mean), tuple(float(s) for s in std)


def _input_dtype(visual: torch.nn.Module) -> torch.dtype:
    # open_clip's 'bf16'/'fp16' precisions store conv weights in low precision, so the input must
    # match; fp32 models keep fp32 inputs (autocast casts inside the ops).
    weight = getattr(getattr(visual, "conv1", None), "weight", None)
    if weight is None:
        weight = next((p for p in visual.parameters() if p.is_floating_point()), None)
    return weight.dtype if weight is not None else torch.float32


def prepare_images(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Turn a batch from our data pipeline into model input.

    The single place where images become model input, so that training, evaluation, attacks
    and defenses all see identical preprocessing.

    Args:
        model: the CLIP model (for device, image size, mean/std and weight dtype).
        images: ``[B, 3, H, W]``, either uint8 in 0..255 or floating point in [0, 1]; any H, W.

    Returns:
        ``[B, 3, h, w]`` normalised tensor on the model's device, ``(h, w) = image_size(model)``.
        Resizing (bilinear, antialiased) happens only when ``(H, W) != (h, w)``.
    """
    if not isinstance(images, torch.Tensor):
        raise UserError(f"images must be a torch.Tensor [B,3,H,W], got {type(images).__name__}")
    if images.ndim != 4 or images.shape[1] != 3:
        raise UserError(
            f"images must have shape [B, 3, H, W] (RGB, channels first), got {tuple(images.shape)}"
        )
    visual = _visual(model)
    param = next(visual.parameters(), None)
    device = param.device if param is not None else images.device
    if images.dtype == torch.uint8:
        x = images.to(device, non_blocking=True).float().div_(255.0)
    elif images.is_floating_point():
        if images.device.type == "cpu" and images.numel():
            # Value check only for CPU tensors: on GPU it would force a sync every batch.
            lo, hi = torch.aminmax(images)
            if lo < -1e-3 or hi > 1 + 1e-3:
                raise UserError(
                    f"float images must be in [0, 1], got values in [{lo.item():.3g}, {hi.item():.3g}]; "
                    "pass uint8 0..255 images or divide by 255"
                )
        x = images.to(device, dtype=torch.float32, non_blocking=True)
    else:
        raise UserError(f"images must be uint8 (0..255) or float ([0, 1]), got dtype {images.dtype}")

    size = image_size(model)
    if tuple(x.shape[-2:]) != size:
        x = F.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False)
    mean, std = image_mean_std(model)
    mean_t = torch.tensor(mean, device=device, dtype=x.dtype).view(1, -1, 1, 1)
    std_t = torch.tensor(std, device=device, dtype=x.dtype).view(1, -1, 1, 1)
    x = (x - mean_t) / std_t
    dtype = _input_dtype(visual)
    return x if dtype == x.dtype else x.to(dtype)
