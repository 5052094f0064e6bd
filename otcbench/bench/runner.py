"""``otcbench run``, execution: the runs of a plan (:mod:`otcbench.bench.plan`), cached and resumable; the report.

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

Each run's ``run.json`` records its ``provenance`` (:func:`otcbench.provenance.provenance`: the code
fingerprint, versions, CPU class, threads, and ``wall_s`` / ``cpu_s``). A run made by other code (another
fingerprint, or none recorded), finished or not, and every run that starts from it, is cleared and re-run
from scratch, with one log line each, unless the plan keeps finished ones (``--keep-other-code``).
"""

from __future__ import annotations

import contextlib
import json
import shutil
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console

from otcbench import __version__
from otcbench.bench.layout import ERROR_FILE, MARKER, RECIPE_COPY, SUMMARY, read_run_info, run_state, write_run_info
from otcbench.bench.plan import OTHER_CODE, RERUN_STATES, Plan, RunSpec, plan_recipe, recorded_code, stable_hash
from otcbench.bench.recipe import RECIPE_DIR, dump_recipe
from otcbench.errors import UserError
from otcbench.progress import progress_bar, progress_enabled


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


def _recipe_source(recipe_file: Path | None) -> str | None:
    """The recipe file as a record shows it: a shipped recipe by its name, else :func:`portable_path`."""
    from otcbench.provenance import portable_path

    if recipe_file is None:
        return None
    if recipe_file.resolve().parent == RECIPE_DIR.resolve():
        return recipe_file.stem
    return portable_path(recipe_file)


def _prepare_out(plan: Plan, recipe_file: Path | None, command: str | None) -> None:
    """Write ``results.json`` (recipe, how it was invoked, the invoking process's provenance; the ``runs``
    block, written with the report, is kept) and ``recipe.yaml``."""
    from otcbench.provenance import command_line, provenance
    from otcbench.train.checkpoint import atomic_write_text, write_json

    plan.out.mkdir(parents=True, exist_ok=True)
    marker = plan.out / MARKER
    source = _recipe_source(recipe_file)
    info = {"recipe": plan.recipe.name, "otcbench_version": __version__, "recipe_file": source,
            "command": command or command_line(["run", source or plan.recipe.name, "--out", str(plan.out)]),
            "provenance": provenance(code=plan.code or None)}
    if marker.is_file():
        try:
            info = {**json.loads(marker.read_text()), **info}
        except json.JSONDecodeError:
            pass
    write_json(marker, info)
    atomic_write_text(plan.out / RECIPE_COPY, dump_recipe(plan.recipe))


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
                 on_step: Callable[[Any], None] | None, code: str = "") -> tuple[str, float]:
    """Train (or resume) and evaluate one run; returns (action, seconds of this attempt).

    ``run.json`` gets the run's provenance (``code``: the fingerprint of the planning process) when the attempt
    starts, so an interrupted run knows what made its checkpoint, and again with the threads used, ``wall_s``
    and ``cpu_s`` when it is done (this attempt's, plus what an earlier attempt recorded: one interrupted by
    Ctrl-C or a failure records none, so ``seconds`` can be larger).
    """
    import torch

    from otcbench.defenses import build_defense
    from otcbench.device import resolve_device
    from otcbench.eval.run import evaluate
    from otcbench.provenance import cpu_seconds, provenance
    from otcbench.train.checkpoint import CHECKPOINT_DIR, LAST
    from otcbench.train.loop import Trainer

    t0, cpu0 = time.perf_counter(), cpu_seconds()
    run.dir.mkdir(parents=True, exist_ok=True)
    info = read_run_info(run.dir)
    attempts = list(info.get("attempts", []))
    base = {
        "run_id": run.run_id, "recipe": recipe_name, "attack": run.attack.label,
        "defense": run.defense.label, "defense_name": run.defense.spec.name, "seed": run.seed,
        "parent": run.parent, "resolved": run.resolved,
    }
    resume = (run.dir / "config.yaml").is_file() or (run.dir / CHECKPOINT_DIR / LAST).is_file()
    before = info.get("provenance") if resume and isinstance(info.get("provenance"), dict) else {}
    device = resolve_device(run.job.train.device)
    prov = provenance(device, threads=run.job.train.threads, code=code or None)
    attempt: dict[str, Any] = {"started": time.strftime("%Y-%m-%dT%H:%M:%S"), "resumed": resume}
    write_run_info(run.dir, {**base, "status": "running", "seconds": info.get("seconds", 0.0),
                             "attempts": [*attempts, attempt], "provenance": prov})
    (run.dir / ERROR_FILE).unlink(missing_ok=True)
    trainer = Trainer(run.job, run.dir, defense=build_defense(run.job.defense), resume=resume,
                      show_progress=show_progress, on_step=on_step)
    attempt["start_step"] = trainer.global_step
    resumed = resume and trainer.global_step > 0
    trainer.fit()
    del trainer
    evaluate(run.dir, eval_data, run.eval, poison=run.poison.path if run.poison else None)
    if keep_checkpoints == "last":
        for f in (run.dir / CHECKPOINT_DIR).glob("epoch_*.pt"):
            f.unlink()
    seconds = time.perf_counter() - t0
    cpu1 = cpu_seconds()
    cpu_s = None if cpu0 is None or cpu1 is None else cpu1 - cpu0 + float(before.get("cpu_s") or 0.0)
    prov.update(threads=torch.get_num_threads(), wall_s=round(seconds + float(before.get("wall_s") or 0.0), 2),
                cpu_s=None if cpu_s is None else round(cpu_s, 2))
    attempt["seconds"] = round(seconds, 2)
    attempt["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    write_run_info(run.dir, {**base, "status": "done", "seconds": round(info.get("seconds", 0.0) + seconds, 2),
                             "attempts": [*attempts, attempt], "provenance": prov})
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


