"""Tests for ``train.report_to`` (otcbench.train.reporting): log.jsonl's records as TensorBoard / wandb scalars.

Training runs are one epoch of otc-rn-nano on the shared tiny world (6 steps). wandb is never installed here: a
fake module in ``sys.modules`` records what the trainer sends it.
"""

from __future__ import annotations

import json
import sys
import types
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from run_helpers import with_defense

from otcbench.bench.plan import plan_recipe
from otcbench.bench.recipe import load_recipe
from otcbench.config import TrainConfig, TrainJob, validate
from otcbench.errors import UserError
from otcbench.train.loop import Trainer, _config_diff
from otcbench.train.reporting import make_reporters, to_scalars


def read_log(run: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines() if line.strip()]


def read_events(run: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar of ``RUN/tensorboard`` as ``{tag: [(step, value), …]}``, in step order."""
    from tensorboard.backend.event_processing.event_accumulator import SCALARS, EventAccumulator

    acc = EventAccumulator(str(run / "tensorboard"), size_guidance={SCALARS: 0})  # 0: keep every event
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


class FakeWandb(types.ModuleType):
    """What the trainer calls of wandb, recorded."""

    def __init__(self) -> None:
        super().__init__("wandb")
        self.inits: list[dict[str, Any]] = []
        self.logs: list[tuple[dict[str, float], int]] = []
        self.finishes = 0

    def init(self, **kwargs: Any) -> Any:
        self.inits.append(kwargs)
        return types.SimpleNamespace(id="fake")

    def log(self, data: dict[str, float], step: int) -> None:
        self.logs.append((dict(data), step))

    def finish(self) -> None:
        self.finishes += 1


# --------------------------------------------------------------------------------------------------
# the mapping


def test_records_map_to_tagged_scalars() -> None:
    step = {"type": "step", "step": 7, "epoch": 1, "loss": 2.5, "lr": 1e-3, "matching": True}
    assert to_scalars(step, default_step=99) == ({"train/loss": 2.5, "train/lr": 1e-3, "train/matching": 1.0}, 7)
    epoch = {"type": "epoch", "epoch": 0, "step": 6, "loss": 3.0, "seconds": 1.5, "bad_image_examples": ["a.jpg"]}
    assert to_scalars(epoch) == ({"epoch/loss": 3.0, "epoch/seconds": 1.5}, 6)
    # a defense's record: <type>/<key>; strings, lists and None skipped, a dict of numbers flattened one level
    match = {"type": "safeclip", "epoch": 2, "source": "x", "trained": False, "ratio": None, "ids": [1, 2],
             "gmm": {"low": 0.1, "name": "g", "deep": {"x": 1}}, "safe_fraction": 0.5}
    assert to_scalars(match, default_step=12) == (
        {"safeclip/trained": 0.0, "safeclip/gmm/low": 0.1, "safeclip/safe_fraction": 0.5}, 12)


# --------------------------------------------------------------------------------------------------
# a run reporting to both (wandb faked): the event file and the wandb calls mirror log.jsonl


@pytest.fixture(scope="module")
def reported_run(tmp_path_factory: pytest.TempPathFactory, make_job: Callable[..., TrainJob]
                 ) -> Iterator[tuple[Path, FakeWandb, TrainJob]]:
    fake = FakeWandb()
    job = make_job(epochs=1, report_to="tensorboard,wandb")
    out = tmp_path_factory.mktemp("reporting") / "run"
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(sys.modules, "wandb", fake)
        Trainer(job, out, show_progress=False).fit()
    yield out, fake, job


def test_tensorboard_event_file_mirrors_the_log(reported_run: tuple[Path, FakeWandb, TrainJob]) -> None:
    run, _, _ = reported_run
    log, events = read_log(run), read_events(run)
    assert {"train/loss", "train/lr", "train/logit_scale", "train/images_per_s", "epoch/loss",
            "epoch/seconds"} <= set(events)
    assert not {"train/step", "train/epoch", "epoch/epoch"} & set(events)  # positions are steps, not curves
    steps = [r for r in log if r["type"] == "step"]
    assert len(events["train/loss"]) == len(steps) == 6
    for key in ("loss", "lr", "logit_scale"):
        assert [s for s, _ in events[f"train/{key}"]] == [r["step"] for r in steps]
        assert [v for _, v in events[f"train/{key}"]] == pytest.approx([r[key] for r in steps], rel=1e-6)
    (epoch,) = [r for r in log if r["type"] == "epoch"]
    assert events["epoch/loss"] == [(epoch["step"], pytest.approx(epoch["loss"], rel=1e-6))]


def test_wandb_runs_offline_and_gets_the_same_scalars(reported_run: tuple[Path, FakeWandb, TrainJob]) -> None:
    run, fake, job = reported_run
    (init,) = fake.inits
    assert init == {"mode": "offline", "dir": str(run), "project": "otcbench", "name": run.name,
                    "config": job.model_dump(mode="json")}
    assert fake.logs == [to_scalars(r) for r in read_log(run)]  # every record has its step
    events = read_events(run)
    for scalars, step in fake.logs:  # and the same as TensorBoard's
        for tag, value in scalars.items():
            assert (step, pytest.approx(value, rel=1e-6)) in events[tag]
    assert fake.finishes == 1


def test_a_defense_records_appear_under_their_type(tmp_path: Path, make_job: Callable[..., TrainJob]) -> None:
    # roclip matches in every epoch with match_every=1: one roclip_match record at the end of the only epoch
    job = with_defense(make_job(epochs=1, report_to=["tensorboard"]), "roclip", pool_size=96, match_every=1)
    run = tmp_path / "run"
    Trainer(job, run, show_progress=False).fit()
    (match,) = [r for r in read_log(run) if r["type"] == "roclip_match"]
    events = read_events(run)
    assert events["roclip_match/match_precision"] == [(match["step"], pytest.approx(match["match_precision"]))]
    assert "roclip_match/matched_random" in events and "train/matching" in events  # a step record's extras too


# --------------------------------------------------------------------------------------------------
# a missing package fails while the trainer is built, before anything is written


@pytest.mark.parametrize("sink, module", [("tensorboard", "torch.utils.tensorboard"), ("wandb", "wandb")])
def test_a_missing_package_fails_before_training(
    tmp_path: Path, make_job: Callable[..., TrainJob], monkeypatch: pytest.MonkeyPatch, sink: str, module: str
) -> None:
    monkeypatch.setitem(sys.modules, module, None)  # None in sys.modules: the import fails
    run = tmp_path / "run"
    with pytest.raises(UserError, match=rf"otcbench\[{sink}\]") as err:
        Trainer(make_job(epochs=1, report_to=[sink]), run, show_progress=False)
    assert "\n" not in str(err.value)
    assert not run.exists()  # no log.jsonl, no checkpoint


def test_no_sink_reports_nothing(tmp_path: Path) -> None:
    reporter = make_reporters([], tmp_path, {})
    reporter.log({"type": "step", "step": 1, "loss": 1.0})
    reporter.close()
    assert not list(tmp_path.iterdir())


# --------------------------------------------------------------------------------------------------
# the option: forms, errors, and no effect on run ids or resume


def test_report_to_accepts_open_clips_forms() -> None:
    assert TrainConfig(report_to="tensorboard,wandb").report_to == ["tensorboard", "wandb"]
    assert TrainConfig(report_to="wandb").report_to == ["wandb"]
    assert TrainConfig(report_to=["tensorboard", "tensorboard"]).report_to == ["tensorboard"]
    assert TrainConfig(report_to="").report_to == TrainConfig().report_to == []


def test_an_unknown_sink_is_one_line_naming_the_allowed_ones() -> None:
    with pytest.raises(UserError) as err:
        validate(TrainJob, {"train": {"report_to": "tensorboard,mlflow"}})
    msg = str(err.value)
    assert "\n" not in msg and "train.report_to" in msg and "'mlflow'" in msg
    assert "tensorboard" in msg and "wandb" in msg


def test_report_to_changes_no_run_id_and_no_resume(tmp_path: Path, make_job: Callable[..., TrainJob]) -> None:
    recipe = {
        "name": "tiny",
        "data": {"synth": {"n_train": 384, "probe_train_per_class": 6, "probe_val_per_class": 3,
                           "test_per_class": 6, "seed": 0}},
        "attacks": ["none"], "defenses": ["none"], "model": {"name": "otc-rn-nano"},
        "train": {"epochs": 1, "batch_size": 64, "threads": 1, "device": "cpu"}, "seeds": [0],
    }
    path = tmp_path / "r.yaml"
    path.write_text(json.dumps(recipe))  # JSON is YAML

    def ids(overrides: list[str]) -> list[str]:
        return [r.run_id for r in plan_recipe(load_recipe(path, overrides)[0], tmp_path / "out").runs]

    assert ids(["train.report_to=tensorboard,wandb"]) == ids([])
    assert _config_diff(make_job(), make_job(report_to=["tensorboard"])) == ""
