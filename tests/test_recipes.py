"""Recipe schema, short forms, sweeps, --set overrides, validation errors and run ids (no training here)."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from otcbench.attacks import ATTACKS
from otcbench.bench.recipe import (
    RECIPE_DIR,
    apply_recipe_overrides,
    expand_attacks,
    expand_defenses,
    grid_size,
    load_recipe,
    parse_recipe,
    recipe_names,
)
from otcbench.bench.runner import plan_recipe, stable_hash
from otcbench.defenses import DEFENSES
from otcbench.errors import UserError

#: A small world for recipes whose data is rendered by the runner (nothing is rendered in this file).
SYNTH = dict(n_train=384, probe_train_per_class=6, probe_val_per_class=3, test_per_class=6, seed=0)


def base_recipe(**over: Any) -> dict[str, Any]:
    """A valid recipe mapping: clean + badnet, plain CLIP and a fine-tune of it, one seed."""
    raw: dict[str, Any] = {
        "name": "tiny",
        "data": {"synth": dict(SYNTH)},
        "attacks": ["none", {"badnet": {"rate": 0.05}}],
        "defenses": ["none", {"name": "none", "label": "ft", "init_from": "none", "train": {"epochs": 1}}],
        "model": {"name": "otc-rn-nano"},
        "train": {"epochs": 1, "batch_size": 64, "threads": 1, "device": "cpu"},
        "eval": {"linear_probe": False},
        "seeds": [0],
    }
    raw.update(over)
    return raw


def write_recipe(tmp_path: Path, raw: dict[str, Any], name: str = "r.yaml") -> Path:
    p = tmp_path / name
    p.write_text(yaml.safe_dump(raw, sort_keys=False))
    return p


def plan_of(tmp_path: Path, raw: dict[str, Any], out: str = "out", overrides: list[str] | None = None, **kw: Any):
    recipe, _ = load_recipe(write_recipe(tmp_path, raw), overrides)
    return plan_recipe(recipe, tmp_path / out, **kw)


# --------------------------------------------------------------------------------------------------
# shipped recipes


def test_shipped_recipes_parse_and_their_registered_methods_validate() -> None:
    names = recipe_names()
    shipped = {"quickstart", "synthetic-full", "otcclip-ablations", "adaptive", "cc3m-rn50", "coco-rn50", "vg-rn50",
               "finegrained", "coco-format", "coco-format-native"}
    assert shipped <= set(names)
    for name in names:
        recipe, path = load_recipe(name)
        assert path == RECIPE_DIR / f"{name}.yaml" and recipe.name == name
        for a in expand_attacks(recipe):
            for attack, opts in a.attacks.items():
                ATTACKS.options(attack, opts)  # every attack exists and its options validate
        for d in expand_defenses(recipe):
            if d.spec.name in DEFENSES.names():  # defenses land one by one; each is checked once registered
                DEFENSES.options(d.spec.name, d.options)
    quick, _ = load_recipe("quickstart")
    # the README's job: clean reference (plain CLIP only) + one poisoned set × 6 defenses, three seeds, compared
    # with the committed reference (a default run writes out/quickstart, never over it)
    assert grid_size(quick) == 21 and quick.seeds == [0, 1, 2] and quick.reference == "results/quickstart"
    assert [a.label for a in expand_attacks(quick)] == ["clean", "targeted+badnet"]
    assert [d.label for d in expand_defenses(quick)] == ["none", "none+aug", "roclip", "safeclip", "cleanclip",
                                                          "otcclip"]
    full, _ = load_recipe("synthetic-full")
    assert full.seeds == [0, 1, 2]
    # every attack of the shapes world; adaptive-describe, -swap and -relabel need the compositional world (the
    # finegrained and adaptive-* recipes), and the peers' attacks have their own recipe (optimised-patch needs
    # a surrogate model trained first)
    peers_attacks = {"optimised-patch", "issba-like"}
    compositional = {"adaptive-describe", "adaptive-swap", "adaptive-relabel"}
    assert {a for e in expand_attacks(full) for a in e.attacks} == set(ATTACKS.names()) - {*compositional,
                                                                                             *peers_attacks}
    swap, _ = load_recipe("adaptive-swap")
    assert {a for e in expand_attacks(swap) for a in e.attacks} == {"adaptive-swap"}
    for name in ("adaptive-captions", "adaptive-captions-long"):  # the caption variants, undefended
        caps, _ = load_recipe(name)
        assert {a for e in expand_attacks(caps) for a in e.attacks} == {"adaptive-swap", "adaptive-relabel"}
        assert {d.spec.name for d in expand_defenses(caps)} == {"none"}
    peers, _ = load_recipe("peers")
    assert {a for e in expand_attacks(peers) for a in e.attacks} == peers_attacks and peers.seeds == [0, 1, 2]
    assert [a.label for a in expand_attacks(peers)][0] == "clean"  # the clean reference: the attacks' clean cost
    fine, _ = load_recipe("finegrained")
    assert fine.seeds == [0, 1, 2] and fine.data.synth is not None and fine.data.synth.world == "compositional"
    assert {"none", "roclip", "otcclip", "otcclip+filter", "safeclip"} <= {d.spec.name for d in expand_defenses(fine)}
    # the seed paper's question on a learnt world: 24 epochs, OT and global matching side by side, and the
    # binding-sensitive attack beside it
    assert fine.train.epochs == 24 and fine.model.name == "otc-rn-grid" and fine.data.synth.min_objects == 1
    assert [d.label for d in expand_defenses(fine)] == ["none", "roclip", "safeclip", "otcclip", "otcclip global",
                                                         "otcclip+filter"]
    assert [a.label for a in expand_attacks(fine)] == ["clean", "targeted+badnet+describe"]
    assert grid_size(fine) == 21
    # the binding-sensitive attack: its own grid on the same world, model, schedule, defenses and seeds; its clean
    # reference is the finegrained grid's clean row
    fine_relabel, _ = load_recipe("finegrained-relabel")
    assert [a.label for a in expand_attacks(fine_relabel)] == ["relabel-25"]
    assert {a for e in expand_attacks(fine_relabel) for a in e.attacks} == {"adaptive-relabel"}
    assert [(d.label, d.options) for d in expand_defenses(fine_relabel)] == [(d.label, d.options)
                                                                              for d in expand_defenses(fine)]
    for part in ("data", "model", "train", "eval"):
        assert getattr(fine_relabel, part) == getattr(fine, part), part
    assert fine_relabel.seeds == fine.seeds and grid_size(fine_relabel) == 18
    relabel, _ = load_recipe("adaptive-relabel")  # the defenses and options of results/finegrained-5epochs's grid
    assert {a for e in expand_attacks(relabel) for a in e.attacks} == {"adaptive-relabel"}
    fine5, _ = load_recipe(Path(__file__).resolve().parent.parent / "results" / "finegrained-5epochs" / "recipe.yaml")
    assert relabel.train.epochs == fine5.train.epochs == 5
    assert [(d.label, d.options) for d in expand_defenses(relabel)] == [(d.label, d.options)
                                                                        for d in expand_defenses(fine5)]
    real, _ = load_recipe("cc3m-rn50")
    assert real.requires.gpu and real.data.path == "data/cc3m"


def test_top_level_recipes_folder_is_the_package_folder() -> None:
    top = Path(__file__).resolve().parent.parent / "recipes"
    assert top.resolve() == RECIPE_DIR.resolve()
    assert (top / "quickstart.yaml").is_file()


def test_real_data_recipe_without_data_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # no data/cc3m here
    raw = yaml.safe_load((RECIPE_DIR / "cc3m-rn50.yaml").read_text())
    raw["defenses"] = [d for d in raw["defenses"] if (d if isinstance(d, str) else d.get("name")) in ("none",)]
    with pytest.raises(UserError, match=r"needs the dataset data/cc3m .*does not exist.*otcbench data import"):
        plan_recipe(parse_recipe(raw, "cc3m"), tmp_path / "out")
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------------------------------
# short forms and sweeps


def test_short_forms_expand_to_full_entries() -> None:
    r = parse_recipe(base_recipe(
        attacks=["none", "badnet", {"yellow": {"rate": 0.02}}, {"label": "mix", "attacks": {"targeted": {},
                                                                                         "badnet": None}},
                 {"attack": "sig", "options": {"rate": 0.03}, "defenses": ["none"]}],
        defenses=["none", {"none": {}}, {"name": "none", "label": "x"}],
    ), "t")
    assert [a.attacks for a in r.attacks] == [{}, {"badnet": {}}, {"yellow": {"rate": 0.02}},
                                               {"targeted": {}, "badnet": {}}, {"sig": {"rate": 0.03}}]
    assert [a.base_label for a in r.attacks] == ["clean", "badnet", "yellow", "mix", "sig"]
    assert r.attacks[4].defenses == ["none"]
    assert [(d.name, d.base_label) for d in r.defenses] == [("none", "none"), ("none", "none"), ("none", "x")]


def test_sweeps_expand_with_labels_and_values() -> None:
    r = parse_recipe(base_recipe(
        attacks=[{"badnet.rate": [0.0025, 0.01]},
                 {"label": "mix", "attacks": {"targeted": {}, "badnet": {}},
                  "sweep": {"badnet.rate": [0.005], "targeted.n_targets": [4, 8]}}],
        defenses=[{"name": "none", "sweep": {"train.lr": [1e-3, 2e-3]}}],
    ), "t")
    attacks = expand_attacks(r)
    assert [a.label for a in attacks] == ["badnet rate=0.0025", "badnet rate=0.01", "mix rate=0.005 n_targets=4",
                                         "mix rate=0.005 n_targets=8"]
    assert attacks[0].attacks == {"badnet": {"rate": 0.0025}} and attacks[0].point == [("badnet.rate", 0.0025)]
    assert attacks[3].attacks == {"targeted": {"n_targets": 8}, "badnet": {"rate": 0.005}}
    defenses = expand_defenses(r)
    assert [d.label for d in defenses] == ["none lr=0.001", "none lr=0.002"]
    assert [d.train for d in defenses] == [{"lr": 1e-3}, {"lr": 2e-3}]
    assert grid_size(r) == 8


def test_nested_sweep_keys_and_bad_sweep_keys() -> None:
    r = parse_recipe(base_recipe(attacks=[{"attack": "badnet", "sweep": {"badnet.trigger.size": [0.25, 0.5]}}]),
                     "t")
    assert [a.attacks["badnet"]["trigger"]["size"] for a in expand_attacks(r)] == [0.25, 0.5]
    bad = parse_recipe(base_recipe(attacks=[{"attack": "badnet", "sweep": {"yellow.rate": [0.1]}}]), "t")
    with pytest.raises(UserError, match=r"sweep key 'yellow.rate' must be ATTACK.option"):
        expand_attacks(bad)
    empty = parse_recipe(base_recipe(attacks=[{"badnet.rate": []}]), "t")
    with pytest.raises(UserError, match="sweep badnet.rate has no values"):
        expand_attacks(empty)
    dbad = parse_recipe(base_recipe(defenses=[{"name": "none", "sweep": {"lr": [1.0]}}]), "t")
    with pytest.raises(UserError, match="must start with options. or train."):
        expand_defenses(dbad)


def test_set_overrides_plain_and_by_label() -> None:
    raw = base_recipe()
    out = apply_recipe_overrides(raw, ["train.epochs=3", "defenses.ft.train.lr=1e-5", "attacks.badnet.options.rate=0.1",
                                       "seeds=[0, 1]"])
    r = parse_recipe(out, "t")
    assert r.train.epochs == 3 and r.seeds == [0, 1]
    assert r.defenses[1].train == {"epochs": 1, "lr": 1e-5}
    assert r.attacks[1].attacks == {"badnet": {"rate": 0.1}}
    assert raw == base_recipe()  # the input is not modified
    with pytest.raises(UserError, match=r"no entry labelled 'cleanclip' in defenses \(labels: none, ft\)"):
        apply_recipe_overrides(raw, ["defenses.cleanclip.train.lr=1e-5"])


# --------------------------------------------------------------------------------------------------
# validation: one clear line before any work


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"trian": {"epochs": 2}}, r"trian: unknown key"),
        ({"train": {"epochs": "two"}}, r"train.epochs: Input should be a valid integer"),
        ({"seeds": "zero"}, r"seeds: Input should be a valid list"),
        ({"seeds": [0, 0]}, r"seeds repeat"),
        ({"name": "my recipe"}, r"name: Value error, use letters"),
        ({"defenses": [{"name": "none", "lable": "x"}]}, r"defenses.0.lable: unknown key"),
        ({"attacks": [{"attack": "badnet", "attacks": {"yellow": {}}}]}, r"either attack .* or attacks"),
        ({"attacks": [{"attacks": {"none": {}, "badnet": {}}}]}, r"cannot be combined"),
        ({"data": {}}, r"exactly one of data.synth .* or data.path"),
        ({"data": {"synth": {"n_train": -1}}}, r"data.synth.n_train: Input should be greater than or equal to 1"),
    ],
)
def test_schema_errors_are_one_line(tmp_path: Path, change: dict[str, Any], message: str) -> None:
    with pytest.raises(UserError, match=message) as err:
        load_recipe(write_recipe(tmp_path, base_recipe(**change)))
    assert "\n" not in str(err.value) and str(tmp_path / "r.yaml") in str(err.value)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"attacks": ["badnett"]}, r"unknown attack 'badnett'; did you mean 'badnet'"),
        ({"defenses": ["nonne"]}, r"unknown defense 'nonne'; did you mean 'none'"),
        ({"attacks": [{"badnet": {"rate": 2}}]}, r"attack badnet: invalid options: rate"),
        ({"attacks": [{"badnet": {"rat": 0.1}}]}, r"attack badnet: invalid options: rat: unknown key"),
        ({"defenses": [{"none": {"x": 1}}]}, r"defense none: invalid options: x: unknown key"),
        ({"defenses": [{"name": "none", "train": {"lr": -1}}]}, r"defense none: invalid options: lr"),
        ({"defenses": [{"name": "none", "train": {"epoch": 1}}]}, r"defense none: invalid options: epoch: unknown"),
        ({"attacks": []}, r"expands to no runs \(attacks: 0, defenses: 2, seeds: 1\)"),
        ({"seeds": []}, r"expands to no runs"),
        ({"defenses": []}, r"expands to no runs"),
        ({"defenses": ["none", "none"]}, r"the label 'none' is used twice"),
        ({"defenses": [{"name": "none", "init_from": "clip"}]}, r"init_from 'clip' is not a defense label"),
        ({"defenses": [{"name": "none", "label": "a", "init_from": "b"}, {"name": "none", "label": "b",
                                                                          "init_from": "a"}]}, r"cycle"),
        ({"attacks": [{"attack": "badnet", "defenses": ["ft"]}]}, r"starts from 'none', which this attack does not"),
        ({"attacks": [{"attack": "badnet", "defenses": ["nope"]}]}, r"lists 'nope', which is not a defense label"),
        ({"attacks": ["badnet", {"label": "again", "attacks": {"badnet": {"rate": 0.01}}}]}, r"identical"),
        ({"data": {"path": "missing/world"}}, r"needs the dataset missing/world \(data.path\), which does not"),
        ({"defenses": [{"name": "none", "data": "nowhere"}]}, r"needs the dataset nowhere \(defense none: data\)"),
        ({"requires": {"gpu": True}}, r"needs a GPU .* --set requires.gpu=false"),
        ({"model": {"init": "nowhere.pt"}}, r"defense none: model.init nowhere.pt does not exist"),
    ],
)
def test_plan_errors_come_before_any_work(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, change: dict[str, Any],
                                          message: str) -> None:
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match=message) as err:
        plan_of(tmp_path, base_recipe(**change))
    assert "\n" not in str(err.value)
    assert not (tmp_path / "out").exists()  # nothing written


def test_out_dir_of_another_recipe_or_with_other_files_is_refused(tmp_path: Path) -> None:
    other = tmp_path / "out"
    other.mkdir()
    (other / "results.json").write_text(json.dumps({"recipe": "quickstart"}))
    with pytest.raises(UserError, match=r"holds the results of recipe 'quickstart', not 'tiny'"):
        plan_of(tmp_path, base_recipe())
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match=r"holds other files"):
        plan_of(tmp_path, base_recipe(), out="junk")
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match=r"is a file"):
        plan_of(tmp_path, base_recipe(), out="file")


def test_unknown_recipe_name_lists_shipped_ones() -> None:
    with pytest.raises(UserError, match=r"recipe 'quickstrat' is neither a file nor a shipped recipe .*quickstart"):
        load_recipe("quickstrat")


# --------------------------------------------------------------------------------------------------
# grid expansion and run ids


def test_stable_hash_is_order_free_and_fixed() -> None:
    assert stable_hash({"b": 1, "a": [1, 2]}) == stable_hash({"a": [1, 2], "b": 1})
    # a fixed value: ids must not depend on the process (hash randomisation) or the machine
    assert stable_hash({"a": 1}) == "015abd7f5cc5"
    assert len(stable_hash({"a": 1})) == 12


def test_grid_order_dependencies_and_shared_poisons(tmp_path: Path) -> None:
    raw = base_recipe(
        defenses=[{"name": "none", "label": "ft", "init_from": "none", "train": {"epochs": 1, "lr": 1e-4}}, "none"],
        seeds=[0, 1],
    )
    plan = plan_of(tmp_path, raw)
    titles = [(r.attack.label, r.defense.label, r.seed) for r in plan.runs]
    # seed-major, attacks in order, and a defense after the one it starts from
    assert titles == [("clean", "none", 0), ("clean", "ft", 0), ("badnet", "none", 0), ("badnet", "ft", 0),
                      ("clean", "none", 1), ("clean", "ft", 1), ("badnet", "none", 1), ("badnet", "ft", 1)]
    by = {t: r for t, r in zip(titles, plan.runs, strict=True)}
    ft, parent = by[("badnet", "ft", 1)], by[("badnet", "none", 1)]
    assert ft.parent == parent.run_id
    assert ft.job.model.init == str((parent.dir / "checkpoints" / "last.pt").resolve())
    assert ft.job.train.lr == 1e-4 and ft.job.train.epochs == 1 and ft.job.train.seed == 1
    # one poisoned dataset per (attack, seed), shared by both defenses
    assert len(plan.poisons) == 2
    assert ft.poison is parent.poison and ft.job.data == str(parent.poison.path.resolve())
    assert by[("clean", "none", 0)].poison is None and by[("clean", "none", 0)].eval.asr is False
    assert parent.eval.asr is True
    assert len({r.run_id for r in plan.runs}) == 8


def test_clean_data_for_fine_tuning_defenses(tmp_path: Path) -> None:
    raw = base_recipe(defenses=["none", {"name": "none", "label": "ft", "init_from": "none", "data": "clean",
                                         "train": {"lr": 1e-4}}])
    plan = plan_of(tmp_path, raw)
    ft = next(r for r in plan.runs if r.defense.label == "ft" and r.attack.label == "badnet")
    assert ft.job.data == str(plan.source.path.resolve())  # trains on the clean world ...
    assert ft.poison is not None and ft.eval.asr  # ... and is still evaluated against the attack


def test_run_ids_are_stable_and_change_with_the_config(tmp_path: Path) -> None:
    def ids(raw: dict[str, Any], out: str = "out", overrides: list[str] | None = None) -> dict[tuple, str]:
        plan = plan_of(tmp_path, raw, out=out, overrides=overrides)
        return {(r.attack.label, r.defense.label, r.seed): r.run_id for r in plan.runs}

    base = ids(base_recipe())
    assert ids(base_recipe(), out="elsewhere") == base  # independent of the output directory
    # options that do not change results do not change ids
    assert ids(base_recipe(), overrides=["train.threads=2", "train.log_every=5", "eval.batch_size=64"]) == base
    # a shared option changes every id
    lr = ids(base_recipe(), overrides=["train.lr=1e-3"])
    assert all(lr[k] != base[k] for k in base)
    # a per-defense override changes that defense's runs only
    ft = ids(base_recipe(), overrides=["defenses.ft.train.lr=1e-4"])
    assert {k for k in base if ft[k] != base[k]} == {("clean", "ft", 0), ("badnet", "ft", 0)}
    # an attack option changes the poisoned runs only (and the fine-tune of a changed parent)
    rate = ids(base_recipe(), overrides=["attacks.badnet.options.rate=0.1"])
    assert {k for k in base if rate[k] != base[k]} == {("badnet", "none", 0), ("badnet", "ft", 0)}
    # the world changes everything; the seed gives new ids
    world = ids(base_recipe(), overrides=["data.synth.seed=1"])
    assert all(world[k] != base[k] for k in base)
    seeds = ids(base_recipe(seeds=[0, 1]))
    assert {k: v for k, v in seeds.items() if k[2] == 0} == base and len(set(seeds.values())) == 8
    # a label is presentation: renaming keeps the ids
    renamed = copy.deepcopy(base_recipe())
    renamed["attacks"][1] = {"label": "patch", "attacks": {"badnet": {"rate": 0.05}}}
    assert set(ids(renamed).values()) == set(base.values())
