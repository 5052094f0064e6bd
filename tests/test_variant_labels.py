"""Variant labels follow the options: plain name at the defaults, phrases or key=value for changes, in the
summary, the tables and `otcbench list defenses` (no training: recipes are planned, summaries hand-written)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, ClassVar

import pandas as pd
import pytest
import yaml
from pydantic import Field
from test_report import row
from typer.testing import CliRunner

from otcbench.bench.recipe import load_recipe
from otcbench.bench.report import HEAD, META, fill_variants, read_summary, shown_labels, summary_rows, write_report
from otcbench.bench.runner import plan_recipe
from otcbench.cli import app
from otcbench.config import Options
from otcbench.defenses import DEFENSES, Defense
from otcbench.defenses.labels import registered_variant_of, row_label, variant_label
from otcbench.defenses.safeclip import SafeCLIP, SafeCLIPOptions
from otcbench.errors import UserError

#: The quickstart's SafeCLIP (recipes/quickstart.yaml): its own warm-up and risky-set components off.
QUICKSTART_SAFECLIP = {"unimodal_epochs": 0, "slow_epochs": 6, "slow_lr_factor": 1.0, "cross_aug": False,
                       "ratio_step": 0.05, "unimodal_on_risky": False}
QUICKSTART_LABEL = "safeclip (no warm-up, full-rate slow phase, no cross-aug, no risky-set loss, +2 more)"


class _Sub(Options):
    depth: int = 2
    cache_mb: int = 64


class _KnobOptions(Options):
    alpha: float = Field(0.5, description="a result-changing option")
    chunk: int = Field(256, description="execution only")
    sub: _Sub = Field(default_factory=_Sub)


class _Knob(Defense):
    """A test defense with execution knobs and one phrase."""

    Options = _KnobOptions
    label_ignore: ClassVar[frozenset[str]] = frozenset({"chunk", "sub.cache_mb"})
    variant_phrases: ClassVar[dict[str, Any]] = {"alpha": lambda v: "no alpha" if v == 0 else None}


class _KnobPlusOptions(_KnobOptions):
    alpha: float = Field(0.0, description="the variant's own default")


class _KnobPlus(_Knob):
    """A variant registered under its own name: other defaults."""

    Options = _KnobPlusOptions


@pytest.fixture
def knob(monkeypatch: pytest.MonkeyPatch) -> None:
    """Registers ``knob`` and its variant ``knob+zero`` for one test."""
    for name, cls in (("knob", _Knob), ("knob+zero", _KnobPlus)):
        monkeypatch.setitem(DEFENSES._items, name, cls)
        monkeypatch.setattr(cls, "name", name, raising=False)


def test_defaults_give_the_plain_registered_name() -> None:
    for name in DEFENSES.names():
        cls = DEFENSES.get(name)
        assert variant_label(name, {}) == name
        assert variant_label(name, cls.Options()) == name  # an Options instance as well as a dict
        assert variant_label(name, cls.Options().model_dump(mode="json")) == name  # fully resolved (run.json)
    # a value equal to the default is no change
    assert variant_label("safeclip", {"unimodal_epochs": 5, "cross_aug": True}) == "safeclip"


def test_one_changed_option_gives_its_phrase() -> None:
    assert variant_label("safeclip", {"unimodal_epochs": 0}) == "safeclip (no warm-up)"
    assert variant_label("safeclip", {"unimodal_epochs": 2}) == "safeclip (warm-up 2)"
    assert variant_label("safeclip", {"unimodal_on_risky": False}) == "safeclip (no risky-set loss)"
    assert variant_label("safeclip", {"cross_aug": False}) == "safeclip (no cross-aug)"
    assert variant_label("safeclip", SafeCLIPOptions(slow_lr_factor=1.0)) == "safeclip (full-rate slow phase)"
    assert variant_label("roclip", {"pool_size": 1024, "warmup_epochs": 4}) == "roclip (pool 1024, warm-up 4)"


def test_changes_without_a_phrase_are_key_value() -> None:
    assert variant_label("safeclip", {"threshold": 0.5}) == "safeclip (threshold=0.5)"
    # the phrase function declines (None): key=value
    assert variant_label("safeclip", {"slow_lr_factor": 0.2}) == "safeclip (slow_lr_factor=0.2)"
    # nested options are flattened with dots
    assert variant_label("safeclip", {"image_aug": {"flip_p": 0.1}}) == "safeclip (image_aug.flip_p=0.1)"
    assert variant_label("cleanclip", {"lr": 1e-4}) == "cleanclip (lr=0.0001)"
    assert variant_label("roclip", {"reencode_matched": True, "own_pair_weight": 0.5}) == \
        "roclip (re-encoded matches, own_pair_weight=0.5)"


def test_order_is_deterministic_and_long_labels_are_cut() -> None:
    # phrased changes first, then key=value ones, each in the options' declaration order, whatever the dict order
    shuffled = dict(reversed(list(QUICKSTART_SAFECLIP.items())))
    assert variant_label("safeclip", QUICKSTART_SAFECLIP) == variant_label("safeclip", shuffled) == QUICKSTART_LABEL
    assert variant_label("safeclip", {"ratio_step": 0.05, "cross_aug": False, "threshold": 0.5}) == \
        "safeclip (no cross-aug, threshold=0.5, ratio_step=0.05)"
    four = {"unimodal_epochs": 0, "cross_aug": False, "threshold": 0.5, "ratio_cap": 0.5}
    assert variant_label("safeclip", four) == "safeclip (no warm-up, no cross-aug, threshold=0.5, ratio_cap=0.5)"


def test_execution_knobs_make_no_label(knob: None) -> None:
    assert variant_label("knob", {"chunk": 32}) == "knob"
    assert variant_label("knob", {"sub": {"cache_mb": 1}}) == "knob"
    assert variant_label("knob", {"sub": {"depth": 3}, "chunk": 32}) == "knob (sub.depth=3)"
    assert variant_label("knob", {"alpha": 0.0}) == "knob (no alpha)"
    assert variant_label("knob", {"alpha": 0.25}) == "knob (alpha=0.25)"


def test_labels_compare_with_the_defaults_of_the_registered_name(knob: None) -> None:
    # a variant registered under its own name is plain at its own defaults, labelled against them otherwise
    assert variant_label("knob+zero", {}) == "knob+zero"
    assert variant_label("knob+zero", {"alpha": 0.5}) == "knob+zero (alpha=0.5)"
    assert variant_label("knob", _KnobPlusOptions().model_dump(mode="json")) == "knob (no alpha)"
    assert registered_variant_of(_KnobPlus) == ("knob", ["no alpha"])
    assert registered_variant_of(_Knob) is None and registered_variant_of(SafeCLIP) is None


def test_bad_options_are_one_line_errors() -> None:
    with pytest.raises(UserError, match="defense safeclip: invalid options: nonsense: unknown key"):
        variant_label("safeclip", {"nonsense": 1})
    with pytest.raises(UserError, match="unknown defense 'safeclipp'; did you mean 'safeclip'"):
        variant_label("safeclipp", {})


def test_row_labels_keep_the_recipe_label_and_skip_swept_keys() -> None:
    assert row_label("safeclip", "safeclip", {"cross_aug": False}) == "safeclip (no cross-aug)"
    assert row_label("ft", "cleanclip", {"lr": 1e-4}) == "ft (lr=0.0001)"
    assert row_label("ft", "cleanclip", {}) == "ft"
    assert row_label("safeclip threshold=0.5", "safeclip", {"threshold": 0.5, "cross_aug": False},
                     ["threshold"]) == "safeclip threshold=0.5 (no cross-aug)"
    assert row_label("safeclip threshold=0.5", "safeclip", {"threshold": 0.5}, ["threshold"]) == \
        "safeclip threshold=0.5"


def test_summary_rows_carry_the_variant_of_each_planned_run(tmp_path: Path) -> None:
    """The runner's summary (planned, nothing trained): label, sweep and init_from entries, train overrides."""
    recipe = {
        "name": "labels", "data": {"synth": {"n_train": 64}}, "attacks": ["none"],
        "defenses": ["none", {"safeclip": QUICKSTART_SAFECLIP},
                     {"name": "cleanclip", "label": "ft", "init_from": "none", "options": {"lr": 1e-4},
                      "train": {"epochs": 2}},
                     {"name": "cleanclip", "init_from": "none", "train": {"epochs": 3}},
                     {"name": "roclip", "options": {"pool_size": 1024}, "sweep": {"options.match_every": [1, 2]}}],
        "train": {"epochs": 7},  # the quickstart SafeCLIP's 6 phase-B epochs need a filtering epoch (validated)
    }
    f = tmp_path / "r.yaml"
    f.write_text(yaml.safe_dump(recipe))
    rows = summary_rows(plan_recipe(load_recipe(f)[0], tmp_path / "out"))
    got = {r["defense"]: (r["variant"], r["variant_options"]) for r in rows}
    assert got == {
        "none": ("none", ""),
        "safeclip": (QUICKSTART_LABEL, "unimodal_epochs=0; slow_epochs=6; slow_lr_factor=1; ratio_step=0.05; "
                                       "cross_aug=false; unimodal_on_risky=false"),
        "ft": ("ft (lr=0.0001)", "lr=0.0001"),  # the recipe's own label, its options appended
        "cleanclip": ("cleanclip", ""),  # a train override is no variant
        "roclip match_every=1": ("roclip match_every=1 (pool 1024)", "pool_size=1024; match_every=1"),
        "roclip match_every=2": ("roclip match_every=2 (pool 1024)", "pool_size=1024"),
    }
    assert all(r["status"] == "pending" for r in rows)


