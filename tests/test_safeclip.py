"""Tests for SafeCLIP (otcbench.defenses.safeclip): the GMM, the safe/risky split and its schedule, the
phases and their learning rates, the unimodal loss, and a tiny end-to-end run that resumes exactly."""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from run_helpers import interrupt_at, last_state, with_defense

from otcbench.config import SynthConfig, TrainJob
from otcbench.data.synth import write_world
from otcbench.defenses.pool import EmbeddingPool
from otcbench.defenses.safeclip import SafeCLIP, SafeCLIPOptions, fit_gmm_1d
from otcbench.defenses.unimodal import cross_view_clip_loss, nn_contrastive_loss
from otcbench.errors import UserError
from otcbench.train.loop import Trainer

FAST = {"unimodal_epochs": 1, "slow_epochs": 1, "bank_size": 32}


# --------------------------------------------------------------------------------------------------
# the mixture


def test_gmm_recovers_two_components() -> None:
    g = torch.Generator().manual_seed(0)
    low = 0.05 + 0.03 * torch.randn(200, generator=g)
    high = 0.45 + 0.06 * torch.randn(800, generator=g)
    fit = fit_gmm_1d(torch.cat([low, high]))
    assert torch.allclose(fit["means"], torch.tensor([0.05, 0.45], dtype=torch.float64), atol=0.01)
    assert torch.allclose(fit["weights"], torch.tensor([0.2, 0.8], dtype=torch.float64), atol=0.02)
    assert torch.allclose(fit["variances"].sqrt(), torch.tensor([0.03, 0.06], dtype=torch.float64), atol=0.01)
    post = fit["posterior"]
    assert torch.allclose(post.sum(1), torch.ones(1000, dtype=torch.float64))
    assert float(post[:200, 1].mean()) < 0.02 and float(post[200:, 1].mean()) > 0.98
    # deterministic and independent of the order of the values
    perm = torch.randperm(1000, generator=g)
    again = fit_gmm_1d(torch.cat([low, high])[perm])
    assert torch.allclose(again["means"], fit["means"]) and torch.allclose(again["posterior"], post[perm])


# --------------------------------------------------------------------------------------------------
# the split and the schedule (hand-built cosines, no model)


def fake_trainer(n: int, poisoned: int = 0) -> SimpleNamespace:
    logged: list[dict[str, Any]] = []
    return SimpleNamespace(
        caption_index=torch.arange(n), global_step=0, log=logged.append, logged=logged,
        data=SimpleNamespace(poison=["backdoor"] * poisoned + [""] * (n - poisoned)),
    )


def hand_cosines(n_bad: int = 30, n_good: int = 370, seed: int = 0) -> torch.Tensor:
    """Clearly mismatched pairs (cosine ~ 0) first, then clean pairs whose cosines spread over 0.2-0.6."""
    g = torch.Generator().manual_seed(seed)
    bad = 0.0 + 0.03 * torch.randn(n_bad, generator=g)
    good = 0.4 + 0.08 * torch.randn(n_good, generator=g)
    return torch.cat([bad, good]).float()


def test_split_puts_mismatched_pairs_in_the_risky_set_and_the_ratio_grows(monkeypatch: pytest.MonkeyPatch) -> None:
    d = SafeCLIP(SafeCLIPOptions(**FAST))
    cos = hand_cosines()
    monkeypatch.setattr(d, "_scores", lambda ctx, epoch: cos)
    trainer = fake_trainer(400, poisoned=30)
    first = d.first_mixed_epoch
    assert first == 2
    ratios, safes = [], []
    for epoch in range(first, first + 4):
        d.on_epoch_start(trainer, epoch)
        ratios.append(d.ratio)
        safes.append(d.safe.clone())
    # first mixed epoch: P(clean) >= 0.9; every mismatched pair is risky
    assert not bool(safes[0][:30].any())
    r0 = ratios[0]
    assert r0 == pytest.approx(float(safes[0].float().mean()))
    assert 0.7 < r0 < 0.95
    # later: top r*N with r += 0.01 per epoch; the safe sets are nested and mismatched pairs stay out
    assert ratios[1:] == pytest.approx([min(r0 + 0.01 * k, 0.85) for k in (1, 2, 3)])
    for k in (1, 2, 3):
        assert int(safes[k].sum()) == int(ratios[k] * 400)
        assert not bool(safes[k][:30].any())
    rec = trainer.logged[0]
    assert rec["type"] == "safeclip" and rec["epoch"] == first and rec["risky_poison_recall"] == 1.0
    # resuming into an epoch whose split is already known recomputes nothing
    d.on_epoch_start(trainer, first + 3)
    assert len(trainer.logged) == 4


