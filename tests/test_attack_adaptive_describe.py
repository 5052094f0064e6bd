"""``adaptive-describe``: targeted poisons captioned with the target's true objects plus the adversarial one."""

from __future__ import annotations

import re
from pathlib import Path

import datasets
import pytest
import torch

from otcbench.attacks.base import decode_png_batch
from otcbench.attacks.poison import attack_options, poison_dataset
from otcbench.config import SynthConfig
from otcbench.data.format import image_bytes, images_to_tensor, load_eval_set, load_pair_dataset
from otcbench.data.synth import CLASSES, COMP_PALETTE, write_world
from otcbench.errors import UserError
from otcbench.eval.asr import attack_success, load_poisoned

NAME = "adaptive-describe"
#: A tiny compositional world (240 pairs at 32 px, 2 eval images per class and split).
COMP = dict(world="compositional", n_train=240, image_size=32, probe_train_per_class=2, probe_val_per_class=2,
            test_per_class=2, targets_per_class=2, seed=0)
SHAPE_WORD = re.compile(rf"\b({'|'.join(CLASSES)})\b")


@pytest.fixture(scope="module")
def comp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("comp") / "world"
    write_world(out, SynthConfig(**COMP))
    return out


def _poison(world: Path, out: Path, sets: list[str], seed: int = 0, name: str = NAME) -> dict:
    meta = poison_dataset(world, out, attack_options([name], ["n_targets=6", "poisons_per_target=5", *sets]),
                          seed=seed)
    return meta.poison["attacks"][0]