def _write(out: Path, rows: list[dict[str, Any]], columns: list[str]) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows, columns=columns).to_csv(out / "summary.csv", index=False)
    (out / "results.json").write_text(json.dumps({"recipe": "demo"}))
    return out


def test_table_shows_the_variant_of_a_non_default_safeclip_row(tmp_path: Path) -> None:
    rows = [row("n0", "badnet", "none", 0, zeroshot_top1=0.70, asr_backdoor=0.90, variant="none"),
            row("s0", "badnet", "safeclip", 0, zeroshot_top1=0.75, asr_backdoor=0.10, variant=QUICKSTART_LABEL,
                variant_options="unimodal_epochs=0; cross_aug=false"),
            row("s1", "badnet", "safeclip", 1, zeroshot_top1=0.77, asr_backdoor=0.20, variant=QUICKSTART_LABEL,
                variant_options="unimodal_epochs=0; cross_aug=false")]
    out = _write(tmp_path / "res", rows, HEAD + META + ["zeroshot_top1", "asr_backdoor"])
    md = write_report(out, plots=True)
    assert (out / "table.md").read_text() == md
    lines = md.splitlines()
    assert "| badnet | none | 1/1 | 70.0 | 90.0 |" in lines
    # `none` has one seed: no spread to rank against, nothing bold
    assert f"| badnet | {QUICKSTART_LABEL} | 2/2 | 76.0 ± 1.4 | 15.0 ± 7.1 |" in lines
    assert f"- {QUICKSTART_LABEL}: unimodal_epochs=0; cross_aug=false" in lines  # every change, once
    assert f"| attack | metric | none | {QUICKSTART_LABEL} |" in lines  # the overview's columns
    tex = (out / "table.tex").read_text()
    assert r"badnet & safeclip (no warm-up, full-rate slow phase, no cross-aug, no risky-set loss, +2 more) & 2/2" \
        in tex
    assert (out / "plots" / "asr_vs_accuracy.png").is_file()
    # the summary keeps the recipe label; only what is shown changes
    df = read_summary(out)
    assert df["defense"].tolist() == ["none", "safeclip", "safeclip"]
    assert shown_labels(shown_labels(df))["defense"].tolist() == ["none", QUICKSTART_LABEL, QUICKSTART_LABEL]