def test_ratio_is_capped(monkeypatch: pytest.MonkeyPatch) -> None:
    d = SafeCLIP(SafeCLIPOptions(**FAST))
    monkeypatch.setattr(d, "_scores", lambda ctx, epoch: hand_cosines(30, 370))
    trainer = fake_trainer(400)
    d.on_epoch_start(trainer, 2)
    assert d.ratio > 0.86  # the first split keeps every pair with P(clean) >= 0.9, even above the cap
    for epoch in range(3, 5):
        d.on_epoch_start(trainer, epoch)
        assert d.ratio == pytest.approx(0.85) and int(d.safe.sum()) == 340


def test_data_step_standalone_uses_the_threshold(monkeypatch: pytest.MonkeyPatch) -> None:
    d = SafeCLIP(SafeCLIPOptions())
    cos = hand_cosines()
    monkeypatch.setattr(d, "_scores", lambda ctx, epoch: cos)
    res = d.data_step(fake_trainer(400))
    assert torch.equal(res.flagged, ~res.keep) and bool(res.flagged[:30].all())
    assert torch.equal(res.caption_index, torch.arange(400))
    assert list(res.scores) == ["cosine", "p_clean"] and torch.equal(res.scores["cosine"], cos)
    assert bool((res.scores["p_clean"][res.keep] >= 0.9).all())


def test_epoch_indices_risky_pass_then_safe_pass_without_mixed_batches() -> None:
    d = SafeCLIP(SafeCLIPOptions(**FAST))
    d.safe = torch.zeros(100, dtype=torch.bool)
    d.safe[torch.arange(0, 100, 3)] = True  # 34 safe, 66 risky
    order = torch.randperm(100, generator=torch.Generator().manual_seed(0))
    rows = d.epoch_indices(SimpleNamespace(cfg=SimpleNamespace(batch_size=16)), 2, order)
    assert len(rows) == 64 + 32
    assert not bool(d.safe[rows[:64]].any()) and bool(d.safe[rows[64:]].all())
    assert rows[:64].tolist() == [r for r in order.tolist() if not d.safe[r]][:64]  # the epoch's shuffle
    assert torch.equal(d.epoch_indices(None, 0, order), order)  # warm-up phases: all rows
    d2 = SafeCLIP(SafeCLIPOptions(**FAST, unimodal_on_risky=False))
    d2.safe = d.safe
    assert bool(d.safe[d2.epoch_indices(SimpleNamespace(cfg=SimpleNamespace(batch_size=16)), 2, order)].all())


def test_no_full_safe_batch_trains_nothing_that_epoch() -> None:
    """An empty first split (or fewer safe pairs than a batch) must not become an epoch of the unimodal loss
    on (nearly) all data at phase C's peak rate: the epoch has no rows at all."""
    d = SafeCLIP(SafeCLIPOptions(**FAST))
    order = torch.randperm(100, generator=torch.Generator().manual_seed(0))
    tr = SimpleNamespace(cfg=SimpleNamespace(batch_size=16))
    d.safe = torch.zeros(100, dtype=torch.bool)
    assert len(d.epoch_indices(tr, 2, order)) == 0
    d.safe[:10] = True  # 10 safe pairs: no full batch of 16
    assert len(d.epoch_indices(tr, 2, order)) == 0
    d.safe[:16] = True  # one full safe batch: the risky pass (80 of 84 risky rows) and the safe pass run
    assert len(d.epoch_indices(tr, 2, order)) == 80 + 16


