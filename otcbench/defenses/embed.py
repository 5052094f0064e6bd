"""No-grad passes over a whole pair dataset: the features data-side defense steps score pairs with.

Under torchrun each process embeds a contiguous shard of the rows and the shards are gathered, so every
rank gets the full result (and takes identical data-side decisions) for 1/W of the compute.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch

from otcbench.defenses.base import DataContext
from otcbench.models import prepare_images
from otcbench.models.mode import eval_mode
from otcbench.train import distributed


def embed_images(ctx: DataContext, rows: torch.Tensor | None = None) -> torch.Tensor:
    """L2-normalised global image features (float32, on ``ctx.device``) of ``rows`` (default: all).

    The images come through ``ctx.data.image_batches``: indexed in memory, or streamed by the data's
    loader (worker processes, prefetching) for a dataset decoded on demand.
    """

    def encode(chunks: list[torch.Tensor]) -> Iterator[torch.Tensor]:
        for raw in ctx.data.image_batches(chunks):
            yield ctx.model.encode_image(prepare_images(ctx.model, raw.to(ctx.device, non_blocking=True)),
                                         normalize=True)

    return _embed(ctx, rows, encode)


def embed_captions(ctx: DataContext, caption_rows: torch.Tensor | None = None) -> torch.Tensor:
    """L2-normalised global text features (float32, on ``ctx.device``) of the captions of ``caption_rows``."""

    def encode(chunks: list[torch.Tensor]) -> Iterator[torch.Tensor]:
        for chunk in chunks:
            yield ctx.model.encode_text(ctx.data.tokens[chunk].to(ctx.device, non_blocking=True), normalize=True)

    return _embed(ctx, caption_rows, encode)


@torch.no_grad()
def _embed(ctx: DataContext, rows: torch.Tensor | None,
           encode: Callable[[list[torch.Tensor]], Iterator[torch.Tensor]]) -> torch.Tensor:
    """``encode`` over this rank's shard of ``rows`` (default: all) in eval mode and chunks, gathered over ranks.

    ``encode`` gets the list of row chunks and yields their features in order (so that image reads can run
    ahead of the model).
    """
    rows = torch.arange(len(ctx.data)) if rows is None else rows
    lo, hi = distributed.shard(len(rows))
    out = []
    with eval_mode(ctx.model):
        features = encode(list(rows[lo:hi].split(ctx.embed_batch_size)))
        while True:
            with ctx.autocast():  # the forward runs inside the generator, at next()
                f = next(features, None)
            if f is None:
                break
            out.append(f.float())
    return distributed.all_gather_rows(_cat(out, ctx))


def pair_cosine(ctx: DataContext) -> torch.Tensor:
    """Cosine similarity of every image with the caption it is currently paired with (N,), float32."""
    return (embed_images(ctx) * embed_captions(ctx, ctx.caption_index)).sum(-1)


def _cat(parts: list[torch.Tensor], ctx: DataContext) -> torch.Tensor:
    """Concatenate feature chunks; an empty shard (fewer rows than ranks) is [0, D] so gathering works."""
    if parts:
        return torch.cat(parts)
    with torch.no_grad(), ctx.autocast():
        dim = ctx.model.encode_text(ctx.data.tokens[:1].to(ctx.device)).shape[-1]
    return torch.empty((0, dim), device=ctx.device)
