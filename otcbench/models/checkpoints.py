"""Checkpoint files: reading them safely (``weights_only``), the model name they record, their state dict in
any of the layouts otcbench or open_clip write, and loading one into a model with a clear error on mismatch.
"""

from __future__ import annotations

import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from otcbench.errors import UserError


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
