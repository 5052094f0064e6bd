"""Fine-grained (per-patch / per-word) features in CLIP's joint embedding space.

Optimal-transport losses (OTCCLIP) match image regions to words, so they need, besides the
usual global embeddings, one embedding per image token and per text token, in the *same*
space as the globals. This module computes all of them in a single forward pass per tower,
reproducing open_clip's own forward exactly, so that

* ``image_global`` is bit-for-bit what ``model.encode_image(images)`` returns, and
* ``text_global`` is what ``model.encode_text(texts)`` returns,

and gradients flow from every output to the weights (nothing is detached).

Conventions (all outputs are **not** L2-normalised; normalise where the loss needs it):

* ViT (open_clip ``VisionTransformer``, pool ``tok`` or ``avg``): the patch tokens after the
  final LayerNorm ``ln_post``, multiplied by the output projection ``visual.proj``. The class
  token is not part of ``image_tokens``. With ``avg`` pooling (and the LayerNorm before
  pooling), ``image_global == image_tokens.mean(1)``.
* ModifiedResNet (``AttentionPool2d``): the final feature grid plus the pool's positional
  embedding, passed through the value projection ``v_proj`` and output projection ``c_proj``
  (MaskCLIP's dense features). The global is the attention pool's output, which is an
  attention-weighted average of these per-position values (per head).
* Text (``CLIP`` and ``CustomTextCLIP`` with open_clip's ``TextTransformer``): the token states
  after ``ln_final``, multiplied by ``text_projection``, for all context positions; ``text_mask``
  marks the real tokens (start token .. end-of-text token inclusive), padding is False.

Wrapped models (DDP ``.module``, ``torch.compile``'s ``._orig_mod``) are unwrapped, i.e. these
functions call the submodules directly. Under DistributedDataParallel the gradient all-reduce is
only armed by a forward through the wrapper, so a DDP trainer should call these functions from
inside the wrapped module's ``forward`` rather than on the wrapper.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from open_clip.modified_resnet import ModifiedResNet
from open_clip.transformer import TextTransformer, VisionTransformer, text_global_pool
from torch import nn

from otcbench.errors import UserError
from otcbench.models.preprocess import prepare_images, unwrap_model

__all__ = ["FineGrained", "encode_image_tokens", "encode_text_tokens", "encode_fine_grained"]


@dataclass
class FineGrained:
    """Global and per-token embeddings of an image-text batch (none of them L2-normalised).

    Attributes:
        image_global: ``[B, D]``, equal to ``model.encode_image(images)``.
        image_tokens: ``[B, N, D]``, one projected embedding per patch / grid cell.
        text_global: ``[B, D]``, equal to ``model.encode_text(texts)``.
        text_tokens: ``[B, M, D]``, one projected embedding per context position (M = context length).
        text_mask: ``[B, M]`` bool, True for real tokens (start .. end-of-text), False for padding.
    """

    image_global: torch.Tensor
    image_tokens: torch.Tensor
    text_global: torch.Tensor
    text_tokens: torch.Tensor
    text_mask: torch.Tensor


def _project(x: torch.Tensor, proj: nn.Module | torch.Tensor | None) -> torch.Tensor:
    # open_clip stores projections either as a bare [width, D] parameter or an nn.Linear.
    if proj is None:
        return x
    if isinstance(proj, nn.Module):
        return proj(x)
    return x @ proj


# --------------------------------------------------------------------------------------------
# image tower
# --------------------------------------------------------------------------------------------


def _vit_tokens(visual: VisionTransformer, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # Mirrors VisionTransformer.forward / _pool for the non-attentional-pool case.
    if visual.attn_pool is not None:
        raise UserError(
            "fine-grained tokens are not supported for ViTs with an attentional pooler (CoCa-style "
            "'attentional_pool' configs); use a model with pool_type 'tok' or 'avg'"
        )
    if visual.pool_type not in ("tok", "avg"):
        raise UserError(
            f"fine-grained tokens need a ViT with pool_type 'tok' or 'avg', this one has "
            f"{visual.pool_type!r}; pick another model"
        )
    x = visual._embeds(x)
    x = visual.transformer(x)
    if visual.final_ln_after_pool:
        # open_clip normalises only the pooled vector here; tokens get the same LayerNorm so
        # that they live in the same space as the global.
        pooled, tokens = visual._global_pool(x)
        pooled = visual.ln_post(pooled)
        tokens = visual.ln_post(tokens)
    else:
        x = visual.ln_post(x)
        pooled, tokens = visual._global_pool(x)
    return _project(pooled, visual.proj), _project(tokens, visual.proj)


def _resnet_tokens(visual: ModifiedResNet, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # Mirrors ModifiedResNet.forward; the pool is called as is so the global is exact.
    x = visual.stem(x)
    x = visual.layer1(x)
    x = visual.layer2(x)
    x = visual.layer3(x)
    x = visual.layer4(x)
    pool = visual.attnpool
    pooled = pool(x)
    # AttentionPool2d prepends the spatial mean as position 0 and adds its positional embedding;
    # the spatial cells are positions 1.. in row-major order (same flatten as the pool).
    feats = x.flatten(2).transpose(1, 2)  # [B, HW, C]
    feats = feats + pool.positional_embedding[1:].to(feats.dtype)
    values = pool.v_proj(feats)
    tokens = pool.c_proj(values)
    return pooled, tokens


def encode_image_tokens(model: nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Global and per-token image embeddings in one forward pass of the image tower.

    Args:
        model: an open_clip ``CLIP``/``CustomTextCLIP`` (optionally DDP/compile-wrapped) with a
            ``VisionTransformer`` or ``ModifiedResNet`` image tower.
        images: model input as produced by :func:`~otcbench.models.factory.prepare_images`
            (normalised float). uint8 batches are passed through ``prepare_images`` first.

    Returns:
        ``(global [B, D], tokens [B, N, D])``; the global equals ``model.encode_image(images)``.
        N is the number of patches (ViT, fewer in train mode with patch dropout) or grid cells
        (ResNet, ``(image_size // 32) ** 2``).
    """
    visual = getattr(unwrap_model(model), "visual", None)
    if images.dtype == torch.uint8:
        images = prepare_images(model, images)
    if isinstance(visual, VisionTransformer):
        return _vit_tokens(visual, images)
    if isinstance(visual, ModifiedResNet):
        return _resnet_tokens(visual, images)
    raise UserError(
        f"fine-grained image tokens are not supported for image tower {type(visual).__name__}; "
        "use an open_clip ViT or ModifiedResNet model (e.g. otc-vit-tiny, otc-rn-tiny)"
    )


