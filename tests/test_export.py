"""``otcbench data export``: the synthetic world as COCO captions files (five captions per image from the world's
caption model), read back by ``data import --format coco``; the native multi-caption twin (``--format pairs``);
bad input as one line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from otcbench.cli import app
from otcbench.data import format as fmt
from otcbench.data.export import ExportOptions, export_dataset
from otcbench.data.importers import import_dataset
from otcbench.errors import UserError


@pytest.fixture(scope="module")
def coco_files(tiny_world: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("export") / "coco"
    res = export_dataset(tiny_world, out)
    assert (res.images, res.captions) == (384, 5 * 384)
    return out


def _doc(coco: Path) -> dict:
    return json.loads((coco / "annotations" / "captions_train2017.json").read_text())


def test_the_world_exports_as_coco_with_five_captions_per_image(tiny_world: Path, coco_files: Path) -> None:
    doc = _doc(coco_files)
    world = fmt.load_pair_dataset(tiny_world)
    assert [im["file_name"] for im in doc["images"][:2]] == ["000000000001.jpg", "000000000002.jpg"]
    by_image: dict[int, list[str]] = {}
    for a in doc["annotations"]:
        by_image.setdefault(a["image_id"], []).append(a["caption"])
    assert all(len(c) == 5 for c in by_image.values())
    assert [c[0] for c in by_image.values()] == world.captions  # the stored caption first
    extra = [c for caps in by_image.values() for c in caps[1:]]
    assert len(set(extra)) > 0.5 * len(extra)  # written for each image, not copies
    # the extra captions come from the world's caption model: they name the scene's main object's class
    names = world.meta.classnames
    lab = list(world.ds["label"])
    hits = np.mean([names[lab[i - 1]] in " ".join(caps[1:]) for i, caps in by_image.items()])
    assert hits > 0.5
    # images: 4:4:4 JPEG at quality 95 of the PNGs: about 3/255 mean error (the noisy backgrounds cost most)
    src = fmt.images_to_tensor(world.ds.select(range(8)), root=world.path).float()
    back = fmt.images_to_tensor(fmt.build_pair_dataset(
        [(coco_files / "train2017" / f"{i:012d}.jpg").read_bytes() for i in range(1, 9)], ["x"] * 8)).float()
    assert 0 < (src - back).abs().mean() < 5.0


def test_the_export_is_deterministic(tiny_world: Path, coco_files: Path, tmp_path: Path) -> None:
    export_dataset(tiny_world, tmp_path / "again")
    a, b = _doc(coco_files), _doc(tmp_path / "again")
    assert a["annotations"] == b["annotations"] and a["images"] == b["images"]


def test_coco_files_import_back_with_image_ids(tiny_world: Path, coco_files: Path, tmp_path: Path) -> None:
    res = import_dataset(coco_files / "annotations" / "captions_train2017.json", tmp_path / "imp", "coco",
                         {"eval_set": str(tiny_world / "eval")})
    assert res.rows == 5 * 384 and not res.skipped
    imp = fmt.load_pair_dataset(tmp_path / "imp")
    assert imp.image_ids[:6] == ["coco:1"] * 5 + ["coco:2"]
    assert imp.captions[::5] == fmt.load_pair_dataset(tiny_world).captions
    assert imp.meta.classnames == fmt.load_pair_dataset(tiny_world).meta.classnames  # from the eval set
    # exported again, the import gives the same COCO captions file (rows grouped by image id)
    export_dataset(tmp_path / "imp", tmp_path / "round")
    assert _doc(tmp_path / "round")["annotations"] == _doc(coco_files)["annotations"]


def test_the_native_twin_has_the_same_captions_and_the_world_s_images(tiny_world: Path, coco_files: Path,
                                                                      tmp_path: Path) -> None:
    export_dataset(tiny_world, tmp_path / "pairs", ExportOptions(format="pairs"))
    twin = fmt.load_pair_dataset(tmp_path / "pairs")
    world = fmt.load_pair_dataset(tiny_world)
    assert len(twin) == 5 * 384 and twin.image_ids[:6] == ["world:0"] * 5 + ["world:1"]
    assert twin.captions == [a["caption"] for a in _doc(coco_files)["annotations"]]
    assert list(twin.ds["label"])[:10] == [list(world.ds["label"])[0]] * 5 + [list(world.ds["label"])[1]] * 5
    assert torch.equal(fmt.images_to_tensor(twin.ds.select([5]), root=twin.path),
                       fmt.images_to_tensor(world.ds.select([1]), root=world.path))
    assert fmt.load_eval_set(tmp_path / "pairs").classnames == world.meta.classnames
    export_dataset(tiny_world, tmp_path / "unlabelled", ExportOptions(format="pairs", labels=False,
                                                                      captions_per_image=2))
    bare = fmt.load_pair_dataset(tmp_path / "unlabelled")
    assert len(bare) == 768 and set(bare.ds["label"]) == {-1} and bare.captions[:2] == twin.captions[:2]


def test_bad_input_is_one_line(tiny_world: Path, coco_files: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    r = runner.invoke(app, ["data", "export", str(tiny_world), str(coco_files)])
    assert r.exit_code == 2 and "is not empty; choose a new or empty directory" in r.output
    assert len(r.output.strip().splitlines()) <= 2  # one line (wrapped at most once by the console)
    r = runner.invoke(app, ["data", "export", str(tiny_world), str(tmp_path / "x"), "--format", "tiff"])
    assert r.exit_code == 2 and "format" in r.output and "x" not in {p.name for p in tmp_path.iterdir()}
    # a dataset whose rows do not replay (captions edited after the world was written) is refused
    world = fmt.load_pair_dataset(tiny_world)
    caps = world.captions
    caps[3] = "edited"
    ds = fmt.build_pair_dataset(fmt.image_bytes(world.ds, root=world.path), caps, list(world.ds["label"]))
    fmt.save_pair_dataset(ds, tmp_path / "edited", world.meta.model_copy())
    with pytest.raises(UserError, match=r"row 3 of the synthetic world does not replay"):
        export_dataset(tmp_path / "edited", tmp_path / "e")
    assert not (tmp_path / "e").exists()
