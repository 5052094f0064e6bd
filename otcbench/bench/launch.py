"""``otcbench run`` beyond one machine: a grid's steps as commands, one run per command, one job per run.

A plan (:mod:`otcbench.bench.plan`) is already a set of cached, resumable runs, so a scheduler can run them:

* :func:`step_commands` (``--print-commands``): one ``otcbench`` command per pending step, the data first
  (``--stage data``: the world and the poisoned sets the pending runs need), then one ``--only RUN_ID`` per
  pending run, a run after the run it starts from;
* :func:`build_data` and :func:`run_only` execute those two kinds of step exactly as
  :func:`otcbench.bench.runner.execute_plan` would (the same stage builder, ``_execute_run`` and failure record);
* :func:`submit_grid` (``--launcher slurm``, :mod:`otcbench.bench.jobs`) submits each step as a submitit job.

Nothing here changes what a run computes: the commands plan the same recipe and call the runner's functions.
"""

from __future__ import annotations

import contextlib
import shlex
import shutil
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console

from otcbench.bench import runner
from otcbench.bench.layout import ERROR_FILE, MARKER, RUN_FILE
from otcbench.bench.plan import RERUN_STATES, DataStage, Plan, RunSpec
from otcbench.bench.runner import Outcome
from otcbench.errors import UserError

#: ``--stage`` values: the data stages alone (the runs are ``--only RUN_ID``).
STAGES = ("data",)

#: Where a results directory's report lock lives: jobs that finish together write summary.csv one at a time.
REPORT_LOCK = ".report.lock"


@dataclass
class Invocation:
    """What every command of a grid carries from the invocation that planned it: the recipe as given, the
    results directory, each ``--set`` (in order) and the flags that change which runs are pending."""

    recipe: str
    out: Path
    sets: list[str] = field(default_factory=list)
    keep_other_code: bool = False
    resume: bool = False

    def args(self, *extra: str) -> list[str]:
        """``run RECIPE --out OUT --set …`` + ``extra``: an ``otcbench`` command line without the program."""
        args = ["run", self.recipe, "--out", str(self.out), *(a for s in self.sets for a in ("--set", s))]
        args += ["--keep-other-code"] * self.keep_other_code
        return [*args, *extra]

    def data_args(self) -> list[str]:
        return self.args("--stage", "data")

    def run_args(self, run_id: str, resume: bool | None = None) -> list[str]:
        resume = self.resume if resume is None else resume
        return self.args(*(["--resume"] if resume else []), "--only", run_id)

    def shell(self, args: list[str]) -> str:
        return shlex.join(["otcbench", *args])


def pending_runs(plan: Plan) -> list[RunSpec]:
    """The runs ``otcbench run`` would train, in plan order (a run after the run it starts from): every run not
    done at the current code (runs made by other code are re-run, as :meth:`Plan.state` says)."""
    return [r for r in plan.runs if plan.state(r) != "done"]


def missing_data(plan: Plan, runs: list[RunSpec]) -> list[DataStage]:
    """The data stages ``runs`` need that are not built yet (an imported dataset is always there)."""
    stages = [plan.source] if runs else []
    stages += list({r.poison.key: r.poison for r in runs if r.poison is not None}.values())
    return [s for s in stages if s.kind != "import" and not s.exists()]


def step_commands(plan: Plan, inv: Invocation) -> list[str]:
    """``--print-commands``: the data step, then one step per pending run, as shell lines (nothing when every
    run is done). Run in order, then ``otcbench report OUT``, they give what ``otcbench run`` gives."""
    pending = pending_runs(plan)
    if not pending:
        return []
    return [inv.shell(inv.data_args()), *(inv.shell(inv.run_args(r.run_id)) for r in pending)]


def _log(console: Console) -> Callable[[str], None]:
    return lambda msg: console.print(msg, highlight=False, markup=False, soft_wrap=True)


def _mark_out(plan: Plan, recipe_file: Path | None, command: str) -> None:
    """results.json and recipe.yaml, unless the invocation that planned the grid wrote them (a step does not
    replace its command line with its own)."""
    if not (plan.out / MARKER).is_file():
        runner._prepare_out(plan, recipe_file, command)


def build_data(plan: Plan, *, recipe_file: Path | None, command: str, console: Console,
               show_progress: bool) -> list[DataStage]:
    """``--stage data``: write the world and the poisoned datasets the pending runs need; returns those built."""
    from otcbench.progress import progress_bar, progress_enabled

    pending = pending_runs(plan)
    todo = missing_data(plan, pending)
    _mark_out(plan, recipe_file, command)
    bar = progress_bar(progress_enabled(show_progress), console=console, info=True, elapsed=True)
    with bar as progress:
        runner._build_stages(plan, pending, progress, _log(console))
    return todo


def _select(plan: Plan, run_ids: list[str], resume: bool, data_step: str) -> list[RunSpec]:
    """The runs ``--only`` names, in plan order; every reason one cannot start is one line, before any work."""
    by_id = {r.run_id: r for r in plan.runs}
    for rid in run_ids:
        if rid not in by_id:
            raise UserError(f"--only {rid}: no run of recipe {plan.recipe.name} has this id (it has "
                            f"{len(plan.runs)}; `otcbench run {plan.recipe.name} --dry-run` lists them)")
    chosen = [r for r in plan.runs if r.run_id in run_ids]
    ids = {r.run_id for r in chosen}
    for r in chosen:
        state = plan.state(r)
        if r.parent is not None and r.parent not in ids and plan.state(by_id[r.parent]) != "done":
            raise UserError(f"--only {r.run_id}: it starts from run {r.parent}, which is "
                            f"{plan.state(by_id[r.parent])}, not done; run that one first")
        if state == "partial" and not resume and (r.dir / RUN_FILE).is_file():
            raise UserError(f"--only {r.run_id}: the run was interrupted or failed ({r.dir}); "
                            "pass --resume to continue it")
        if state != "done":
            missing = missing_data(plan, [r])
            if missing:
                raise UserError(f"--only {r.run_id}: its dataset {missing[0].path} is not built; "
                                f"run the data step first ({data_step})")
    return chosen


