"""``otcbench run``, planning: a recipe expanded into a grid of runs, each with its id and directory, all checked.

The grid is attacks × defenses × seeds. Stages are shared and cached by content:

* the clean data: the synthetic world (``data/world-<hash>``) or an imported dataset (used in place);
* one poisoned dataset per (attack entry, seed) (``data/poison-<hash>``), shared by every defense;
* one run directory per (attack, defense, seed) (``runs/<run_id>``): training, then ``metrics.json``.

A run's id is the hash of its resolved configuration (data stage, model, train options, defense and its
options, the run it starts from, evaluation options), so the same recipe maps to the same directories,
and changing any option that changes results gives new ones. Options that do not change results
(device, threads, workers, logging, checkpoint cadence) are left out of the hash. ``threads`` changes the
order of float sums (the last bits) but not what is computed: kept out, a grid resumes on a machine with
another core count; each run records its count in its provenance and the report flags a table mixing counts.

The id names what a run computes; the code that computes it is the code fingerprint
(:func:`otcbench.provenance.code_fingerprint`), recorded in each run's ``run.json``. A run recorded with
another fingerprint (or none) was made by other code: its state is ``other code`` and the runner re-runs
it from scratch, as it does the runs that start from it (``parent re-run``), unless ``keep_other_code``
keeps the finished ones (their rows are then marked in the tables).

Everything that can be wrong with a recipe is checked here, before any data is generated or model trained
(:mod:`otcbench.bench.runner` executes a plan; :mod:`otcbench.bench.layout` names the directories).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from otcbench.bench import layout
from otcbench.bench.layout import MARKER, read_run_info, run_state
from otcbench.bench.recipe import ExpandedAttack, ExpandedDefense, Recipe, expand_attacks, expand_defenses
from otcbench.config import RESULT_NEUTRAL_TRAIN_KEYS, EvalConfig, ModelConfig, TrainConfig, TrainJob, validate
from otcbench.errors import UserError

#: Train/eval options that do not change results: left out of run ids (as the trainer's resume check does;
#: ``threads``: see the module docstring).
HASH_IGNORED_TRAIN = (*RESULT_NEUTRAL_TRAIN_KEYS, "save_every_epochs", "checkpoint_every_steps")
HASH_IGNORED_EVAL = ("device", "batch_size")

#: Where `otcbench run` writes a recipe's results without --out (out/<name>).
DEFAULT_OUT = Path("out")


def stable_hash(obj: Any, n: int = 12) -> str:
    """Hex digest of a JSON-serialisable object, independent of key order."""
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:n]


@dataclass
class DataStage:
    """A dataset the grid needs: the clean source or one poisoned copy."""

    key: str  # content hash (of how it is made)
    path: Path
    kind: str  # "world", "import" or "poison"
    label: str = ""
    seed: int = 0
    attacks: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    synth: Any = None  # SynthConfig for the world

    def exists(self) -> bool:
        return (self.path / "otcbench.json").is_file()


@dataclass
class RunSpec:
    """One cell of the grid (attack, defense, seed) with everything needed to run it."""

    run_id: str
    attack: ExpandedAttack
    defense: ExpandedDefense
    seed: int
    job: TrainJob  # data and init filled in
    train_data: DataStage
    poison: DataStage | None  # the poisoned dataset that defines ASR (None for the clean reference)
    eval: EvalConfig
    parent: str | None  # run id whose final checkpoint this run starts from
    resolved: dict[str, Any]  # what the id hashes
    dir: Path

    @property
    def title(self) -> str:
        return f"{self.attack.label} × {self.defense.label} (seed {self.seed})"


#: Plan states of a run that is re-run from scratch: made by other code, or starting from such a run.
OTHER_CODE = "other code"
PARENT_RERUN = "parent re-run"
RERUN_STATES = (OTHER_CODE, PARENT_RERUN)


def recorded_code(run_dir: Path) -> str:
    """The code fingerprint a run directory's ``run.json`` records ("" when none)."""
    prov = read_run_info(run_dir).get("provenance")
    return str(prov.get("code") or "") if isinstance(prov, dict) else ""


