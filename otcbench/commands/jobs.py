"""``otcbench run --launcher slurm``: each pending run of a grid as one job, submitted through submitit.

A job runs one step of :mod:`otcbench.bench.launch` as a command (``otcbench run … --stage data`` or
``otcbench run … --only RUN_ID --resume``, under torchrun when a run has several GPUs), so a job does exactly
what ``otcbench run`` does for that step and records a failure the same way. Each submission is recorded in
``RUN/job.json`` (``OUT/data/job.json`` for the data job); a run that is done, or whose recorded job is queued
or running, is not submitted again. SLURM orders the jobs (``afterok`` on the data job and on the job of the
run a run starts from, ``kill-on-invalid-dep`` so that a failed dependency cancels its dependants); the local
executor (tests, laptops) has no dependencies, so the submitting process waits for a job before submitting
the jobs that need it. These modules live beside the CLI because they drive commands and compute nothing.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError

from otcbench.bench import runner
from otcbench.bench.launch import Invocation, missing_data, pending_runs, write_report_locked
from otcbench.bench.layout import RUN_FILE, read_run_info, run_state
from otcbench.bench.plan import RERUN_STATES, Plan, RunSpec
from otcbench.bench.recipe import Recipe
from otcbench.config import Options, format_validation_error
from otcbench.errors import UserError

#: ``--launcher`` values: ``local`` trains on this machine (``--jobs`` at a time), ``slurm`` submits jobs.
LAUNCHERS = ("local", "slurm")
#: A submitted job's record, in its run directory (and in ``OUT/data/`` for the data job).
JOB_FILE = "job.json"
#: SLURM job states after which a job will not run again; anything else (pending, running, requeued, or
#: unknown to sacct yet) counts as in flight, so that a job is never submitted twice.
ENDED = frozenset({"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
                   "DEADLINE", "SPECIAL_EXIT", "FINISHED", "ENDED"})


class LauncherOptions(Options):
    """The recipe's ``launcher:`` section (``--set launcher.KEY=VALUE``); no run id depends on it."""

    executor: Literal["slurm", "local"] = Field(
        "slurm", description="slurm (sbatch on a cluster) or local (submitit's LocalExecutor: this machine)")
    partition: str | None = Field(None, description="SLURM partition (default: the cluster's)")
    gpus_per_run: int = Field(1, ge=0, description="GPUs of each run's job (one node); over 1, torchrun")
    cpus_per_run: int = Field(8, ge=1, description="CPU cores of each job (data loading workers, the data job)")
    time_min: int = Field(24 * 60, ge=1, description="time limit of each job, minutes")
    mem_gb: float | None = Field(None, gt=0, description="host memory of each job, GB (default: the partition's)")
    account: str | None = Field(None, description="SLURM account")
    qos: str | None = Field(None, description="SLURM quality of service")
    folder: str | None = Field(None, description="submitit's folder for job scripts and logs (default OUT/jobs)")


class _Section(Options):
    launcher: LauncherOptions


def require_submitit() -> None:
    try:
        import submitit  # noqa: F401
    except ImportError:
        raise UserError('--launcher slurm needs submitit: pip install "otcbench[slurm]"') from None


def launcher_options(recipe: Recipe) -> LauncherOptions:
    """The recipe's ``launcher:`` options; an unknown key or a bad value is one line naming it."""
    try:
        return _Section.model_validate({"launcher": recipe.launcher}).launcher
    except ValidationError as err:
        raise UserError(format_validation_error(err, f"recipe {recipe.name}") + " (see docs/scale.md)") from None


def _gpus_needed(device: str) -> int:
    if device.startswith("cuda:"):
        index = device.partition(":")[2]
        return int(index) + 1 if index.isdigit() else 1
    return 1 if device == "cuda" else 0


def check_resources(plan: Plan, runs: list[RunSpec], opts: LauncherOptions) -> None:
    """Refuse, in one line, a run its job cannot train: more GPUs than the job has (a job numbers its GPUs
    from cuda:0), a CPU run spread over GPUs, or a global batch that the job's GPUs cannot split."""
    g = opts.gpus_per_run
    if g == 0 and plan.recipe.requires.gpu:
        raise UserError(f"recipe {plan.recipe.name} needs a GPU (requires.gpu: true) and launcher.gpus_per_run "
                        "is 0; give each job a GPU")
    for r in runs:
        train_dev = r.job.train.device
        # under torchrun every process trains on its own GPU (docs/scale.md), whatever cuda:N says
        need_train = 1 if g > 1 and train_dev.startswith("cuda") else _gpus_needed(train_dev)
        for key, dev, need in (("train.device", train_dev, need_train),
                               ("eval.device", r.eval.device, _gpus_needed(r.eval.device))):
            if need > g:
                raise UserError(f"run {r.title}: {key}={dev} needs {need} GPU(s) and its job has {g} "
                                "(launcher.gpus_per_run; a job numbers its GPUs from cuda:0)")
        if g > 1 and train_dev == "cpu":
            raise UserError(f"run {r.title}: train.device=cpu with launcher.gpus_per_run={g} would start {g} CPU "
                            "processes under torchrun; use train.device=auto, or gpus_per_run 0 or 1")
        if g > 1 and r.job.train.batch_size % g:
            raise UserError(f"run {r.title}: train.batch_size={r.job.train.batch_size} is the global batch, split "
                            f"over the job's {g} GPUs by torchrun (docs/scale.md); use a multiple of {g}")