def attempt(plan: Plan, run: RunSpec, show_progress: bool) -> Outcome:
    """Train and evaluate one run as the runner's worker does: a failure is recorded (run.json status
    ``failed``, error.log) and returned, never raised; Ctrl-C propagates and leaves the run resumable."""
    t0 = time.perf_counter()
    try:
        action, seconds = runner._execute_run(run, plan.recipe.name, plan.eval_data, plan.recipe.keep_checkpoints,
                                              show_progress, None, plan.code)
    except KeyboardInterrupt:
        raise
    except Exception as err:
        seconds = time.perf_counter() - t0
        runner._record_failure(run, err, seconds, traceback.format_exc())
        return Outcome(run, "failed", seconds, runner._one_line(err))
    return Outcome(run, action, seconds)


def run_only(plan: Plan, run_ids: list[str], *, resume: bool, recipe_file: Path | None, command: str,
             data_step: str, console: Console, show_progress: bool) -> list[Outcome]:
    """``--only RUN_ID …``: train and evaluate just these runs (in plan order), then rewrite summary.csv and the
    tables. Other runs of the grid may be in progress elsewhere: only these runs' states are checked.

    Under torchrun (``WORLD_SIZE`` > 1) one run trains over the processes and rank 0 alone writes.
    """
    from otcbench.train.distributed import env_dist_info

    chosen = _select(plan, run_ids, resume, data_step)
    info = env_dist_info()
    if info.enabled:
        if len(chosen) != 1:
            raise UserError(f"--only under torchrun trains one run over its {info.world_size} processes; "
                            f"give one --only (got {len(chosen)})")
        return [_run_distributed(plan, chosen[0], recipe_file, command, console)]
    _mark_out(plan, recipe_file, command)
    log = _log(console)
    states = {r.run_id: plan.state(r) for r in plan.runs}  # all before any directory is cleared
    outcomes: dict[str, Outcome] = {}
    for run in chosen:
        state = states[run.run_id]
        if state == "done":
            outcomes[run.run_id] = Outcome(run, "cached")
            log(f"{run.title}, run {run.run_id}: done, nothing to do")
            continue
        if state in RERUN_STATES:
            log(f"{run.title}: {runner._rerun_reason(plan, run, state)}; re-running it from scratch")
            shutil.rmtree(run.dir)
        parent = outcomes.get(run.parent or "")
        if parent is not None and parent.action == "failed":
            err = UserError(f"starts from run {run.parent}, which failed")
            runner._record_failure(run, err, 0.0, f"{err}\n")
            outcomes[run.run_id] = Outcome(run, "failed", 0.0, str(err))
        else:
            outcomes[run.run_id] = attempt(plan, run, show_progress)
        o, where = outcomes[run.run_id], f"{run.title}, run {run.run_id}"
        if o.action == "failed":
            log(f"{where}: FAILED after {o.seconds:.1f} s: {o.error} (see {run.dir / ERROR_FILE})")
        else:
            log(f"{where}: {o.action} in {o.seconds:.1f} s")
    write_report_locked(plan)
    return [outcomes[r.run_id] for r in chosen]


def _run_distributed(plan: Plan, run: RunSpec, recipe_file: Path | None, command: str,
                     console: Console) -> Outcome:
    """One run over torchrun's processes, as ``otcbench train`` under torchrun: every rank trains, rank 0 alone
    clears, records (run.json, error.log), evaluates and writes the report."""
    from otcbench.defenses import build_defense
    from otcbench.device import resolve_device
    from otcbench.train import distributed
    from otcbench.train.checkpoint import CHECKPOINT_DIR, LAST
    from otcbench.train.loop import Trainer

    info = distributed.init_distributed(resolve_device(run.job.train.device).type)
    try:
        state = plan.state(run)
        if info.is_main:
            _mark_out(plan, recipe_file, command)
            if state in RERUN_STATES:
                _log(console)(f"{run.title}: {runner._rerun_reason(plan, run, state)}; re-running it from scratch")
                shutil.rmtree(run.dir)
        distributed.barrier()
        # every rank decides resume-or-start before rank 0 writes anything (the trainer needs the same answer)
        resume = (run.dir / "config.yaml").is_file() or (run.dir / CHECKPOINT_DIR / LAST).is_file()
        distributed.barrier()
        if state == "done":
            return Outcome(run, "cached")
        if not info.is_main:
            Trainer(run.job, run.dir, defense=build_defense(run.job.defense), resume=resume,
                    show_progress=False).fit()
            return Outcome(run, "trained")
        outcome = attempt(plan, run, False)
        write_report_locked(plan)
        return outcome
    finally:
        distributed.destroy()


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive lock on ``path`` where the filesystem has locks; without them (some cluster mounts) the last
    writer wins, and ``otcbench run --resume`` rewrites the report from the run directories anyway."""
    try:
        import fcntl
    except ImportError:  # not a POSIX system
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX)
        except OSError:
            pass
        yield


def write_report_locked(plan: Plan) -> None:
    """summary.csv and the tables from the run directories (no plots), one writer at a time: each job that
    finishes reads every run's state inside the lock, so the last one to take it sees every finished run."""
    from otcbench.bench.report import write_report

    with _locked(plan.out / REPORT_LOCK):
        write_report(plan.out, plan=plan, plots=False)