def test_phase_c_cosine_spans_its_epochs_whatever_their_steps() -> None:
    """Phase C's cosine is positioned by epoch progress (as the official per-epoch scheduler index): a
    phase-C epoch of few steps (a small split) ends where one of many steps ends."""
    d = SafeCLIP(SafeCLIPOptions(unimodal_epochs=2, slow_epochs=1))  # phase C: epochs 3, 4, 5 of 6
    cfg = SimpleNamespace(lr=1e-3, warmup=0.1, epochs=6, batch_size=10)
    order = torch.arange(100)

    def rates(epoch: int, n_safe: int) -> list[float]:
        d.safe = torch.zeros(100, dtype=torch.bool)
        d.safe[:n_safe] = True
        n = len(d.epoch_indices(SimpleNamespace(cfg=cfg), epoch, order)) // 10
        return [d.learning_rate(SimpleNamespace(cfg=cfg, steps_per_epoch=10, total_steps=60, epoch=epoch,
                                                global_step=0, step_in_epoch=s), 1.0) for s in range(n)]

    few, many = rates(3, 20), rates(3, 90)  # 10 steps either way (risky + safe passes fill the epoch)
    assert few[0] == pytest.approx(1e-3) and len(few) == len(many) == 10
    d2 = rates(4, 50)
    # the second of three phase-C epochs starts one third into the cosine
    assert d2[0] == pytest.approx(0.5e-3 * (1 + math.cos(math.pi / 3)))
    only_clip = SafeCLIP(SafeCLIPOptions(unimodal_epochs=2, slow_epochs=1, unimodal_on_risky=False))
    only_clip.safe = torch.zeros(100, dtype=torch.bool)
    only_clip.safe[:30] = True  # 3 steps this epoch
    assert len(only_clip.epoch_indices(SimpleNamespace(cfg=cfg), 5, order)) == 30
    last = only_clip.learning_rate(SimpleNamespace(cfg=cfg, steps_per_epoch=10, total_steps=60, epoch=5,
                                                   global_step=0, step_in_epoch=2), 1.0)
    assert last == pytest.approx(0.5e-3 * (1 + math.cos(math.pi * (2 + 2 / 3) / 3)))


def test_phases_and_learning_rates() -> None:
    d = SafeCLIP(SafeCLIPOptions(unimodal_epochs=2, slow_epochs=1, slow_lr_factor=0.01))
    assert [d.phase(e) for e in range(5)] == ["unimodal", "unimodal", "slow", "mixed", "mixed"]
    cfg = SimpleNamespace(lr=1e-3, warmup=0.1, epochs=6)
    tr = SimpleNamespace(cfg=cfg, steps_per_epoch=10, total_steps=60, epoch=2, global_step=25, step_in_epoch=5)
    assert d.learning_rate(tr, 123.0) == pytest.approx(1e-5)  # phase B: constant 0.01 x lr
    tr.epoch, tr.global_step, tr.step_in_epoch = 3, 30, 0
    assert d.learning_rate(tr, 123.0) == pytest.approx(1e-3)  # phase C restarts at the full rate
    tr.epoch, tr.global_step, tr.step_in_epoch = 5, 59, 9
    assert d.learning_rate(tr, 123.0) < 1e-5
    tr.epoch, tr.global_step = 0, 0
    assert d.learning_rate(tr, 123.0) == pytest.approx(1e-3 / 3)  # warm-up over 10% of phases A+B (3 steps)
    # without phase A, phase B is where training starts: it warms up over 10 % of phase B, then stays constant
    b = SafeCLIP(SafeCLIPOptions(unimodal_epochs=0, slow_epochs=3, slow_lr_factor=1.0))
    rates = [b.learning_rate(SimpleNamespace(cfg=cfg, steps_per_epoch=10, total_steps=60, epoch=s // 10,
                                             global_step=s), 123.0) for s in range(30)]
    assert rates[:3] == pytest.approx([1e-3 / 3, 2e-3 / 3, 1e-3]) and rates[3:] == pytest.approx([1e-3] * 27)
    g = SafeCLIP(SafeCLIPOptions(unimodal_epochs=2, slow_epochs=1, lr_schedule="global"))
    assert g.learning_rate(tr, 123.0) == 123.0