# --------------------------------------------------------------------------------------------
# text tower
# --------------------------------------------------------------------------------------------


def _text_mask(text: torch.Tensor, pool_type: str, eos_id: int | None, pad_id: int) -> torch.Tensor:
    """Real-token mask: every position up to and including the token the global is pooled from.

    For argmax pooling (CLIP's tokenizer: end-of-text has the largest id) this is exactly
    ``text != 0`` for tokenizer output; deriving it from the pooled position keeps it right even
    if a vocabulary id 0 occurs inside a caption.
    """
    positions = torch.arange(text.shape[1], device=text.device)
    if pool_type == "argmax":
        end = text.argmax(dim=-1)
    elif pool_type == "eos" and eos_id is not None:
        end = (text == eos_id).int().argmax(dim=-1)
    else:
        return text != pad_id
    return positions.unsqueeze(0) <= end.unsqueeze(1)


def _check_text(text: object, context_length: int | None) -> torch.Tensor:
    if not isinstance(text, torch.Tensor):
        raise UserError(
            f"texts must be a tensor of token ids [B, context_length], got {type(text).__name__}; "
            "tokenize captions with otcbench.models.get_tokenizer(model_name)"
        )
    if text.ndim != 2 or text.is_floating_point() or text.dtype == torch.bool:
        raise UserError(
            f"texts must be integer token ids of shape [B, context_length], got {text.dtype} "
            f"{tuple(text.shape)}; tokenize with otcbench.models.get_tokenizer(model_name)"
        )
    if context_length is not None and text.shape[1] != context_length:
        raise UserError(
            f"texts have {text.shape[1]} tokens per caption but the model's context length is "
            f"{context_length}; tokenize with the model's own tokenizer (get_tokenizer(model_name))"
        )
    return text


