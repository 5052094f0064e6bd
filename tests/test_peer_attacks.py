"""The peers' backdoors: ``optimised-patch`` (a patch optimised against a surrogate CLIP) and ``issba-like``
(sample-specific invisible triggers). Triggers deterministic per seed and identical between poison and eval."""

from __future__ import annotations

import copy
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch

from otcbench.attacks.base import decode_png_batch
from otcbench.attacks.poison import poison_dataset
from otcbench.attacks.trigger_kinds import (
    OptimisedPatchTrigger,
    StegoTrigger,
    apply_manifest_trigger,
    manifest_trigger,
)
from otcbench.config import EvalConfig
from otcbench.data.format import load_pair_dataset
from otcbench.errors import UserError
from otcbench.eval.asr import load_poisoned


def _images(n: int = 6, seed: int = 0, side: int = 32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, side, side), generator=g, dtype=torch.uint8)


def _rows(path: Path, rows: list[int]) -> torch.Tensor:
    ds = load_pair_dataset(path).ds.cast_column("image", datasets.Image(decode=False))
    return decode_png_batch([ds[int(r)]["image"]["bytes"] for r in rows])


# --------------------------------------------------------------------------------------------------------
# the stego (issba-like) trigger


def test_stego_trigger_is_bounded_per_image_and_deterministic() -> None:
    spec = StegoTrigger(pattern_seed=7)
    x = _images()
    rng = np.random.default_rng(0)
    state = copy.deepcopy(rng.bit_generator.state)
    y = spec.apply(x, rng)
    assert rng.bit_generator.state == state  # draws nothing: poisoning and eval cannot diverge
    delta = y.to(torch.int16) - x.to(torch.int16)
    assert int(delta.abs().max()) <= round(255 * spec.epsilon) == 8  # invisible: L∞ ≤ 8/255
    assert float(delta.abs().float().mean()) > 2.0  # and not nothing: the budget is used
    # sample-specific: the residuals of different images differ (not a fixed pattern)
    r = spec.residual(x).flatten(1)
    corr = torch.corrcoef(r)
    off_diagonal = corr[~torch.eye(len(x), dtype=torch.bool)]
    assert float(off_diagonal.abs().max()) < 0.9
    flat = torch.full((1, 3, 32, 32), 128, dtype=torch.uint8)
    assert not torch.equal(spec.residual(flat), spec.residual(x[:1]))
    # deterministic per seed; another seed is another encoder
    assert torch.equal(StegoTrigger(pattern_seed=7).apply(x, np.random.default_rng(5)), y)
    assert not torch.equal(StegoTrigger(pattern_seed=8).apply(x, rng), y)
    with pytest.raises(ValueError, match="pattern_seed"):
        StegoTrigger().apply(x, rng)


def test_manifest_trigger_dispatches_on_kind() -> None:
    assert isinstance(manifest_trigger({"kind": "stego", "pattern_seed": 1}), StegoTrigger)
    assert isinstance(manifest_trigger({"kind": "optimised_patch"}), OptimisedPatchTrigger)
    assert manifest_trigger({"kind": "badnet"}).kind == "badnet"
    with pytest.raises(ValueError, match="uint8"):
        apply_manifest_trigger({"kind": "stego", "pattern_seed": 1}, _images().float(), np.random.default_rng(0))


def test_optimised_patch_trigger_pastes_its_stored_pixels() -> None:
    patch = np.arange(3 * 4 * 4).reshape(3, 4, 4).tolist()
    spec = OptimisedPatchTrigger(size=0.125, location="bottom_right", patch=patch)  # 4 px on 32 px
    x = _images(2)
    y = spec.apply(x, np.random.default_rng(0))
    assert torch.equal(y[:, :, -4:, -4:], torch.tensor(patch, dtype=torch.uint8).expand(2, 3, 4, 4))
    assert torch.equal(y[:, :, :-4], x[:, :, :-4]) and torch.equal(y[:, :, :, :-4], x[:, :, :, :-4])
    # random locations come from the rng, image by image, as badnet's do
    a = OptimisedPatchTrigger(size=0.125, patch=patch).apply(x, np.random.default_rng(3))
    b = OptimisedPatchTrigger(size=0.125, patch=patch).apply(x, np.random.default_rng(3))
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match=r"\[3\]\[p\]\[p\]"):
        OptimisedPatchTrigger(patch=[[[300]]])


# --------------------------------------------------------------------------------------------------------
# the attacks, through poison and eval