# --------------------------------------------------------------------------------------------------
# losses on hand-built features


def test_nn_contrastive_loss_uses_the_bank_before_updating_it() -> None:
    torch.manual_seed(0)
    bank = EmbeddingPool(8, 4, seed=1)
    before = bank.vectors.clone()
    v1 = F.normalize(torch.randn(3, 4), dim=1)
    v2 = F.normalize(torch.randn(3, 4), dim=1).requires_grad_()
    s = torch.tensor(5.0)
    nn = before[(v1 @ before.t()).argmax(1)]
    expected = F.cross_entropy(s * v2 @ nn.t(), torch.arange(3))
    loss = nn_contrastive_loss(v1, v2, s, bank, torch.tensor([7, 8, 9]))
    assert torch.allclose(loss, expected)
    assert torch.allclose(bank.vectors[:3], v1) and bank.rows[:3].tolist() == [7, 8, 9]
    loss.backward()
    assert v2.grad is not None and float(v2.grad.abs().sum()) > 0
    in_batch = nn_contrastive_loss(v1, v2, s, None)
    assert torch.allclose(in_batch, F.cross_entropy(s * v2 @ v1.t(), torch.arange(3)))


def test_cross_view_clip_loss() -> None:
    torch.manual_seed(1)
    i1, t1, i2, t2 = (F.normalize(torch.randn(4, 6), dim=1) for _ in range(4))
    s = torch.tensor(3.0)
    target = torch.arange(4)
    expected = 0.5 * (F.cross_entropy(s * i1 @ t2.t(), target) + F.cross_entropy(s * t1 @ i2.t(), target))
    assert torch.allclose(cross_view_clip_loss(i1, t1, i2, t2, s), expected)


# --------------------------------------------------------------------------------------------------
# end to end on a very small world: 1 unimodal + 1 slow + 2 mixed epochs, and an exact resume


@pytest.fixture(scope="module")
def small_world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("safeclip") / "world"
    write_world(out, SynthConfig(n_train=128, probe_train_per_class=2, probe_val_per_class=1, test_per_class=2))
    return out


@pytest.fixture(scope="module")
def safeclip_job(small_world: Path, make_job: Callable[..., TrainJob]) -> TrainJob:
    # threshold 0.5: at P >= 0.9 this untrained model keeps 4 of 128 pairs, less than a batch, and such an epoch
    # trains nothing (test_empty_first_split_epoch_trains_nothing); 0.5 keeps ~55 %, both passes run
    return with_defense(make_job(data=small_world, epochs=4, batch_size=32, checkpoint_every_steps=1),
                        "safeclip", **FAST, threshold=0.5)


@pytest.fixture(scope="module")
def safeclip_run(tmp_path_factory: pytest.TempPathFactory, safeclip_job: TrainJob) -> Iterator[Path]:
    out = tmp_path_factory.mktemp("safeclip-run") / "run"
    Trainer(safeclip_job, out, show_progress=False).fit()
    yield out
    shutil.rmtree(out, ignore_errors=True)


