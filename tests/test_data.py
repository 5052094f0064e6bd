"""Tests for the synthetic world (otcbench.data.synth), the on-disk formats (otcbench.data.format) and
``otcbench data show`` (otcbench.data.show).

One small world is built once per module; generation speed is a benchmark (``otcbench bench``), not a test.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
from collections import Counter
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from PIL import Image
from rich.console import Console
from rich.table import Table

import otcbench.data.format as fmt
import otcbench.data.synth.generate as synth_generate
import otcbench.data.synth.world as synth_world
from otcbench.config import SynthConfig
from otcbench.data.format import (
    META_FILE,
    PAIR_COLUMNS,
    PAIR_FEATURES,
    DatasetMeta,
    build_pair_dataset,
    fingerprint_dataset,
    images_to_tensor,
    load_eval_set,
    load_pair_dataset,
    read_meta,
    save_eval_set,
    save_pair_dataset,
    staged_extras,
)
from otcbench.data.show import render_stats_table, show_dataset
from otcbench.data.synth import (
    CLASS_SYNONYMS,
    CLASSES,
    TEMPLATES,
    WEB_JUNK,
    encode_png,
    generate_labelled,
    generate_pairs,
    plural,
    world_options,
    write_world,
)
from otcbench.errors import UserError

torch.set_num_threads(1)

SMALL = dict(n_train=300, probe_train_per_class=4, probe_val_per_class=2, test_per_class=4, targets_per_class=1)
N_CLASSES = len(CLASSES)
SYNONYMS = [s for syn in CLASS_SYNONYMS.values() for s in syn]


def small(**kw) -> SynthConfig:
    return SynthConfig(**{**SMALL, **kw})


@pytest.fixture(scope="module")
def worlds(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Three small worlds: ``a`` and ``a2`` share seed 0 (different directories), ``b`` has seed 1."""
    root = tmp_path_factory.mktemp("worlds")
    paths = {"a": root / "a" / "world", "a2": root / "a2" / "world", "b": root / "b" / "world"}
    write_world(paths["a"], small(seed=0))
    write_world(paths["a2"], small(seed=0))
    write_world(paths["b"], small(seed=1))
    return paths


@pytest.fixture(scope="module")
def world(worlds: dict[str, Path]) -> Path:
    return worlds["a"]


@pytest.fixture(scope="module")
def pairs(world: Path) -> fmt.PairDataset:
    return load_pair_dataset(world)


def raw_images(ds: datasets.Dataset) -> list[bytes]:
    return [x["bytes"] for x in ds.cast_column("image", datasets.Image(decode=False))["image"]]


def as_png(x: bytes | np.ndarray) -> bytes:
    """Generators return PNG bytes or uint8 arrays; compare them as PNG bytes."""
    return x if isinstance(x, bytes) else encode_png(x)


def tree(path: Path) -> dict[str, bytes]:
    """Every file under ``path`` with its content (to check that something was left untouched)."""
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def class_word(name: str) -> re.Pattern[str]:
    return re.compile(rf"\b{re.escape(name)}(s|es)?\b", re.IGNORECASE)


def synonym_used(caption: str) -> bool:
    """Whether a caption names a class by a synonym (exact words: "dots"/"stripes" are backgrounds)."""
    return any(re.search(rf"\b{re.escape(s)}\b", caption, re.IGNORECASE) for s in SYNONYMS)


def is_junk(caption: str) -> bool:
    return caption in WEB_JUNK or re.fullmatch(r"DSC_\d{4}\.jpg", caption) is not None