def test_an_old_summary_gets_its_variants_from_run_json_or_recipe_yaml(tmp_path: Path) -> None:
    """A summary.csv from before the variant column: re-rendered with labels from what the results hold."""
    old_meta = [c for c in META if not c.startswith("variant")]
    rows = [row("n0", "badnet", "none", 0, zeroshot_top1=0.70),
            row("r0", "badnet", "roclip", 0, zeroshot_top1=0.60),
            row("s0", "badnet", "safeclip", 0, zeroshot_top1=0.75),
            row("x0", "badnet", "gone", 0, zeroshot_top1=0.50)]  # a defense no longer registered: plain label
    out = _write(tmp_path / "res", rows, HEAD + old_meta + ["zeroshot_top1"])
    # no run.json, no recipe.yaml: plain labels
    assert fill_variants(read_summary(out), out)["variant"].tolist() == ["", "", "", ""]
    (out / "recipe.yaml").write_text(yaml.safe_dump({
        "name": "demo", "data": {"synth": {"n_train": 64}}, "attacks": ["badnet"],
        "defenses": ["none", {"roclip": {"pool_size": 1024}}, "safeclip", "gone"]}))
    # one run's run.json holds its resolved options: it wins over the recipe
    (out / "runs" / "s0").mkdir(parents=True)
    (out / "runs" / "s0" / "run.json").write_text(json.dumps({"resolved": {"defense": {
        "name": "safeclip", "options": SafeCLIPOptions(cross_aug=False).model_dump(mode="json")}}}))
    df = fill_variants(read_summary(out), out)
    assert df["variant"].tolist() == ["none", "roclip (pool 1024)", "safeclip (no cross-aug)", ""]
    md = write_report(out, plots=False)
    assert "| badnet | roclip (pool 1024) | 1/1 | 60.0 |" in md and "| badnet | gone | 1/1 | 50.0 |" in md
    assert "- safeclip (no cross-aug): cross_aug=false" in md
    assert "variant" not in pd.read_csv(out / "summary.csv").columns  # re-rendering leaves summary.csv as it was


def test_list_defenses_shows_a_registered_variant_on_its_own_line(knob: None) -> None:
    r = CliRunner().invoke(app, ["list", "defenses"], env={"COLUMNS": "200"})
    assert r.exit_code == 0, r.output
    lines = r.output.splitlines()
    assert any("│ knob+zero " in ln and "A variant registered under its own name" in ln for ln in lines)
    assert any("variant of knob: no alpha" in ln for ln in lines)
    assert any("│ knob " in ln for ln in lines) and any("│ safeclip " in ln for ln in lines)
