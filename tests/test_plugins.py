"""A new defense, a new attack and a new attack *kind* are one class each: registered from this file alone, they
run through ``poison``, training, ``eval --asr``, the listings and the bench's columns without any other file
knowing them.
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
from otcbench.attacks.kinds import KINDS, AttackKind, EvalContext, kind_labels, overview_metrics
from otcbench.cli import app
from otcbench.config import DefenseConfig, EvalConfig, Options
from otcbench.data.format import load_pair_dataset
from otcbench.defenses import DEFENSES, Defense, build_defense
from otcbench.errors import UserError
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


class MisclassifyAny(AttackKind):
    """Toy kind: an attack succeeds on a target image that is classified as anything but its true class."""

    headline = {"asr_misclassify": "asr", "asr_misclassify_n": "n"}
    labels = {"asr_misclassify": "ASR misclassify-any"}

    def evaluate(self, entry: dict, index: int, ctx: EvalContext) -> dict:
        rows = entry["target_rows"]
        true = torch.tensor([ctx.class_index(t["true_class"], entry["name"]) for t in entry["targets"]])
        pred = (ctx.features(ctx.target_images()[rows]) @ ctx.classifier).argmax(1)
        return {"kind": "misclassify-any", "asr": float((pred != true).float().mean()), "n": len(rows)}

    def describe(self, entry: dict) -> str:
        return f"{len(entry['targets'])} targets, any wrong class"


class CopyAnyWrong(CopyTarget):
    """Toy attack of the toy kind: the same copies, judged by whether the target is misclassified at all."""

    kind = "misclassify-any"


@pytest.fixture
def toy_kind(monkeypatch: pytest.MonkeyPatch) -> None:
    """Register the toy kind and its attack for one test (the registries are restored afterwards)."""
    for registry, name, cls in ((KINDS, "misclassify-any", MisclassifyAny), (ATTACKS, "copy-any-wrong", CopyAnyWrong)):
        monkeypatch.setattr(cls, "name", name, raising=False)
        monkeypatch.setitem(registry._items, name, cls)


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


def test_an_attack_of_an_unknown_kind_is_refused_when_registered_and_when_used(
        tiny_world: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from otcbench.attacks.poison import poison_dataset

    monkeypatch.setattr(ATTACKS, "_items", dict(ATTACKS._items))  # a registration that passes is undone
    bad = type("Bad", (CopyTarget,), {"kind": "misclassify-any"})
    with pytest.raises(UserError, match=r"attack 'bad': unknown attack kind 'misclassify-any'; known: backdoor, "
                                        r"targeted \(`otcbench list attacks`\)"):
        ATTACKS.register("bad")(bad)
    assert "bad" not in ATTACKS.names()
    with pytest.raises(UserError, match="attack 'no-kind' declares no kind"):
        ATTACKS.register("no-kind")(type("NoKind", (Attack,), {}))
    # registered behind the registry's back (as the fixtures here do): refused before any poisoning
    monkeypatch.setitem(ATTACKS._items, "copy-any-wrong", CopyAnyWrong)
    monkeypatch.setattr(CopyAnyWrong, "name", "copy-any-wrong", raising=False)
    with pytest.raises(UserError, match="attack 'copy-any-wrong': unknown attack kind 'misclassify-any'"):
        poison_dataset(tiny_world, tmp_path / "p", [("copy-any-wrong", {})])
    assert not (tmp_path / "p").exists()
    monkeypatch.setitem(KINDS._items, "misclassify-any", MisclassifyAny)
    monkeypatch.setattr(MisclassifyAny, "name", "misclassify-any", raising=False)
    ATTACKS.register("good")(type("Good", (CopyTarget,), {"kind": "misclassify-any"}))  # a known kind: accepted
    assert "good" in ATTACKS.names()


def test_a_toy_kind_names_its_columns_for_the_bench(toy_kind: None) -> None:
    from otcbench.bench.summary import _column_order, lower_is_better, metric_names

    assert list(kind_labels()) == ["asr_targeted", "asr_backdoor", "asr_backdoor_probe", "asr_misclassify"]
    assert overview_metrics() == ["asr_targeted", "asr_backdoor", "asr_misclassify"]
    assert metric_names()["asr_misclassify"] == "ASR misclassify-any" and lower_is_better("asr_misclassify")
    cols = _column_order(["run_id", "detect_auroc", "asr_misclassify", "zeroshot_top1", "asr_backdoor"])
    assert cols[-4:] == ["zeroshot_top1", "asr_backdoor", "asr_misclassify", "detect_auroc"]


@pytest.mark.slow
def test_a_toy_attack_kind_runs_through_poison_train_and_eval(
        toy_kind: None, tiny_world: Path, make_job, tmp_path: Path) -> None:
    from rich.console import Console

    from otcbench import render
    from otcbench.attacks.poison import poison_dataset

    poisoned = tmp_path / "poisoned"
    meta = poison_dataset(tiny_world, poisoned, [("copy-any-wrong", {"copies": 4})], seed=0)
    (entry,) = meta.poison["attacks"]
    assert (entry["name"], entry["kind"], entry["n_poisoned"]) == ("copy-any-wrong", "misclassify-any", 4)
    console = Console(record=True, width=200)
    console.print(render.poison_table(poisoned, meta))
    assert "1 targets, any wrong class" in console.export_text()  # the kind's own line

    job = make_job(data=poisoned, epochs=1)
    Trainer(job, tmp_path / "run", show_progress=False).fit()
    metrics = evaluate(tmp_path / "run", tiny_world, EvalConfig(linear_probe=False, asr=True), poison=poisoned)
    res = metrics["asr"]["copy-any-wrong"]
    assert res["kind"] == "misclassify-any" and res["n"] == 1 and res["asr"] in (0.0, 1.0)
    assert metrics["asr_misclassify"] == res["asr"] and metrics["asr_misclassify_n"] == 1
    assert "asr_targeted" not in metrics and "asr_backdoor" not in metrics  # only the kinds present
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["asr_misclassify"] == res["asr"]