def make_pair_dir(
    path: Path, n: int = 40, poisoned: dict[int, str] | None = None, labels: bool = True, size: int = 16
) -> Path:
    """A hand-built pair dataset of random images, with some rows flagged as poisoned."""
    rng = np.random.default_rng(0)
    images = [encode_png(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(n)]
    captions = [f"a photo of a {CLASSES[i % N_CLASSES]} number {i}" for i in range(n)]
    poison = [""] * n
    for i, attack in (poisoned or {}).items():
        poison[i] = attack
        captions[i] = "a banana for $5 and $10 " + "with a very long poisoned caption " * 6
    captions[1] = ""  # an empty caption must not break stats or the grid
    ds = build_pair_dataset(
        images, captions, [i % N_CLASSES for i in range(n)] if labels else None, poison, list(range(n))
    )
    save_pair_dataset(ds, path, DatasetMeta(kind="pairs", classnames=list(CLASSES), templates=list(TEMPLATES),
                                            created_by={"command": "test", "seed": 0}))
    return path


# --------------------------------------------------------------------------------------------------
# Determinism


def test_same_seed_same_world(worlds: dict[str, Path]) -> None:
    a, a2 = load_pair_dataset(worlds["a"]), load_pair_dataset(worlds["a2"])
    assert a.meta.fingerprint == a2.meta.fingerprint
    assert a.captions == a2.captions
    assert raw_images(a.ds) == raw_images(a2.ds)
    assert read_meta(worlds["a"] / "eval").fingerprint == read_meta(worlds["a2"] / "eval").fingerprint


def test_different_seed_different_world(worlds: dict[str, Path]) -> None:
    a, b = load_pair_dataset(worlds["a"]), load_pair_dataset(worlds["b"])
    assert a.meta.fingerprint != b.meta.fingerprint
    assert a.captions != b.captions
    assert sum(x == y for x, y in zip(a.captions, b.captions, strict=True)) < len(a) // 2
    assert raw_images(a.ds)[0] != raw_images(b.ds)[0]
    assert read_meta(worlds["a"] / "eval").fingerprint != read_meta(worlds["b"] / "eval").fingerprint


def test_generators_are_deterministic() -> None:
    opts = world_options(SynthConfig(image_size=16))
    i1, c1, l1 = generate_pairs(20, 7, opts)
    i2, c2, l2 = generate_pairs(20, 7, opts)
    assert c1 == c2 and l1 == l2 and [as_png(x) for x in i1] == [as_png(x) for x in i2]
    e1, m1 = generate_labelled(2, 7, 3, opts)
    e2, m2 = generate_labelled(2, 7, 1, opts)  # another stream: other images, same labels
    assert m1 == m2
    assert [as_png(x) for x in e1] != [as_png(x) for x in e2]


def test_fingerprint_depends_on_values_not_storage() -> None:
    ds = build_pair_dataset([b"a", b"b", b"c"], ["x", "y", "z"], [0, 1, 2])
    reordered = ds.select([2, 1, 0])
    fresh = build_pair_dataset([b"c", b"b", b"a"], ["z", "y", "x"], [2, 1, 0])
    assert fingerprint_dataset(reordered) == fingerprint_dataset(fresh)
    assert fingerprint_dataset(reordered.flatten_indices()) == fingerprint_dataset(fresh)
    assert fingerprint_dataset(ds) != fingerprint_dataset(fresh)  # row order counts
    flagged = build_pair_dataset([b"a", b"b", b"c"], ["x", "y", "z"], [0, 1, 2], poison=["", "x", ""])
    assert fingerprint_dataset(flagged) != fingerprint_dataset(ds)


# --------------------------------------------------------------------------------------------------
# Counts, columns, labels


def test_pair_dataset_counts_and_columns(pairs: fmt.PairDataset) -> None:
    ds = pairs.ds
    assert len(pairs) == SMALL["n_train"]
    assert ds.column_names == list(PAIR_COLUMNS)
    assert ds.features == PAIR_FEATURES
    labels = list(ds["label"])
    assert all(isinstance(x, int) and 0 <= x < N_CLASSES for x in labels)
    assert len(set(labels)) == N_CLASSES
    assert set(ds["poison"]) == {""}
    assert set(ds["origin"]) == {-1}
    assert all(isinstance(c, str) and c for c in ds["caption"])
    m = pairs.meta
    assert m.kind == "pairs" and m.eval_set == "eval"
    assert m.counts["pairs"] == SMALL["n_train"] and m.counts["poisoned"] == 0
    assert m.created_by["command"] == "otcbench data synth"
    assert m.created_by["seed"] == 0 and m.created_by["options"]["n_train"] == SMALL["n_train"]
    assert set(CLASS_SYNONYMS) <= set(m.synonyms)


def test_eval_set_counts_and_balance(world: Path) -> None:
    ev = load_eval_set(world / "eval")
    expected = {
        "train": SMALL["probe_train_per_class"], "val": SMALL["probe_val_per_class"],
        "test": SMALL["test_per_class"], "targets": SMALL["targets_per_class"],
    }
    assert set(ev.splits) == set(expected)
    for split, per_class in expected.items():
        ds = ev.splits[split]
        assert len(ds) == per_class * N_CLASSES
        assert ds.features == PAIR_FEATURES
        assert Counter(ds["label"]) == {c: per_class for c in range(N_CLASSES)}
        assert set(ds["poison"]) == {""} and set(ds["origin"]) == {-1}
        # eval captions are the first prompt template with the true class
        assert list(ds["caption"]) == [TEMPLATES[0].format(CLASSES[x]) for x in ds["label"]]
        assert ev.meta.counts[split] == per_class * N_CLASSES
    assert ev.meta.kind == "eval"
    assert ev.classnames == list(CLASSES) and ev.templates == list(TEMPLATES)
    all_images = [b for ds in ev.splits.values() for b in raw_images(ds)]
    assert len(set(all_images)) == len(all_images)  # no duplicate image across splits


def test_eval_images_are_single_object(monkeypatch: pytest.MonkeyPatch) -> None:
    scenes = []
    real = synth_generate.sample_scene

    def spy(*args, **kwargs):
        scene = real(*args, **kwargs)
        scenes.append(scene)
        return scene

    # the generator's own reference: the one generate_labelled calls
    monkeypatch.setattr(synth_generate, "sample_scene", spy)
    cfg = small()
    images, labels = generate_labelled(3, cfg.seed, 3, world_options(cfg))
    assert len(scenes) == len(images) == len(labels) == 3 * N_CLASSES
    assert all(len(s.objects) == 1 for s in scenes)
    assert [s.objects[0].cls for s in scenes] == labels
    assert Counter(labels) == {c: 3 for c in range(N_CLASSES)}


def test_written_eval_set_is_what_the_generator_makes(world: Path) -> None:
    cfg = small(seed=0)
    images, labels = generate_labelled(cfg.test_per_class, cfg.seed, 3, world_options(cfg))
    test = load_eval_set(world).splits["test"]
    assert list(test["label"]) == labels
    assert raw_images(test) == [as_png(x) for x in images]


def test_image_size(world: Path, tmp_path: Path) -> None:
    pairs = load_pair_dataset(world)
    t = images_to_tensor(pairs.ds.select(range(10)))
    assert t.shape == (10, 3, 32, 32) and t.dtype == torch.uint8
    big = tmp_path / "big"
    write_world(big, SynthConfig(n_train=12, image_size=48, probe_train_per_class=1, probe_val_per_class=1,
                                 test_per_class=1, targets_per_class=1))
    t48 = images_to_tensor(load_pair_dataset(big).ds)
    assert t48.shape == (12, 3, 48, 48)
    for ds in load_eval_set(big).splits.values():
        assert images_to_tensor(ds).shape == (N_CLASSES, 3, 48, 48)
    assert images_to_tensor(load_pair_dataset(big).ds, size=24).shape == (12, 3, 24, 24)
    first = raw_images(load_pair_dataset(big).ds)[0]
    assert Image.open(io.BytesIO(first)).size == (48, 48)


# --------------------------------------------------------------------------------------------------
# Captions


def test_classes_and_class_words_in_captions(pairs: fmt.PairDataset) -> None:
    assert len(CLASSES) >= 10 and len(set(CLASSES)) == len(CLASSES)
    assert pairs.meta.classnames == list(CLASSES)
    caps = pairs.captions
    for name in CLASSES:
        n = sum(1 for c in caps if class_word(name).search(c))
        assert n >= 3, f"class {name!r} named in only {n} captions"


def test_captions_are_varied_and_use_synonyms(pairs: fmt.PairDataset) -> None:
    caps = pairs.captions
    assert len(set(caps)) > 0.5 * len(caps)
    with_synonym = [c for c in caps if synonym_used(c)]
    assert len(with_synonym) >= 5
    words = [len(c.split()) for c in caps]
    assert min(words) <= 2 and max(words) >= 8  # short alt-text and long descriptions


def test_no_synonyms_when_disabled() -> None:
    _, caps, _ = generate_pairs(150, 0, world_options(SynthConfig(image_size=16, p_synonym=0.0)))
    assert not [c for c in caps if synonym_used(c)]


def test_junk_captions_follow_p_junk() -> None:
    _, caps, _ = generate_pairs(200, 0, world_options(SynthConfig(image_size=16, p_junk=0.5)))
    junk = [c for c in caps if is_junk(c)]
    assert 0.35 < len(junk) / len(caps) < 0.65
    assert any(c in WEB_JUNK for c in junk) and any(c.startswith("DSC_") for c in junk)
    # a junk caption names no class
    assert not [c for c in junk if any(class_word(n).search(c) for n in CLASSES)]
    _, clean, _ = generate_pairs(200, 0, world_options(SynthConfig(image_size=16, p_junk=0.0)))
    assert not [c for c in clean if is_junk(c)]


def test_default_world_has_little_noise(pairs: fmt.PairDataset) -> None:
    junk = sum(is_junk(c) for c in pairs.captions)
    assert 0 < junk < 0.15 * len(pairs)


@pytest.mark.parametrize(
    ("noun", "expected"),
    [("circle", "circles"), ("cross", "crosses"), ("box", "boxes"), ("hourglass", "hourglasses"),
     ("plus sign", "plus signs"), ("plus", "pluses"), ("love heart", "love hearts")],
)
def test_plural(noun: str, expected: str) -> None:
    assert plural(noun) == expected


# --------------------------------------------------------------------------------------------------
# Atomic writes


def test_write_world_refuses_existing_output(world: Path, tmp_path: Path) -> None:
    before = tree(world)
    with pytest.raises(UserError, match="already exists"):
        write_world(world, small())
    assert tree(world) == before
    other = tmp_path / "taken"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    with pytest.raises(UserError, match="already exists"):
        write_world(other, small(n_train=5))
    assert tree(other) == {"keep.txt": b"mine"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]


@pytest.mark.parametrize("exc", [RuntimeError, KeyboardInterrupt])
def test_failed_write_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, exc: type) -> None:
    real = fmt.write_meta

    def failing(directory: Path, meta: DatasetMeta) -> None:
        if meta.kind == "pairs":  # the very last step: data and eval set are already written
            raise exc("disk full")
        real(directory, meta)

    monkeypatch.setattr(fmt, "write_meta", failing)
    out = tmp_path / "world"
    with pytest.raises(exc, match="disk full"):
        write_world(out, small(n_train=20))
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []  # no temporary or staging directories left behind