@pytest.fixture(scope="module")
def poisoned(comp: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ad") / "p"
    _poison(comp, out, [])
    return out


def _objects(caption: str) -> set[str]:
    """The "colour shape" phrases of a caption (the poisons never use synonyms; a frame may capitalise)."""
    return set(re.findall(rf"\b((?:{'|'.join(COMP_PALETTE)}) (?:{'|'.join(CLASSES)}))\b", caption.lower()))


def test_deterministic_per_seed(comp: Path, poisoned: Path, tmp_path: Path) -> None:
    again = _poison(comp, tmp_path / "same", [])
    other = _poison(comp, tmp_path / "other", [], seed=1)
    first = load_pair_dataset(poisoned)
    assert load_pair_dataset(tmp_path / "same").meta.fingerprint == first.meta.fingerprint
    assert again["targets"] == first.meta.poison["attacks"][0]["targets"]
    assert load_pair_dataset(tmp_path / "other").meta.fingerprint != first.meta.fingerprint
    assert other["targets"] != again["targets"]


def test_captions_name_true_objects_and_adversarial_class(poisoned: Path) -> None:
    pd = load_pair_dataset(poisoned)
    a = pd.meta.poison["attacks"][0]
    assert a["kind"] == "targeted" and a["n_poisoned"] == 30 and a["target_split"] == "generated"
    for k, t in enumerate(a["targets"]):
        true = set(t["content"].split("|"))
        assert len(true) == 3 and t["true_class"] in {o.split(" ")[1] for o in true}  # default: 3-object scenes
        adv_colour, adv_shape = t["adversarial_object"].split(" ")
        assert adv_shape == t["adversarial_class"] and adv_shape not in {o.split(" ")[1] for o in true}
        assert adv_colour not in {o.split(" ")[0] for o in true}  # its own colour, so the bindings stay distinct
        named = set()
        for r in a["rows"][k * 5:(k + 1) * 5]:
            objs = _objects(pd.captions[r])
            # every caption: the adversarial object plus exactly one (named_objects=1) true object, nothing else
            assert t["adversarial_object"] in objs and len(objs - {t["adversarial_object"]}) == 1
            assert objs - {t["adversarial_object"]} <= true
            assert len(SHAPE_WORD.findall(pd.captions[r].lower())) == 2 and pd.poison_flags[r] == NAME
            assert pd.content[r] == ""
            named |= objs
        assert named - {t["adversarial_object"]} <= true


def test_named_objects_all(comp: Path, tmp_path: Path) -> None:
    a = _poison(comp, tmp_path / "all", ["target_objects=3", "named_objects=null"])
    pd = load_pair_dataset(tmp_path / "all")
    for k, t in enumerate(a["targets"]):
        want = set(t["content"].split("|")) | {t["adversarial_object"]}
        assert len(want) == 4
        assert all(_objects(pd.captions[r]) == want for r in a["rows"][k * 5:(k + 1) * 5])


def test_targets_are_held_out_and_poisons_are_near_duplicates(comp: Path, poisoned: Path) -> None:
    clean = load_pair_dataset(comp)
    clean_px = {x.numpy().tobytes() for x in images_to_tensor(clean.ds)}
    tds = datasets.load_from_disk(str(poisoned / "targets"))
    targets = images_to_tensor(tds)
    assert targets.shape == (6, 3, 32, 32)
    assert not any(t.numpy().tobytes() in clean_px for t in targets)  # never a clean training image
    assert not set(image_bytes(tds)) & set(image_bytes(clean.ds))
    pd = load_pair_dataset(poisoned)
    a = pd.meta.poison["attacks"][0]
    rows = pd.ds.select(a["rows"]).cast_column("image", datasets.Image(decode=False))
    poisons = decode_png_batch([x["bytes"] for x in rows["image"]])
    assert len({p.numpy().tobytes() for p in poisons}) == len(poisons)  # no two poisons pixel-identical
    for k in range(6):
        diff = (poisons[k * 5:(k + 1) * 5].float() - targets[k].float()).abs()
        assert (diff.flatten(1).max(1).values > 0).all()  # none is the target itself
        # each poison is the target shifted by at most 1 px (edges repeated) plus noise of std 2 (mean |n| ≈ 1.6)
        pad = torch.nn.functional.pad(targets[k][None].float(), (1, 1, 1, 1), mode="replicate")[0]
        shifted = [pad[:, 1 + dy:33 + dy, 1 + dx:33 + dx] for dy in (-1, 0, 1) for dx in (-1, 0, 1)]
        for p in poisons[k * 5:(k + 1) * 5].float():
            assert 1.0 < min(float((p - s).abs().mean()) for s in shifted) < 2.5


def test_split_targets(comp: Path, tmp_path: Path) -> None:
    a = _poison(comp, tmp_path / "split", ["target_source=split"])
    pd = load_pair_dataset(tmp_path / "split")
    split = load_eval_set(comp).splits["targets"]
    assert a["target_split"] == "targets"
    tds = datasets.load_from_disk(str(tmp_path / "split" / "targets"))
    split_bytes = image_bytes(split)
    for k, (t, blob) in enumerate(zip(a["targets"], image_bytes(tds), strict=True)):
        assert blob == split_bytes[t["split_index"]] and t["content"] == split["content"][t["split_index"]]
        assert CLASSES[split["label"][t["split_index"]]] == t["true_class"]
        for r in a["rows"][k * 5:(k + 1) * 5]:
            assert _objects(pd.captions[r]) == {t["content"], t["adversarial_object"]}
            assert " in the " not in pd.captions[r]  # a split image's cell is not recorded: no positions


def test_fixed_adversarial_class(comp: Path, tmp_path: Path) -> None:
    a = _poison(comp, tmp_path / "fixed", ["adversarial_class=star"])
    assert {t["adversarial_class"] for t in a["targets"]} == {"star"}
    assert all("star" not in t["content"] and len(t["content"].split("|")) == 3 for t in a["targets"])


def test_asr_counts_it(poisoned: Path) -> None:
    """eval --asr measures it as a targeted attack: a fake model fooled by exactly the first 4 of 6 targets."""
    pd, man = load_poisoned(poisoned)
    a = man["attacks"][0]
    targets = images_to_tensor(datasets.load_from_disk(str(poisoned / "targets")))
    classes = list(CLASSES)
    lookup = {targets[a["target_rows"][k]].numpy().tobytes(): classes.index(t["adversarial_class"] if k < 4
                                                                            else t["true_class"])
              for k, t in enumerate(a["targets"])}

    def features(x: torch.Tensor, transform=None) -> torch.Tensor:
        return torch.nn.functional.one_hot(torch.tensor([lookup[i.numpy().tobytes()] for i in x]),
                                           len(classes)).float()

    res = attack_success(pd, man, classes, features, torch.eye(len(classes)), torch.zeros(0, 3, 32, 32),
                         torch.zeros(0, dtype=torch.long), None)
    assert res["asr_targeted"] == pytest.approx(4 / 6) and res["asr_targeted_n"] == 6
    assert res["asr"][NAME]["target_still_correct"] == pytest.approx(2 / 6)


@pytest.mark.slow
def test_eval_asr_end_to_end(poisoned: Path, tmp_path: Path) -> None:
    from otcbench.config import EvalConfig, TrainConfig, TrainJob
    from otcbench.eval.run import evaluate
    from otcbench.train.loop import Trainer

    job = TrainJob(data=str(poisoned), train=TrainConfig(epochs=1, batch_size=64, threads=1, device="cpu"))
    Trainer(job, tmp_path / "run", show_progress=False).fit()
    m = evaluate(tmp_path / "run", poisoned, EvalConfig(asr=True, linear_probe=False, device="cpu"), poison=poisoned)
    assert m["asr_targeted_n"] == 6 and set(m["asr"]) == {NAME} and 0.0 <= m["asr_targeted"] <= 1.0


@pytest.mark.parametrize(
    ("sets", "message"),
    [
        (["target_objects=4"], "use at most 3"),
        (["named_objects=4"], "named_objects=4 is above the 3 objects"),
        (["adversarial_class=unicorn"], "'unicorn' is not a class"),
        (["target_source=split", "n_targets=100"], "only 24 eligible"),
    ],
)
def test_bad_input(comp: Path, tmp_path: Path, sets: list[str], message: str) -> None:
    with pytest.raises(UserError, match=re.escape(message)):
        _poison(comp, tmp_path / "out", sets)
    assert not (tmp_path / "out").exists()


def test_shapes_world_is_rejected(tiny_world: Path, tmp_path: Path) -> None:
    with pytest.raises(UserError, match="not a compositional world"):
        _poison(tiny_world, tmp_path / "out", [])


def test_swap_binds_the_adversarial_class_to_the_main_object(comp: Path, tmp_path: Path) -> None:
    """adaptive-swap: c' in the main object's colour, the main object never named, the others as usual."""
    a = _poison(comp, tmp_path / "swap", [], name="adaptive-swap")
    pd = load_pair_dataset(tmp_path / "swap")
    clean = _poison(comp, tmp_path / "added", [])
    # the same targets and adversarial classes as the default (the swap is applied after every draw)
    assert [t["content"] for t in a["targets"]] == [t["content"] for t in clean["targets"]]
    assert [t["adversarial_class"] for t in a["targets"]] == [t["adversarial_class"] for t in clean["targets"]]
    for k, t in enumerate(a["targets"]):
        true = set(t["content"].split("|"))
        main = next(o for o in true if o.split(" ")[1] == t["true_class"])
        assert t["adversarial_object"] == f"{main.split(' ')[0]} {t['adversarial_class']}"
        for r in a["rows"][k * 5:(k + 1) * 5]:
            objs = _objects(pd.captions[r])
            assert t["adversarial_object"] in objs and main not in objs
            assert t["true_class"] not in SHAPE_WORD.findall(pd.captions[r].lower())
            assert len(objs - {t["adversarial_object"]}) == 1 and objs - {t["adversarial_object"]} <= true - {main}


def test_swap_single_object_targets(comp: Path, tmp_path: Path) -> None:
    """Single-object split targets: every caption names only c', in the target's colour."""
    a = _poison(comp, tmp_path / "swap1", ["target_source=split"], name="adaptive-swap")
    pd = load_pair_dataset(tmp_path / "swap1")
    for k, t in enumerate(a["targets"]):
        colour = t["content"].split(" ")[0]
        assert t["adversarial_object"] == f"{colour} {t['adversarial_class']}"
        assert all(_objects(pd.captions[r]) == {t["adversarial_object"]} for r in a["rows"][k * 5:(k + 1) * 5])


def test_swap_named_objects_zero(comp: Path, tmp_path: Path) -> None:
    """named_objects=0: every caption of a 3-object target names c' alone, in the main object's colour."""
    a = _poison(comp, tmp_path / "swap0", ["named_objects=0"], name="adaptive-swap")
    pd = load_pair_dataset(tmp_path / "swap0")
    for k, t in enumerate(a["targets"]):
        assert len(t["content"].split("|")) == 3
        assert all(_objects(pd.captions[r]) == {t["adversarial_object"]} for r in a["rows"][k * 5:(k + 1) * 5])


@pytest.mark.parametrize("named", [[], ["named_objects=null"]])
def test_relabel_names_every_object_as_the_adversarial_class(comp: Path, tmp_path: Path, named: list[str]) -> None:
    """adaptive-relabel: the swap's targets; every named object keeps its colour and takes c' as its shape."""
    a = _poison(comp, tmp_path / "relabel", named, name="adaptive-relabel")
    pd = load_pair_dataset(tmp_path / "relabel")
    swap = _poison(comp, tmp_path / "swap", named, name="adaptive-swap")
    assert [t["content"] for t in a["targets"]] == [t["content"] for t in swap["targets"]]
    assert [t["adversarial_object"] for t in a["targets"]] == [t["adversarial_object"] for t in swap["targets"]]
    for k, t in enumerate(a["targets"]):
        colours = {o.split(" ")[0] for o in t["content"].split("|")}
        want = 2 if not named else len(colours)  # the main object and named_objects (1) of the others, or all
        for r in a["rows"][k * 5:(k + 1) * 5]:
            objs = _objects(pd.captions[r])
            assert set(SHAPE_WORD.findall(pd.captions[r].lower())) == {t["adversarial_class"]}
            assert t["adversarial_object"] in objs and len(objs) == want
            assert {o.split(" ")[0] for o in objs} <= colours
