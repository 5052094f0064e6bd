"""Typed options for every stage, YAML loading and dotted ``--set key=value`` overrides.

Every user-facing option lives in a pydantic model with ``extra="forbid"``, so an unknown key or a wrong
type is caught before any work starts and reported on one line (:func:`validate`).
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PositiveFloat,
    SerializerFunctionWrapHandler,
    ValidationError,
    field_validator,
    model_serializer,
    model_validator,
)

from otcbench.errors import UserError


class Options(BaseModel):
    """Base of all option models: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


class SynthConfig(Options):
    """The synthetic world (``otcbench data synth``)."""

    n_train: int = Field(10000, ge=1, description="number of training image–caption pairs")
    image_size: int = Field(32, ge=16, le=512, description="image side in pixels")
    seed: int = Field(0, description="world seed: same seed, same data")
    probe_train_per_class: int = Field(64, ge=1, description="linear-probe training images per class")
    probe_val_per_class: int = Field(32, ge=1, description="linear-probe validation images per class")
    test_per_class: int = Field(64, ge=1, description="held-out test images per class (zero-shot, probe)")
    targets_per_class: int = Field(
        8, ge=0, description="held-out images per class that targeted attacks pick their targets from"
    )
    p_colour: float = Field(0.3, ge=0, le=1, description="probability a caption names an object's colour")
    p_synonym: float = Field(0.12, ge=0, le=1, description="probability a class is named by a synonym")
    p_junk: float = Field(0.04, ge=0, le=1, description="probability of an unrelated web caption")
    p_wrong: float = Field(0.03, ge=0, le=1, description="probability the main object is misnamed")
    world: Literal["shapes", "compositional"] = Field(
        "shapes",
        description="shapes: 1-3 shapes, class words in captions (default); compositional: 2-4 objects with "
        "distinct colour-shape bindings, every object named with its colour (docs/synthetic-world.md)",
    )
    min_objects: int = Field(2, ge=1, le=9, description="compositional: fewest objects in a training scene")
    max_objects: int = Field(4, ge=1, le=9, description="compositional: most objects in a training scene")
    p_position: float = Field(
        0.3, ge=0, le=1, description="compositional: probability a caption gives each object's position"
    )
    n_colours: int = Field(
        4, ge=1, le=9, description="compositional: palette size (red, green, blue, yellow, white, purple, cyan, "
        "orange, pink: the first n); small, so that colour is no shortcut and bindings repeat"
    )
    p_uncoloured: float = Field(
        0.0, ge=0, le=1, description="compositional: probability a caption names the shapes without their colours"
    )

    @model_validator(mode="after")
    def _objects_range(self) -> SynthConfig:
        if self.min_objects > self.max_objects:
            raise ValueError(f"min_objects ({self.min_objects}) is above max_objects ({self.max_objects})")
        if self.world == "compositional" and self.max_objects > self.n_colours:
            raise ValueError(f"max_objects ({self.max_objects}) is above n_colours ({self.n_colours}): objects "
                             "of a scene have distinct colours")
        return self

    @model_serializer(mode="wrap")
    def _dump(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        # A shapes world dumps as it did before the compositional options existed: recipe world keys and run
        # ids are hashes of this dump, and datasets record it (created_by), so they stay what they were.
        data = handler(self)
        if self.world == "shapes":
            for name in _COMPOSITIONAL_FIELDS:
                if getattr(self, name) == type(self).model_fields[name].default:
                    data.pop(name, None)
        return data


#: The SynthConfig fields added with the compositional world (left out of a default shapes world's dump).
_COMPOSITIONAL_FIELDS = ("world", "min_objects", "max_objects", "p_position", "n_colours", "p_uncoloured")


class ModelConfig(Options):
    """Which open_clip architecture, and where its weights come from."""

    name: str = Field("otc-rn-nano", description="open_clip model name (see `otcbench list models`)")
    init: str | None = Field(None, description="local checkpoint to start from (default: random init)")


#: ``train`` options that change how a run executes, never what it computes: a run resumes across a change of
#: them, and the recipe runner leaves them out of run ids. ``threads`` changes the order of float sums, so
#: the last bits: each run records its count in its provenance and the report flags a table mixing counts.
RESULT_NEUTRAL_TRAIN_KEYS = ("device", "threads", "num_workers", "data_mode", "max_bad_fraction", "log_every",
                             "report_to")


class TrainConfig(Options):
    """The training loop."""

    epochs: int = Field(8, ge=1)
    batch_size: int = Field(128, ge=2, description="global batch size (per step, before accumulation)")
    lr: float = Field(3e-3, gt=0)
    weight_decay: float = Field(0.1, ge=0)
    beta1: float = Field(0.9, ge=0, lt=1)
    beta2: float = Field(0.98, ge=0, lt=1)
    eps: float = Field(1e-6, gt=0)
    warmup: float = Field(
        0.1, ge=0, description="linear warm-up: a fraction of all steps if < 1, else a number of steps"
    )
    grad_accum: int = Field(1, ge=1, description="micro-batches per optimiser step")
    grad_clip: float | None = Field(None, gt=0, description="clip the gradient norm to this value")
    seed: int = Field(0, description="initialisation, data order and augmentation seed")
    device: str = Field("auto", description="auto, cpu, cuda, cuda:N")
    amp: Literal["auto", "bf16", "fp16", "none"] = Field(
        "auto", description="autocast precision; auto = bf16 on CUDA, none on CPU"
    )
    num_workers: int = Field(0, ge=0, description="data-loader worker processes (streamed images)")
    data_mode: Literal["auto", "memory", "stream"] = Field(
        "auto", description="memory: decode every image once up front; stream: decode batches on demand with "
        "num_workers processes (datasets larger than memory); auto: memory when the pixels at the model's "
        "side (or as stored, up to 4x it) fit in 8 GiB"
    )
    max_bad_fraction: float = Field(
        0.01, ge=0, le=1, description="streaming: error when more than this fraction of images are missing or "
        "unreadable (fewer are trained as black images and counted in log.jsonl)"
    )
    threads: int | None = Field(
        1, ge=1, description="torch CPU threads (null: torch's default, every core); runs are bit-identical only "
        "at the same count and CPU class"
    )
    save_every_epochs: int = Field(1, ge=1, description="keep a per-epoch checkpoint every N epochs")
    checkpoint_every_steps: int = Field(
        0, ge=0, description="also write last.pt every N steps inside an epoch (0: only at epoch end)"
    )
    log_every: int = Field(10, ge=1, description="steps between log.jsonl lines")
    report_to: list[Literal["tensorboard", "wandb"]] = Field(
        default_factory=list, description="also send log.jsonl's metrics to these: tensorboard (RUN/tensorboard), "
        "wandb (offline, RUN/wandb); a list or a comma-separated string, as open_clip's --report-to"
    )
    max_logit_scale: float = Field(100.0, gt=0, description="clamp of the learnable temperature")

    @field_validator("report_to", mode="before")
    @classmethod
    def _report_to_list(cls, value: Any) -> Any:
        # `--set train.report_to=tensorboard,wandb` arrives as one string (open_clip's form): split it; each name
        # is then checked against the Literal, so a typo is a one-line error naming the allowed sinks
        if value is None:
            return []
        if isinstance(value, str):
            value = [part.strip() for part in value.split(",") if part.strip()]
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            value = list(dict.fromkeys(value))  # a sink named twice reports once
        return value


class DefenseConfig(Options):
    """A defense by registry name with its own options (validated by the defense's options model)."""

    name: str = "none"
    options: dict[str, Any] = Field(default_factory=dict)


class TrainJob(Options):
    """Everything ``otcbench train`` needs; written resolved to ``config.yaml`` in the run directory."""

    data: str = Field("", description="pair dataset directory")
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    defense: DefenseConfig = Field(default_factory=DefenseConfig)


class EvalConfig(Options):
    """``otcbench eval``."""

    zeroshot: bool = True
    linear_probe: bool = True
    asr: bool = False
    batch_size: int = Field(512, ge=1)
    device: str = "auto"
    probe_c_grid: list[PositiveFloat] = Field(
        default_factory=lambda: [0.01, 0.1, 1.0, 10.0, 100.0],
        min_length=1,
        description="inverse L2 strengths tried for the linear probe; the best on the val split wins",
    )
    probe_max_iter: int = Field(300, ge=1)
    seed: int = 0


M = TypeVar("M", bound=BaseModel)
_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+")


def format_validation_error(err: ValidationError, where: str = "") -> str:
    """One line out of a pydantic error: ``train.epochs: input should be a valid integer (got 'x')``."""
    parts = []
    for e in err.errors()[:3]:
        loc = ".".join(str(p) for p in e["loc"])
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        got = e.get("input")
        shown = f" (got {got!r})" if e["type"] != "extra_forbidden" and not isinstance(got, dict) else ""
        parts.append(f"{loc}: {msg}{shown}")
    more = f" (+{len(err.errors()) - 3} more)" if len(err.errors()) > 3 else ""
    prefix = f"{where}: " if where else ""
    return f"{prefix}invalid options: {'; '.join(parts)}{more}"


def validate(model: type[M], data: dict[str, Any], where: str = "") -> M:
    """Validate ``data`` against ``model``; any problem becomes a one-line :class:`UserError`."""
    try:
        return model.model_validate(data)
    except ValidationError as err:
        hint = " (see `--help` for the options)"
        raise UserError(format_validation_error(err, where) + hint) from None


def parse_override(item: str) -> tuple[list[str], Any]:
    """Parse ``a.b.c=value`` (value in YAML syntax: ``3``, ``1e-3``, ``true``, ``[1, 2]``, ``text``)."""
    key, sep, raw = item.partition("=")
    key = key.strip()
    if not sep or not key or any(not p for p in key.split(".")):
        raise UserError(f"--set {item!r}: expected KEY=VALUE with a dotted key, e.g. --set train.epochs=5")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    if isinstance(value, str):
        # YAML 1.1 reads 1e-3 (no dot) as a string; numbers are what users mean.
        if _NUMBER.fullmatch(value.strip()):
            value = float(value)
    return key.split("."), value


def apply_overrides(data: dict[str, Any], overrides: list[str] | None) -> dict[str, Any]:
    """Return a copy of ``data`` with each dotted ``--set`` override applied (validated later)."""
    out = copy.deepcopy(data)
    for item in overrides or []:
        path, value = parse_override(item)
        node = out
        for i, part in enumerate(path[:-1]):
            nxt = node.get(part)
            if nxt is None:
                nxt = node[part] = {}
            elif not isinstance(nxt, dict):
                where = ".".join(path[: i + 1])
                raise UserError(f"--set {item!r}: {where} is a value, not a section; use --set {where}=...")
            node = nxt
        node[path[-1]] = value
    return out


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping safely; missing files and bad YAML are one-line errors."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"config file {p} does not exist; check the path")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise UserError(f"{p}: not valid YAML{where}; fix the syntax") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"{p}: expected a mapping of options at the top level, got {type(data).__name__}")
    return data


def dump_yaml(model: BaseModel) -> str:
    """The fully resolved options as YAML (the run directory's config.yaml)."""
    return yaml.safe_dump(model.model_dump(mode="json"), sort_keys=False)
