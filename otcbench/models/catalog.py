"""The model names otcbench knows: the bundled tiny configs (registered with open_clip on import), every
open_clip architecture, name resolution with suggestions, and a one-line summary per model (``list models``).
"""

from __future__ import annotations

import difflib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import open_clip
import torch

from otcbench.errors import UserError

#: Directory holding the bundled tiny open_clip model configs (``<name>.json``).
CONFIG_DIR = Path(__file__).resolve().parent / "configs"

_LIST_HINT = "run `otcbench list models` to see the available names"


def bundled_model_names() -> list[str]:
    """Names of the tiny model configs shipped with otcbench (``otcbench/models/configs``)."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.json"))


def register_bundled_configs() -> None:
    """Register the bundled configs with open_clip's model registry.

    Idempotent: open_clip's ``add_model_config`` appends the directory to its search path on
    every call, so only call it when a bundled name is missing from the registry.
    """
    known = set(open_clip.list_models())
    if not set(bundled_model_names()) <= known:
        open_clip.add_model_config(CONFIG_DIR)


def list_model_names() -> list[str]:
    """All model names :func:`create_model` accepts: open_clip's built-ins plus the bundled ones."""
    register_bundled_configs()
    return list(open_clip.list_models())


def _resolve_name(name: str) -> str:
    """Return the registry name for ``name`` or raise a UserError with close matches."""
    if not isinstance(name, str) or not name.strip():
        raise UserError(f"model name must be a non-empty string, got {name!r}; {_LIST_HINT}")
    register_bundled_configs()
    if ":" in name:
        # 'hf-hub:' / 'local-dir:' schemas need downloads or foreign file layouts; our models are
        # built from registry configs and weights come from --checkpoint.
        raise UserError(
            f"model name {name!r} uses an open_clip schema prefix, which otcbench does not support; "
            f"pass a registry name (e.g. otc-vit-tiny) and load weights with --checkpoint"
        )
    names = open_clip.list_models()
    # open_clip itself maps 'ViT-B/32' to 'ViT-B-32'; accept a case-insensitive match too.
    for candidate in (name, name.replace("/", "-")):
        if candidate in names:
            return candidate
    lowered = {n.lower(): n for n in names}
    if name.replace("/", "-").lower() in lowered:
        return lowered[name.replace("/", "-").lower()]
    close = difflib.get_close_matches(name.lower(), list(lowered), n=3, cutoff=0.5)
    suggestion = f"did you mean {', '.join(repr(lowered[c]) for c in close)}? " if close else ""
    raise UserError(f"unknown model {name!r}; {suggestion}{_LIST_HINT}")


def _model_config(name: str) -> dict[str, Any]:
    cfg = open_clip.get_model_config(name)
    if cfg is None:  # registry changed under us; treat like an unknown name
        raise UserError(f"no config found for model {name!r}; {_LIST_HINT}")
    return cfg


def _family(vision_cfg: Mapping[str, Any]) -> str:
    if vision_cfg.get("timm_model_name"):
        return "other"
    return "resnet" if isinstance(vision_cfg.get("layers", 12), (list, tuple)) else "vit"


def _count_params_m(cfg: dict[str, Any]) -> float | None:
    """Parameter count in millions, built on the meta device so nothing is allocated.

    Returns None for configs that cannot be built offline (Hugging Face text towers).
    """
    cfg = json.loads(json.dumps(cfg))  # deep copy; open_clip pops keys
    if cfg["text_cfg"].get("hf_model_name"):
        return None
    if cfg["vision_cfg"].get("timm_model_name"):
        cfg["vision_cfg"]["timm_model_pretrained"] = False  # never download for a summary
    custom_text = cfg.pop("custom_text", False)
    if "multimodal_cfg" in cfg:
        cls: type[torch.nn.Module] = open_clip.CoCa
    elif custom_text:
        cls = open_clip.CustomTextCLIP
    else:
        cls = open_clip.CLIP
    try:
        with torch.device("meta"):
            model = cls(**cfg)
    except Exception:  # a listing must never fail because of one exotic config
        return None
    return sum(p.numel() for p in model.parameters()) / 1e6


def model_summary(name: str, *, count_params: bool | None = None) -> dict[str, Any]:
    """Describe a model without building it on a real device (used by ``otcbench list models``).

    Args:
        name: registry name.
        count_params: build the model on the meta device to count parameters (exact, allocates
            nothing). ``None`` (default) counts only open_clip-native towers (~10-50 ms each);
            timm-based towers take ~0.1-0.7 s each, so they report None unless True is passed.

    Returns:
        A dict with ``name``, ``family`` ("vit", "resnet" or "other" for timm towers),
        ``image_size`` (h, w), ``embed_dim``, ``context_length``, ``params_m`` (millions, or None
        when not counted / not countable offline) and ``bundled`` (shipped with otcbench).
    """
    name = _resolve_name(name)
    cfg = _model_config(name)
    vision_cfg = cfg.get("vision_cfg", {})
    text_cfg = cfg.get("text_cfg", {})
    size = vision_cfg.get("image_size", 224)
    family = _family(vision_cfg)
    if count_params is None:
        count_params = family != "other"
    return {
        "name": name,
        "family": family,
        "image_size": tuple(size) if isinstance(size, (list, tuple)) else (int(size), int(size)),
        "embed_dim": cfg.get("embed_dim"),
        "context_length": text_cfg.get("context_length", 77),
        "params_m": _count_params_m(cfg) if count_params else None,
        "bundled": name in bundled_model_names(),
    }