@pytest.fixture(scope="module")
def issba(tiny_world: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("issba") / "p"
    poison_dataset(tiny_world, out, [("issba-like", {"count": 8})], seed=4)
    return out


def test_issba_like_poison_equals_eval_trigger(tiny_world: Path, issba: Path, tmp_path: Path) -> None:
    src = load_pair_dataset(tiny_world)
    _, man = load_poisoned(issba)
    (entry,) = man["attacks"]
    trig = entry["trigger"]
    assert trig["kind"] == "stego" and isinstance(trig["pattern_seed"], int)  # drawn from the poisoning seed
    stored = _rows(issba, entry["rows"])
    clean = _rows(tiny_world, entry["source_rows"])
    # eval's path (apply_manifest_trigger on the manifest's dict) gives the stored poisons exactly
    assert torch.equal(apply_manifest_trigger(trig, clean, np.random.default_rng(99)), stored)
    assert int((stored.to(torch.int16) - clean.to(torch.int16)).abs().max()) <= 8
    assert len(src) + 8 == len(load_pair_dataset(issba))
    # same poisoning seed → the same dataset; another seed → another encoder
    again = tmp_path / "again"
    poison_dataset(tiny_world, again, [("issba-like", {"count": 8})], seed=4)
    assert load_pair_dataset(again).meta.fingerprint == load_pair_dataset(issba).meta.fingerprint
    other = tmp_path / "other"
    poison_dataset(tiny_world, other, [("issba-like", {"count": 8})], seed=5)
    assert load_pair_dataset(other).meta.poison["attacks"][0]["trigger"]["pattern_seed"] != trig["pattern_seed"]


def test_optimised_patch_without_surrogate_is_one_line(tiny_world: Path, tmp_path: Path) -> None:
    with pytest.raises(UserError, match="surrogate=RUN_DIR") as err:
        poison_dataset(tiny_world, tmp_path / "p", [("optimised-patch", {"count": 4})])
    assert "\n" not in str(err.value)
    with pytest.raises(UserError, match="does not exist"):
        poison_dataset(tiny_world, tmp_path / "p", [("optimised-patch", {"count": 4, "surrogate": "nope"})])
    assert not (tmp_path / "p").exists()


OPT = {"count": 8, "steps": 25, "batch_size": 16, "device": "cpu", "trigger": {"location": "bottom_right"}}


@pytest.fixture(scope="module")
def optimised(tiny_world: Path, trained_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("optpatch") / "p"
    poison_dataset(tiny_world, out, [("optimised-patch", {**OPT, "surrogate": str(trained_run)})], seed=2)
    return out


# slow: needs the shared trained run (trains) and optimises a patch against it
@pytest.mark.slow
def test_optimised_patch_is_cached_in_the_manifest_and_applied_identically(
        tiny_world: Path, trained_run: Path, optimised: Path, tmp_path: Path) -> None:
    _, man = load_poisoned(optimised)
    (entry,) = man["attacks"]
    trig = entry["trigger"]
    p = round(0.375 * 32)
    assert trig["kind"] == "optimised_patch" and np.asarray(trig["patch"]).shape == (3, p, p)
    stored = _rows(optimised, entry["rows"])
    clean = _rows(tiny_world, entry["source_rows"])
    assert torch.equal(apply_manifest_trigger(trig, clean, np.random.default_rng(0)), stored)
    assert torch.equal(stored[:, :, -p:, -p:], torch.tensor(trig["patch"], dtype=torch.uint8).expand(8, 3, p, p))
    # the optimisation did what it is for: the surrogate embeds patched images closer to the target's text than
    # clean images and than images with a random patch of the same size at the same places (the tiny 2-epoch
    # surrogate embeds every image almost alike, so the margins are small but the order is not chance)
    stats = entry["optimisation"]
    assert stats["surrogate_cos_target_text_patched"] > stats["surrogate_cos_target_text_clean"]
    assert stats["surrogate_cos_target_text_patched"] > stats["surrogate_cos_target_text_random_patch"]
    # deterministic per seed: the same patch, bit for bit
    again = tmp_path / "again"
    poison_dataset(tiny_world, again, [("optimised-patch", {**OPT, "surrogate": str(trained_run)})], seed=2)
    assert load_pair_dataset(again).meta.poison["attacks"][0]["trigger"]["patch"] == trig["patch"]
    # a cached patch skips the optimisation (and needs no surrogate)
    cached = tmp_path / "cached"
    poison_dataset(tiny_world, cached, [("optimised-patch", {"count": 8, "trigger": trig})], seed=2)
    assert torch.equal(_rows(cached, load_pair_dataset(cached).meta.poison["attacks"][0]["rows"]), stored)


# slow: needs the shared trained run (trains)
@pytest.mark.slow
def test_eval_asr_uses_the_new_triggers(optimised: Path, issba: Path, trained_run: Path) -> None:
    from otcbench.eval.run import evaluate

    cfg = EvalConfig(linear_probe=False, asr=True, device="cpu")
    for data, name in ((optimised, "optimised-patch"), (issba, "issba-like")):
        m = evaluate(trained_run, data, cfg, poison=data, out=data / "metrics.json")
        res = m["asr"][name]
        assert res["kind"] == "backdoor" and res["n"] > 0 and 0.0 <= res["asr"] <= 1.0
