"""Model creation and tokenizers for CLIP models: the one place otcbench builds an open_clip model.

Everything open_clip-specific that the rest of otcbench needs goes through :mod:`otcbench.models`, so
that the data pipeline, trainers, attacks and defenses never touch open_clip internals.
Models are always randomly initialised (this toolkit studies *pre-training*); trained
weights come from local checkpoint files written by our trainer (or open_clip's): :mod:`.checkpoints`.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import open_clip
import torch

from otcbench.device import resolve_device
from otcbench.errors import UserError
from otcbench.models.catalog import _model_config, _resolve_name, bundled_model_names
from otcbench.models.checkpoints import checkpoint_state_dict, load_checkpoint_file, load_checkpoint_into

#: Weight precisions accepted by :func:`create_model` (open_clip's names). ``bf16``/``fp16`` keep
#: LayerNorms in fp32 like OpenAI's CLIP; ``pure_*`` cast everything. Mixed precision training
#: (autocast) wants ``fp32`` weights.
PRECISIONS = ("fp32", "bf16", "fp16", "pure_bf16", "pure_fp16")


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
    dev = resolve_device(device, fix="use --device cpu")
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
