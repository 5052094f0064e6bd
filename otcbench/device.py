"""The one device parser (``auto``, ``cpu``, ``cuda``, ``cuda:N``) and the autocast dtype of ``amp``."""

from __future__ import annotations

import torch

from otcbench.errors import UserError


def resolve_device(name: str | torch.device, *, fix: str = "use --set train.device=cpu") -> torch.device:
    """``auto`` → CUDA when available, else CPU; an unknown name, a CUDA request without CUDA or a GPU index
    this machine lacks is a one-line :class:`~otcbench.errors.UserError` ending in ``fix`` (how to fix it)."""
    if isinstance(name, str) and name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError):
        raise UserError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device {name!r} requested but CUDA is not available; {fix}")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise UserError(f"device {name!r} does not exist (this machine has {torch.cuda.device_count()} GPUs); "
                        "pick another index")
    return dev


def autocast_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``train.amp`` on ``device`` (None: full precision)."""
    if amp == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "none": None}[amp]
