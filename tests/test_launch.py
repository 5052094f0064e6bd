"""A grid beyond one machine: ``--print-commands``, ``--stage data``, ``--only RUN_ID`` and ``--launcher slurm``.

The jobs run through submitit's LocalExecutor (processes on this machine) or, for what only SLURM does
(dependencies, sbatch options, queue states), a fake ``sbatch``/``sacct``/``srun`` on PATH that records each job
script and reports the states a test writes. Runs train otc-rn-nano for one epoch of 6 steps (``tiny_recipe``).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from run_helpers import tiny_recipe
from typer.testing import CliRunner

from otcbench.bench.layout import RUN_FILE
from otcbench.bench.plan import plan_recipe
from otcbench.bench.recipe import load_recipe
from otcbench.bench.runner import execute_plan
from otcbench.bench.summary import metric_names
from otcbench.cli import app
from otcbench.commands import jobs

cli = CliRunner()
#: submitit is the optional `slurm` extra (and in `test`): without it only the launcher-free tests run
needs_submitit = pytest.mark.skipif(importlib.util.find_spec("submitit") is None, reason="submitit not installed")
LOCAL = ["--launcher", "slurm", "--set", "launcher.executor=local", "--set", "launcher.gpus_per_run=0",
         "--set", "launcher.time_min=20"]


def invoke(*args: str) -> Any:
    return cli.invoke(app, [str(a) for a in args])


def run_ids(path: Path, out: Path, *sets: str) -> list[str]:
    return [r.run_id for r in plan_recipe(load_recipe(path, list(sets))[0], out, resume=True).runs]


def metrics(out: Path) -> pd.DataFrame:
    """summary.csv's status and metric columns, one row per run id."""
    df = pd.read_csv(out / "summary.csv")
    cols = ["status", *(c for c in metric_names() if c in df.columns)]
    return df.set_index("run_id")[cols].sort_index()


def one_error_line(r: Any, text: str) -> None:
    assert r.exit_code == 2, r.output
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), r.output
    assert text in " ".join(r.output.split()), r.output


def wait_for_jobs(out: Path, timeout: float = 900) -> None:
    """Until no recorded job of ``out`` is queued or running."""
    deadline = time.monotonic() + timeout
    while True:
        records = {p.parent.name: json.loads(p.read_text()) for p in out.glob("runs/*/job.json")}
        if not any(jobs.is_active(s) for s in jobs.job_states(out, records).values()):
            return
        assert time.monotonic() < deadline, f"jobs still running after {timeout} s"
        time.sleep(1)


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, tiny_world: Path) -> Path:
    """``otcbench run`` of the tiny recipe on this machine: the results every launcher must reproduce."""
    base = tmp_path_factory.mktemp("reference")
    path = tiny_recipe(base, tiny_world)
    execute_plan(plan_recipe(load_recipe(path)[0], base / "out"), show_progress=False, recipe_file=path,
                 plots=False)
    return base / "out"


# ------------------------------------------------------------------------------------------------------------
# bad input: one line, exit 2, nothing submitted or written