@pytest.mark.slow
def test_safeclip_trains_through_all_phases(safeclip_run: Path) -> None:
    log = [json.loads(x) for x in (safeclip_run / "log.jsonl").read_text().splitlines()]
    steps = [r for r in log if r["type"] == "step"]
    assert [r["phase"] for r in steps[:8]] == [0.0] * 4 + [1.0] * 4
    assert all(r["lr"] == pytest.approx(0.01 * 3e-3) for r in steps[4:8])  # phase B at 0.01 x lr
    splits = [r for r in log if r["type"] == "safeclip"]
    assert [r["epoch"] for r in splits] == [2, 3]
    reprs = [r for r in log if r["type"] == "safeclip_repr"]  # after phase A and after phase B
    assert [r["epoch"] for r in reprs] == [0, 1] and all(-1 <= r["text_cos"] <= 1 for r in reprs)
    assert reprs[0]["logit_scale"] == pytest.approx(steps[3]["logit_scale"], abs=1e-3)
    mixed = [r for r in steps if r["epoch"] == 2]
    risky = [r["risky"] for r in mixed]
    assert risky == sorted(risky, reverse=True)  # the risky pass first, then the safe pass
    state = last_state(safeclip_run)["defense"]
    assert state["split_epoch"] == 3 and state["safe"].shape == (128,)
    assert set(state["banks"]) == {"image", "text"}


@pytest.mark.slow
def test_safeclip_resumes_exactly(safeclip_run: Path, safeclip_job: TrainJob, tmp_path: Path) -> None:
    run = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        Trainer(safeclip_job, run, show_progress=False, on_step=interrupt_at(10)).fit()  # inside a mixed epoch
    Trainer(safeclip_job, run, resume=True, show_progress=False).fit()
    a, b = last_state(run), last_state(safeclip_run)
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert torch.equal(a["defense"]["safe"], b["defense"]["safe"])
    log = [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log if r["type"] == "safeclip"] == [2, 3]


