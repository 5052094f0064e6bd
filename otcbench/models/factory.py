"""Model creation, checkpoints, tokenizers and image preprocessing for CLIP models.

Everything open_clip-specific that the rest of otcbench needs goes through this module, so
that the data pipeline, trainers, attacks and defenses never touch open_clip internals.
Models are always randomly initialised (this toolkit studies *pre-training*); trained
weights come from local checkpoint files written by our trainer (or open_clip's).
"""

from __future__ import annotations

import contextlib
import difflib
import importlib.util
import json
import logging
import pickle
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import open_clip
import torch
import torch.nn.functional as F
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

from otcbench.errors import UserError

__all__ = [
    "CONFIG_DIR",
    "PRECISIONS",
    "register_bundled_configs",
    "list_model_names",
    "bundled_model_names",
    "model_summary",
    "create_model",
    "load_checkpoint_file",
    "checkpoint_model_name",
    "checkpoint_state_dict",
    "load_checkpoint_into",
    "get_tokenizer",
    "image_size",
    "image_mean_std",
    "prepare_images",
    "unwrap_model",
]

#: Directory holding the bundled tiny open_clip model configs (``<name>.json``).
CONFIG_DIR = Path(__file__).resolve().parent / "configs"

#: Weight precisions accepted by :func:`create_model` (open_clip's names). ``bf16``/``fp16`` keep
#: LayerNorms in fp32 like OpenAI's CLIP; ``pure_*`` cast everything. Mixed precision training
#: (autocast) wants ``fp32`` weights.
PRECISIONS = ("fp32", "bf16", "fp16", "pure_bf16", "pure_fp16")

_LIST_HINT = "run `otcbench list models` to see the available names"


# --------------------------------------------------------------------------------------------
# config registry
# --------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------
# model creation
# --------------------------------------------------------------------------------------------


class _DropRandomInitWarning(logging.Filter):
    """Drop open_clip's 'No pretrained weights loaded' warning: random init is our normal case."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("No pretrained weights loaded")


@contextlib.contextmanager
def _quiet_open_clip() -> Iterator[None]:
    root = logging.getLogger()
    log_filter = _DropRandomInitWarning()
    # open_clip logs through the module-level logging.warning(), which calls basicConfig()
    # when the root logger has no handlers -- a global side effect we do not want from a
    # library call. A temporary NullHandler prevents it.
    placeholder = logging.NullHandler() if not root.handlers else None
    if placeholder is not None:
        root.addHandler(placeholder)
    root.addFilter(log_filter)
    try:
        yield
    finally:
        root.removeFilter(log_filter)
        if placeholder is not None:
            root.removeHandler(placeholder)


def _resolve_device(device: str | torch.device) -> torch.device:
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise UserError(f"invalid device {device!r} ({e}); use e.g. 'cpu', 'cuda' or 'cuda:0'") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device {device!r} requested but CUDA is not available here; use --device cpu")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise UserError(
            f"device {device!r} does not exist (this machine has {torch.cuda.device_count()} GPUs); "
            "pick another index"
        )
    return dev


def _check_optional_deps(name: str, *, tokenizer: bool = False) -> None:
    # open_clip reports a missing timm/transformers as a generic RuntimeError mid-construction.
    cfg = _model_config(name)
    text_cfg = cfg.get("text_cfg", {})
    needs = []
    if tokenizer:
        if text_cfg.get("hf_tokenizer_name"):
            needs.append("transformers")
    else:
        if cfg.get("vision_cfg", {}).get("timm_model_name"):
            needs.append("timm")
        if text_cfg.get("hf_model_name"):
            needs.append("transformers")
    missing = [pkg for pkg in needs if importlib.util.find_spec(pkg) is None]
    if missing:
        raise UserError(
            f"model {name!r} needs the package(s) {', '.join(missing)}, which are not installed; "
            f"install them or pick another model (e.g. {bundled_model_names()[0]})"
        )


def create_model(
    name: str,
    *,
    checkpoint: str | Path | None = None,
    device: str | torch.device = "cpu",
    precision: str = "fp32",
) -> torch.nn.Module:
    """Build an open_clip model by registry name, randomly initialised or from a local checkpoint.

    Args:
        name: any open_clip registry name (``list_model_names()``), e.g. ``otc-vit-tiny``.
        checkpoint: optional local checkpoint file: our trainer's dict (``{"model": state_dict,
            "model_name": ...}``), an open_clip ``{"state_dict": ...}`` dict or a bare state dict.
        device: where to put the model.
        precision: one of :data:`PRECISIONS`.

    Returns:
        The model on ``device``, in train mode as open_clip builds it (call ``.eval()`` to evaluate).

    Raises:
        UserError: unknown name, bad device/precision, unreadable or mismatching checkpoint.
    """
    name = _resolve_name(name)
    dev = _resolve_device(device)
    if precision not in PRECISIONS:
        raise UserError(f"unknown precision {precision!r}; use one of {', '.join(PRECISIONS)}")

    state_dict = None
    if checkpoint is not None:
        # Read and check the checkpoint before building (fails fast on typos in the path).
        raw = load_checkpoint_file(checkpoint)
        saved_name = raw.get("model_name")
        if isinstance(saved_name, str) and saved_name and saved_name != name:
            raise UserError(
                f"checkpoint {checkpoint} was trained with model '{saved_name}', not '{name}'; "
                f"pass --model {saved_name}"
            )
        state_dict = checkpoint_state_dict(raw, checkpoint)

    _check_optional_deps(name)
    try:
        with _quiet_open_clip():
            model = open_clip.create_model(
                name,
                pretrained=None,
                precision=precision,
                device="cpu",  # load weights on CPU, then move once
                pretrained_image=False,
                pretrained_text=False,
            )
    except ImportError as e:
        raise UserError(f"model {name!r} needs an optional package that is not installed: {e}") from e
    except OSError as e:
        # HF-text-tower configs fetch their architecture from the Hugging Face hub.
        raise UserError(
            f"model {name!r} could not be built offline ({e}); pick a model without a Hugging Face "
            f"text tower, e.g. one of {', '.join(bundled_model_names())}"
        ) from e

    if state_dict is not None:
        load_checkpoint_into(model, state_dict, source=str(checkpoint), model_name=name)
    try:
        return model.to(dev)
    except torch.OutOfMemoryError as e:
        raise UserError(f"model {name!r} does not fit in {dev} memory; use a smaller model") from e


# --------------------------------------------------------------------------------------------
# checkpoints
# --------------------------------------------------------------------------------------------


def load_checkpoint_file(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint file (``torch.load(..., weights_only=True)``) and return its raw dict.

    A bare state dict is returned as is. Raises UserError when the file is missing, is not a
    torch checkpoint, or contains pickled objects that ``weights_only`` refuses.
    """
    p = Path(path)
    if not p.exists():
        raise UserError(f"checkpoint {path} does not exist; check the path (e.g. runs/<name>/checkpoints/)")
    if not p.is_file():
        raise UserError(f"checkpoint {path} is not a file; pass the .pt file, not its directory")
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # weights_only refuses arbitrary classes; its message is long, keep the first line.
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(
            f"checkpoint {path} contains objects that cannot be loaded safely ({first}); "
            "re-save it with only tensors and plain Python values"
        ) from e
    except Exception as e:  # torch.load fails in many ways on damaged files (IndexError, ...)
        raise UserError(
            f"checkpoint {path} is not a readable torch checkpoint ({type(e).__name__}); "
            "the file may be truncated or corrupted -- re-create it or pick another checkpoint"
        ) from e
    if not isinstance(obj, dict):
        raise UserError(
            f"checkpoint {path} holds a {type(obj).__name__}, not a dict; "
            "expected a state dict or {'model': state_dict, 'model_name': ...}"
        )
    return obj


