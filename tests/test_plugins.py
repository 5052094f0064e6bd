"""A new defense and a new attack are one class each: registered from this file alone, they run through
``poison``, training, ``eval --asr`` and the listings without any other file knowing them.

(A new attack *kind* — beyond ``targeted`` and ``backdoor`` — still needs its ASR in ``otcbench/eval/asr.py``.)
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from pydantic import Field
from typer.testing import CliRunner

from otcbench.attacks import ATTACKS
from otcbench.attacks.base import Attack, PoisonContext, PoisonRows
from otcbench.cli import app
from otcbench.config import DefenseConfig, EvalConfig, Options
from otcbench.data.format import load_pair_dataset
from otcbench.defenses import DEFENSES, Defense, build_defense
from otcbench.eval.run import evaluate
from otcbench.train.loop import Trainer


class EveryKthOptions(Options):
    keep_every: int = Field(2, ge=1, description="train on every k-th row of each epoch's order")


class EveryKth(Defense):
    """Toy defense: trains on every k-th row of each epoch."""

    Options = EveryKthOptions

    def __init__(self, options: Options) -> None:
        super().__init__(options)
        self.seen: list[tuple[int, int]] = []

    def epoch_indices(self, trainer, epoch: int, order: torch.Tensor) -> torch.Tensor:
        self.seen.append((epoch, trainer.global_step))
        return order[:: self.options.keep_every]


class CopyOptions(Options):
    copies: int = Field(6, ge=1, description="poisoned copies of the target image")


class CopyTarget(Attack):
    """Toy targeted attack: copies of the first training image captioned with the next class."""

    kind = "targeted"
    Options = CopyOptions

    def poison(self, ctx: PoisonContext) -> PoisonRows:
        blob, true = ctx.image_bytes[0], int(ctx.labels[0])
        adv = (true + 1) % len(ctx.classnames)
        n = self.options.copies
        rows = PoisonRows(images=[blob] * n, captions=[f"a photo of a {ctx.classnames[adv]}."] * n,
                          labels=[true] * n, origin=[-1] * n, targets=[(blob, true, adv)])
        rows.manifest = {"targets": [{"true_class": ctx.classnames[true], "adversarial_class": ctx.classnames[adv]}]}
        return rows


@pytest.fixture
def toy_plugins(monkeypatch: pytest.MonkeyPatch) -> None:
    """Register the toy defense and attack for one test (the registries are restored afterwards)."""
    for registry, name, cls in ((DEFENSES, "every-kth", EveryKth), (ATTACKS, "copy-target", CopyTarget)):
        monkeypatch.setattr(cls, "name", name, raising=False)
        monkeypatch.setitem(registry._items, name, cls)


def test_toy_plugins_are_listed_with_their_options(toy_plugins: None) -> None:
    runner = CliRunner()
    for command, name, option in ((["list", "defenses"], "every-kth", "keep_every"),
                                  (["list", "attacks"], "copy-target", "copies")):
        res = runner.invoke(app, command, env={"COLUMNS": "250"})
        assert res.exit_code == 0, res.output
        assert name in res.stdout and option in res.stdout


@pytest.mark.slow
def test_toy_attack_and_defense_run_through_poison_train_and_eval(
        toy_plugins: None, tiny_world: Path, make_job, tmp_path: Path) -> None:
    from otcbench.attacks.poison import poison_dataset

    poisoned = tmp_path / "poisoned"
    meta = poison_dataset(tiny_world, poisoned, [("copy-target", {"copies": 6})], seed=0)
    (entry,) = meta.poison["attacks"]
    assert (entry["name"], entry["kind"], entry["n_poisoned"]) == ("copy-target", "targeted", 6)
    data = load_pair_dataset(poisoned)
    assert data.poison_flags.count("copy-target") == 6 and len(data) == len(load_pair_dataset(tiny_world)) + 6

    job = make_job(data=poisoned, epochs=1).model_copy(update={"defense": DefenseConfig(name="every-kth")})
    defense = build_defense(job.defense)
    assert isinstance(defense, EveryKth) and defense.options.keep_every == 2
    trainer = Trainer(job, tmp_path / "run", defense=defense, show_progress=False)
    trainer.fit()
    assert defense.seen == [(0, 0)]
    n_rows = len(data)
    # half the rows per epoch: the steps of (n_rows / 2) rows at batch 64
    assert trainer.global_step == (n_rows + 1) // 2 // 64
    log = [json.loads(x) for x in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["type"] for r in log].count("epoch") == 1

    metrics = evaluate(tmp_path / "run", tiny_world, EvalConfig(linear_probe=False, asr=True), poison=poisoned)
    assert metrics["asr"]["copy-target"]["kind"] == "targeted" and metrics["asr"]["copy-target"]["n"] == 1
    assert metrics["asr_targeted"] in (0.0, 1.0)
