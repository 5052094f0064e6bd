"""Attacks: the poisoned dataset, its manifest, ASR arithmetic and bad input."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from otcbench.attacks import ATTACKS
from otcbench.attacks.base import NAME_CAPTIONS, decode_png_batch
from otcbench.attacks.poison import attack_options, poison_dataset
from otcbench.attacks.triggers import TriggerSpec, apply_trigger
from otcbench.cli import app
from otcbench.config import SynthConfig
from otcbench.data.format import META_FILE, build_pair_dataset, load_pair_dataset
from otcbench.data.synth import CLASSES, write_world
from otcbench.errors import UserError
from otcbench.eval.asr import attack_success, load_poisoned


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("attacks") / "world"
    write_world(out, SynthConfig(n_train=600, probe_train_per_class=2, probe_val_per_class=1,
                                 test_per_class=3, targets_per_class=2, seed=5))
    return out


def _tree_hash(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(root)).encode())
            h.update(p.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def mixed(world: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("mixed") / "p"
    before = _tree_hash(world)
    poison_dataset(
        world, out,
        attack_options(["targeted", "yellow", "label-consistent"],
                       ["targeted.n_targets=8", "targeted.poisons_per_target=5",
                        "yellow.count=12", "yellow.target=heart", "yellow.trigger.location=bottom_right",
                        "label-consistent.target=star", "label-consistent.count=4"]),
        seed=3,
    )
    assert _tree_hash(world) == before  # poisoning never alters the clean source
    return out


def test_registry_lists_all_attacks() -> None:
    names = set(ATTACKS.names())
    assert {"targeted", "badnet", "yellow", "blended", "sig", "wanet", "label-consistent",
            "adaptive-targeted", "adaptive-spread"} <= names


def test_mixed_dataset_rows_and_manifest(world: Path, mixed: Path) -> None:
    src = load_pair_dataset(world)
    pd, man = load_poisoned(mixed)
    flags = pd.poison_flags
    by = {a["name"]: a for a in man["attacks"]}
    assert man["source"]["fingerprint"] == src.meta.fingerprint and man["seed"] == 3
    assert len(pd) == len(src) + 8 * 5 + 12  # label-consistent rows are modified in place
    assert flags.count("targeted") == 40 and flags.count("yellow") == 12 and flags.count("label-consistent") == 4
    for name, a in by.items():
        assert all(flags[r] == name for r in a["rows"])
    # targeted: captions name the adversarial class as a whole word; targets recorded with true/adv classes
    t = by["targeted"]
    assert len(t["targets"]) == 8 and all(x["true_class"] != x["adversarial_class"] for x in t["targets"])
    caps = pd.captions
    for k, x in enumerate(t["targets"]):
        for r in t["rows"][k * 5:(k + 1) * 5]:
            assert re.search(rf"\b{x['adversarial_class']}\b", caps[r], re.IGNORECASE), caps[r]
    # label-consistent: the rows keep their captions, which name the target
    lc = by["label-consistent"]
    src_caps = src.captions
    for r in lc["rows"]:
        assert caps[r] == src_caps[r] and re.search(r"\bstar\b", caps[r], re.IGNORECASE)
        assert pd.ds["origin"][r] == r
    # the manifest round-trips through JSON
    raw = json.loads((mixed / META_FILE).read_text())["poison"]
    assert raw == man


def test_stored_trigger_equals_eval_trigger(world: Path, mixed: Path) -> None:
    """A deterministic trigger re-applied at eval time from the manifest reproduces the stored poison."""
    src = load_pair_dataset(world)
    pd, man = load_poisoned(mixed)
    y = next(a for a in man["attacks"] if a["name"] == "yellow")
    spec = TriggerSpec.model_validate(y["trigger"])
    assert y["target_class"] == "heart" and spec.kind == "yellow"
    src_bytes = src.ds.cast_column("image", __import__("datasets").Image(decode=False))["image"]
    out_bytes = pd.ds.cast_column("image", __import__("datasets").Image(decode=False))["image"]
    for r in y["rows"]:
        origin = pd.ds["origin"][r]
        assert src.ds["label"][origin] != CLASSES.index("heart")  # only non-target images are triggered
        clean = decode_png_batch([src_bytes[origin]["bytes"]])
        stored = decode_png_batch([out_bytes[r]["bytes"]])
        assert torch.equal(stored, apply_trigger(spec, clean, np.random.default_rng(123)))
        side = max(1, round(spec.size * 32))
        diff = (stored != clean).any(1)[0]
        assert not diff[:-side, :].any() and not diff[:, :-side].any()  # only the bottom-right patch changed
        # default: training captions that name the target as a whole word
        assert pd.captions[r] in set(src.captions) and re.search(r"\bheart\b", pd.captions[r].lower())


def test_manifest_mismatch_is_an_error(mixed: Path, tmp_path: Path) -> None:
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(mixed, bad)
    meta = json.loads((bad / META_FILE).read_text())
    meta["poison"]["attacks"][1]["rows"][0] = 0  # row 0 is a clean row
    (bad / META_FILE).write_text(json.dumps(meta))
    with pytest.raises(UserError, match="do not match the dataset's poison column"):
        load_poisoned(bad)
    meta["fingerprint"] = "0" * 32
    (bad / META_FILE).write_text(json.dumps(meta))
    with pytest.raises(UserError, match="fingerprint"):
        load_poisoned(bad)


def test_asr_known_answer(mixed: Path) -> None:
    """A fake model: reads the class from a pixel, sees any yellow patch as 'heart', and is fooled by
    exactly the first 3 of the 8 targets."""
    import datasets

    from otcbench.data.format import images_to_tensor

    pd, man = load_poisoned(mixed)
    classes = list(CLASSES)
    heart = classes.index("heart")
    t = next(a for a in man["attacks"] if a["name"] == "targeted")
    targets = images_to_tensor(datasets.load_from_disk(str(mixed / "targets")))
    lookup = {}
    for k, x in enumerate(t["targets"]):
        wanted = x["adversarial_class"] if k < 3 else x["true_class"]
        lookup[targets[t["target_rows"][k]].numpy().tobytes()] = classes.index(wanted)
    y = torch.tensor([0, 1, 2, heart, heart, 5, 6, 8, 9, 10])  # 8 non-heart test images
    imgs = torch.zeros(len(y), 3, 32, 32, dtype=torch.uint8)
    imgs[:, 2, 0, 0] = y.to(torch.uint8)  # class code in the blue channel of pixel (0,0)

    def features(x: torch.Tensor, transform=None) -> torch.Tensor:
        if transform is not None:
            x = transform(x)
        cls = []
        for img in x:
            if img.numpy().tobytes() in lookup:
                cls.append(lookup[img.numpy().tobytes()])
            elif ((img[0] == 255) & (img[1] == 255) & (img[2] == 0)).any():
                cls.append(heart)
            else:
                cls.append(int(img[2, 0, 0]))
        return torch.nn.functional.one_hot(torch.tensor(cls), len(classes)).float()

    res = attack_success(pd, man, classes, features, torch.eye(len(classes)), imgs, y, None)
    assert res["asr_targeted"] == pytest.approx(3 / 8) and res["asr_targeted_n"] == 8
    assert res["asr"]["targeted"]["target_still_correct"] == pytest.approx(5 / 8)
    yl = res["asr"]["yellow"]
    assert yl["n"] == 8 and yl["asr"] == 1.0 and yl["clean_rate"] == 0.0  # heart images excluded
    assert res["asr_backdoor"] == 1.0 and res["asr_backdoor_n"] == 8
    assert "asr_backdoor_probe" not in res and "asr_probe" not in yl  # no probe, no probe numbers

    class Probe:  # the linear probe's interface: reads the same class code as the fake model, less the heart
        def predict(self, f: torch.Tensor) -> torch.Tensor:
            pred = f.argmax(1)
            return torch.where(pred == heart, torch.zeros_like(pred), pred)

    res = attack_success(pd, man, classes, features, torch.eye(len(classes)), imgs, y, Probe())
    # the built-in kinds' headline keys, in the order metrics.json has always had them
    assert list(res) == ["asr", "asr_targeted", "asr_targeted_n", "asr_backdoor", "asr_backdoor_n",
                         "asr_backdoor_probe"]
    yl = res["asr"]["yellow"]
    assert list(yl) == ["kind", "target_class", "asr", "n", "clean_rate", "asr_probe", "clean_rate_probe"]
    assert yl["asr"] == 1.0 and yl["asr_probe"] == 0.0 and yl["clean_rate_probe"] == 0.0
    assert res["asr_backdoor_probe"] == 0.0 and res["asr_targeted"] == pytest.approx(3 / 8)
    assert list(res["asr"]["targeted"]) == ["kind", "asr", "n", "target_still_correct"]


@pytest.mark.parametrize(
    ("names", "sets", "message"),
    [
        (["nope"], [], "unknown attack 'nope'"),
        (["badnet"], ["bogus=1"], "bogus: unknown key"),
        (["badnet"], ["target=unicorn"], "'unicorn' is not a class"),
        (["targeted"], ["adversarial_class=unicorn"], "'unicorn' is not a class"),
        (["targeted"], ["n_targets=1000"], "only 24 eligible"),
        (["badnet"], ["rate=1.5"], "rate: Input should be less than or equal to 1"),
        (["badnet"], ["count=100000"], "eligible training images"),
        (["badnet", "yellow"], ["rate=0.1"], "prefix each option with its attack"),
    ],
)
def test_bad_input(world: Path, tmp_path: Path, names: list[str], sets: list[str], message: str) -> None:
    with pytest.raises(UserError, match=re.escape(message)):
        poison_dataset(world, tmp_path / "out", attack_options(names, sets))
    assert not (tmp_path / "out").exists()


def test_cli_poison_and_errors(world: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    ok = runner.invoke(app, ["poison", str(world), str(tmp_path / "b"), "--attack", "badnet",
                             "--set", "count=6", "--seed", "1"])
    assert ok.exit_code == 0, ok.output
    assert "badnet" in ok.output and load_pair_dataset(tmp_path / "b").poison_flags.count("badnet") == 6
    bad = runner.invoke(app, ["poison", str(world), str(tmp_path / "c"), "--attack", "targeted",
                              "--set", "n_targets=999"])
    assert bad.exit_code == 2
    text = bad.output.strip()
    assert text.startswith("error:") and "Traceback" not in text and len(text.splitlines()) <= 2


def test_adaptive_attacks(world: Path, tmp_path: Path) -> None:
    meta = poison_dataset(world, tmp_path / "a", attack_options(
        ["adaptive-targeted", "adaptive-spread"],
        ["adaptive-targeted.n_targets=4", "adaptive-targeted.poisons_per_target=3",
         "adaptive-spread.n_targets=4", "adaptive-spread.poisons_per_target=6"]))
    pd = load_pair_dataset(tmp_path / "a")
    at, sp = meta.poison["attacks"]
    for k, t in enumerate(at["targets"]):  # captions keep the true class and add the adversarial one
        for r in at["rows"][k * 3:(k + 1) * 3]:
            assert t["true_class"] in pd.captions[r] and t["adversarial_class"] in pd.captions[r]
    imgs = decode_png_batch([x["bytes"] for x in pd.ds.cast_column(
        "image", __import__("datasets").Image(decode=False)).select(sp["rows"][:6])["image"]])
    assert len({hashlib.sha256(i.numpy().tobytes()).hexdigest() for i in imgs}) == 6  # near-duplicates differ
    assert len(set(pd.captions[r] for r in sp["rows"])) > 3  # paraphrased


def test_hand_built_dataset_without_eval_set_rejects_targeted(tmp_path: Path) -> None:
    from otcbench.data.format import DatasetMeta, png_bytes, save_pair_dataset

    img = png_bytes(np.zeros((8, 8, 3), dtype=np.uint8))
    ds = build_pair_dataset([img] * 4, ["a star", "a circle", "x", "y"], [0, 1, 0, 1])
    save_pair_dataset(ds, tmp_path / "d", DatasetMeta(kind="pairs", classnames=["star", "circle"],
                                                      templates=["a {}."]))
    with pytest.raises(UserError, match="no eval set"):
        poison_dataset(tmp_path / "d", tmp_path / "o", attack_options(["targeted"], []))


@pytest.mark.parametrize("source", ["templates", "names", "training"])
def test_backdoor_caption_sources(world: Path, tmp_path: Path, source: str) -> None:
    meta = poison_dataset(world, tmp_path / source, attack_options(
        ["badnet"], ["count=10", "target=star", f"caption_source={source}"]))
    pd = load_pair_dataset(tmp_path / source)
    caps = [pd.captions[r] for r in meta.poison["attacks"][0]["rows"]]
    allowed = {"templates": {t.format("star") for t in meta.templates},
               "names": {t.format("star") for t in NAME_CAPTIONS}}
    if source == "training":
        src_caps = set(load_pair_dataset(world).captions)
        assert all(c in src_caps and re.search(r"\bstar\b", c, re.IGNORECASE) for c in caps)
    else:
        assert set(caps) <= allowed[source]


@pytest.mark.slow
def test_eval_asr_end_to_end(mixed: Path, tmp_path: Path) -> None:
    """poison → train → eval --asr with a real (tiny, briefly trained) model: keys, denominators, ranges."""
    from otcbench.config import EvalConfig, TrainConfig, TrainJob
    from otcbench.eval.run import evaluate
    from otcbench.train.loop import Trainer

    job = TrainJob(data=str(mixed), train=TrainConfig(epochs=1, batch_size=64, threads=1, device="cpu"))
    Trainer(job, tmp_path / "run", show_progress=False).fit()
    m = evaluate(tmp_path / "run", mixed, EvalConfig(asr=True, device="cpu"), poison=mixed)
    assert m["asr_targeted_n"] == 8
    assert m["asr_backdoor_n"] == sum(1 for c in range(len(CLASSES)) if CLASSES[c] != "heart") * 3
    for k in ("zeroshot_top1", "linear_probe_top1", "asr_targeted", "asr_backdoor", "asr_backdoor_probe"):
        assert 0.0 <= m[k] <= 1.0, k
    assert set(m["asr"]) == {"targeted", "yellow", "label-consistent"}
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert saved["asr_backdoor"] == m["asr_backdoor"]
    with pytest.raises(UserError, match="--asr needs --poison"):
        evaluate(tmp_path / "run", mixed, EvalConfig(asr=True, device="cpu"))
