"""Tests for the training loop (otcbench.train): run directory, learning, determinism, exact resume.

Runs use the shared tiny world (384 pairs → 6 steps of 64 per epoch, 2 epochs = 12 steps) and the shared
``trained_run`` (conftest) as the uninterrupted reference, so that every comparison is bit-exact.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from run_helpers import interrupt_at
from typer.testing import CliRunner

from otcbench.cli import app
from otcbench.config import EvalConfig, SynthConfig, TrainJob, validate
from otcbench.data.synth import write_world
from otcbench.errors import UserError
from otcbench.eval.run import evaluate
from otcbench.models import create_model
from otcbench.train.loop import Trainer
from otcbench.train.schedule import cosine_lr, warmup_steps

pytestmark = pytest.mark.slow  # every test here trains (pytest -m "not slow": the quick loop)

STEPS_PER_EPOCH = 6  # 384 pairs / batch 64
TOTAL_STEPS = 2 * STEPS_PER_EPOCH
#: metrics.json entries that legitimately differ between two runs of the same model (paths, timing).
NOT_METRICS = {"seconds", "checkpoint", "metrics_file", "eval_data"}


# --------------------------------------------------------------------------------------------------
# helpers


def load_ckpt(path: Path) -> dict[str, Any]:
    return torch.load(path, map_location="cpu", weights_only=True)


def last(run: Path) -> dict[str, Any]:
    return load_ckpt(run / "checkpoints" / "last.pt")


def assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    unequal = [k for k in a if not torch.equal(a[k], b[k])]
    assert not unequal, f"{len(unequal)} tensors differ, e.g. {unequal[:3]}"


def flat_tensors(obj: Any, prefix: str = "") -> dict[str, torch.Tensor]:
    """Every tensor in a nested dict/list (optimizer state dicts), keyed by its path."""
    out: dict[str, torch.Tensor] = {}
    if isinstance(obj, torch.Tensor):
        out[prefix] = obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            out.update(flat_tensors(v, f"{prefix}/{k}"))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            out.update(flat_tensors(v, f"{prefix}/{i}"))
    return out


def read_log(run: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines() if line.strip()]


def _log_records(run: Path) -> list[dict[str, Any]]:
    """The log of a run still being written (a torn last line is skipped)."""
    log = run / "log.jsonl"
    out = []
    for line in log.read_text().splitlines() if log.is_file() else []:
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return out


def steps_of(log: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in log if r["type"] == "step"]


def epochs_of(log: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in log if r["type"] == "epoch"]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def metric_values(metrics: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in metrics.items() if k not in NOT_METRICS}


# --------------------------------------------------------------------------------------------------
# the run directory


def test_run_directory(trained_run: Path, make_job: Callable[..., TrainJob]) -> None:
    # config.yaml: fully resolved and reloadable into the same TrainJob
    job = validate(TrainJob, yaml.safe_load((trained_run / "config.yaml").read_text()))
    assert job == make_job()
    assert job.train.epochs == 2 and job.train.batch_size == 64 and job.model.name == "otc-rn-nano"

    env = json.loads((trained_run / "env.json").read_text())
    for key in ("otcbench", "git_commit", "python", "torch", "open_clip", "device"):
        assert key in env
    assert env["device"] == "cpu" and env["torch"] == torch.__version__

    ckdir = trained_run / "checkpoints"
    assert sorted(p.name for p in ckdir.iterdir()) == ["epoch_001.pt", "epoch_002.pt", "last.pt"]  # no temp files
    states = {p.stem: load_ckpt(p) for p in ckdir.iterdir()}  # weights_only=True
    for name, st in states.items():
        assert st["model_name"] == "otc-rn-nano"
        assert st["step_in_epoch"] == 0, name
        assert st["config"] == make_job().model_dump(mode="json")
    assert states["epoch_001"]["epoch"] == 1 and states["epoch_001"]["global_step"] == STEPS_PER_EPOCH
    assert states["epoch_002"]["epoch"] == 2 and states["last"]["global_step"] == TOTAL_STEPS
    assert_same_tensors(states["last"]["model"], states["epoch_002"]["model"])
    assert any(not torch.equal(v, states["epoch_001"]["model"][k]) for k, v in states["last"]["model"].items())
    # the checkpoint is a usable model
    model = create_model("otc-rn-nano", checkpoint=ckdir / "epoch_001.pt")
    assert_same_tensors(model.state_dict(), states["epoch_001"]["model"])


def test_log_jsonl(trained_run: Path) -> None:
    log = read_log(trained_run)
    steps = steps_of(log)
    assert [r["step"] for r in steps] == list(range(1, TOTAL_STEPS + 1))  # log_every=1, monotonic, no gaps
    assert [r["epoch"] for r in steps] == [0] * STEPS_PER_EPOCH + [1] * STEPS_PER_EPOCH
    for r in steps:
        assert math.isfinite(r["loss"]) and r["loss"] > 0
        assert 0 < r["logit_scale"] <= 100
        assert r["images_per_s"] > 0
    epochs = epochs_of(log)
    assert [(r["epoch"], r["step"]) for r in epochs] == [(0, STEPS_PER_EPOCH), (1, TOTAL_STEPS)]
    for r, ep in zip(epochs, (0, 1), strict=True):
        losses = [s["loss"] for s in steps if s["epoch"] == ep]
        assert r["loss"] == pytest.approx(sum(losses) / len(losses), abs=1e-4)
    # every epoch record follows the steps of its epoch
    kinds = [(r["type"], r["epoch"]) for r in log]
    assert kinds.index(("epoch", 0)) == STEPS_PER_EPOCH


def test_logged_lr_follows_schedule(trained_run: Path) -> None:
    warm = warmup_steps(0.1, TOTAL_STEPS)
    assert warm == 1
    for r in steps_of(read_log(trained_run)):
        # the record of step s (count after the update) carries the lr used for update s-1 (0-based)
        assert r["lr"] == pytest.approx(cosine_lr(r["step"] - 1, 3e-3, warm, TOTAL_STEPS), rel=1e-12)


def test_loss_decreases_when_memorising(tmp_path: Path, make_job: Callable[..., TrainJob]) -> None:
    """On 64 pairs (one batch) a working loop drives the contrastive loss far below chance (ln 64)."""
    world = tmp_path / "w64"
    write_world(world, SynthConfig(n_train=64, probe_train_per_class=1, probe_val_per_class=1, test_per_class=1))
    run = tmp_path / "run"
    Trainer(make_job(data=world, epochs=15, save_every_epochs=100), run, show_progress=False).fit()
    losses = [r["loss"] for r in epochs_of(read_log(run))]
    assert len(losses) == 15
    chance = math.log(64)
    assert losses[-1] < chance - 1.0, losses
    assert losses[-1] < 0.6 * losses[0], losses
    assert min(losses[-3:]) < min(losses[:3]) - 1.0, losses
    # only the final per-epoch copy with save_every_epochs > epochs
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["epoch_015.pt", "last.pt"]
    shutil.rmtree(tmp_path)  # 100 MB checkpoints; kept only when the test fails


# --------------------------------------------------------------------------------------------------
# determinism


def test_same_seed_same_weights_and_metrics(
    tmp_path: Path, make_job: Callable[..., TrainJob], trained_run: Path, trained_metrics: dict[str, Any],
    tiny_world: Path,
) -> None:
    run = tmp_path / "again"
    Trainer(make_job(), run, show_progress=False).fit()
    a, b = last(trained_run), last(run)
    assert_same_tensors(a["model"], b["model"])
    assert_same_tensors(flat_tensors(a["optimizer"]), flat_tensors(b["optimizer"]))
    assert [r["loss"] for r in steps_of(read_log(run))] == [r["loss"] for r in steps_of(read_log(trained_run))]
    metrics = evaluate(run, tiny_world, EvalConfig(device="cpu"))
    assert metric_values(metrics) == metric_values(trained_metrics)
    assert {"zeroshot_top1", "zeroshot_top5", "linear_probe_top1"} <= metrics.keys()
    shutil.rmtree(tmp_path)


def test_different_seed_different_weights(
    tmp_path: Path, make_job: Callable[..., TrainJob], trained_run: Path
) -> None:
    run = tmp_path / "seed1"
    Trainer(make_job(seed=1), run, show_progress=False).fit()
    a, b = last(trained_run)["model"], last(run)["model"]
    differ = [k for k in a if a[k].is_floating_point() and not torch.equal(a[k], b[k])]
    # initialisation differs, so (nearly) every trained weight differs
    assert len(differ) > 0.9 * sum(1 for v in a.values() if v.is_floating_point())
    shutil.rmtree(tmp_path)


# --------------------------------------------------------------------------------------------------
# resume, in-process

INTERRUPT_STEP = STEPS_PER_EPOCH + 3  # the middle of epoch 2
_resumed_cache: dict[int, tuple[Path, dict[str, Any]]] = {}


def _resumed_run(
    every: int, tmp_path_factory: pytest.TempPathFactory, make_job: Callable[..., TrainJob]
) -> tuple[Path, dict[str, Any]]:
    """Run with Ctrl-C at INTERRUPT_STEP, then resume to the end; returns (run dir, last.pt at the interrupt)."""
    if every not in _resumed_cache:
        run = tmp_path_factory.mktemp("resume") / f"every{every}"
        job = make_job(checkpoint_every_steps=every)
        with pytest.raises(KeyboardInterrupt):
            Trainer(job, run, show_progress=False, on_step=interrupt_at(INTERRUPT_STEP)).fit()
        at_interrupt = last(run)
        Trainer(job, run, resume=True, show_progress=False).fit()
        _resumed_cache[every] = (run, at_interrupt)
    return _resumed_cache[every]


@pytest.fixture(scope="module", autouse=True)
def _drop_resumed_runs() -> Iterator[None]:
    yield
    for run, _ in _resumed_cache.values():
        shutil.rmtree(run, ignore_errors=True)
    _resumed_cache.clear()


@pytest.fixture(scope="module", params=[2, 0], ids=["mid-epoch-checkpoint", "epoch-checkpoints-only"])
def resumed(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, make_job: Callable[..., TrainJob]
) -> tuple[int, Path, dict[str, Any]]:
    return (request.param, *_resumed_run(request.param, tmp_path_factory, make_job))


def test_resume_checkpoint_position(resumed: tuple[int, Path, dict[str, Any]]) -> None:
    every, _, at_interrupt = resumed
    if every:
        # last.pt was rewritten inside epoch 2 at the last multiple of `every` before the interrupt
        assert at_interrupt["global_step"] == INTERRUPT_STEP - 1
        assert (at_interrupt["epoch"], at_interrupt["step_in_epoch"]) == (1, 2)
    else:
        assert at_interrupt["global_step"] == STEPS_PER_EPOCH
        assert (at_interrupt["epoch"], at_interrupt["step_in_epoch"]) == (1, 0)


def test_resume_is_exact(resumed: tuple[int, Path, dict[str, Any]], trained_run: Path) -> None:
    _, run, _ = resumed
    a, b = last(trained_run), last(run)
    assert_same_tensors(a["model"], b["model"])
    assert_same_tensors(flat_tensors(a["optimizer"]), flat_tensors(b["optimizer"]))
    assert (b["epoch"], b["global_step"], b["step_in_epoch"]) == (2, TOTAL_STEPS, 0)
    assert_same_tensors(load_ckpt(run / "checkpoints" / "epoch_002.pt")["model"], a["model"])


def test_resume_log_has_no_duplicates(resumed: tuple[int, Path, dict[str, Any]], trained_run: Path) -> None:
    _, run, _ = resumed
    log = read_log(run)
    steps = steps_of(log)
    assert [r["step"] for r in steps] == list(range(1, TOTAL_STEPS + 1))
    assert [r["epoch"] for r in epochs_of(log)] == [0, 1]
    ref = steps_of(read_log(trained_run))
    assert [(r["loss"], r["lr"], r["logit_scale"]) for r in steps] == [
        (r["loss"], r["lr"], r["logit_scale"]) for r in ref
    ]


def test_resume_mid_epoch_epoch_record_matches(
    tmp_path_factory: pytest.TempPathFactory, make_job: Callable[..., TrainJob], trained_run: Path
) -> None:
    run, _ = _resumed_run(2, tmp_path_factory, make_job)
    ref = epochs_of(read_log(trained_run))
    got = epochs_of(read_log(run))
    assert [r["loss"] for r in got] == [r["loss"] for r in ref]


def test_resume_a_finished_run_is_a_no_op(make_job: Callable[..., TrainJob], trained_run: Path) -> None:
    before = sha256(trained_run / "checkpoints" / "last.pt")
    log_before = (trained_run / "log.jsonl").read_text()
    Trainer(make_job(), trained_run, resume=True, show_progress=False).fit()
    assert sha256(trained_run / "checkpoints" / "last.pt") == before
    assert (trained_run / "log.jsonl").read_text() == log_before


# --------------------------------------------------------------------------------------------------
# resume, for real: SIGKILL a `python -m otcbench train` subprocess


def test_resume_after_sigkill_matches_uninterrupted_cli_run(tiny_world: Path, tmp_path: Path) -> None:
    opts = [
        "--epochs", "2", "--no-progress",
        "--set", "train.batch_size=64", "--set", "train.threads=1", "--set", "train.device=cpu",
        "--set", "train.log_every=1", "--set", "train.checkpoint_every_steps=2",
    ]  # fmt: skip
    runner = CliRunner()
    ref, killed = tmp_path / "ref", tmp_path / "killed"

    res = runner.invoke(app, ["train", str(tiny_world), str(ref), *opts])
    assert res.exit_code == 0, res.output

    stdout, stderr = tmp_path / "stdout.txt", tmp_path / "stderr.txt"
    with open(stdout, "wb") as out, open(stderr, "wb") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "otcbench", "train", str(tiny_world), str(killed), *opts],
            stdout=out, stderr=err, cwd=tmp_path,
        )
        try:
            deadline = time.monotonic() + 120
            while True:
                # wait for step 9: epoch 2 has started and last.pt was rewritten inside it (at step 8)
                if max((r["step"] for r in _log_records(killed) if r.get("type") == "step"), default=0) >= (
                    INTERRUPT_STEP
                ):
                    proc.send_signal(signal.SIGKILL)
                    break
                if proc.poll() is not None:
                    pytest.fail(f"the training subprocess ended (rc {proc.returncode}) before it could be killed:\n"
                                f"{stderr.read_text()}")
                if time.monotonic() > deadline:
                    pytest.fail("the training subprocess did not reach epoch 2 within 120 s")
                time.sleep(0.02)
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL

    at_kill = last(killed)
    assert at_kill["epoch"] == 1 and 0 < at_kill["step_in_epoch"] < STEPS_PER_EPOCH  # a mid-epoch checkpoint
    assert not (killed / "checkpoints" / "epoch_002.pt").exists()

    res = runner.invoke(app, ["train", str(tiny_world), str(killed), "--resume", *opts])
    assert res.exit_code == 0, res.output

    assert_same_tensors(last(ref)["model"], last(killed)["model"])
    assert [r["step"] for r in steps_of(read_log(killed))] == list(range(1, TOTAL_STEPS + 1))

    for run in (ref, killed):
        res = runner.invoke(app, ["eval", str(run), "--eval-data", str(tiny_world), "--set", "device=cpu"])
        assert res.exit_code == 0, res.output
    m_ref = json.loads((ref / "metrics.json").read_text())
    m_killed = json.loads((killed / "metrics.json").read_text())
    assert {"zeroshot_top1", "zeroshot_top5", "linear_probe_top1"} <= m_ref.keys()
    assert metric_values(m_killed) == metric_values(m_ref)
    shutil.rmtree(tmp_path)


# --------------------------------------------------------------------------------------------------
# refusing to clobber or mis-resume a run


def test_resume_with_changed_options_is_refused(trained_run: Path, make_job: Callable[..., TrainJob]) -> None:
    with pytest.raises(UserError, match=r"--resume: options differ .*train\.lr"):
        Trainer(make_job(lr=1e-3), trained_run, resume=True, show_progress=False)
    with pytest.raises(UserError, match=r"train\.seed"):
        Trainer(make_job(seed=5), trained_run, resume=True, show_progress=False)
    with pytest.raises(UserError, match=r"model\.name"):
        Trainer(make_job(model="otc-vit-tiny"), trained_run, resume=True, show_progress=False)


def test_resume_may_extend_epochs(trained_run: Path, make_job: Callable[..., TrainJob]) -> None:
    """epochs, device, threads, log_every may change on resume (constructing the trainer is enough)."""
    trainer = Trainer(make_job(epochs=3, log_every=5), trained_run, resume=True, show_progress=False)
    assert (trainer.epoch, trainer.global_step) == (2, TOTAL_STEPS)


def test_new_run_into_existing_run_is_refused(trained_run: Path, make_job: Callable[..., TrainJob]) -> None:
    ck = trained_run / "checkpoints" / "last.pt"
    before = (sha256(ck), ck.stat().st_mtime_ns)
    log_before = (trained_run / "log.jsonl").read_text()
    with pytest.raises(UserError, match="already holds a training run; pass --resume"):
        Trainer(make_job(), trained_run, show_progress=False)
    with pytest.raises(UserError, match="already holds a training run"):
        Trainer(make_job(lr=1e-2), trained_run, show_progress=False)
    assert (sha256(ck), ck.stat().st_mtime_ns) == before
    assert (trained_run / "log.jsonl").read_text() == log_before


def test_resume_without_a_run_is_refused(tmp_path: Path, make_job: Callable[..., TrainJob]) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError, match="holds no checkpoint"):
        Trainer(make_job(), empty, resume=True, show_progress=False)
    with pytest.raises(UserError, match="holds no checkpoint"):
        Trainer(make_job(), tmp_path / "missing", resume=True, show_progress=False)
    assert list(empty.iterdir()) == [] and not (tmp_path / "missing").exists()


def test_output_that_is_a_file_is_refused(tmp_path: Path, make_job: Callable[..., TrainJob]) -> None:
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(UserError, match="is a file"):
        Trainer(make_job(), f, show_progress=False)


def test_run_interrupted_before_first_checkpoint_can_be_continued(
    tmp_path: Path, make_job: Callable[..., TrainJob]
) -> None:
    run = tmp_path / "run"
    job = make_job(epochs=1)
    with pytest.raises(KeyboardInterrupt):
        Trainer(job, run, show_progress=False, on_step=interrupt_at(1)).fit()
    assert (run / "config.yaml").is_file() and not (run / "checkpoints" / "last.pt").exists()
    errors = []
    for resume in (True, False):
        try:
            Trainer(job, run, resume=resume, show_progress=False)
            return  # one of the two ways to continue works
        except UserError as err:
            errors.append(str(err))
    pytest.fail(" / ".join(errors))


# --------------------------------------------------------------------------------------------------
# learning-rate schedule


@pytest.mark.parametrize(
    ("warmup", "total", "expected"),
    [(0.1, 100, 10), (0.0, 100, 0), (0.05, 12, 1), (5, 100, 5), (5.0, 100, 5), (1, 100, 1), (200, 100, 100)],
)
def test_warmup_steps(warmup: float, total: int, expected: int) -> None:
    assert warmup_steps(warmup, total) == expected


def test_cosine_lr_known_values() -> None:
    base, warm, total = 2.0, 10, 110
    # linear warm-up: (step + 1) / warmup of the base rate, reaching it at the last warm-up step
    assert cosine_lr(0, base, warm, total) == pytest.approx(0.2)
    assert cosine_lr(4, base, warm, total) == pytest.approx(1.0)
    assert cosine_lr(9, base, warm, total) == pytest.approx(base)
    # cosine from base to 0 over the remaining 100 steps
    assert cosine_lr(10, base, warm, total) == pytest.approx(base)
    assert cosine_lr(35, base, warm, total) == pytest.approx(0.5 * base * (1 + math.cos(math.pi / 4)))
    assert cosine_lr(60, base, warm, total) == pytest.approx(base / 2)
    assert cosine_lr(85, base, warm, total) == pytest.approx(0.5 * base * (1 - math.cos(math.pi / 4)))
    assert cosine_lr(110, base, warm, total) == pytest.approx(0.0, abs=1e-15)
    assert cosine_lr(500, base, warm, total) == pytest.approx(0.0, abs=1e-15)  # clamped past the end
    lrs = [cosine_lr(s, base, warm, total) for s in range(total)]
    assert all(a <= b for a, b in zip(lrs[:warm], lrs[1 : warm + 1], strict=True))  # rising warm-up
    assert all(a >= b for a, b in zip(lrs[warm:], lrs[warm + 1 :], strict=False))  # falling cosine
    assert all(lr > 0 for lr in lrs)  # every trained step has a positive rate


def test_cosine_lr_without_warmup() -> None:
    assert cosine_lr(0, 1.0, 0, 4) == pytest.approx(1.0)
    assert cosine_lr(2, 1.0, 0, 4) == pytest.approx(0.5)
    assert cosine_lr(4, 1.0, 0, 4) == pytest.approx(0.0, abs=1e-15)
    assert cosine_lr(0, 1.0, 0, 1) == pytest.approx(1.0)  # a one-step run trains at the base rate


def test_full_disk_while_checkpointing_is_one_line_and_keeps_the_previous_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import errno

    from otcbench.train import checkpoint

    path = tmp_path / "ck" / "last.pt"
    checkpoint.atomic_torch_save({"epoch": 1}, path)

    def full(obj: object, f: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint.torch, "save", full)
    with pytest.raises(UserError, match="no space left on the device.*--resume"):
        checkpoint.atomic_torch_save({"epoch": 2}, path)
    monkeypatch.undo()
    assert torch.load(path)["epoch"] == 1 and sorted(p.name for p in path.parent.iterdir()) == ["last.pt"]
    # any other write error is not disguised as a full disk
    monkeypatch.setattr(checkpoint.torch, "save", lambda obj, f: (_ for _ in ()).throw(RuntimeError("boom")))
    with pytest.raises(RuntimeError, match="boom"):
        checkpoint.atomic_torch_save({"epoch": 3}, path)