@dataclass
class Plan:
    """A validated, expanded recipe bound to an output directory, and the code that plans (and runs) it."""

    recipe: Recipe
    out: Path
    source: DataStage
    eval_data: Path
    poisons: list[DataStage]
    runs: list[RunSpec]
    code: str = ""  # the code fingerprint runs are compared with ("": every recorded one matches)
    keep_other_code: bool = False  # keep finished runs made by other code instead of re-running them

    def _parent(self, run: RunSpec) -> RunSpec | None:
        return next((r for r in self.runs if r.run_id == run.parent), None) if run.parent else None

    def made_by_other_code(self, run: RunSpec) -> bool:
        """Whether a run that has started was made by code of another fingerprint (or none recorded), or
        starts from such a run."""
        if not self.code or run_state(run.dir) == "new":
            return False
        if recorded_code(run.dir) != self.code:
            return True
        parent = self._parent(run)
        return parent is not None and self.made_by_other_code(parent)

    def state(self, run: RunSpec) -> str:
        """``done``, ``partial`` (interrupted or failed: resumable), ``new``, or a state that re-runs it from
        scratch: ``other code`` (started or finished by code of another fingerprint; a finished one stays
        ``done`` with ``keep_other_code``, an unfinished one never resumes) or ``parent re-run`` (it
        starts from a run that is re-run)."""
        state = run_state(run.dir)
        if state == "new" or not self.code:
            return state
        # an unfinished run that never trained (it failed before, e.g. its parent did) has nothing to resume
        trained = (run.dir / "config.yaml").is_file()
        if recorded_code(run.dir) != self.code and (state == "done" and not self.keep_other_code
                                                    or state == "partial" and trained):
            return OTHER_CODE
        parent = self._parent(run)
        if parent is not None and self.state(parent) in RERUN_STATES:
            return PARENT_RERUN
        return state


def _check_out_dir(out: Path, recipe: Recipe) -> None:
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; choose a directory for the results")
    marker = out / MARKER
    if marker.is_file():
        try:
            owner = json.loads(marker.read_text()).get("recipe")
        except json.JSONDecodeError:
            owner = None
        if owner != recipe.name:
            raise UserError(f"{out} holds the results of recipe {owner!r}, not {recipe.name!r}; "
                            f"choose another --out (default out/{recipe.name}) or remove it")
    elif out.is_dir() and any(p for p in out.iterdir() if not p.name.startswith(".")):
        raise UserError(f"{out} exists and holds other files (no {MARKER}); choose an empty or new --out directory")


def _dataset_stage(path: Path, recipe: Recipe, what: str) -> DataStage:
    """An existing pair dataset used in place, keyed by its content fingerprint."""
    from otcbench.data.format import read_meta

    note = f" ({recipe.requires.note})" if recipe.requires.note else ""
    if not path.exists():
        raise UserError(f"recipe {recipe.name} needs the dataset {path} ({what}), which does not exist{note}")
    meta = read_meta(path)
    if meta.kind != "pairs":
        raise UserError(f"{what} {path} is an eval set; point it at a training pair dataset")
    key = stable_hash({"fingerprint": meta.fingerprint or str(path.resolve())})
    return DataStage(key, path.resolve(), "import", label=str(path))


def _source_stage(recipe: Recipe, out: Path) -> tuple[DataStage, Path]:
    from otcbench.data.format import read_meta

    spec = recipe.data
    if spec.synth is not None:
        key = stable_hash({"synth": spec.synth.model_dump(mode="json")})
        # absolute: poisoned copies record their source's path, which later steps (cleanclip) follow
        stage = DataStage(key, layout.world_dir(out, key).resolve(), "world", label="world", synth=spec.synth)
        return stage, stage.path
    path = Path(spec.path or "")
    stage = _dataset_stage(path, recipe, "data.path")
    meta = read_meta(path)
    note = f" ({recipe.requires.note})" if recipe.requires.note else ""
    eval_path = Path(spec.eval) if spec.eval else path
    if spec.eval and not eval_path.exists():
        raise UserError(f"recipe {recipe.name} needs the eval set {eval_path}, which does not exist{note}")
    if not spec.eval and not meta.eval_set:
        raise UserError(f"{path} carries no eval set; set data.eval to an eval set directory "
                        "(e.g. one written by `otcbench data import --format imagefolder`)")
    read_meta(eval_path, what="eval set")
    return stage, eval_path.resolve()


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _topo_order(defenses: list[ExpandedDefense]) -> list[ExpandedDefense]:
    """Defenses ordered so that a defense comes after the one it starts from (stable otherwise)."""
    labels = {d.label: d for d in defenses}
    done: list[ExpandedDefense] = []
    seen: set[str] = set()

    def visit(d: ExpandedDefense, stack: tuple[str, ...]) -> None:
        if d.label in seen:
            return
        if d.label in stack:
            raise UserError(f"defenses: init_from forms a cycle ({' → '.join((*stack, d.label))}); "
                            "a defense cannot start from itself")
        parent = d.spec.init_from
        if parent is not None:
            visit(labels[parent], (*stack, d.label))
        seen.add(d.label)
        done.append(d)

    for d in defenses:
        visit(d, ())
    return done