@pytest.mark.slow
def test_empty_first_split_epoch_trains_nothing(
    small_world: Path, make_job: Callable[..., TrainJob], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """End to end: every pair scores the same, the GMM finds no clean component (P = 0.5 < 0.9), and the
    phase-C epoch runs no step instead of the unimodal loss on all data."""
    monkeypatch.setattr(SafeCLIP, "_scores", lambda self, ctx, epoch: torch.zeros(len(ctx.data)))
    job = with_defense(make_job(data=small_world, epochs=3, batch_size=32), "safeclip", **FAST)
    Trainer(job, tmp_path / "run", show_progress=False).fit()
    log = [json.loads(x) for x in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    steps = [r for r in log if r["type"] == "step"]
    assert {r["epoch"] for r in steps} == {0, 1}
    split = next(r for r in log if r["type"] == "safeclip")
    assert split["epoch"] == 2 and split["safe_fraction"] == 0.0 and split["trained"] is False
    epochs = [r for r in log if r["type"] == "epoch"]
    assert [r["epoch"] for r in epochs] == [0, 1, 2] and epochs[-1]["step"] == epochs[-2]["step"] == 8


@pytest.mark.slow
def test_too_few_epochs_is_a_clear_error(safeclip_job: TrainJob, tmp_path: Path) -> None:
    d = safeclip_job.model_dump()
    d["train"]["epochs"] = 2
    with pytest.raises(UserError, match="leaves no filtering epoch"):
        Trainer(TrainJob.model_validate(d), tmp_path / "run", show_progress=False).fit()


def test_unworkable_epochs_are_refused_before_any_work(tiny_world: Path, tmp_path: Path) -> None:
    """A recipe entry or an `otcbench train` whose epochs leave SafeCLIP no filtering epoch stops at validation
    with one line (what, where, how to fix), before data, model or output directory exist."""
    import yaml
    from typer.testing import CliRunner

    from otcbench.bench.recipe import load_recipe
    from otcbench.bench.runner import plan_recipe
    from otcbench.cli import app

    raw = {"name": "tiny", "data": {"synth": {"n_train": 64}}, "attacks": ["none"],
           "defenses": ["none", {"name": "safeclip", "label": "safe", "train": {"epochs": 6}}],
           "train": {"epochs": 8}, "seeds": [0]}
    f = tmp_path / "recipe.yaml"
    f.write_text(yaml.safe_dump(raw))
    with pytest.raises(UserError, match=r"^defense safe: train.epochs=6 leaves no filtering epoch after "
                       r"unimodal_epochs=5 \+ slow_epochs=1; set train.epochs \(--epochs\) to 7 or more"):
        plan_recipe(load_recipe(f)[0], tmp_path / "out")
    assert not (tmp_path / "out").exists()
    raw["defenses"][1]["train"] = {"epochs": 7}  # one filtering epoch: fine
    f.write_text(yaml.safe_dump(raw))
    assert len(plan_recipe(load_recipe(f)[0], tmp_path / "out").runs) == 2

    r = CliRunner().invoke(app, ["train", str(tiny_world), str(tmp_path / "run"), "--defense", "safeclip",
                                 "--epochs", "3", "--set", "defense.options.unimodal_epochs=2"])
    assert r.exit_code == 2 and not (tmp_path / "run").exists()
    line = " ".join(r.output.split())
    assert "defense safeclip: train.epochs=3 leaves no filtering epoch" in line and "to 4 or more" in line


@pytest.mark.slow
def test_defend_writes_the_split_and_its_scores(trained_run: Path, tiny_world: Path, tmp_path: Path) -> None:
    import pandas as pd

    from otcbench.defenses.defend import run_defend

    run_defend(tiny_world, tmp_path / "defended", defense="safeclip", checkpoint=trained_run, device="cpu",
               show_progress=False)
    scores = pd.read_parquet(tmp_path / "defended" / "pair_scores.parquet")
    assert {"score_cosine", "score_p_clean", "keep", "flagged"} <= set(scores.columns)
    assert scores["flagged"].tolist() == (~scores["keep"]).tolist()
    assert bool((scores.loc[scores["keep"], "score_p_clean"] >= 0.9).all())
    assert scores["caption_row"].tolist() == list(range(384))  # SafeCLIP filters, it never re-pairs


@pytest.mark.slow
def test_augmented_scoring_is_seeded_per_epoch(make_job: Callable[..., TrainJob], tmp_path: Path) -> None:
    """score_views="augmented" (the official code's cosine on its first augmented view) is reproducible."""
    job = with_defense(make_job(epochs=3), "safeclip", **FAST, score_views="augmented")
    trainer = Trainer(job, tmp_path / "run", show_progress=False)
    d = trainer.defense
    d.on_train_start(trainer)
    a, b = d._scores(trainer, 2), d._scores(trainer, 2)
    assert a.shape == (384,) and torch.equal(a, b)
    assert not torch.equal(a, d._scores(trainer, 3))
    clean = SafeCLIP(SafeCLIPOptions(**FAST))._scores(trainer, 2)
    assert not torch.allclose(a, clean) and float(a.abs().max()) <= 1.0


def test_estimated_cost_follows_the_phases() -> None:
    # official: 5 unimodal + 1 cross_aug slow epoch (two views each), then CLIP on two views of the safe share
    # and the unimodal loss on two views of the risky rest: twice a plain epoch throughout
    official = SafeCLIPOptions()
    assert SafeCLIP.estimated_cost(official, 16) == pytest.approx(32.0)
    # one view, no unimodal loss: phase B at 1x, phase C at the safe share (ratio_cap) only
    cheap = SafeCLIPOptions(unimodal_epochs=0, slow_epochs=6, cross_aug=False, unimodal_on_risky=False)
    assert SafeCLIP.estimated_cost(cheap, 16) == pytest.approx(6 + 0.85 * 10)
    assert SafeCLIP.estimated_cost(official, 3) == pytest.approx(6.0)  # a run that ends inside phase A