def checkpoint_model_name(path: str | Path) -> str | None:
    """The ``model_name`` recorded in a checkpoint (our trainer's format), or None if absent.

    Lets the CLI default ``--model`` from ``--checkpoint``. UserError if the file is unreadable.
    """
    name = load_checkpoint_file(path).get("model_name")
    return name if isinstance(name, str) and name else None


def checkpoint_state_dict(raw: Mapping[str, Any], source: str | Path = "<checkpoint>") -> dict[str, Any]:
    """Extract the model state dict from a raw checkpoint dict.

    Accepts our format (``"model"``), open_clip's (``"state_dict"``) or a bare state dict, and
    strips the ``module.`` prefix that DistributedDataParallel adds.
    """
    sd: Any = raw
    for key in ("model", "state_dict"):
        if isinstance(raw.get(key), Mapping):
            sd = raw[key]
            break
    if not isinstance(sd, Mapping) or not any(isinstance(v, torch.Tensor) for v in sd.values()):
        raise UserError(
            f"checkpoint {source} contains no model weights; expected a state dict or a dict with a "
            "'model' or 'state_dict' entry"
        )
    out = {}
    for k, v in sd.items():
        out[k[len("module.") :] if k.startswith("module.") else k] = v
    return out


def load_checkpoint_into(
    model: torch.nn.Module,
    state_dict: Mapping[str, Any],
    *,
    source: str = "<checkpoint>",
    model_name: str = "model",
) -> None:
    """Strictly load ``state_dict`` into ``model``; UserError summarising any mismatch.

    torch's own error for shape mismatches is a multi-screen RuntimeError; this compares keys and
    shapes first and reports counts plus a few examples in one line.
    """
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    shape_bad = [
        k
        for k, v in state_dict.items()
        if k in expected and isinstance(v, torch.Tensor) and v.shape != expected[k].shape
    ]
    if missing or unexpected or shape_bad:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys")
        if shape_bad:
            parts.append(f"{len(shape_bad)} shape mismatches")
        examples = (
            [f"{k} {tuple(state_dict[k].shape)} vs {tuple(expected[k].shape)}" for k in shape_bad[:2]]
            + (missing[:1] if missing else [])
            + (unexpected[:1] if unexpected else [])
        )
        raise UserError(
            f"checkpoint {source} does not match model '{model_name}': {', '.join(parts)} "
            f"(e.g. {'; '.join(examples)}); pass the --model it was trained with"
        )
    try:
        model.load_state_dict(state_dict, strict=True)
    except (RuntimeError, TypeError) as e:  # e.g. a non-tensor value under a weight key
        first = str(e).strip().splitlines()[0]
        raise UserError(f"checkpoint {source} could not be loaded into '{model_name}': {first}") from e


# --------------------------------------------------------------------------------------------
# tokenizer
# --------------------------------------------------------------------------------------------


def get_tokenizer(name: str) -> Any:
    """open_clip's tokenizer for model ``name`` (callable: list[str] -> LongTensor [B, context]).

    For the bundled models this is open_clip's SimpleTokenizer with its bundled BPE vocabulary
    (no network), padded with 0 to the model's ``context_length``.
    """
    name = _resolve_name(name)
    _check_optional_deps(name, tokenizer=True)
    try:
        with _quiet_open_clip():
            return open_clip.get_tokenizer(name)
    except (OSError, ImportError) as e:
        raise UserError(f"the tokenizer of model {name!r} cannot be loaded offline ({e})") from e


# --------------------------------------------------------------------------------------------
# images
# --------------------------------------------------------------------------------------------


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