@needs_submitit
def test_bad_input_is_one_line_before_anything_is_submitted(tmp_path: Path, tiny_world: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    path = tiny_recipe(tmp_path, tiny_world)
    out = tmp_path / "res"
    base = ["run", path, "--out", out]
    one_error_line(invoke(*base, *LOCAL, "--set", "launcher.partiton=gpu"), "launcher.partiton: unknown key")
    one_error_line(invoke(*base, *LOCAL, "--set", "launcher.gpus_per_run=-1"),
                   "launcher.gpus_per_run: Input should be greater than or equal to 0")
    one_error_line(invoke(*base, "--launcher", "pbs"), "--launcher 'pbs': use local")
    one_error_line(invoke(*base, "--print-commands", "--launcher", "slurm"), "--print-commands prints the steps")
    one_error_line(invoke(*base, "--print-commands", "--launcher", "local"), "drop --launcher local")
    one_error_line(invoke(*base, "--stage", "runs"), "--stage 'runs': the one stage is data")
    one_error_line(invoke(*base, "--stage", "data", "--only", "x"), "give --stage data or --only RUN_ID, not both")
    # more GPUs than a job has: a CUDA run in a job without GPUs, cuda:1 in a one-GPU job, a batch the GPUs
    # cannot split, a CPU run spread over GPUs
    one_error_line(invoke(*base, *LOCAL, "--set", "train.device=cuda"),
                   "train.device=cuda needs 1 GPU(s) and its job has 0")
    one_error_line(invoke(*base, *LOCAL, "--set", "eval.device=cuda:1", "--set", "launcher.gpus_per_run=1"),
                   "eval.device=cuda:1 needs 2 GPU(s) and its job has 1")
    one_error_line(invoke(*base, *LOCAL, "--set", "launcher.gpus_per_run=3", "--set", "train.device=auto"),
                   "train.batch_size=64 is the global batch, split over the job's 3 GPUs")
    one_error_line(invoke(*base, *LOCAL, "--set", "launcher.gpus_per_run=2"),
                   "train.device=cpu with launcher.gpus_per_run=2 would start 2 CPU processes")
    one_error_line(invoke(*base, *LOCAL, "--set", "requires.gpu=true"),
                   "needs a GPU (requires.gpu: true) and launcher.gpus_per_run is 0")
    # SLURM itself: not a login node
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    one_error_line(invoke(*base, "--launcher", "slurm", "--set", "launcher.gpus_per_run=0"),
                   "launcher.executor=slurm: sbatch/srun are not on PATH")
    monkeypatch.undo()
    # --only: an id not in the plan, a run whose parent is not done
    parent, child = run_ids(path, out)
    one_error_line(invoke(*base, "--only", "0123456789ab"), "--only 0123456789ab: no run of recipe tiny has this id")
    one_error_line(invoke(*base, "--only", child), f"--only {child}: it starts from run {parent}, which is new")
    # submitit missing
    monkeypatch.setitem(sys.modules, "submitit", None)
    one_error_line(invoke(*base, *LOCAL), '--launcher slurm needs submitit: pip install "otcbench[slurm]"')
    assert not (out / "runs").exists() and not (out / "jobs").exists()


def test_stage_data_builds_only_the_data(tmp_path: Path, tiny_world: Path) -> None:
    path = tiny_recipe(tmp_path, tiny_world, attacks=["none", {"badnet": {"rate": 0.05}}], defenses=["none"])
    out = tmp_path / "res"
    r = invoke("run", path, "--out", out, "--stage", "data")
    assert r.exit_code == 0, r.output
    assert "1 dataset(s) built" in r.output and len(list((out / "data").glob("poison-*"))) == 1
    assert not (out / "runs").exists()
    command = json.loads((out / "results.json").read_text())["command"]
    assert command.startswith("otcbench run ") and "--stage" not in command  # the grid's line, not the step's
    r = invoke("run", path, "--out", out, "--stage", "data")
    assert r.exit_code == 0 and "0 dataset(s) built" in r.output
    lines = invoke("run", path, "--out", out, "--print-commands").stdout.splitlines()
    assert len(lines) == 3 and lines[0].endswith("--stage data")
    # a GPU recipe prints and builds its data where there is no GPU (a login node); only training needs one
    gpu = ["--set", "requires.gpu=true"]
    gpu_lines = invoke("run", path, "--out", out, *gpu, "--print-commands").stdout.splitlines()
    assert [ln.replace(" --set requires.gpu=true", "") for ln in gpu_lines] == lines
    assert invoke("run", path, "--out", out, *gpu, "--stage", "data").exit_code == 0


# ------------------------------------------------------------------------------------------------------------
# --print-commands: the same results through any scheduler


@pytest.mark.slow
def test_print_commands_run_in_order_give_the_run_summary(tmp_path: Path, tiny_world: Path,
                                                          reference: Path) -> None:
    path = tiny_recipe(tmp_path, tiny_world)
    out = tmp_path / "res"
    sets = ["--set", "description=a grid, quoted", "--set", "train.log_every=2"]  # neither changes a run id
    r = invoke("run", path, "--out", out, *sets, "--print-commands")
    assert r.exit_code == 0, r.output
    lines = r.stdout.splitlines()
    parent, child = run_ids(path, out)
    head = f"otcbench run {path} --out {out} --set 'description=a grid, quoted' --set train.log_every=2"
    assert lines == [f"{head} --stage data", f"{head} --only {parent}", f"{head} --only {child}"]
    for line in lines:
        argv = shlex.split(line)
        res = subprocess.run([sys.executable, "-m", "otcbench", *argv[1:]], capture_output=True, text=True,
                             timeout=900)
        assert res.returncode == 0, res.stderr[-3000:]
    r = invoke("report", out)
    assert r.exit_code == 0 and "| clean | ft" in r.output
    pd.testing.assert_frame_equal(metrics(out), metrics(reference))
    assert (out / "table.md").read_text().count("1/1") == (reference / "table.md").read_text().count("1/1")
    # collected by `otcbench run` too, even for a GPU recipe on a machine without one (nothing trains)
    r = invoke("run", path, "--out", out, *sets, "--set", "requires.gpu=true", "--no-plots")
    assert r.exit_code == 0 and "2 runs (2 cached)" in r.output, r.output
    pd.testing.assert_frame_equal(metrics(out), metrics(reference))
    # nothing left to do: nothing printed
    assert invoke("run", path, "--out", out, *sets, "--print-commands").stdout == ""
    # a run made by other code is printed again (it re-runs), and so is the run that starts from it
    info = json.loads((out / "runs" / child / RUN_FILE).read_text())
    info["provenance"]["code"] = "000000000000"
    (out / "runs" / child / RUN_FILE).write_text(json.dumps(info))
    lines = invoke("run", path, "--out", out, "--print-commands").stdout.splitlines()
    assert [ln.split()[-1] for ln in lines] == ["data", child]
    assert invoke("run", path, "--out", out, "--print-commands", "--keep-other-code").stdout == ""


# ------------------------------------------------------------------------------------------------------------
# --launcher slurm through submitit's LocalExecutor


@pytest.mark.slow
@needs_submitit
def test_slurm_launcher_on_the_local_executor_matches_run(tmp_path: Path, tiny_world: Path,
                                                          reference: Path) -> None:
    path = tiny_recipe(tmp_path, tiny_world)
    out = tmp_path / "res"
    parent, child = run_ids(path, out)
    r = invoke("run", path, "--out", out, *LOCAL)
    assert r.exit_code == 0, r.output
    assert "0 done, 0 queued or running, 2 submitted" in r.output
    rec = json.loads((out / "runs" / child / jobs.JOB_FILE).read_text())
    assert rec["run_id"] == child and rec["executor"] == "local" and rec["folder"] == "jobs"
    assert rec["command"].endswith(f"--resume --only {child}") and rec["submitted"]
    # the local executor cannot order jobs: the parent's job ended before the child's was submitted
    assert json.loads((out / "runs" / parent / RUN_FILE).read_text())["status"] == "done"

    # submitting again at once submits nothing: the child's job is queued or running (or already done)
    r = invoke("run", path, "--out", out, *LOCAL)
    assert r.exit_code == 0 and "0 submitted" in r.output, r.output
    # and `otcbench run` here refuses to train a run whose job is still running
    if jobs.in_flight(plan_recipe(load_recipe(path)[0], out, resume=True)):
        r = invoke("run", path, "--out", out, "--resume")
        assert r.exit_code == 2 and f"run {child} has job" in r.output
    wait_for_jobs(out)
    r = invoke("run", path, "--out", out, *LOCAL)
    assert r.exit_code == 0 and "2 done, 0 queued or running, 0 submitted" in r.output, r.output

    # collected: `report` reads the summary the last job wrote, `run --resume` rebuilds it; the same numbers
    assert invoke("report", out).exit_code == 0
    pd.testing.assert_frame_equal(metrics(out), metrics(reference))
    r = invoke("run", path, "--out", out, "--resume", "--no-plots")
    assert r.exit_code == 0 and "2 runs (2 cached)" in r.output, r.output
    pd.testing.assert_frame_equal(metrics(out), metrics(reference))


@pytest.mark.slow
@needs_submitit
def test_failed_job_is_recorded_like_a_failed_run(tmp_path: Path, tiny_world: Path, reference: Path) -> None:
    path = tiny_recipe(tmp_path, tiny_world)
    out = tmp_path / "res"
    shutil.copytree(reference, out)
    parent, child = run_ids(path, out)
    shutil.rmtree(out / "runs" / child)
    # the child starts from its parent's checkpoint: a broken one fails the child's job at train time
    (out / "runs" / parent / "checkpoints" / "last.pt").write_bytes(b"not a checkpoint")
    r = invoke("run", path, "--out", out, *LOCAL)
    assert r.exit_code == 0 and "1 done, 0 queued or running, 1 submitted" in r.output, r.output
    wait_for_jobs(out)
    info = json.loads((out / "runs" / child / RUN_FILE).read_text())
    assert info["status"] == "failed" and info["error"]
    assert "Traceback" in (out / "runs" / child / "error.log").read_text()
    df = pd.read_csv(out / "summary.csv", keep_default_na=False).set_index("run_id")
    assert df.loc[child, "status"] == "failed" and df.loc[child, "error"] == info["error"]
    # a failed run is submitted again only with --resume, as `otcbench run` continues it only with --resume
    r = invoke("run", path, "--out", out, *LOCAL)
    assert r.exit_code == 2 and "pass --resume to submit them again" in r.output
    r = invoke("run", path, "--out", out, *LOCAL, "--dry-run", "--resume")
    assert r.exit_code == 0 and "to submit (job" in r.output and "1 would submit" in r.output


# ------------------------------------------------------------------------------------------------------------
# --launcher slurm against a fake SLURM: dependencies, sbatch options, queue states, idempotence


@pytest.fixture
def fake_slurm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """``sbatch`` copies each job script to ``FAKE/job_<id>.sh`` and answers ids from 7001; ``sacct`` reports
    ``FAKE/states`` (lines ``ID|STATE|``); ``srun`` exists."""
    from submitit.slurm.slurm import SlurmJob

    fake = tmp_path / "fake-slurm"
    fake.mkdir()
    scripts = {
        "sbatch": 'n=$(cat "$FAKE/next" 2>/dev/null || echo 7001)\ncp "$1" "$FAKE/job_$n.sh"\n'
                  'echo $((n + 1)) > "$FAKE/next"\necho "Submitted batch job $n"\n',
        "sacct": 'echo "JobID|State|NodeList"\ncat "$FAKE/states" 2>/dev/null\n',
        "srun": "exit 0\n",
    }
    for name, body in scripts.items():
        (fake / name).write_text("#!/bin/sh\n" + body)
        (fake / name).chmod(0o755)
    monkeypatch.setenv("FAKE", str(fake))
    monkeypatch.setenv("PATH", f"{fake}:{os.environ['PATH']}")
    SlurmJob.watcher.clear()  # sacct answers are cached per process; ids repeat between tests
    return fake


def _scripts(fake: Path) -> dict[str, str]:
    return {p.stem.removeprefix("job_"): p.read_text() for p in sorted(fake.glob("job_*.sh"))}


def _command(out: Path, job_id: str) -> list[str]:
    from submitit.core.utils import DelayedSubmission

    return DelayedSubmission.load(out / "jobs" / f"{job_id}_submitted.pkl").function.argv


@needs_submitit
def test_slurm_jobs_depend_on_data_and_parents_and_are_submitted_once(tmp_path: Path, tiny_world: Path,
                                                                      fake_slurm: Path) -> None:
    path = tiny_recipe(tmp_path, tiny_world, attacks=["none", {"badnet": {"rate": 0.05}}])
    out = tmp_path / "res"
    sets = ["--set", "train.device=auto", "--set", "launcher.gpus_per_run=2", "--set", "launcher.partition=gpu",
            "--set", "launcher.mem_gb=32", "--set", "launcher.account=acc", "--set", "launcher.qos=high"]
    r = invoke("run", path, "--out", out, "--launcher", "slurm", *sets)
    assert r.exit_code == 0, r.output
    ids = run_ids(path, out)  # clean × none, clean × ft, badnet × none, badnet × ft
    scripts = _scripts(fake_slurm)
    assert list(scripts) == ["7001", "7002", "7003", "7004", "7005"]
    data = scripts["7001"]
    assert "--dependency" not in data and "#SBATCH --gpus-per-node=1" in data
    argv = _command(out, "7001")
    assert argv[1:3] == ["-m", "otcbench"] and argv[-3:] == ["--stage", "data", "--no-progress"]
    expected = {"7002": "afterok:7001", "7003": "afterok:7001:7002", "7004": "afterok:7001",
                "7005": "afterok:7001:7004"}
    for (job, dep), rid in zip(expected.items(), ids, strict=True):
        text = scripts[job]
        for line in (f"--dependency={dep}", "--kill-on-invalid-dep=yes", "--partition=gpu", "--gpus-per-node=2",
                     "--mem=32768M", "--account=acc", "--qos=high", "--time=1440", "--cpus-per-task=8",
                     "--ntasks-per-node=1", f"--job-name=otc-tiny-{rid}"):
            assert f"#SBATCH {line}\n" in text, (line, text)
        argv = _command(out, job)
        assert argv[1:5] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
        assert argv[-4:] == ["--resume", "--only", rid, "--no-progress"] and "train.device=auto" in argv
        assert json.loads((out / "runs" / rid / jobs.JOB_FILE).read_text())["job_id"] == job
    assert json.loads((out / "data" / jobs.JOB_FILE).read_text())["job_id"] == "7001"

    # queued: a second submission submits nothing, and `otcbench run` here refuses to train them too
    (fake_slurm / "states").write_text("".join(f"{j}|PENDING|\n" for j in scripts))
    r = invoke("run", path, "--out", out, "--launcher", "slurm", *sets)
    assert r.exit_code == 0 and "4 queued or running, 0 submitted" in r.output, r.output
    assert len(_scripts(fake_slurm)) == 5 and "job 7003 PENDING" in r.output
    r = invoke("run", path, "--out", out, "--resume", *sets[:2])
    assert r.exit_code == 2 and "has job 7002 PENDING" in r.output

    # the clean fine-tune's job failed without a word (killed): recorded failed, resubmitted with --resume,
    # after the data job and its parent's job, both still queued
    (fake_slurm / "states").write_text("7001|PENDING|\n7002|RUNNING|\n7003|CANCELLED by 0|\n7004|PENDING|\n"
                                       "7005|PENDING|\n")
    r = invoke("run", path, "--out", out, "--launcher", "slurm", *sets)
    assert r.exit_code == 2 and "pass --resume to submit them again" in r.output
    info = json.loads((out / "runs" / ids[1] / RUN_FILE).read_text())
    assert info["status"] == "failed" and info["error"] == "RuntimeError: job 7003 ended (CANCELLED by 0) " \
                                                           "before the run finished"
    r = invoke("run", path, "--out", out, "--launcher", "slurm", "--resume", *sets)
    assert r.exit_code == 0 and "1 submitted" in r.output, r.output
    assert "#SBATCH --dependency=afterok:7001:7002\n" in _scripts(fake_slurm)["7006"]
    rec = json.loads((out / "runs" / ids[1] / jobs.JOB_FILE).read_text())
    assert rec["job_id"] == "7006" and rec["earlier_jobs"] == ["7003"]


# ------------------------------------------------------------------------------------------------------------
# a multi-GPU job: --only under torchrun (2 gloo processes on CPU stand in for 2 GPUs)


@pytest.mark.slow
def test_only_under_torchrun_trains_one_run_and_rank_zero_writes(tmp_path: Path, tiny_world: Path) -> None:
    path = tiny_recipe(tmp_path, tiny_world, defenses=["none"])
    out = tmp_path / "res"
    (rid,) = run_ids(path, out)
    assert invoke("run", path, "--out", out, "--stage", "data").exit_code == 0
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "otcbench",
           "run", str(path), "--out", str(out), "--only", rid, "--no-progress"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.count("1 run(s) of tiny (1 trained)") == 1
    run_dir = out / "runs" / rid
    assert json.loads((run_dir / RUN_FILE).read_text())["status"] == "done"
    assert json.loads((run_dir / "env.json").read_text())["world_size"] == 2
    assert (run_dir / "metrics.json").is_file()
    assert pd.read_csv(out / "summary.csv")["status"].tolist() == ["done"]