def test_failed_build_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(synth_world, "build_pair_dataset", boom)
    with pytest.raises(RuntimeError):
        write_world(tmp_path / "world", small(n_train=20))
    assert list(tmp_path.iterdir()) == []


def test_failed_overwrite_keeps_old_world(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "world"
    write_world(out, small(n_train=20, probe_train_per_class=1, probe_val_per_class=1, test_per_class=1))
    before = tree(out)

    def boom(ds: datasets.Dataset) -> str:
        raise RuntimeError("interrupted")

    monkeypatch.setattr(fmt, "fingerprint_dataset", boom)
    with pytest.raises(RuntimeError):
        write_world(out, small(n_train=20, seed=5), overwrite=True)
    monkeypatch.undo()
    assert tree(out) == before
    assert [p.name for p in tmp_path.iterdir()] == ["world"]
    load_pair_dataset(out)  # still valid


def test_overwrite_replaces_world(tmp_path: Path) -> None:
    out = tmp_path / "world"
    cfg = dict(n_train=10, probe_train_per_class=1, probe_val_per_class=1, test_per_class=1)
    m1 = write_world(out, SynthConfig(**cfg, seed=0))
    m2 = write_world(out, SynthConfig(**cfg, seed=1), overwrite=True)
    assert m1.fingerprint != m2.fingerprint
    assert load_pair_dataset(out).meta.fingerprint == m2.fingerprint
    assert [p.name for p in tmp_path.iterdir()] == ["world"]


# --------------------------------------------------------------------------------------------------
# Loading: every way a dataset directory can be wrong is one helpful UserError


def test_load_missing_dir(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"does not exist.*otcbench data synth"):
        load_pair_dataset(tmp_path / "nope")


def test_load_file_instead_of_dir(tmp_path: Path) -> None:
    f = tmp_path / "file.txt"
    f.write_text("x")
    with pytest.raises(UserError, match="is a file"):
        load_pair_dataset(f)


def test_load_dir_without_meta(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=rf"not an otcbench dataset \(no {re.escape(META_FILE)}\)"):
        load_pair_dataset(tmp_path)


def test_load_eval_set_as_pairs(world: Path) -> None:
    with pytest.raises(UserError, match="is an eval set, not a pair dataset"):
        load_pair_dataset(world / "eval")


@pytest.mark.parametrize("content", ["{not json", "[1, 2]", '{"kind": "bogus"}', '{"kind": "pairs",'])
def test_load_corrupted_meta(world: Path, tmp_path: Path, content: str) -> None:
    d = tmp_path / "copy"
    shutil.copytree(world, d)
    (d / META_FILE).write_text(content)
    with pytest.raises(UserError, match="corrupted.*recreate") as info:
        load_pair_dataset(d)
    assert "\n" not in str(info.value)


def test_load_meta_not_utf8(world: Path, tmp_path: Path) -> None:
    d = tmp_path / "copy"
    shutil.copytree(world, d)
    (d / META_FILE).write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(UserError, match="corrupted"):
        load_pair_dataset(d)


def test_load_missing_data(world: Path, tmp_path: Path) -> None:
    d = tmp_path / "copy"
    shutil.copytree(world, d)
    shutil.rmtree(d / "data")
    with pytest.raises(UserError, match="could not be read"):
        load_pair_dataset(d)


def test_load_modified_dataset(world: Path, tmp_path: Path) -> None:
    d = tmp_path / "copy"
    shutil.copytree(world, d)
    ds = load_pair_dataset(d).ds
    captions = list(ds["caption"])
    captions[3] = "tampered caption"
    modified = ds.remove_columns("caption").add_column("caption", captions).select_columns(list(PAIR_COLUMNS))
    modified = modified.cast(PAIR_FEATURES)
    modified.save_to_disk(str(tmp_path / "new_data"))
    del ds, modified
    shutil.rmtree(d / "data")
    shutil.move(str(tmp_path / "new_data"), str(d / "data"))  # keep the old otcbench.json
    with pytest.raises(UserError, match=r"fingerprint.*modified"):
        load_pair_dataset(d)
    loaded = load_pair_dataset(d, verify=False)
    assert loaded.captions[3] == "tampered caption"


def test_load_eval_set_beside_pairs(world: Path) -> None:
    ev = load_eval_set(world)
    assert ev.path.resolve() == (world / "eval").resolve()
    assert set(ev.splits) == {"train", "val", "test", "targets"}
    assert ev.classnames == list(CLASSES)
    assert load_pair_dataset(world).eval_set_path() == (world / "eval").resolve()


def test_load_eval_set_errors(tmp_path: Path) -> None:
    d = make_pair_dir(tmp_path / "pairs", n=4)
    with pytest.raises(UserError, match="without an eval set"):
        load_eval_set(d)
    meta = json.loads((d / META_FILE).read_text())
    meta["eval_set"] = "../elsewhere"
    (d / META_FILE).write_text(json.dumps(meta))
    with pytest.raises(UserError, match="outside the dataset directory"):
        load_eval_set(d)
    ds = build_pair_dataset([encode_png(np.zeros((8, 8, 3), np.uint8))], [""], [0])
    save_eval_set({"test": ds}, tmp_path / "no_classes", DatasetMeta(kind="eval", templates=["a {}."]))
    with pytest.raises(UserError, match="no class names"):
        load_eval_set(tmp_path / "no_classes")
    save_eval_set({"train": ds}, tmp_path / "no_test", DatasetMeta(kind="eval", classnames=["x"]))
    with pytest.raises(UserError, match="no 'test' split"):
        load_eval_set(tmp_path / "no_test")


def test_load_eval_set_self_reference(tmp_path: Path) -> None:
    d = make_pair_dir(tmp_path / "pairs", n=4)
    meta = json.loads((d / META_FILE).read_text())
    meta["eval_set"] = "."
    (d / META_FILE).write_text(json.dumps(meta))
    with pytest.raises(UserError):
        load_eval_set(d)


# --------------------------------------------------------------------------------------------------
# otcbench data show


def test_show_world(world: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    before = tree(world)
    stats = show_dataset(world, n=16)
    png = Path(stats["png"])
    assert png == tmp_path / "world-samples.png" and png.is_file()
    w, h = Image.open(png).size
    assert 600 <= w <= 4000 and 300 <= h <= 4000
    assert tree(world) == before  # nothing written inside the (fingerprinted) dataset directory
    assert stats["kind"] == "pairs" and stats["rows"] == SMALL["n_train"]
    assert stats["poisoned"] == 0 and stats["poison_by_attack"] == {} and stats["samples_poisoned"] == 0
    assert sum(stats["labels"].values()) == SMALL["n_train"] and set(stats["labels"]) <= set(CLASSES)
    assert stats["unlabelled"] == 0
    assert stats["image_size"] == "32x32"
    assert stats["fingerprint"] == read_meta(world).fingerprint and stats["fingerprint_ok"] is True
    assert stats["created_by"]["command"] == "otcbench data synth"
    cw = stats["caption_words"]
    assert 1 <= cw["min"] <= cw["mean"] <= cw["max"]
    assert len(stats["samples"]) == 16
    json.dumps(stats)  # machine-readable (`--json`)
    again = show_dataset(world, out_png=tmp_path / "again.png", n=16)
    assert again["samples"] == stats["samples"]  # same seed, same sample


def test_show_poisoned(tmp_path: Path) -> None:
    poisoned = {3: "badnets", 10: "badnets", 17: "label-flip", 30: "badnets"}
    d = make_pair_dir(tmp_path / "poisoned", n=40, poisoned=poisoned)
    stats = show_dataset(d, out_png=tmp_path / "out" / "grid.png", n=8, seed=1)
    assert Path(stats["png"]) == tmp_path / "out" / "grid.png" and Path(stats["png"]).is_file()
    assert stats["poisoned"] == 4 and stats["poison_by_attack"] == {"badnets": 3, "label-flip": 1}
    assert stats["samples_poisoned"] == 2  # a quarter of the grid
    assert set(stats["samples"]) & set(poisoned)
    assert stats["empty_captions"] == 1 and stats["caption_words"]["min"] == 0
    assert stats["image_size"] == "16x16"
    table = render_stats_table(stats)
    assert isinstance(table, Table)
    console = Console(record=True, width=120)
    console.print(table)
    text = console.export_text()
    assert "badnets 3" in text and "label-flip 1" in text and "16x16" in text


def test_show_everything_poisoned_and_small_n(tmp_path: Path) -> None:
    d = make_pair_dir(tmp_path / "allbad", n=6, poisoned={i: "x" for i in range(6)}, labels=False)
    stats = show_dataset(d, out_png=tmp_path / "g.png", n=50)
    assert len(stats["samples"]) == 6 and stats["samples_poisoned"] == 6
    assert stats["labels"] == {} and stats["unlabelled"] == 6


def test_show_eval_set(world: Path, tmp_path: Path) -> None:
    stats = show_dataset(world / "eval", out_png=tmp_path / "eval.png", n=8)
    assert stats["kind"] == "eval"
    assert stats["splits"] == {
        "train": SMALL["probe_train_per_class"] * N_CLASSES, "val": SMALL["probe_val_per_class"] * N_CLASSES,
        "test": SMALL["test_per_class"] * N_CLASSES, "targets": SMALL["targets_per_class"] * N_CLASSES,
    }
    assert stats["rows"] == sum(stats["splits"].values())
    assert set(stats["labels"].values()) == {stats["rows"] // N_CLASSES}
    assert stats["fingerprint_ok"] is True
    assert Path(stats["png"]).is_file()


def test_show_reports_modified_data_and_refuses_bad_output(world: Path, tmp_path: Path) -> None:
    d = tmp_path / "copy"
    shutil.copytree(world, d)
    meta = json.loads((d / META_FILE).read_text())
    meta["fingerprint"] = "0" * 32
    (d / META_FILE).write_text(json.dumps(meta))
    with pytest.raises(UserError, match="inside the dataset directory"):
        show_dataset(d, out_png=d / "samples.png")
    with pytest.raises(UserError, match="at least 1"):
        show_dataset(d, n=0)
    stats = show_dataset(d, out_png=tmp_path / "x.png", n=4)
    assert stats["fingerprint_ok"] is False  # shown (it is a diagnostic tool), but flagged
    console = Console(record=True, width=160)
    console.print(render_stats_table(stats))
    assert "MISMATCH" in console.export_text()
    with pytest.raises(UserError, match="does not exist"):
        show_dataset(tmp_path / "missing")


def test_staged_extras_links_the_source_relatively_and_leaves_nothing_behind(tmp_path: Path) -> None:
    src = tmp_path / "sets" / "source"
    src.mkdir(parents=True)
    (src / "a.txt").write_text("x")
    out = tmp_path / "sets" / "derived"
    with pytest.raises(RuntimeError, match="boom"), staged_extras(out, src) as (staging, extra):
        link = extra["source"]
        assert os.readlink(link) == os.path.join("..", "source")  # relative to out: the pair can move together
        assert (link / "a.txt").read_text() == "x"  # the scratch folder sits beside out, so it resolves there too
        raise RuntimeError("boom")
    assert not staging.exists() and sorted(p.name for p in (tmp_path / "sets").iterdir()) == ["source"]
    with staged_extras(out) as (_, extra):
        assert extra == {}
