"""Atomic checkpoint writes and run-directory helpers."""

from __future__ import annotations

import errno
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from otcbench.errors import UserError

#: A run directory's checkpoints: ``CHECKPOINT_DIR/LAST`` (latest) and ``CHECKPOINT_DIR/epoch_NNN.pt``.
CHECKPOINT_DIR = "checkpoints"
LAST = "last.pt"


def atomic_torch_save(obj: Any, path: Path) -> None:
    """Write ``obj`` with torch.save to a temp file then rename: a crash never leaves a torn file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
    except (OSError, RuntimeError) as err:
        tmp.unlink(missing_ok=True)
        # torch's zip writer reports a full disk as a RuntimeError ("unexpected pos"), so ask the disk
        free = shutil.disk_usage(path.parent).free
        if (isinstance(err, OSError) and err.errno == errno.ENOSPC) or free < 64 * 1024**2:
            raise UserError(f"could not write {path}: no space left on the device ({free / 1024**2:.0f} MB free); "
                            "free some space and continue with --resume (the previous checkpoint is intact)") from None
        raise
    os.replace(tmp, path)


def atomic_write_text(path: Path, text: str) -> None:
    """Write a text file atomically (temp file + rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def environment_info(device: torch.device) -> dict[str, Any]:
    """The run directory's ``env.json``: :func:`otcbench.provenance.provenance` of this process (versions, code
    fingerprint, CPU class, GPU, torch threads) with the git state as ``git_commit`` / ``git_dirty``, and the
    device. No absolute paths."""
    from otcbench.provenance import provenance

    info = provenance(device, threads=torch.get_num_threads())
    return {"otcbench": info.pop("otcbench"), "git_commit": info.pop("commit") or "",
            "git_dirty": info.pop("dirty"), **info, "device": str(device)}


def write_json(path: Path, obj: Any) -> None:
    """Pretty JSON, written atomically."""
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


@dataclass
class ResolvedCheckpoint:
    """Where a checkpoint file is and where its metrics go."""

    file: Path
    run_dir: Path | None


def resolve_checkpoint(path: str | Path) -> ResolvedCheckpoint:
    """Accept a run directory (→ its ``checkpoints/last.pt``) or a checkpoint file."""
    p = Path(path)
    if p.is_dir():
        f = p / CHECKPOINT_DIR / LAST
        if not f.is_file():
            raise UserError(f"{p} is a directory without {CHECKPOINT_DIR}/{LAST}; pass a run directory "
                            "written by `otcbench train` or a checkpoint file")
        return ResolvedCheckpoint(f, p)
    if not p.is_file():
        raise UserError(f"checkpoint {p} does not exist; pass a run directory or a .pt file")
    run_dir = p.parent.parent if p.parent.name == CHECKPOINT_DIR else None
    return ResolvedCheckpoint(p, run_dir)
