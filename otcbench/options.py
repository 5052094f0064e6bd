"""Each stage's validated options, built from a command's arguments: what a CLI command (or a notebook) builds
before any work starts. Every argument left ``None`` keeps its default; ``overrides`` are ``--set key=value``
strings, applied last; a bad key or value is one :class:`~otcbench.errors.UserError` line.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from otcbench.config import EvalConfig, SynthConfig, TrainJob, apply_overrides, load_yaml, validate
from otcbench.errors import UserError

#: ``data import``'s image-storage flags and the ``storage`` option each selects.
STORAGE_FLAGS = {"--bytes": "bytes", "--copy-images": "copy", "--link-images": "link"}


def _given(**values: Any) -> dict[str, Any]:
    return {k: v for k, v in values.items() if v is not None}


def synth_config(*, n_train: int | None = None, image_size: int | None = None, seed: int | None = None,
                 overrides: list[str] | None = None) -> SynthConfig:
    """The synthetic world's options (``data synth``)."""
    raw = _given(n_train=n_train, image_size=image_size, seed=seed)
    return validate(SynthConfig, apply_overrides(raw, overrides), where="data synth")


def train_job(data: str | Path, *, defense: str = "none", model: str | None = None, init: str | Path | None = None,
              epochs: int | None = None, seed: int | None = None, config: str | Path | None = None,
              overrides: list[str] | None = None) -> TrainJob:
    """A training run's job (``train``): a YAML ``config`` file, then the arguments, then ``overrides``.

    With ``init`` and no model name given anywhere, the model is the one the checkpoint records.
    """
    from otcbench.models import checkpoint_model_name

    raw: dict[str, Any] = load_yaml(config) if config else {}
    raw["data"] = str(data)
    raw.setdefault("defense", {})["name"] = defense
    if model is not None:
        raw.setdefault("model", {})["name"] = model
    if init is not None:
        raw.setdefault("model", {})["init"] = str(init)
        if model is None and "name" not in raw.get("model", {}):
            name = checkpoint_model_name(init)
            if name:
                raw["model"]["name"] = name
    if epochs is not None:
        raw.setdefault("train", {})["epochs"] = epochs
    if seed is not None:
        raw.setdefault("train", {})["seed"] = seed
    return validate(TrainJob, apply_overrides(raw, overrides), where="train")


def eval_config(*, zeroshot: bool = False, linear_probe: bool = False, asr: bool = False, poison: bool = False,
                overrides: list[str] | None = None) -> EvalConfig:
    """What ``eval`` measures: the metrics asked for, else every metric (ASR too when a poisoned dataset is
    given, ``poison``)."""
    raw: dict[str, Any] = {}
    if zeroshot or linear_probe or asr:
        raw = {"zeroshot": zeroshot, "linear_probe": linear_probe, "asr": asr}
    elif poison:
        raw = {"asr": True}
    return validate(EvalConfig, apply_overrides(raw, overrides), where="eval")


def storage_option(flags: dict[str, bool]) -> str | None:
    """The ``storage`` option of ``data import``'s storage flags (``{"--bytes": True, …}``), None for the
    format's default; two flags at once is one line."""
    on = [name for name, value in flags.items() if value]
    if len(on) > 1:
        raise UserError(f"{' and '.join(on)} exclude each other; pick one way to store images")
    return STORAGE_FLAGS[on[0]] if on else None


def import_options(overrides: list[str] | None = None, **given: Any) -> dict[str, Any]:
    """``data import``'s options: the given ones (None: the format's default), then ``overrides``; validated by
    the importer of the chosen format."""
    return apply_overrides(_given(**given), overrides)