def _check_labels(attacks: list[ExpandedAttack], defenses: list[ExpandedDefense]) -> None:
    for what, labels in (("attacks", [a.label for a in attacks]), ("defenses", [d.label for d in defenses])):
        dup = sorted({x for x in labels if labels.count(x) > 1})
        if dup:
            raise UserError(f"{what}: the label {dup[0]!r} is used twice; give the entries distinct labels")


def _resolve_defenses(recipe: Recipe, defenses: list[ExpandedDefense]) -> dict[str, dict[str, Any]]:
    """Each defense label's validated options; options that cannot work together (SafeCLIP epochs leaving no
    filtering epoch) and bad ``init_from`` links are refused before any run."""
    from otcbench.defenses import DEFENSES
    from otcbench.defenses.base import check_defense

    dlabels = {d.label for d in defenses}
    resolved: dict[str, dict[str, Any]] = {}
    for d in defenses:
        resolved[d.label] = DEFENSES.options(d.spec.name, d.options).model_dump(mode="json")
        where = f"defense {d.label}"
        d_train = validate(TrainConfig, _merge(recipe.train.model_dump(mode="json"), d.train), where=where)
        check_defense(d.spec.name, d.options, d_train.epochs, where)
        if d.spec.init_from is not None and d.spec.init_from not in dlabels:
            raise UserError(f"defense {d.label}: init_from {d.spec.init_from!r} is not a defense label of this "
                            f"recipe (labels: {', '.join(sorted(dlabels))})")
        if d.spec.init_from is not None and d.spec.model.get("init"):
            raise UserError(f"defense {d.label}: give init_from or model.init, not both")
    return resolved


def _check_attack_defenses(attacks: list[ExpandedAttack], defenses: list[ExpandedDefense]) -> None:
    dlabels = {d.label for d in defenses}
    for a in attacks:
        for lab in a.spec.defenses or []:
            if lab not in dlabels:
                raise UserError(f"attack {a.label}: defenses lists {lab!r}, which is not a defense label "
                                f"(labels: {', '.join(sorted(dlabels))})")


def _check_grid(recipe: Recipe, attacks: list[ExpandedAttack], defenses: list[ExpandedDefense]) -> None:
    n_cells = sum(len([d for d in defenses if a.spec.defenses is None or d.label in a.spec.defenses])
                  for a in attacks) * len(recipe.seeds)
    if n_cells == 0:
        raise UserError(f"recipe {recipe.name} expands to no runs (attacks: {len(attacks)}, defenses: "
                        f"{len(defenses)}, seeds: {len(recipe.seeds)}); list at least one of each")


def _check_gpu(recipe: Recipe) -> None:
    import torch

    if recipe.requires.gpu and not torch.cuda.is_available():
        note = f" ({recipe.requires.note})" if recipe.requires.note else ""
        raise UserError(f"recipe {recipe.name} needs a GPU (requires.gpu: true) and CUDA is not available"
                        f"{note}; run it on a GPU machine or pass --set requires.gpu=false to try anyway")


@dataclass
class _Grid:
    """What every run of a plan is built from (planning state shared by :func:`_run_spec`)."""

    recipe: Recipe
    out: Path
    source: DataStage
    extra_data: dict[str, DataStage]
    resolved_defense: dict[str, dict[str, Any]]


def _run_spec(grid: _Grid, seed: int, a: ExpandedAttack, d: ExpandedDefense, poison: DataStage | None,
              by_label: dict[str, RunSpec]) -> RunSpec:
    """The run of defense ``d`` against attack ``a`` (its poisoned data ``poison``) at ``seed``; ``by_label``:
    this attack and seed's runs planned so far (a run starts from one of them with ``init_from``)."""
    where = f"defense {d.label}"
    train = validate(TrainConfig, {**_merge(grid.recipe.train.model_dump(mode="json"), d.train), "seed": seed},
                     where=where)
    model = validate(ModelConfig, _merge(grid.recipe.model.model_dump(mode="json"), d.spec.model), where=where)
    parent = None
    if d.spec.init_from is not None:
        if d.spec.init_from not in by_label:
            raise UserError(f"attack {a.label}: defense {d.label} starts from {d.spec.init_from!r}, "
                            "which this attack does not run; add it to the attack's defenses")
        parent = by_label[d.spec.init_from]
    if d.spec.data in grid.extra_data:
        train_data = grid.extra_data[d.spec.data]
    else:
        train_data = grid.source if (poison is None or d.spec.data == "clean") else poison
    ev = grid.recipe.eval.model_copy(update={"asr": poison is not None})
    tr = train.model_dump(mode="json")
    ev_d = ev.model_dump(mode="json")
    resolved = {
        "train_data": train_data.key,
        "poison": poison.key if poison else None,
        "model": {**model.model_dump(mode="json"),
                  "init": parent.run_id if parent else model.init},
        "train": {k: v for k, v in tr.items() if k not in HASH_IGNORED_TRAIN},
        "defense": {"name": d.spec.name, "options": grid.resolved_defense[d.label]},
        "eval": {k: v for k, v in ev_d.items() if k not in HASH_IGNORED_EVAL},
    }
    run_id = stable_hash(resolved)
    if parent is not None:
        model = model.model_copy(update={"init": str((parent.dir / "checkpoints" / "last.pt").resolve())})
    elif model.init:
        if not Path(model.init).is_file():
            raise UserError(f"{where}: model.init {model.init} does not exist; pass a checkpoint file "
                            "(a run's checkpoints/last.pt)")
        model = model.model_copy(update={"init": str(Path(model.init).resolve())})
    job = TrainJob(data=str(train_data.path.resolve()), model=model, train=train,
                   defense={"name": d.spec.name, "options": d.options})
    return RunSpec(run_id, a, d, seed, job, train_data, poison, ev, parent.run_id if parent else None, resolved,
                   layout.run_dir(grid.out, run_id))


