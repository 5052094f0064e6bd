"""Recipes: one YAML file describes a whole benchmark grid (attacks × defenses × seeds).

A recipe is validated by pydantic (unknown keys and wrong types are one-line errors) after short forms
are expanded, so recipes stay compact::

    name: quickstart
    data: {synth: {n_train: 6000}}           # or {path: data/cc3m, eval: data/imagenet-val}
    attacks:
      - none                                 # the clean reference
      - badnet                               # an attack with its default options
      - {badnet: {rate: 0.01}}               # an attack with options
      - label: targeted+badnet               # several attacks in one poisoned dataset
        attacks: {targeted: {n_targets: 8}, badnet: {}}
      - badnet.rate: [0.0025, 0.005, 0.01]   # a sweep: one entry per value, labelled "badnet rate=…"
    defenses:
      - none
      - {roclip: {match_every: 2}}
      - name: cleanclip                      # fine-tunes the `none` model of the same attack and seed
        init_from: none
        train: {epochs: 2, lr: 1e-5}         # per-defense overrides of the train section
    model: {name: otc-rn-nano}
    train: {epochs: 6, batch_size: 128}
    eval: {zeroshot: true, linear_probe: true}
    seeds: [0]

:func:`load_recipe` reads a recipe by path or by name (the recipes shipped in ``otcbench/recipes``),
applies ``--set`` overrides (``--set train.epochs=2``, ``--set defenses.cleanclip.train.lr=1e-5``) and
validates the schema; :mod:`otcbench.bench.runner` checks names against the registries and expands it.
"""

from __future__ import annotations

import copy
import itertools
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from otcbench.config import (
    EvalConfig,
    ModelConfig,
    Options,
    SynthConfig,
    TrainConfig,
    apply_overrides,
    format_validation_error,
    load_yaml,
)
from otcbench.errors import UserError

#: Where the shipped recipes live (package data; the repository's top-level ``recipes/`` links here).
RECIPE_DIR = Path(__file__).resolve().parent.parent / "recipes"

#: Attack name that stands for "no attack": the clean reference.
CLEAN = "none"

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


class DataSpec(Options):
    """The clean training data: the synthetic world, or a pair dataset made by ``otcbench data import``."""

    synth: SynthConfig | None = Field(None, description="render the synthetic world with these options")
    path: str | None = Field(None, description="an existing pair dataset (e.g. from `otcbench data import`)")
    eval: str | None = Field(
        None, description="eval set directory (default: the eval set stored with the data, as the world has)"
    )

    @model_validator(mode="after")
    def _one_source(self) -> DataSpec:
        if (self.synth is None) == (self.path is None):
            raise ValueError("give exactly one of data.synth (the synthetic world) or data.path (a dataset)")
        return self


class Requirements(Options):
    """What a recipe needs beyond a CPU: shown by ``otcbench list recipes``, checked before any work."""

    gpu: bool = Field(False, description="needs CUDA (override with --set requires.gpu=false to try anyway)")
    note: str = Field("", description="how to get what the recipe needs (data import commands, hardware)")


def _single_key_form(raw: Any, fields: set[str], name_key: str, options_key: str) -> Any:
    """``"badnet"`` → ``{name_key: "badnet"}``; ``{"badnet": {...}}`` → ``{name_key: "badnet", options_key: {...}}``."""
    if isinstance(raw, str):
        return {name_key: raw}
    if isinstance(raw, dict) and len(raw) == 1:
        (key, value), = raw.items()
        if key not in fields and (value is None or isinstance(value, dict)):
            return {name_key: key, options_key: dict(value or {})}
    return raw


