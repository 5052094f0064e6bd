"""No-grad passes over a whole pair dataset: the features data-side defense steps score pairs with."""

from __future__ import annotations

import torch

from otcbench.defenses.base import DataContext
from otcbench.models import prepare_images


@torch.no_grad()
def embed_images(ctx: DataContext, rows: torch.Tensor | None = None) -> torch.Tensor:
    """L2-normalised global image features (float32, on ``ctx.device``) of ``rows`` (default: all)."""
    rows = torch.arange(len(ctx.data)) if rows is None else rows
    model = ctx.model
    was_training = model.training
    model.eval()
    out = []
    for chunk in rows.split(ctx.embed_batch_size):
        images = prepare_images(model, ctx.data.images[chunk].to(ctx.device, non_blocking=True))
        with ctx.autocast():
            f = model.encode_image(images, normalize=True)
        out.append(f.float())
    model.train(was_training)
    return torch.cat(out) if out else torch.empty(0, device=ctx.device)


@torch.no_grad()
def embed_captions(ctx: DataContext, caption_rows: torch.Tensor | None = None) -> torch.Tensor:
    """L2-normalised global text features (float32, on ``ctx.device``) of the captions of ``caption_rows``."""
    caption_rows = torch.arange(len(ctx.data)) if caption_rows is None else caption_rows
    model = ctx.model
    was_training = model.training
    model.eval()
    out = []
    for chunk in caption_rows.split(ctx.embed_batch_size):
        with ctx.autocast():
            f = model.encode_text(ctx.data.tokens[chunk].to(ctx.device, non_blocking=True), normalize=True)
        out.append(f.float())
    model.train(was_training)
    return torch.cat(out) if out else torch.empty(0, device=ctx.device)


def pair_cosine(ctx: DataContext) -> torch.Tensor:
    """Cosine similarity of every image with the caption it is currently paired with (N,), float32."""
    return (embed_images(ctx) * embed_captions(ctx, ctx.caption_index)).sum(-1)
