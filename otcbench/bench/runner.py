"""``otcbench run``: expand a recipe into a grid of runs, execute it with caching and resume, report.

The grid is attacks × defenses × seeds. Stages are shared and cached by content:

* the clean data: the synthetic world (``data/world-<hash>``) or an imported dataset (used in place);
* one poisoned dataset per (attack entry, seed) (``data/poison-<hash>``), shared by every defense;
* one run directory per (attack, defense, seed) (``runs/<run_id>``): training, then ``metrics.json``.

A run's id is the hash of its resolved configuration (data stage, model, train options, defense and its
options, the run it starts from, evaluation options), so the same recipe maps to the same directories,
and changing any option that changes results gives new ones. Options that do not change results
(device, threads, workers, logging, checkpoint cadence) are left out of the hash.

A run is *done* when its ``run.json`` says so and ``metrics.json`` exists: it is skipped. A run
directory that is not done was interrupted or failed: with ``--resume`` it continues from its last
checkpoint (the trainer's exact resume), without it the runner refuses to start. A run that raises is
recorded as failed with its error (``run.json``, ``error.log``) and the grid goes on; runs that start
from a failed run's checkpoint are recorded as failed too. Everything that can be wrong with a recipe is
checked before any data is generated or model trained.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console

from otcbench import __version__
from otcbench.bench.recipe import ExpandedAttack, ExpandedDefense, Recipe, dump_recipe, expand_attacks, expand_defenses
from otcbench.config import RESULT_NEUTRAL_TRAIN_KEYS, EvalConfig, ModelConfig, TrainConfig, TrainJob, validate
from otcbench.errors import UserError

#: Train/eval options that do not change results: left out of run ids (as the trainer's resume check does).
HASH_IGNORED_TRAIN = (*RESULT_NEUTRAL_TRAIN_KEYS, "save_every_epochs", "checkpoint_every_steps")
HASH_IGNORED_EVAL = ("device", "batch_size")

MARKER = "results.json"  # identifies a results directory and the recipe it belongs to
RUN_FILE = "run.json"
ERROR_FILE = "error.log"


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


@dataclass
class Plan:
    """A validated, expanded recipe bound to an output directory."""

    recipe: Recipe
    out: Path
    source: DataStage
    eval_data: Path
    poisons: list[DataStage]
    runs: list[RunSpec]

    def state(self, run: RunSpec) -> str:
        """``done``, ``partial`` (interrupted or failed: resumable) or ``new``."""
        return run_state(run.dir)


def run_state(run_dir: Path) -> str:
    """Whether a run directory is ``done``, ``partial`` or ``new`` (see module docs)."""
    if not run_dir.exists():
        return "new"
    info = read_run_info(run_dir)
    if info.get("status") == "done" and (run_dir / "metrics.json").is_file():
        return "done"
    return "partial"


def read_run_info(run_dir: Path) -> dict[str, Any]:
    f = run_dir / RUN_FILE
    if not f.is_file():
        return {}
    try:
        return json.loads(f.read_text())
    except json.JSONDecodeError:
        return {}  # torn by an interruption: the run is simply not done


def write_run_info(run_dir: Path, info: dict[str, Any]) -> None:
    from otcbench.train.checkpoint import write_json

    write_json(run_dir / RUN_FILE, info)


# --------------------------------------------------------------------------------------------------
# planning: every check happens here, before any work


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
                            f"choose another --out (default results/{recipe.name}) or remove it")
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
        stage = DataStage(key, (out / "data" / f"world-{key}").resolve(), "world", label="world", synth=spec.synth)
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


def plan_recipe(recipe: Recipe, out: str | Path | None = None, *, resume: bool = False) -> Plan:
    """Validate ``recipe`` against the registries and the filesystem and expand it into ordered runs.

    Raises :class:`UserError` (one line) for unknown attacks/defenses or options, an empty grid,
    missing data, a results directory of another recipe, or interrupted runs without ``resume``.
    """
    import torch

    from otcbench.attacks import ATTACKS
    from otcbench.defenses import DEFENSES
    from otcbench.defenses.base import check_defense

    out = Path(out) if out is not None else Path("results") / recipe.name
    attacks = expand_attacks(recipe)
    defenses = expand_defenses(recipe)
    for what, labels in (("attacks", [a.label for a in attacks]), ("defenses", [d.label for d in defenses])):
        dup = sorted({x for x in labels if labels.count(x) > 1})
        if dup:
            raise UserError(f"{what}: the label {dup[0]!r} is used twice; give the entries distinct labels")

    # names and options, against the registries
    resolved_attacks: dict[str, list[tuple[str, dict[str, Any]]]] = {}
    for a in attacks:
        resolved_attacks[a.label] = [
            (name, ATTACKS.options(name, opts).model_dump(mode="json")) for name, opts in a.attacks.items()
        ]
    dlabels = {d.label for d in defenses}
    resolved_defense: dict[str, dict[str, Any]] = {}
    for d in defenses:
        resolved_defense[d.label] = DEFENSES.options(d.spec.name, d.options).model_dump(mode="json")
        # options that cannot work together (SafeCLIP epochs leaving no filtering epoch): refused before any run
        where = f"defense {d.label}"
        d_train = validate(TrainConfig, _merge(recipe.train.model_dump(mode="json"), d.train), where=where)
        check_defense(d.spec.name, d.options, d_train.epochs, where)
        if d.spec.init_from is not None and d.spec.init_from not in dlabels:
            raise UserError(f"defense {d.label}: init_from {d.spec.init_from!r} is not a defense label of this "
                            f"recipe (labels: {', '.join(sorted(dlabels))})")
        if d.spec.init_from is not None and d.spec.model.get("init"):
            raise UserError(f"defense {d.label}: give init_from or model.init, not both")
    for a in attacks:
        for lab in a.spec.defenses or []:
            if lab not in dlabels:
                raise UserError(f"attack {a.label}: defenses lists {lab!r}, which is not a defense label "
                                f"(labels: {', '.join(sorted(dlabels))})")
    ordered = _topo_order(defenses)
    extra_data: dict[str, DataStage] = {}
    for d in defenses:
        if d.spec.data not in ("poisoned", "clean") and d.spec.data not in extra_data:
            extra_data[d.spec.data] = _dataset_stage(Path(d.spec.data), recipe, f"defense {d.label}: data")

    n_cells = sum(len([d for d in defenses if a.spec.defenses is None or d.label in a.spec.defenses])
                  for a in attacks) * len(recipe.seeds)
    if n_cells == 0:
        raise UserError(f"recipe {recipe.name} expands to no runs (attacks: {len(attacks)}, defenses: "
                        f"{len(defenses)}, seeds: {len(recipe.seeds)}); list at least one of each")

    _check_out_dir(out, recipe)
    source, eval_data = _source_stage(recipe, out)
    if recipe.requires.gpu and not torch.cuda.is_available():
        note = f" ({recipe.requires.note})" if recipe.requires.note else ""
        raise UserError(f"recipe {recipe.name} needs a GPU (requires.gpu: true) and CUDA is not available"
                        f"{note}; run it on a GPU machine or pass --set requires.gpu=false to try anyway")

    base_train = recipe.train.model_dump(mode="json")
    base_model = recipe.model.model_dump(mode="json")
    eval_cfg = recipe.eval
    poisons: dict[str, DataStage] = {}
    runs: list[RunSpec] = []
    for seed in recipe.seeds:
        for a in attacks:
            poison = None
            if not a.is_clean:
                key = stable_hash({"source": source.key, "attacks": resolved_attacks[a.label], "seed": seed})
                poison = poisons.setdefault(key, DataStage(
                    key, (out / "data" / f"poison-{key}").resolve(), "poison", label=a.label, seed=seed,
                    attacks=[(n, o) for n, o in a.attacks.items()],
                ))
            allowed = a.spec.defenses
            by_label: dict[str, RunSpec] = {}
            for d in ordered:
                if allowed is not None and d.label not in allowed:
                    continue
                where = f"defense {d.label}"
                train = validate(TrainConfig, {**_merge(base_train, d.train), "seed": seed}, where=where)
                model = validate(ModelConfig, _merge(base_model, d.spec.model), where=where)
                parent = None
                if d.spec.init_from is not None:
                    if d.spec.init_from not in by_label:
                        raise UserError(f"attack {a.label}: defense {d.label} starts from {d.spec.init_from!r}, "
                                        "which this attack does not run; add it to the attack's defenses")
                    parent = by_label[d.spec.init_from]
                if d.spec.data in extra_data:
                    train_data = extra_data[d.spec.data]
                else:
                    train_data = source if (poison is None or d.spec.data == "clean") else poison
                ev = eval_cfg.model_copy(update={"asr": poison is not None})
                tr = train.model_dump(mode="json")
                ev_d = ev.model_dump(mode="json")
                resolved = {
                    "train_data": train_data.key,
                    "poison": poison.key if poison else None,
                    "model": {**model.model_dump(mode="json"),
                              "init": parent.run_id if parent else model.init},
                    "train": {k: v for k, v in tr.items() if k not in HASH_IGNORED_TRAIN},
                    "defense": {"name": d.spec.name, "options": resolved_defense[d.label]},
                    "eval": {k: v for k, v in ev_d.items() if k not in HASH_IGNORED_EVAL},
                }
                run_id = stable_hash(resolved)
                run_dir = out / "runs" / run_id
                if parent is not None:
                    model = model.model_copy(update={"init": str((parent.dir / "checkpoints" / "last.pt").resolve())})
                elif model.init:
                    if not Path(model.init).is_file():
                        raise UserError(f"{where}: model.init {model.init} does not exist; pass a checkpoint file "
                                        "(a run's checkpoints/last.pt)")
                    model = model.model_copy(update={"init": str(Path(model.init).resolve())})
                job = TrainJob(data=str(train_data.path.resolve()), model=model, train=train,
                               defense={"name": d.spec.name, "options": d.options})
                spec = RunSpec(run_id, a, d, seed, job, train_data, poison, ev,
                               parent.run_id if parent else None, resolved, run_dir)
                by_label[d.label] = spec
                runs.append(spec)
    ids = [r.run_id for r in runs]
    dup = sorted({i for i in ids if ids.count(i) > 1})
    if dup:
        same = [r.title for r in runs if r.run_id == dup[0]]
        raise UserError(f"runs {same[0]} and {same[1]} have identical configurations; remove one of the entries")
    plan = Plan(recipe, out, source, eval_data, list(poisons.values()), runs)
    if not resume:
        partial = [r for r in runs if plan.state(r) == "partial"]
        if partial:
            raise UserError(f"{out} holds {len(partial)} interrupted or failed run(s) of this recipe "
                            f"(e.g. {partial[0].title} in {partial[0].dir}); pass --resume to continue them")
    return plan


# --------------------------------------------------------------------------------------------------
# execution


@dataclass
class Outcome:
    """What happened to one run in this invocation."""

    run: RunSpec
    action: str  # cached, trained, resumed, failed
    seconds: float = 0.0
    error: str = ""


@dataclass
class RunResult:
    """The result of :func:`execute_plan`."""

    plan: Plan
    outcomes: list[Outcome]
    summary: Path
    table_md: str

    @property
    def failed(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.action == "failed"]


@contextlib.contextmanager
def _grid_progress(enabled: bool, console: Console) -> Iterator[Any]:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    progress = Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        TextColumn("{task.fields[info]}"), disable=not enabled, console=console, transient=False,
    )
    with progress:
        yield progress


def _prepare_out(plan: Plan, recipe_file: Path | None) -> None:
    from otcbench.train.checkpoint import atomic_write_text, write_json

    plan.out.mkdir(parents=True, exist_ok=True)
    marker = plan.out / MARKER
    info = {"recipe": plan.recipe.name, "otcbench_version": __version__,
            "recipe_file": str(recipe_file) if recipe_file else None}
    if marker.is_file():
        try:
            info = {**json.loads(marker.read_text()), **info}
        except json.JSONDecodeError:
            pass
    write_json(marker, info)
    atomic_write_text(plan.out / "recipe.yaml", dump_recipe(plan.recipe))


def _build_stages(plan: Plan, pending: list[RunSpec], progress: Any, log: Callable[[str], None]) -> None:
    """Write the world and the poisoned datasets the pending runs need (cached ones are skipped)."""
    from otcbench.attacks.poison import poison_dataset
    from otcbench.data.synth import expected_images, write_world

    need_source = bool(pending)
    needed_poison = {r.poison.key: r.poison for r in pending if r.poison is not None}
    src = plan.source
    if need_source and src.kind == "world" and not src.exists():
        task = progress.add_task("world", total=expected_images(src.synth), info=str(src.path))
        # the command names `data synth`: the world's provenance, which cleanclip follows to render clean pairs
        write_world(src.path, src.synth, progress=lambda k: progress.advance(task, k),
                    command=f"otcbench data synth {src.path} (otcbench run {plan.recipe.name})")
        progress.remove_task(task)
        log(f"wrote the synthetic world to {src.path}")
    todo = [p for p in needed_poison.values() if not p.exists()]
    if todo:
        task = progress.add_task("poisoning", total=len(todo), info="")
        for p in todo:
            progress.update(task, info=f"{p.label} (seed {p.seed})")
            attacks = " ".join(f"--attack {n}" for n, _ in p.attacks)
            poison_dataset(src.path, p.path, p.attacks, seed=p.seed,
                           command=f"otcbench poison {src.path} {p.path} {attacks} --seed {p.seed} "
                           f"(otcbench run {plan.recipe.name}: {p.label})")
            progress.advance(task)
            log(f"poisoned {p.label} (seed {p.seed}) → {p.path}")
        progress.remove_task(task)


def _one_line(err: BaseException) -> str:
    msg = str(err).strip().splitlines()[0] if str(err).strip() else ""
    return f"{type(err).__name__}: {msg}" if not isinstance(err, UserError) else msg


def _execute_run(run: RunSpec, recipe_name: str, eval_data: Path, keep_checkpoints: str, show_progress: bool,
                 on_step: Callable[[Any], None] | None) -> tuple[str, float]:
    """Train (or resume) and evaluate one run; returns (action, seconds of this attempt)."""
    from otcbench.eval.run import evaluate
    from otcbench.train.loop import CHECKPOINT_DIR, LAST, Trainer

    t0 = time.perf_counter()
    run.dir.mkdir(parents=True, exist_ok=True)
    info = read_run_info(run.dir)
    attempts = list(info.get("attempts", []))
    base = {
        "run_id": run.run_id, "recipe": recipe_name, "attack": run.attack.label,
        "defense": run.defense.label, "defense_name": run.defense.spec.name, "seed": run.seed,
        "parent": run.parent, "resolved": run.resolved,
    }
    resume = (run.dir / "config.yaml").is_file() or (run.dir / CHECKPOINT_DIR / LAST).is_file()
    attempt: dict[str, Any] = {"started": time.strftime("%Y-%m-%dT%H:%M:%S"), "resumed": resume}
    write_run_info(run.dir, {**base, "status": "running", "seconds": info.get("seconds", 0.0),
                             "attempts": [*attempts, attempt]})
    (run.dir / ERROR_FILE).unlink(missing_ok=True)
    trainer = Trainer(run.job, run.dir, resume=resume, show_progress=show_progress, on_step=on_step)
    attempt["start_step"] = trainer.global_step
    resumed = resume and trainer.global_step > 0
    trainer.fit()
    del trainer
    evaluate(run.dir, eval_data, run.eval, poison=run.poison.path if run.poison else None)
    if keep_checkpoints == "last":
        for f in (run.dir / CHECKPOINT_DIR).glob("epoch_*.pt"):
            f.unlink()
    seconds = time.perf_counter() - t0
    attempt["seconds"] = round(seconds, 2)
    attempt["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    write_run_info(run.dir, {**base, "status": "done", "seconds": round(info.get("seconds", 0.0) + seconds, 2),
                             "attempts": [*attempts, attempt]})
    return ("resumed" if resumed else "trained"), seconds


def _worker_init() -> None:
    import datasets

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    # the heavy imports (torch, open_clip) happen here, while the main process still builds the data stages
    import otcbench.train.loop  # noqa: F401


def _worker_ready() -> None:
    """A no-op task: submitting one per worker starts them all (and their imports) at once."""


@contextlib.contextmanager
def _worker_pool(jobs: int) -> Iterator[Any]:
    """``jobs`` spawned worker processes, started now so that their start-up overlaps the data stages
    (None for ``jobs == 1``: runs then train in this process)."""
    if jobs <= 1:
        yield None
        return
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    ctx = multiprocessing.get_context("spawn")  # fresh interpreters: no forked torch thread pools
    with ProcessPoolExecutor(max_workers=jobs, mp_context=ctx, initializer=_worker_init) as pool:
        for _ in range(jobs):
            pool.submit(_worker_ready)
        yield pool


def _run_in_worker(run: RunSpec, recipe_name: str, eval_data: Path, keep_checkpoints: str) -> Outcome:
    """One run in a worker process (``jobs > 1``): failures are recorded here, as in the main process."""
    t0 = time.perf_counter()
    try:
        action, seconds = _execute_run(run, recipe_name, eval_data, keep_checkpoints, False, None)
    except Exception as err:
        seconds = time.perf_counter() - t0
        _record_failure(run, err, seconds, traceback.format_exc())
        return Outcome(run, "failed", seconds, _one_line(err))
    return Outcome(run, action, seconds)


def _record_failure(run: RunSpec, err: BaseException, seconds: float, tb: str) -> None:
    run.dir.mkdir(parents=True, exist_ok=True)
    info = read_run_info(run.dir)
    write_run_info(run.dir, {
        **{k: v for k, v in info.items() if k not in ("status", "error")},
        "run_id": run.run_id, "attack": run.attack.label, "defense": run.defense.label,
        "defense_name": run.defense.spec.name, "seed": run.seed, "resolved": run.resolved,
        "status": "failed", "error": _one_line(err),
        "seconds": round(float(info.get("seconds", 0.0)) + seconds, 2),
    })
    (run.dir / ERROR_FILE).write_text(tb)


def execute_plan(
    plan: Plan,
    *,
    jobs: int = 1,
    show_progress: bool = True,
    console: Console | None = None,
    recipe_file: Path | None = None,
    plots: bool = True,
    on_step: Callable[[Any], None] | None = None,
) -> RunResult:
    """Run every run of ``plan`` that is not done; write summary.csv, tables and plots.

    ``jobs > 1`` trains that many runs at once in worker processes (a run starts once the run it starts
    from is done); each gets ``train.threads`` or an equal share of the CPU cores, which changes no run id.
    ``on_step`` is passed to each trainer (tests use it to simulate an interruption; ``jobs=1`` only).
    A ``KeyboardInterrupt`` leaves the runs in progress resumable and propagates.
    """
    from otcbench.bench.report import write_report

    if jobs < 1:
        raise UserError(f"--jobs {jobs}: give at least 1")
    console = console or Console(stderr=True)
    _prepare_out(plan, recipe_file)
    states = {r.run_id: plan.state(r) for r in plan.runs}
    pending = [r for r in plan.runs if states[r.run_id] != "done"]
    outcomes: dict[str, Outcome] = {r.run_id: Outcome(r, "cached") for r in plan.runs if states[r.run_id] == "done"}
    index = {r.run_id: i for i, r in enumerate(plan.runs, 1)}

    def log(msg: str) -> None:
        console.print(msg, highlight=False, markup=False)

    def finish(o: Outcome, progress: Any, grid: Any) -> None:
        outcomes[o.run.run_id] = o
        where = f"[{index[o.run.run_id]}/{len(plan.runs)}] {o.run.title}"
        if o.action == "failed":
            log(f"{where}: FAILED after {o.seconds:.1f} s: {o.error} (see {o.run.dir / ERROR_FILE})")
        else:
            log(f"{where}: {o.action} in {o.seconds:.1f} s")
        progress.advance(grid)
        write_report(plan.out, plan=plan, plots=False)  # partial results are always on disk

    def failed_parent(run: RunSpec) -> Outcome | None:
        """A run whose parent failed is recorded as failed without training."""
        if run.parent is not None and outcomes.get(run.parent, Outcome(run, "")).action == "failed":
            err = UserError(f"starts from run {run.parent}, which failed")
            _record_failure(run, err, 0.0, f"{err}\n")
            return Outcome(run, "failed", 0.0, str(err))
        return None

    with _grid_progress(show_progress, console) as progress, _worker_pool(jobs if pending else 1) as pool:
        _build_stages(plan, pending, progress, log)
        grid = progress.add_task(plan.recipe.name, total=len(plan.runs), info="",
                                 completed=len(plan.runs) - len(pending))
        try:
            if jobs == 1:
                for run in pending:
                    progress.update(grid, info=run.title)
                    o = failed_parent(run)
                    if o is None:
                        t0 = time.perf_counter()
                        try:
                            action, seconds = _execute_run(run, plan.recipe.name, plan.eval_data,
                                                           plan.recipe.keep_checkpoints, show_progress, on_step)
                            o = Outcome(run, action, seconds)
                        except KeyboardInterrupt:
                            raise
                        except Exception as err:  # a failed run is recorded and the grid goes on
                            seconds = time.perf_counter() - t0
                            _record_failure(run, err, seconds, traceback.format_exc())
                            o = Outcome(run, "failed", seconds, _one_line(err))
                    finish(o, progress, grid)
            else:
                _execute_parallel(plan, pending, jobs, pool, outcomes, failed_parent,
                                  lambda o: finish(o, progress, grid), lambda text: progress.update(grid, info=text))
        except KeyboardInterrupt:
            log("interrupted; run again with --resume to continue the unfinished runs from their last checkpoints")
            write_report(plan.out, plan=plan, plots=False)
            raise
        progress.update(grid, info="report")
        table = write_report(plan.out, plan=plan, plots=plots)
    ordered = [outcomes[r.run_id] for r in plan.runs]
    return RunResult(plan, ordered, plan.out / "summary.csv", table)


def _start_priority(run: RunSpec, runs: list[RunSpec]) -> tuple[bool, float]:
    """Longest-first order for parallel runs: runs others start from, then by estimated cost.

    Cost is the defense's ``estimated_cost`` (epochs × ``relative_cost`` unless its options change it);
    starting long runs first shortens the whole grid (a 6-run quickstart on two workers: ~3.3 instead of ~3.5
    plain-CLIP run times).
    """
    from otcbench.defenses import DEFENSES

    is_parent = any(r.parent == run.run_id for r in runs)
    d = run.job.defense  # this run's options, a defense sweep's value included
    return is_parent, DEFENSES.get(d.name).estimated_cost(DEFENSES.options(d.name, d.options), run.job.train.epochs)


def _execute_parallel(plan: Plan, pending: list[RunSpec], jobs: int, pool: Any, outcomes: dict[str, Outcome],
                      failed_parent: Callable[[RunSpec], Outcome | None], finish: Callable[[Outcome], None],
                      status: Callable[[str], None]) -> None:
    """Run ``pending`` in the ``jobs`` worker processes of ``pool``, each run once its parent is done."""
    import os
    from concurrent.futures import FIRST_COMPLETED, Future, wait
    from concurrent.futures.process import BrokenProcessPool

    share = max(1, (os.cpu_count() or 1) // jobs)
    waiting = sorted(pending, key=lambda r: _start_priority(r, pending), reverse=True)
    running: dict[Future, RunSpec] = {}
    try:
        while waiting or running:
            for run in list(waiting):
                if len(running) >= jobs:
                    break
                if run.parent is not None and run.parent not in outcomes:
                    continue  # its parent is still pending or training
                waiting.remove(run)
                o = failed_parent(run)
                if o is not None:
                    finish(o)
                    continue
                if run.job.train.threads is None:
                    run = copy.copy(run)
                    run.job = run.job.model_copy(update={"train": run.job.train.model_copy(
                        update={"threads": share})})
                try:
                    fut = pool.submit(_run_in_worker, run, plan.recipe.name, plan.eval_data,
                                      plan.recipe.keep_checkpoints)
                except BrokenProcessPool:
                    raise UserError("a worker process died (out of memory?); run again with --resume, "
                                    "with fewer --jobs") from None
                running[fut] = run
            status(", ".join(r.title for r in running.values()))
            if not running:
                continue
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for fut in done:
                run = running.pop(fut)
                try:
                    o = fut.result()
                except Exception as err:  # the worker itself died: the run is failed, the grid goes on
                    _record_failure(run, err, 0.0, traceback.format_exc())
                    o = Outcome(run, "failed", 0.0, _one_line(err))
                finish(o)
    except BaseException:
        pool.shutdown(wait=True, cancel_futures=True)
        raise
