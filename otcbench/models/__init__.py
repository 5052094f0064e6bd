"""CLIP models for otcbench: creation, checkpoints, tokenizers, preprocessing and fine-grained tokens.

Importing this package registers the bundled tiny model configs (``otc-vit-tiny``,
``otc-vit-small``, ``otc-rn-tiny``) with open_clip's model registry.
"""

from __future__ import annotations

from otcbench.models.catalog import (
    CONFIG_DIR,
    bundled_model_names,
    list_model_names,
    model_summary,
    register_bundled_configs,
)
from otcbench.models.checkpoints import (
    checkpoint_model_name,
    checkpoint_state_dict,
    load_checkpoint_file,
    load_checkpoint_into,
)
from otcbench.models.factory import PRECISIONS, create_model, get_tokenizer
from otcbench.models.preprocess import image_mean_std, image_size, prepare_images, unwrap_model
from otcbench.models.tokens import (
    FineGrained,
    encode_fine_grained,
    encode_image_tokens,
    encode_text_tokens,
)

register_bundled_configs()

__all__ = [
    "CONFIG_DIR",
    "PRECISIONS",
    "FineGrained",
    "bundled_model_names",
    "checkpoint_model_name",
    "checkpoint_state_dict",
    "create_model",
    "encode_fine_grained",
    "encode_image_tokens",
    "encode_text_tokens",
    "get_tokenizer",
    "image_mean_std",
    "image_size",
    "list_model_names",
    "load_checkpoint_file",
    "load_checkpoint_into",
    "model_summary",
    "prepare_images",
    "register_bundled_configs",
    "unwrap_model",
]