def _check_executor(opts: LauncherOptions) -> None:
    if opts.executor == "slurm" and not (shutil.which("sbatch") and shutil.which("srun")):
        raise UserError("launcher.executor=slurm: sbatch/srun are not on PATH (not a SLURM login node?); submit "
                        "from one, or set launcher.executor=local to run the jobs on this machine")


@dataclass
class JobCommand:
    """What a job runs: an ``otcbench`` command in the submitting directory (pickled by submitit)."""

    argv: list[str]
    cwd: str

    def __call__(self) -> None:
        # the command carries --no-progress: a job's log is a file, where a bar's frames would only be noise
        code = subprocess.run(self.argv, cwd=self.cwd, check=False).returncode
        if code:  # the job fails with the step (the run's own failure is in its run.json and error.log)
            raise RuntimeError(f"{shlex.join(self.argv)} exited with status {code}")


def job_argv(inv: Invocation, run_id: str | None, gpus: int) -> list[str]:
    """A job's command: the data step, or one run with ``--resume`` (a requeued or resubmitted job continues
    its run); with several GPUs, one process per GPU under torchrun (``--standalone``: one node)."""
    launcher = [sys.executable, "-m", "otcbench"]
    if gpus > 1:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={gpus}",
                    "-m", "otcbench"]
    args = inv.data_args() if run_id is None else inv.run_args(run_id, resume=True)
    return [*launcher, *args, "--no-progress"]


# ------------------------------------------------------------------------------------------------------------
# job records and states


def _read_record(path: Path) -> dict[str, Any]:
    import json

    try:
        rec = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return rec if isinstance(rec, dict) and rec.get("job_id") else {}


def _folder(out: Path, rec: dict[str, Any]) -> Path:
    folder = Path(str(rec.get("folder", "jobs")))
    return folder if folder.is_absolute() else out / folder


def _pid_alive(pid: str) -> bool:
    """Whether a local job's controller process still runs (a finished child not yet reaped counts as ended)."""
    stat = Path("/proc") / pid / "stat"
    if Path("/proc/self").exists():
        try:
            return stat.read_text().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
        except (OSError, IndexError):
            return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, ValueError):
        return True
    return True


def job_states(out: Path, records: dict[str, dict[str, Any]]) -> dict[str, str]:
    """Each record's job state: FINISHED once submitit wrote its result, a local job by its process, a SLURM
    job through submitit's sacct watcher (one call for all; UNKNOWN where sacct does not know it yet)."""
    states: dict[str, str] = {}
    slurm: dict[str, str] = {}
    for key, rec in records.items():
        jid = str(rec["job_id"])
        if (_folder(out, rec) / f"{jid}_0_result.pkl").is_file():
            states[key] = "FINISHED"
        elif rec.get("executor") == "local":
            states[key] = "RUNNING" if _pid_alive(jid) else "ENDED"
        else:
            slurm[key] = jid
    if slurm:
        from submitit.slurm.slurm import SlurmJob

        watcher = SlurmJob.watcher
        for jid in slurm.values():
            watcher.register_job(jid)
        watcher.update()
        for key, jid in slurm.items():
            states[key] = watcher.get_state(jid, mode="cache")
    return states


def is_active(state: str) -> bool:
    return (state.split() or ["UNKNOWN"])[0].upper() not in ENDED


def in_flight(plan: Plan) -> dict[str, tuple[dict[str, Any], str]]:
    """Run id → (job record, state) of every pending run whose recorded job is queued or running ({} when no
    run records a job, or submitit is not installed to ask)."""
    records = {r.run_id: rec for r in pending_runs(plan) if (rec := _read_record(r.dir / JOB_FILE))}
    if not records:
        return {}
    try:
        states = job_states(plan.out, records)
    except ImportError:
        return {}
    return {rid: (records[rid], s) for rid, s in states.items() if is_active(s)}


