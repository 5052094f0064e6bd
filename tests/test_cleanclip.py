"""Tests for CleanCLIP (otcbench.defenses.cleanclip): the loss, the clean set, the schedule, --init, resume."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from run_helpers import interrupt_at, last_state, with_defense

from otcbench.config import SynthConfig, TrainJob
from otcbench.data.format import DatasetMeta, write_meta
from otcbench.defenses.cleanclip import CleanCLIP, CleanCLIPOptions, cleanclip_loss, world_config
from otcbench.errors import UserError
from otcbench.train.loop import Trainer

FAST = {"clean_n": 128, "lr": 1e-4, "warmup_steps": 1}


def test_loss_is_the_weighted_sum_on_a_hand_built_batch() -> None:
    torch.manual_seed(0)
    i, t, ia, ta = (F.normalize(torch.randn(5, 8), dim=1) for _ in range(4))
    s = torch.tensor(7.0)
    y = torch.arange(5)
    clip = 0.5 * (F.cross_entropy(s * i @ t.t(), y) + F.cross_entropy(s * t @ i.t(), y))
    inmodal = 0.5 * (F.cross_entropy(s * i @ ia.t(), y) + F.cross_entropy(s * t @ ta.t(), y))
    for lc, li in ((1.0, 1.0), (0.3, 2.0), (1.0, 0.0)):
        total, c, m = cleanclip_loss(i, t, ia, ta, s, lc, li)
        assert torch.allclose(c, clip) and torch.allclose(m, inmodal)
        assert torch.allclose(total, lc * clip + li * inmodal)
    # perfectly aligned views give a lower in-modality term than unrelated ones
    assert float(cleanclip_loss(i, t, i, t, s)[2]) < float(inmodal)


def test_fine_tuning_schedule_replaces_train_lr() -> None:
    d = CleanCLIP(CleanCLIPOptions(lr=1e-5, warmup_steps=50))
    tr = SimpleNamespace(global_step=0, total_steps=1000)
    assert d.learning_rate(tr, 3e-3) == pytest.approx(1e-5 / 50)
    tr.global_step = 49
    assert d.learning_rate(tr, 3e-3) == pytest.approx(1e-5)
    tr.global_step = 999
    assert d.learning_rate(tr, 3e-3) < 1e-8
    assert CleanCLIP(CleanCLIPOptions(lr=None)).learning_rate(tr, 3e-3) == 3e-3


def test_world_config_follows_a_poisoned_copy_to_its_clean_source(tmp_path: Path) -> None:
    world, poisoned, other = tmp_path / "world", tmp_path / "p", tmp_path / "csv"
    for d in (world, poisoned, other):
        d.mkdir()
    cfg = SynthConfig(n_train=50, seed=3)
    write_meta(world, DatasetMeta(kind="pairs", created_by={"command": "otcbench data synth world",
                                                            "options": cfg.model_dump(mode="json")}))
    write_meta(poisoned, DatasetMeta(kind="pairs", created_by={"command": "otcbench poison"},
                                     poison={"source": {"path": str(world)}}))
    write_meta(other, DatasetMeta(kind="pairs", created_by={"command": "otcbench data import"}))
    assert world_config(DatasetMeta.model_validate_json((poisoned / "otcbench.json").read_text()), poisoned) == cfg
    assert world_config(DatasetMeta.model_validate_json((other / "otcbench.json").read_text()), other) is None


@pytest.mark.slow
def test_without_init_is_a_clear_error(make_job: Callable[..., TrainJob], tmp_path: Path) -> None:
    with pytest.raises(UserError, match="pass --init CKPT"):
        Trainer(with_defense(make_job(), "cleanclip", **FAST), tmp_path / "run", show_progress=False)


@pytest.mark.slow
def test_poisoned_clean_data_is_refused(
    make_job: Callable[..., TrainJob], trained_run: Path, tmp_path: Path, tiny_world: Path
) -> None:
    from otcbench.attacks.poison import poison_dataset

    bad = tmp_path / "bad"
    poison_dataset(tiny_world, bad, [("badnet", {})])
    job = with_defense(make_job(), "cleanclip", trained_run / "checkpoints" / "last.pt", **FAST, clean_data=str(bad))
    with pytest.raises(UserError, match="poisoned rows"):
        Trainer(job, tmp_path / "run", show_progress=False)


# --------------------------------------------------------------------------------------------------
# end to end: fine-tune the shared tiny run on 128 fresh clean pairs, 2 epochs x 2 steps, exact resume


@pytest.fixture(scope="module")
def cleanclip_job(make_job: Callable[..., TrainJob], trained_run: Path) -> TrainJob:
    return with_defense(make_job(checkpoint_every_steps=1), "cleanclip", trained_run / "checkpoints" / "last.pt",
                        **FAST)


@pytest.fixture(scope="module")
def cleanclip_run(tmp_path_factory: pytest.TempPathFactory, cleanclip_job: TrainJob) -> Iterator[Path]:
    out = tmp_path_factory.mktemp("cleanclip") / "run"
    Trainer(cleanclip_job, out, show_progress=False).fit()
    yield out
    shutil.rmtree(out, ignore_errors=True)


@pytest.mark.slow
def test_cleanclip_fine_tunes_on_fresh_clean_pairs(
    cleanclip_run: Path, cleanclip_job: TrainJob, trained_run: Path, tmp_path: Path
) -> None:
    log = [json.loads(x) for x in (cleanclip_run / "log.jsonl").read_text().splitlines()]
    head = log[0]
    assert head["type"] == "cleanclip" and head["clean_pairs"] == 128 and "seed 1000" in head["source"]
    steps = [r for r in log if r["type"] == "step"]
    assert len(steps) == 4 and steps[0]["lr"] == pytest.approx(1e-4)  # 2 epochs of 128 / 64, warm-up 1 step
    assert all(r["loss"] == pytest.approx(r["clip"] + r["inmodal"], abs=1e-3) for r in steps)
    # the clean set is new data, not the training rows
    trainer = Trainer(cleanclip_job, tmp_path / "probe", show_progress=False)
    assert len(trainer.data) == 128 and not any(trainer.data.poison)
    train_rows = Trainer(with_defense(cleanclip_job, "none"), tmp_path / "probe2", show_progress=False).data
    assert not torch.equal(trainer.data.images[:8], train_rows.images[:8])
    # it starts from the init checkpoint and moves away from it
    base = last_state(trained_run)["model"]
    tuned = last_state(cleanclip_run)["model"]
    weights = [k for k in base if base[k].is_floating_point() and "running_" not in k]  # not BatchNorm statistics
    diffs = [float((tuned[k].float() - base[k].float()).abs().max()) for k in weights]
    assert 0 < max(diffs) < 0.01  # 4 AdamW steps of at most 1e-4 each


@pytest.mark.slow
def test_cleanclip_resumes_exactly(cleanclip_run: Path, cleanclip_job: TrainJob, tmp_path: Path) -> None:
    run = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        Trainer(cleanclip_job, run, show_progress=False, on_step=interrupt_at(3)).fit()
    Trainer(cleanclip_job, run, resume=True, show_progress=False).fit()
    a, b = last_state(run), last_state(cleanclip_run)
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def test_world_config_is_not_fooled_by_synth_in_a_poisoned_sets_path(tmp_path: Path) -> None:
    """synthetic-full's poisoned sets live under results/synthetic-full/: their poison command mentions
    "synth", which made all 36 CleanCLIP runs of that recipe fail to find their world."""
    world, poisoned = tmp_path / "synthetic-full" / "world", tmp_path / "synthetic-full" / "poison"
    cfg = SynthConfig(n_train=50, seed=3)
    for d in (world, poisoned):
        d.mkdir(parents=True)
    write_meta(world, DatasetMeta(kind="pairs", created_by={"command": f"otcbench data synth {world}",
                                                            "options": cfg.model_dump(mode="json")}))
    write_meta(poisoned, DatasetMeta(kind="pairs", created_by={"command": f"otcbench poison {world} {poisoned}",
                                                               "options": {"attacks": [["badnet", {}]]}},
                                     poison={"source": {"path": str(world)}}))
    assert world_config(DatasetMeta.model_validate_json((poisoned / "otcbench.json").read_text()), poisoned) == cfg


@pytest.mark.slow
def test_optimizer_state_from_the_checkpoint(cleanclip_job: TrainJob, trained_run: Path, tmp_path: Path) -> None:
    """optimizer_state="checkpoint" (the official code's optimizer.load_state_dict): the fine-tuning starts with
    the pre-training run's AdamW moments and step counts; "fresh" (default) with none."""
    pre = last_state(trained_run)["optimizer"]
    for mode in ("fresh", "checkpoint"):
        job = with_defense(cleanclip_job, "cleanclip", trained_run / "checkpoints" / "last.pt", **FAST,
                           optimizer_state=mode)
        trainer = Trainer(job, tmp_path / mode, show_progress=False)
        (tmp_path / mode).mkdir()  # fit() makes it; on_train_start logs there
        trainer.defense.on_train_start(trainer)
        state = trainer.optimizer.state_dict()["state"]
        if mode == "fresh":
            assert state == {}
            continue
        assert state.keys() == pre["state"].keys()
        assert all(torch.equal(state[k]["exp_avg_sq"], pre["state"][k]["exp_avg_sq"]) for k in state)
        assert all(float(state[k]["step"]) == float(pre["state"][k]["step"]) > 0 for k in state)
