"""The compositional synthetic world (``world=compositional``) and the ``content`` ground-truth column."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from otcbench.attacks.poison import attack_options, poison_dataset
from otcbench.config import SynthConfig, validate
from otcbench.data.format import fingerprint_dataset, load_eval_set, load_pair_dataset
from otcbench.data.synth import (
    CLASSES,
    COLOURS,
    COMP_PALETTE,
    Scene,
    SceneObject,
    WorldOptions,
    compositional_templates,
    generate_labelled_scenes,
    generate_rows,
    grid_position,
    grid_side,
    make_compositional_caption,
    sample_compositional_scene,
    scene_content,
    world_options,
    write_world,
)
from otcbench.errors import UserError
from otcbench.train.data import load_train_data

#: A tiny compositional world: 240 pairs, 2 eval images per class and split.
COMP = dict(world="compositional", n_train=240, image_size=32, probe_train_per_class=2, probe_val_per_class=2,
            test_per_class=2, targets_per_class=2, seed=0)

#: Content hashes (decoded pixels, captions, labels; independent of the PNG encoder's version) of the
#: default-world ``tests/conftest.py`` TINY_WORLD (pairs, eval test split), computed with the code before the
#: compositional world existed: the shapes world must produce exactly the same data.
SHAPES_TINY_CONTENT = ("ba7a03b8228091652eea7f5d1eda20c6", "8997b49f3137ec99593d7ed27bfcbb4b")


def _content_hash(ds) -> str:
    import hashlib

    h = hashlib.sha256()
    for row in ds:
        h.update(np.asarray(row["image"].convert("RGB")).tobytes())
        h.update(row["caption"].encode() if "caption" in row else b"")
        h.update(str(row["label"]).encode())
    return h.hexdigest()[:32]

#: Captions of the compositional world without any noise: every object named exactly.
CLEAN = WorldOptions(image_size=64, world="compositional", p_synonym=0.0, p_junk=0.0, p_wrong=0.0, p_typo=0.0)


@pytest.fixture(scope="module")
def comp_world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("comp") / "world"
    write_world(out, SynthConfig(**COMP))
    return out


def test_default_world_fingerprint_unchanged(tiny_world: Path) -> None:
    pd = load_pair_dataset(tiny_world)
    assert "content" not in pd.ds.column_names and pd.content is None
    assert (_content_hash(pd.ds), _content_hash(load_eval_set(tiny_world).splits["test"])) == SHAPES_TINY_CONTENT
    assert fingerprint_dataset(pd.ds) == pd.meta.fingerprint


def test_shapes_world_options_dump_as_before() -> None:
    # recipe world keys and run ids hash this dump: a shapes world must not gain the compositional keys
    before = ["n_train", "image_size", "seed", "probe_train_per_class", "probe_val_per_class", "test_per_class",
              "targets_per_class", "p_colour", "p_synonym", "p_junk", "p_wrong"]
    assert list(SynthConfig(n_train=7).model_dump(mode="json")) == before
    comp = SynthConfig(world="compositional").model_dump(mode="json")
    assert comp["world"] == "compositional" and comp["max_objects"] == 4
    assert SynthConfig.model_validate(comp) == SynthConfig(world="compositional")


def test_deterministic_per_seed() -> None:
    opts = world_options(SynthConfig(**{**COMP, "image_size": 16}))
    a, b, c = generate_rows(30, 7, opts), generate_rows(30, 7, opts), generate_rows(30, 8, opts)
    assert a == b
    assert a[0] != c[0] and a[1] != c[1] and a[3] != c[3]
    # the worker count never changes the data (chunks have their own streams)
    assert generate_rows(1100, 7, opts, workers=2) == generate_rows(1100, 7, opts, workers=1)


def test_scenes_have_two_to_four_distinct_bindings_in_distinct_cells() -> None:
    rng = np.random.default_rng(0)
    g = grid_side(CLEAN)
    assert g == 2
    cell = CLEAN.image_size / g
    counts = Counter()
    for _ in range(400):
        scene = sample_compositional_scene(rng, CLEAN)
        objs = scene.objects
        counts[len(objs)] += 1
        assert 2 <= len(objs) <= 4
        assert len({o.cls for o in objs}) == len(objs)  # distinct shapes
        assert len({o.colour for o in objs}) == len(objs)  # distinct colours, so bindings are distinct
        cells = {(int(o.cx // cell), int(o.cy // cell)) for o in objs}
        assert len(cells) == len(objs)
        for o in objs:  # the whole object lies in its cell, so its position is its cell
            col, row = int(o.cx // cell), int(o.cy // cell)
            assert col * cell <= o.cx - 0.95 * o.radius + 1e-6 and o.cx + 0.95 * o.radius <= (col + 1) * cell + 1e-6
            assert row * cell <= o.cy - 0.95 * o.radius + 1e-6 and o.cy + 0.95 * o.radius <= (row + 1) * cell + 1e-6
    assert set(counts) == {2, 3, 4} and min(counts.values()) > 100  # uniform over 2..4


def test_object_range_and_grid_follow_the_options() -> None:
    rng = np.random.default_rng(1)
    opts = WorldOptions(image_size=48, world="compositional", comp_objects=(3, 6), n_colours=7)
    assert grid_side(opts) == 3
    scenes = [sample_compositional_scene(rng, opts) for _ in range(200)]
    assert {len(s.objects) for s in scenes} == {3, 4, 5, 6}
    assert {o.colour for s in scenes for o in s.objects} == set(COMP_PALETTE[:7])
    default = [sample_compositional_scene(rng, CLEAN) for _ in range(100)]  # 4 colours by default
    assert {o.colour for s in default for o in s.objects} == {"red", "green", "blue", "yellow"}
    cfg = validate(SynthConfig, {"world": "compositional", "min_objects": 3, "max_objects": 6, "n_colours": 7},
                   where="t")
    assert world_options(cfg).comp_objects == (3, 6) and world_options(cfg).n_colours == 7
    with pytest.raises(UserError, match="min_objects"):
        validate(SynthConfig, {"min_objects": 4, "max_objects": 2}, where="data synth")
    with pytest.raises(UserError, match="n_colours"):
        validate(SynthConfig, {"world": "compositional", "max_objects": 5}, where="data synth")


def test_captions_name_every_object_with_its_colour() -> None:
    rng = np.random.default_rng(2)
    orders = set()
    for _ in range(300):
        scene = sample_compositional_scene(rng, CLEAN)
        cap = make_compositional_caption(rng, scene, CLEAN)
        spots = []
        for o in scene.objects:
            phrase = f"{o.colour} {CLASSES[o.cls]}"
            assert re.search(rf"\b{phrase}\b", cap, flags=re.IGNORECASE), (phrase, cap)
            spots.append(cap.lower().index(phrase))
        orders.add(tuple(np.argsort(spots)))
        # no other colour-shape binding is named
        named = re.findall(rf"\b({'|'.join(COLOURS)}) ({'|'.join(CLASSES)})\b", cap.lower())
        assert sorted(f"{c} {s}" for c, s in named) == scene_content(scene).split("|")
    assert len(orders) > 6  # the order of the objects varies


def test_position_phrases_name_each_objects_cell() -> None:
    rng = np.random.default_rng(3)
    opts = WorldOptions(**{**CLEAN.__dict__, "p_position": 1.0})
    for _ in range(100):
        scene = sample_compositional_scene(rng, opts)
        cap = make_compositional_caption(rng, scene, opts)
        for o in scene.objects:
            assert f"{o.colour} {CLASSES[o.cls]} in the {grid_position(o, opts)}" in cap.lower()
    left = SceneObject(0, "red", "large", 10.0, 50.0, 10.0, 0.0)
    assert grid_position(left, opts) == "bottom left"


def test_binding_swap_changes_content_only_by_binding() -> None:
    def obj(cls: str, colour: str, cx: float) -> SceneObject:
        return SceneObject(CLASSES.index(cls), colour, "large", cx, 16.0, 10.0, 0.0)

    a = Scene((obj("circle", "red", 16.0), obj("square", "blue", 48.0)), "plain")
    swapped = Scene((obj("circle", "blue", 16.0), obj("square", "red", 48.0)), "plain")
    reordered = Scene((obj("square", "blue", 16.0), obj("circle", "red", 48.0)), "striped")
    assert scene_content(a) == "blue square|red circle"
    assert scene_content(swapped) == "blue circle|red square"
    assert scene_content(a) == scene_content(reordered)  # order, position and background are not content

    def words(s: Scene) -> list[str]:
        return sorted(scene_content(s).replace("|", " ").split())

    assert words(a) == words(swapped)  # the same colours and shapes, told apart by their binding alone


def test_written_world_has_content_and_single_object_eval(comp_world: Path) -> None:
    pd = load_pair_dataset(comp_world)
    assert "content" in pd.ds.column_names and len(pd.content) == len(pd) == COMP["n_train"]
    _, captions, labels, content = generate_rows(COMP["n_train"], COMP["seed"], world_options(SynthConfig(**COMP)))
    assert pd.content == content and pd.captions == captions and list(pd.ds["label"]) == labels
    for lab, c in zip(labels, content, strict=True):  # the label is the main object's class, one of the objects
        objs = [x.split(" ") for x in c.split("|")]
        assert 2 <= len(objs) <= 4 and CLASSES[lab] in {s for _, s in objs}
    # content is part of the fingerprint: changing it is detected
    assert fingerprint_dataset(pd.ds) == pd.meta.fingerprint
    changed = pd.ds.map(lambda r, i: {"content": "x" if i == 0 else r["content"]}, with_indices=True)
    assert fingerprint_dataset(changed) != pd.meta.fingerprint
    assert fingerprint_dataset(pd.ds.remove_columns("content")) != pd.meta.fingerprint

    ev = load_eval_set(comp_world)
    assert ev.classnames == list(CLASSES)
    test = ev.splits["test"]
    assert Counter(test["label"]) == {c: COMP["test_per_class"] for c in range(len(CLASSES))}
    assert [c.split(" ")[1] for c in test["content"]] == [CLASSES[x] for x in test["label"]]
    _, _, scenes = generate_labelled_scenes(COMP["test_per_class"], COMP["seed"], 3,
                                            world_options(SynthConfig(**COMP)))
    assert all(len(s.objects) == 1 for s in scenes)
    assert set(ev.splits) == {"train", "val", "test", "targets"}
    # zero-shot prompts in the world's caption style: every palette colour bound to the class name
    assert ev.templates == list(compositional_templates(world_options(SynthConfig(**COMP))))
    assert {t.format("circle") for t in ev.templates} >= {"the red circle", "a photo of the blue circle."}


def test_content_loaded_into_train_data(comp_world: Path, tiny_world: Path) -> None:
    def tok(texts: list[str]):
        import torch

        return torch.zeros(len(texts), 4, dtype=torch.long)

    td = load_train_data(load_pair_dataset(comp_world), tok)
    assert td.content == load_pair_dataset(comp_world).content and len(td.content) == len(td)
    assert load_train_data(load_pair_dataset(tiny_world), tok).content is None


def test_poisoned_rows_get_unknown_content(comp_world: Path, tmp_path: Path) -> None:
    clean = load_pair_dataset(comp_world)
    poison_dataset(comp_world, tmp_path / "p", attack_options(
        ["yellow", "label-consistent"],
        ["yellow.count=5", "yellow.target=heart", "label-consistent.target=star", "label-consistent.count=2"]))
    pd = load_pair_dataset(tmp_path / "p")
    assert len(pd) == len(clean) + 5
    for i, (flag, c) in enumerate(zip(pd.poison_flags, pd.content, strict=True)):
        if flag:
            assert c == ""
        else:
            assert c == clean.content[i]
    assert sum(1 for f in pd.poison_flags[:len(clean)] if f) == 2  # the label-consistent rows, in place


def test_grid_model_has_a_token_per_cell_and_room_for_four_objects() -> None:
    import torch

    from otcbench.models import create_model, encode_image_tokens

    model = create_model("otc-rn-grid")
    glob, tokens = encode_image_tokens(model, torch.zeros(2, 3, 64, 64, dtype=torch.uint8))
    assert glob.shape == (2, 64) and tokens.shape == (2, 4, 64)  # 2x2 grid = the world's 2x2 cells
    assert model.context_length == 40


def test_uncoloured_captions_name_shapes_only() -> None:
    rng = np.random.default_rng(4)
    opts = WorldOptions(**{**CLEAN.__dict__, "p_uncoloured": 1.0})
    for _ in range(50):
        scene = sample_compositional_scene(rng, opts)
        cap = make_compositional_caption(rng, scene, opts).lower()
        assert all(re.search(rf"\b{CLASSES[o.cls]}\b", cap) for o in scene.objects)
        assert not re.search(rf"\b({'|'.join(COLOURS)})\b", cap)