def _check_runs(plan: Plan, resume: bool) -> None:
    ids = [r.run_id for r in plan.runs]
    dup = sorted({i for i in ids if ids.count(i) > 1})
    if dup:
        same = [r.title for r in plan.runs if r.run_id == dup[0]]
        raise UserError(f"runs {same[0]} and {same[1]} have identical configurations; remove one of the entries")
    if not resume:
        partial = [r for r in plan.runs if plan.state(r) == "partial"]
        if partial:
            raise UserError(f"{plan.out} holds {len(partial)} interrupted or failed run(s) of this recipe "
                            f"(e.g. {partial[0].title} in {partial[0].dir}); pass --resume to continue them")


def plan_recipe(recipe: Recipe, out: str | Path | None = None, *, resume: bool = False,
                keep_other_code: bool = False) -> Plan:
    """Validate ``recipe`` against the registries and the filesystem and expand it into ordered runs.

    Raises :class:`UserError` (one line) for unknown attacks/defenses or options, an empty grid,
    missing data, a results directory of another recipe, or interrupted runs without ``resume``.
    ``keep_other_code``: finished runs made by other code are kept (see :meth:`Plan.state`).
    """
    from otcbench.attacks import ATTACKS
    from otcbench.provenance import code_fingerprint

    # out/ (gitignored), not results/: a default run never writes over the committed reference results
    out = Path(out) if out is not None else DEFAULT_OUT / recipe.name
    attacks = expand_attacks(recipe)
    defenses = expand_defenses(recipe)
    _check_labels(attacks, defenses)
    # names and options, against the registries
    resolved_attacks = {a.label: [(name, ATTACKS.options(name, opts).model_dump(mode="json"))
                                  for name, opts in a.attacks.items()] for a in attacks}
    resolved_defense = _resolve_defenses(recipe, defenses)
    _check_attack_defenses(attacks, defenses)
    ordered = _topo_order(defenses)
    extra_data: dict[str, DataStage] = {}
    for d in defenses:
        if d.spec.data not in ("poisoned", "clean") and d.spec.data not in extra_data:
            extra_data[d.spec.data] = _dataset_stage(Path(d.spec.data), recipe, f"defense {d.label}: data")
    _check_grid(recipe, attacks, defenses)
    _check_out_dir(out, recipe)
    source, eval_data = _source_stage(recipe, out)
    _check_gpu(recipe)

    grid = _Grid(recipe, out, source, extra_data, resolved_defense)
    poisons: dict[str, DataStage] = {}
    runs: list[RunSpec] = []
    for seed in recipe.seeds:
        for a in attacks:
            poison = None
            if not a.is_clean:
                key = stable_hash({"source": source.key, "attacks": resolved_attacks[a.label], "seed": seed})
                poison = poisons.setdefault(key, DataStage(
                    key, layout.poison_dir(out, key).resolve(), "poison", label=a.label, seed=seed,
                    attacks=[(n, o) for n, o in a.attacks.items()],
                ))
            by_label: dict[str, RunSpec] = {}
            for d in ordered:
                if a.spec.defenses is None or d.label in a.spec.defenses:
                    by_label[d.label] = _run_spec(grid, seed, a, d, poison, by_label)
                    runs.append(by_label[d.label])
    plan = Plan(recipe, out, source, eval_data, list(poisons.values()), runs, code=code_fingerprint(),
                keep_other_code=keep_other_code)
    _check_runs(plan, resume)
    return plan