def _clip_text_tokens(model: nn.Module, text: torch.Tensor) -> tuple[torch.Tensor, ...]:
    # Mirrors open_clip.CLIP.encode_text.
    pool_type = model.text_pool_type
    if pool_type not in ("first", "last", "argmax", "eos"):
        raise UserError(f"fine-grained text tokens need a pooled text tower, this one pools {pool_type!r}")
    eos_id = getattr(model, "text_eos_id", None)
    text = text.to(model.token_embedding.weight.device)
    cast_dtype = model.transformer.get_cast_dtype()
    x = model.token_embedding(text).to(cast_dtype)
    x = x + model.positional_embedding.to(cast_dtype)
    x = model.transformer(x, attn_mask=model.attn_mask)
    x = model.ln_final(x)
    pooled = text_global_pool(x, text, pool_type, eos_token_id=eos_id)
    mask = _text_mask(text, pool_type, eos_id, pad_id=0)  # CLIP's tokenizer pads with 0
    return _project(pooled, model.text_projection), _project(x, model.text_projection), mask


def _custom_text_tokens(tower: TextTransformer, text: torch.Tensor) -> tuple[torch.Tensor, ...]:
    # Mirrors TextTransformer.forward for towers without an appended class token.
    if tower.cls_emb is not None:
        raise UserError(
            "fine-grained text tokens are not supported for text towers with an appended class "
            "token (CoCa-style embed_cls); use a CLIP model"
        )
    if tower.pool_type not in ("first", "last", "argmax", "eos"):
        raise UserError(
            f"fine-grained text tokens need a pooled text tower, this one pools {tower.pool_type!r}"
        )
    text = text.to(tower.token_embedding.weight.device)
    x, attn_mask = tower._embeds(text)
    x = tower.transformer(x, attn_mask=attn_mask)
    x = tower.ln_final(x)
    eos_id = getattr(tower, "eos_id", None)
    pooled = text_global_pool(x, text, pool_type=tower.pool_type, eos_token_id=eos_id)
    mask = _text_mask(text, tower.pool_type, eos_id, pad_id=tower.pad_id)
    return _project(pooled, tower.text_projection), _project(x, tower.text_projection), mask


def encode_text_tokens(
    model: nn.Module, texts: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Global and per-token text embeddings in one forward pass of the text tower.

    Args:
        model: an open_clip ``CLIP`` or ``CustomTextCLIP`` with an open_clip ``TextTransformer``.
        texts: token ids ``[B, M]`` from :func:`~otcbench.models.factory.get_tokenizer` (M is the
            model's context length).

    Returns:
        ``(global [B, D], tokens [B, M, D], mask [B, M] bool)``; the global equals
        ``model.encode_text(texts)``; mask is True for start .. end-of-text tokens.
    """
    inner = unwrap_model(model)
    tower = getattr(inner, "text", None)
    if tower is None and hasattr(inner, "text_projection") and hasattr(inner, "ln_final"):
        _check_text(texts, int(inner.positional_embedding.shape[0]))
        global_, tokens, mask = _clip_text_tokens(inner, texts)
    elif isinstance(tower, TextTransformer):
        _check_text(texts, None)  # TextTransformer slices its positional embedding itself
        if texts.shape[1] > tower.positional_embedding.shape[0]:
            raise UserError(
                f"texts have {texts.shape[1]} tokens per caption but the model's context length is "
                f"{tower.context_length}; tokenize with get_tokenizer(model_name)"
            )
        global_, tokens, mask = _custom_text_tokens(tower, texts)
    else:
        kind = type(tower).__name__ if tower is not None else type(inner).__name__
        raise UserError(
            f"fine-grained text tokens are not supported for text tower {kind}; use an open_clip "
            "CLIP model with a native text transformer (e.g. otc-vit-tiny)"
        )
    return global_, tokens, mask


def encode_fine_grained(model: nn.Module, images: torch.Tensor, texts: torch.Tensor) -> FineGrained:
    """Global and per-token embeddings of both towers (one forward pass each), see :class:`FineGrained`."""
    image_global, image_tokens = encode_image_tokens(model, images)
    text_global, text_tokens, text_mask = encode_text_tokens(model, texts)
    return FineGrained(
        image_global=image_global,
        image_tokens=image_tokens,
        text_global=text_global,
        text_tokens=text_tokens,
        text_mask=text_mask,
    )
