"""Frozen image features of an eval split, batched, in eval mode, without gradients."""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
import torch.nn.functional as F

from otcbench.models import prepare_images
from otcbench.models.mode import eval_mode


@torch.no_grad()
def image_features(
    model: torch.nn.Module,
    images: torch.Tensor,
    *,
    batch_size: int = 512,
    device: torch.device | str = "cpu",
    amp_dtype: torch.dtype | None = None,
    transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """L2-normalised image embeddings ``[N, D]`` (float32, on CPU) of uint8 ``images`` ``[N,3,H,W]``.

    ``transform`` is applied to each uint8 batch first (e.g. a backdoor trigger for ASR).
    """
    dev = torch.device(device)
    out = []
    ctx = torch.autocast(dev.type, dtype=amp_dtype) if amp_dtype is not None else contextlib.nullcontext()
    with eval_mode(model):
        for start in range(0, images.shape[0], batch_size):
            x = images[start : start + batch_size]
            if transform is not None:
                x = transform(x)
            with ctx:
                f = model.encode_image(prepare_images(model, x.to(dev)))
            out.append(F.normalize(f.float(), dim=-1).cpu())
    if not out:
        return torch.empty(0, 0)
    return torch.cat(out)