def _record_ended(plan: Plan, run: RunSpec, rec: dict[str, Any], state: str) -> bool:
    """A job that ended without finishing its run and without recording why (killed: time limit, memory,
    cancelled): the run is recorded as failed, with the job's log, as a failure inside the run would be."""
    if run_state(run.dir) == "done" or read_run_info(run.dir).get("status") == "failed":
        return False
    log = _folder(plan.out, rec) / f"{rec['job_id']}_0_log.err"
    tail = log.read_text(errors="replace")[-20000:] if log.is_file() else f"(no log at {log})\n"
    err = RuntimeError(f"job {rec['job_id']} ended ({state}) before the run finished")
    runner._record_failure(run, err, 0.0, f"{err}\n{tail}")
    return True


# ------------------------------------------------------------------------------------------------------------
# submission


def _executor(opts: LauncherOptions, folder: Path, gpus: int, after: list[str], name: str) -> Any:
    import submitit

    if opts.executor == "local":
        ex = submitit.LocalExecutor(folder)
        ex.update_parameters(timeout_min=opts.time_min, gpus_per_node=gpus)
        return ex
    ex = submitit.SlurmExecutor(folder)
    params: dict[str, Any] = {"job_name": name, "time": opts.time_min, "nodes": 1, "ntasks_per_node": 1,
                              "cpus_per_task": opts.cpus_per_run}
    optional = {"partition": opts.partition, "account": opts.account, "qos": opts.qos,
                "gpus_per_node": gpus or None,
                "mem": None if opts.mem_gb is None else f"{max(1, round(opts.mem_gb * 1024))}M"}
    params.update({k: v for k, v in optional.items() if v is not None})
    if after:
        params["dependency"] = "afterok:" + ":".join(after)
        params["additional_parameters"] = {"kill-on-invalid-dep": "yes"}
    ex.update_parameters(**params)
    return ex


@dataclass
class _Submitter:
    plan: Plan
    opts: LauncherOptions
    inv: Invocation
    folder: Path
    log: Callable[[str], None]

    def submit(self, run_id: str | None, gpus: int, after: list[str], record: Path) -> Any:
        ex = _executor(self.opts, self.folder, gpus, after, f"otc-{self.plan.recipe.name}-{run_id or 'data'}")
        job = ex.submit(JobCommand(job_argv(self.inv, run_id, gpus), str(Path.cwd())))
        from otcbench.train.checkpoint import write_json

        old = _read_record(record)
        folder = self.folder
        with_out = folder.resolve().is_relative_to(self.plan.out.resolve())
        record.parent.mkdir(parents=True, exist_ok=True)
        write_json(record, {
            "job_id": str(job.job_id), "run_id": run_id, "executor": self.opts.executor,
            "folder": str(folder.resolve().relative_to(self.plan.out.resolve()) if with_out else folder.resolve()),
            "submitted": time.strftime("%Y-%m-%dT%H:%M:%S"), "after": after,
            "command": self.inv.shell(self.inv.data_args() if run_id is None else self.inv.run_args(run_id, True)),
            "earlier_jobs": [*old.get("earlier_jobs", []), old["job_id"]] if old else [],
        })
        return job


def _data_job(sub: _Submitter, pending: list[RunSpec]) -> list[str]:
    """The data job the runs wait for (none when their data is built); a queued or running one is reused.
    The local executor cannot order jobs, so it is waited for here."""
    missing = missing_data(sub.plan, pending)
    if not missing:
        return []
    record = sub.plan.out / "data" / JOB_FILE
    rec = _read_record(record)
    if rec and is_active(job_states(sub.plan.out, {"data": rec})["data"]):
        sub.log(f"data: job {rec['job_id']} is queued or running")
        return [str(rec["job_id"])]
    job = sub.submit(None, min(sub.opts.gpus_per_run, 1), [], record)
    sub.log(f"data: submitted job {job.job_id} ({', '.join(s.path.name for s in missing)})")
    if sub.opts.executor != "local":
        return [str(job.job_id)]
    job.wait()
    if missing_data(sub.plan, pending):
        raise UserError(f"the data job {job.job_id} failed; see its log in {sub.folder}")
    return []