class AttackSpec(Options):
    """One row group of the grid: a poisoned dataset made by one or several attacks (none: clean data)."""

    label: str | None = Field(None, description="row label in tables (default: the attack names joined by +)")
    attacks: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="attack name → options; all go into one poisoned dataset"
    )
    sweep: dict[str, list[Any]] = Field(
        default_factory=dict,
        description="ATTACK.option → values: one entry per value (cartesian product over several keys)",
    )
    defenses: list[str] | None = Field(
        None, description="run only these defense labels on this data (default: every defense)"
    )

    @model_validator(mode="before")
    @classmethod
    def _short_forms(cls, raw: Any) -> Any:
        if isinstance(raw, dict) and len(raw) == 1:
            (key, value), = raw.items()
            if isinstance(key, str) and "." in key and isinstance(value, list):
                # the compact sweep: `- badnet.rate: [0.0025, 0.005, 0.01]`
                raw = {"attack": key.split(".")[0], "sweep": {key: value}}
        raw = _single_key_form(raw, set(cls.model_fields) | {"attack", "options"}, "attack", "options")
        if isinstance(raw, dict) and "attack" in raw:
            raw = dict(raw)
            name = raw.pop("attack")
            options = raw.pop("options", None) or {}
            if "attacks" in raw:
                raise ValueError("give either attack (one) or attacks (several), not both")
            if not isinstance(name, str):
                raise ValueError(f"attack must be a name, got {name!r}")
            raw["attacks"] = {} if name == CLEAN else {name: options}
        return raw

    @field_validator("attacks", mode="before")
    @classmethod
    def _empty_options(cls, v: Any) -> Any:
        # `badnet:` with nothing after it (YAML null) means default options
        return {k: ({} if o is None else o) for k, o in v.items()} if isinstance(v, dict) else v

    @field_validator("attacks")
    @classmethod
    def _no_none(cls, v: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        if CLEAN in v and len(v) > 1:
            raise ValueError(f"{CLEAN!r} (clean data) cannot be combined with other attacks")
        v.pop(CLEAN, None)
        return v

    @property
    def base_label(self) -> str:
        return self.label or ("+".join(self.attacks) if self.attacks else "clean")


class DefenseSpec(Options):
    """One column group of the grid: a defense with its options and per-defense training overrides."""

    name: str = Field(description="registered defense (see `otcbench list defenses`)")
    label: str | None = Field(None, description="column label in tables (default: the name)")
    options: dict[str, Any] = Field(default_factory=dict, description="the defense's own options")
    train: dict[str, Any] = Field(
        default_factory=dict, description="overrides of the recipe's train section for this defense"
    )
    model: dict[str, Any] = Field(default_factory=dict, description="overrides of the model section")
    init_from: str | None = Field(
        None, description="label of the defense whose final checkpoint (same attack, seed) this one starts from"
    )
    data: str = Field(
        "poisoned", description="training data: the attack's poisoned dataset (poisoned), the clean source "
        "(clean), or the path of another pair dataset (e.g. CleanCLIP's separate clean fine-tuning set)"
    )
    sweep: dict[str, list[Any]] = Field(
        default_factory=dict,
        description="options.KEY / train.KEY → values: one entry per value, labelled 'LABEL KEY=VALUE'",
    )

    @model_validator(mode="before")
    @classmethod
    def _short_forms(cls, raw: Any) -> Any:
        return _single_key_form(raw, set(cls.model_fields), "name", "options")

    @property
    def base_label(self) -> str:
        return self.label or self.name


class Recipe(Options):
    """A benchmark grid: data, attacks × defenses × seeds, model, train and eval options."""

    name: str = Field(description="recipe name; results go to out/<name>/ by default")
    description: str = ""
    requires: Requirements = Field(default_factory=Requirements)
    data: DataSpec
    attacks: list[AttackSpec] = Field(description="poisoned datasets (rows of the tables); none = clean")
    defenses: list[DefenseSpec] = Field(description="defenses (columns of the comparison)")
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    seeds: list[int] = Field(default_factory=lambda: [0], description="training and poisoning seeds")
    keep_checkpoints: Literal["last", "all"] = Field(
        "last", description="after a run is evaluated keep only checkpoints/last.pt (last) or every epoch's"
    )
    jobs: int = Field(
        1, ge=1, description="runs trained at once by default (`otcbench run --jobs` overrides); each uses "
        "train.threads torch threads whatever the number of jobs or cores"
    )
    reference: str | None = Field(
        None, description="a results directory (relative to the working directory, e.g. a committed "
        "results/<name>) that `otcbench run` compares its table with (`otcbench report --compare`); no run id "
        "depends on it"
    )
    launcher: dict[str, Any] = Field(
        default_factory=dict, description="options of `otcbench run --launcher` (partition, GPUs and CPUs per run, "
        "time limit, memory: docs/scale.md), validated by the launcher before anything is submitted; no run id "
        "depends on them"
    )

    @field_validator("name")
    @classmethod
    def _slug(cls, v: str) -> str:
        if not _NAME.match(v):
            raise ValueError("use letters, digits, '.', '_' and '-' only (it names the output directory)")
        return v

    @field_validator("seeds")
    @classmethod
    def _unique_seeds(cls, v: list[int]) -> list[int]:
        if len(set(v)) != len(v):
            raise ValueError(f"seeds repeat ({v}); list each seed once")
        return v


# --------------------------------------------------------------------------------------------------
# sweeps


def _fmt_value(v: Any) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


def _set_path(d: dict[str, Any], path: list[str], value: Any, where: str) -> None:
    node = d
    for i, part in enumerate(path[:-1]):
        nxt = node.setdefault(part, {})
        if not isinstance(nxt, dict):
            raise UserError(f"{where}: {'.'.join(path[: i + 1])} is a value, not a section of options")
        node = nxt
    node[path[-1]] = value


def _sweep_points(sweep: dict[str, list[Any]], where: str) -> list[list[tuple[str, Any]]]:
    """The cartesian product of a sweep: a list of [(key, value), ...] assignments (one empty one if none)."""
    for key, values in sweep.items():
        if not values:
            raise UserError(f"{where}: sweep {key} has no values; give a list like [0.005, 0.01]")
    keys = list(sweep)
    return [list(zip(keys, combo, strict=True)) for combo in itertools.product(*(sweep[k] for k in keys))]


def _sweep_label(base: str, point: list[tuple[str, Any]]) -> str:
    if not point:
        return base
    return base + " " + " ".join(f"{k.split('.')[-1]}={_fmt_value(v)}" for k, v in point)


class ExpandedAttack:
    """An attack entry after its sweep is expanded: one poisoned dataset per seed."""

    def __init__(self, spec: AttackSpec, label: str, attacks: dict[str, dict[str, Any]],
                 point: list[tuple[str, Any]]) -> None:
        self.spec = spec
        self.label = label
        self.attacks = attacks
        self.point = point  # the sweep assignment (key, value), empty without a sweep

    @property
    def is_clean(self) -> bool:
        return not self.attacks


class ExpandedDefense:
    """A defense entry after its sweep is expanded."""

    def __init__(self, spec: DefenseSpec, label: str, options: dict[str, Any], train: dict[str, Any],
                 point: list[tuple[str, Any]]) -> None:
        self.spec = spec
        self.label = label
        self.options = options
        self.train = train
        self.point = point


def expand_attacks(recipe: Recipe) -> list[ExpandedAttack]:
    """Every attack entry with its sweep expanded; sweep keys are ``ATTACK.option[.sub]``."""
    out = []
    for i, spec in enumerate(recipe.attacks):
        where = f"attacks[{i}] ({spec.base_label})"
        for point in _sweep_points(spec.sweep, where):
            attacks = copy.deepcopy(spec.attacks)
            for key, value in point:
                head, _, rest = key.partition(".")
                if head not in attacks or not rest:
                    names = ", ".join(attacks) or "no attack"
                    raise UserError(f"{where}: sweep key {key!r} must be ATTACK.option with ATTACK one of this "
                                    f"entry's attacks ({names}), e.g. {next(iter(attacks), 'badnet')}.rate")
                _set_path(attacks[head], rest.split("."), value, where)
            out.append(ExpandedAttack(spec, _sweep_label(spec.base_label, point), attacks, point))
    return out


def expand_defenses(recipe: Recipe) -> list[ExpandedDefense]:
    """Every defense entry with its sweep expanded; sweep keys are ``options.KEY`` or ``train.KEY``."""
    out = []
    for i, spec in enumerate(recipe.defenses):
        where = f"defenses[{i}] ({spec.base_label})"
        for point in _sweep_points(spec.sweep, where):
            options, train = copy.deepcopy(spec.options), copy.deepcopy(spec.train)
            for key, value in point:
                head, _, rest = key.partition(".")
                if head not in ("options", "train") or not rest:
                    raise UserError(f"{where}: sweep key {key!r} must start with options. or train. "
                                    "(e.g. options.alpha or train.lr)")
                _set_path(options if head == "options" else train, rest.split("."), value, where)
            out.append(ExpandedDefense(spec, _sweep_label(spec.base_label, point), options, train, point))
    return out


# --------------------------------------------------------------------------------------------------
# loading


def recipe_names() -> list[str]:
    """Names of the shipped recipes (``otcbench run NAME``)."""
    return sorted(p.stem for p in RECIPE_DIR.glob("*.yaml"))


def resolve_recipe_path(source: str | Path) -> Path:
    """A recipe file path, or the shipped recipe of that name; anything else is a one-line error."""
    p = Path(source)
    if p.is_file():
        return p
    if p.suffix not in (".yaml", ".yml") and "/" not in str(source) and (RECIPE_DIR / f"{source}.yaml").is_file():
        return RECIPE_DIR / f"{source}.yaml"
    known = ", ".join(recipe_names()) or "none"
    raise UserError(f"recipe {str(source)!r} is neither a file nor a shipped recipe (shipped: {known}; "
                    "see `otcbench list recipes`)")


def _normalise_entries(raw: dict[str, Any]) -> dict[str, Any]:
    """Expand short forms of list entries to mappings (so ``--set`` can address them by label)."""
    out = copy.deepcopy(raw)
    for section, spec in (("attacks", AttackSpec), ("defenses", DefenseSpec)):
        entries = out.get(section)
        if isinstance(entries, list):
            norm = []
            for e in entries:
                try:
                    norm.append(spec._short_forms(e))  # type: ignore[operator]
                except ValueError:
                    norm.append(e)  # reported by validation, with its location
            out[section] = norm
    return out


def _entry_label(section: str, entry: Any) -> str | None:
    if not isinstance(entry, dict):
        return None
    if entry.get("label"):
        return str(entry["label"])
    if section == "defenses":
        return entry.get("name")
    attacks = entry.get("attacks")
    if isinstance(attacks, dict):
        return "+".join(a for a in attacks if a != CLEAN) or "clean"
    return None


def apply_recipe_overrides(raw: dict[str, Any], overrides: list[str] | None) -> dict[str, Any]:
    """``--set`` for recipes: dotted keys as everywhere, and list entries addressed by their label:
    ``--set defenses.cleanclip.train.lr=1e-5``, ``--set attacks.badnet.defenses=[none]``,
    ``--set attacks.badnet.options.rate=0.02`` (one attack), ``--set attacks.mix.badnet.rate=0.02`` (several).
    An override applies to every entry with that label."""
    from otcbench.config import parse_override

    out = _normalise_entries(raw)
    plain = []
    for item in overrides or []:
        path, value = parse_override(item)
        if path[0] in ("attacks", "defenses") and len(path) >= 2 and isinstance(out.get(path[0]), list):
            entries = out[path[0]]
            matches = [e for e in entries if _entry_label(path[0], e) == path[1]]
            if not matches:
                labels = ", ".join(str(_entry_label(path[0], e)) for e in entries)
                raise UserError(f"--set {item!r}: no entry labelled {path[1]!r} in {path[0]} (labels: {labels})")
            if len(path) == 2:
                raise UserError(f"--set {item!r}: name an option of the entry, e.g. {path[0]}.{path[1]}.options.KEY")
            for e in matches:
                rest = path[2:]
                attacks = e.get("attacks") if path[0] == "attacks" else None
                if isinstance(attacks, dict):
                    if rest[0] == "options" and len(attacks) == 1 and len(rest) > 1:
                        rest = ["attacks", next(iter(attacks)), *rest[1:]]  # attacks.badnet.options.rate
                    elif rest[0] in attacks:
                        rest = ["attacks", *rest]  # attacks.mix.badnet.rate
                _set_path(e, rest, value, f"--set {item}")
        else:
            plain.append(item)
    return apply_overrides(out, plain)


def parse_recipe(raw: dict[str, Any], where: str) -> Recipe:
    """Validate a recipe mapping; every problem is one line naming the key."""
    try:
        return Recipe.model_validate(raw)
    except ValidationError as err:
        raise UserError(format_validation_error(err, where) + " (see docs/recipes.md)") from None


def load_recipe(source: str | Path, overrides: list[str] | None = None) -> tuple[Recipe, Path]:
    """Read, override and validate a recipe (by path or shipped name); returns it with its file."""
    path = resolve_recipe_path(source)
    raw = load_yaml(path)
    raw = apply_recipe_overrides(raw, overrides)
    return parse_recipe(raw, where=f"recipe {path}"), path


def dump_recipe(recipe: Recipe) -> str:
    """The resolved recipe as YAML (written to the results directory)."""
    return yaml.safe_dump(recipe.model_dump(mode="json", exclude_none=True), sort_keys=False)


def grid_size(recipe: Recipe) -> int:
    """Number of runs the recipe expands to (attacks × the defenses each runs × seeds)."""
    attacks, defenses = expand_attacks(recipe), expand_defenses(recipe)
    per_seed = sum(len([d for d in defenses if a.spec.defenses is None or d.label in a.spec.defenses])
                   for a in attacks)
    return per_seed * len(recipe.seeds)