def _run_in_worker(run: RunSpec, recipe_name: str, eval_data: Path, keep_checkpoints: str, code: str) -> Outcome:
    """One run in a worker process (``jobs > 1``): failures are recorded here, as in the main process."""
    t0 = time.perf_counter()
    try:
        action, seconds = _execute_run(run, recipe_name, eval_data, keep_checkpoints, False, None, code)
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
    command: str | None = None,
) -> RunResult:
    """Run every run of ``plan`` that is not done; write summary.csv, tables and plots.

    ``jobs > 1`` trains that many runs at once in worker processes (a run starts once the run it starts
    from is done); each uses ``train.threads`` torch threads, whatever ``jobs`` and the number of cores.
    Runs made by other code (:meth:`Plan.state`) are cleared first and re-run from scratch.
    ``on_step`` is passed to each trainer (tests use it to simulate an interruption; ``jobs=1`` only).
    ``command``: the command line recorded in results.json (default: ``otcbench run RECIPE --out OUT``).
    A ``KeyboardInterrupt`` leaves the runs in progress resumable and propagates.
    """
    from otcbench.bench.report import write_report

    if jobs < 1:
        raise UserError(f"--jobs {jobs}: give at least 1")
    console = console or Console(stderr=True)
    _prepare_out(plan, recipe_file, command)
    index = {r.run_id: i for i, r in enumerate(plan.runs, 1)}

    def log(msg: str) -> None:
        console.print(msg, highlight=False, markup=False)

    states = {r.run_id: plan.state(r) for r in plan.runs}  # all before any directory is cleared
    for r in plan.runs:
        if states[r.run_id] in RERUN_STATES:
            log(f"[{index[r.run_id]}/{len(plan.runs)}] {r.title}: {_rerun_reason(plan, r, states[r.run_id])}; "
                "re-running it from scratch")
            shutil.rmtree(r.dir)
    pending = [r for r in plan.runs if states[r.run_id] != "done"]
    outcomes: dict[str, Outcome] = {r.run_id: Outcome(r, "cached") for r in plan.runs if states[r.run_id] == "done"}

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

    bar = progress_bar(progress_enabled(show_progress), console=console, info=True, elapsed=True)
    with bar as progress, _worker_pool(jobs if pending else 1) as pool:
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
                                                           plan.recipe.keep_checkpoints, show_progress, on_step,
                                                           plan.code)
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
    return RunResult(plan, ordered, plan.out / SUMMARY, table)


def _rerun_reason(plan: Plan, run: RunSpec, state: str) -> str:
    """Why a run is re-run, for its log line: the fingerprints, or the run it starts from."""
    if state == OTHER_CODE:
        old = recorded_code(run.dir)
        return f"made by other code (code {old or 'not recorded'}, now {plan.code})"
    parent = next(r for r in plan.runs if r.run_id == run.parent)
    return f"starts from {parent.title}, which is re-run"


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
    from concurrent.futures import FIRST_COMPLETED, Future, wait
    from concurrent.futures.process import BrokenProcessPool

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
                try:
                    fut = pool.submit(_run_in_worker, run, plan.recipe.name, plan.eval_data,
                                      plan.recipe.keep_checkpoints, plan.code)
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


# planning and the layout, re-exported from their historical import path
__all__ = ["Outcome", "Plan", "RunResult", "RunSpec", "execute_plan", "plan_recipe", "read_run_info", "run_state",
           "stable_hash"]