def _submit_runs(sub: _Submitter, todo: list[RunSpec], active: dict[str, str], data_after: list[str],
                 index: dict[str, int]) -> int:
    """Submit ``todo`` in plan order, each after the data job and the job of the run it starts from; the local
    executor submits a run once its parent's job has ended (and records it failed if the parent failed)."""
    plan, n = sub.plan, len(sub.plan.runs)
    by_id = {r.run_id: r for r in plan.runs}
    jobs = dict(active)  # run id → job id, of jobs queued earlier and submitted now
    local: dict[str, Any] = {}
    waiting, count = list(todo), 0
    while waiting:
        moved = False
        for run in list(waiting):
            after = list(data_after)
            parent = by_id.get(run.parent or "")
            if parent is not None and plan.state(parent) != "done":
                if sub.opts.executor != "local":
                    after += [jobs[parent.run_id]] if parent.run_id in jobs else []
                elif _local_running(plan, parent.run_id, local):
                    continue
                elif run_state(parent.dir) != "done":
                    err = UserError(f"starts from run {parent.run_id}, which failed")
                    runner._record_failure(run, err, 0.0, f"{err}\n")
                    sub.log(f"[{index[run.run_id]}/{n}] {run.title}: not submitted: {err}")
                    waiting.remove(run)
                    moved = True
                    continue
            job = sub.submit(run.run_id, sub.opts.gpus_per_run, after, run.dir / JOB_FILE)
            jobs[run.run_id], local[run.run_id] = str(job.job_id), job
            after_text = f" (after {', '.join(after)})" if after else ""
            sub.log(f"[{index[run.run_id]}/{n}] {run.title}, run {run.run_id}: submitted job {job.job_id}{after_text}")
            waiting.remove(run)
            moved, count = True, count + 1
        if waiting and not moved:
            time.sleep(1.0)
    return count


def _local_running(plan: Plan, run_id: str, local: dict[str, Any]) -> bool:
    job = local.get(run_id)
    if job is not None:
        return not job.done()
    rec = _read_record(plan.out / "runs" / run_id / JOB_FILE)
    return bool(rec) and is_active(job_states(plan.out, {run_id: rec})[run_id])


def submit_grid(plan: Plan, opts: LauncherOptions, inv: Invocation, *, recipe_file: Path | None, command: str,
                log: Callable[[str], None], dry_run: bool = False) -> str:
    """Submit a job for every pending run without a queued or running one (and the data job they need);
    ``dry_run`` only says what would happen. Returns the closing line."""
    pending = pending_runs(plan)
    index = {r.run_id: i for i, r in enumerate(plan.runs, 1)}
    records = {r.run_id: rec for r in pending if (rec := _read_record(r.dir / JOB_FILE))}
    states = job_states(plan.out, records) if records else {}
    by_id = {r.run_id: r for r in plan.runs}
    recorded = [rid for rid, s in states.items()
                if not is_active(s) and not dry_run and _record_ended(plan, by_id[rid], records[rid], s)]
    active = {rid: str(records[rid]["job_id"]) for rid, s in states.items() if is_active(s)}
    todo = [r for r in pending if r.run_id not in active]
    # interrupted or failed runs need --resume, as for `otcbench run` (a run made by other code re-runs without)
    started = [r for r in todo if plan.state(r) == "partial" and (r.dir / RUN_FILE).is_file()]
    if started and not inv.resume:
        raise UserError(f"{plan.out} holds {len(started)} interrupted or failed run(s) of this recipe (e.g. "
                        f"{started[0].title} in {started[0].dir}); pass --resume to submit them again")
    check_resources(plan, todo, opts)
    _check_executor(opts)
    for r in plan.runs:
        if r.run_id in active:
            log(f"[{index[r.run_id]}/{len(plan.runs)}] {r.title}, run {r.run_id}: job {active[r.run_id]} "
                f"{states[r.run_id]}")
        elif r not in todo:
            log(f"[{index[r.run_id]}/{len(plan.runs)}] {r.title}, run {r.run_id}: done")
        elif dry_run:
            log(f"[{index[r.run_id]}/{len(plan.runs)}] {r.title}, run {r.run_id}: to submit"
                + (f" (job {records[r.run_id]['job_id']} {states[r.run_id]})" if r.run_id in records else ""))
    missing = missing_data(plan, todo)
    if dry_run and missing:
        log(f"data: to build ({', '.join(s.path.name for s in missing)})")
    if recorded:
        write_report_locked(plan)
    if dry_run or not todo:
        verb = "would submit" if dry_run else "submitted"
        return (f"{len(plan.runs)} runs: {len(plan.runs) - len(pending)} done, {len(active)} queued or running, "
                f"{len(todo) if dry_run else 0} {verb}")
    runner._prepare_out(plan, recipe_file, command)
    rerun = {r.run_id: s for r in todo if (s := plan.state(r)) in RERUN_STATES}  # all before any is cleared
    for r in todo:  # as `otcbench run` does: runs made by other code start again from scratch
        if r.run_id in rerun:
            log(f"{r.title}: {runner._rerun_reason(plan, r, rerun[r.run_id])}; cleared, to run from scratch")
            shutil.rmtree(r.dir)
    folder = Path(opts.folder) if opts.folder else plan.out / "jobs"
    sub = _Submitter(plan, opts, inv, folder, log)
    count = _submit_runs(sub, todo, active, _data_job(sub, pending), index)
    return (f"{len(plan.runs)} runs: {len(plan.runs) - len(pending)} done, {len(active)} queued or running, "
            f"{count} submitted (logs in {folder})")
