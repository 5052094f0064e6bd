"""Several captions per image: image ids from the importers (or derived), the per-image OTCCLIP filter, match
precision counting a sibling caption as describing the image, SafeCLIP's and RoCLIP's per-caption decisions.

The COCO fixture has five captions per image, as MS-COCO has: a filter that counted rows and took the
pixel-identical copies with it would leave out most of the images.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from otcbench.attacks.poison import attack_options, poison_dataset
from otcbench.data import format as fmt
from otcbench.data.image_ids import content_id, dataset_image_ids, image_groups
from otcbench.data.importers import import_dataset
from otcbench.defenses import DEFENSES
from otcbench.defenses import roclip as roclip_mod
from otcbench.defenses.safeclip import SafeCLIP, SafeCLIPOptions
from otcbench.errors import UserError
from otcbench.train.data import TrainData, load_train_data


def write_coco(root: Path, n_images: int, captions: int = 5, *, repeat_id: bool = False) -> Path:
    """A COCO captions file with ``captions`` captions per image and distinct 16 px JPEGs."""
    rng = np.random.default_rng(0)
    images, anns = [], []
    (root / "train2017").mkdir(parents=True)
    for i in range(n_images):
        name = f"{i:012d}.jpg"
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(root / "train2017" / name)
        images.append({"id": 7 if repeat_id and i == 1 else 100 + i, "file_name": name})
        if repeat_id and i == 1:
            images[0]["id"] = 7
        anns += [{"id": i * captions + j, "image_id": images[-1]["id"], "caption": f"image {i} caption {j}"}
                 for j in range(captions)]
    p = root / "annotations" / "captions_train2017.json"
    p.parent.mkdir()
    p.write_text(json.dumps({"images": images, "annotations": anns}))
    return p


@pytest.fixture(scope="module")
def coco(tmp_path_factory: pytest.TempPathFactory) -> fmt.PairDataset:
    tmp = tmp_path_factory.mktemp("coco")
    (tmp / "names.txt").write_text("cat\ndog\n")
    import_dataset(write_coco(tmp / "src", 20), tmp / "pairs", "coco", {"classnames": str(tmp / "names.txt")})
    return fmt.load_pair_dataset(tmp / "pairs")


def tokenize(captions: list[str]) -> torch.Tensor:
    return torch.tensor([[len(c), sum(map(ord, c)) % 1000] for c in captions])


def test_coco_rows_carry_their_image_id(coco: fmt.PairDataset, tmp_path: Path) -> None:
    assert len(coco) == 100 and coco.has_image_id_column
    assert coco.image_ids[:6] == ["coco:100"] * 5 + ["coco:101"]
    assert image_groups(coco.image_ids).tolist()[:11] == [0] * 5 + [1] * 5 + [2]
    two = import_dataset(write_coco(tmp_path / "src", 3), tmp_path / "two", "coco", {"captions_per_image": 2})
    ds = fmt.load_pair_dataset(two.out)
    assert two.rows == 6 and ds.captions[:3] == ["image 0 caption 0", "image 0 caption 1", "image 1 caption 0"]


def test_a_coco_file_whose_image_ids_repeat_is_one_clear_error(tmp_path: Path) -> None:
    src = write_coco(tmp_path / "src", 3, repeat_id=True)
    with pytest.raises(UserError, match=r"image id 7 is listed twice in 'images'.*must be unique"):
        import_dataset(src, tmp_path / "out", "coco")
    assert not (tmp_path / "out").exists()


def test_datasets_without_the_column_derive_ids_and_keep_their_fingerprints(tmp_path: Path) -> None:
    a, b = fmt.png_bytes(np.zeros((4, 4, 3), np.uint8)), fmt.png_bytes(np.ones((4, 4, 3), np.uint8))
    ds = fmt.build_pair_dataset([a, b, a, "images/x.jpg"], ["w", "x", "y", "z"])
    assert dataset_image_ids(ds) == [content_id(a), content_id(b), content_id(a), "path:images/x.jpg"]
    with_ids = fmt.build_pair_dataset([a, b, a, "images/x.jpg"], ["w", "x", "y", "z"], image_id=["1", "2", "3", ""])
    assert dataset_image_ids(with_ids) == ["1", "2", "3", "path:images/x.jpg"]  # an empty cell is derived
    # the column is hashed only when present: a dataset written without it keeps its fingerprint
    assert fmt.fingerprint_dataset(ds) != fmt.fingerprint_dataset(with_ids)
    plain = fmt.build_pair_dataset([a, b], ["w", "x"])
    assert fmt.fingerprint_dataset(plain) == fmt.fingerprint_dataset(
        fmt.build_pair_dataset([a, b], ["w", "x"], content=None, image_id=None))


def test_poisoned_rows_get_ids_of_their_own_images(coco: fmt.PairDataset, tmp_path: Path) -> None:
    out = tmp_path / "p"
    poison_dataset(coco.path, out, attack_options(["badnet"], ["count=4", "target=dog"]), seed=0)
    p = fmt.load_pair_dataset(out)
    ids = p.image_ids
    assert ids[:100] == coco.image_ids  # clean rows keep their images' ids
    blobs = fmt.image_bytes(p.ds.select(range(100, 104)), root=p.path)
    assert ids[100:] == [content_id(b) for b in blobs]  # a triggered image is an image of its own
    assert len(set(ids[100:])) == 4 and not set(ids[100:]) & set(ids[:100])


def test_otcclip_filter_keeps_one_minus_fraction_of_the_images_not_of_the_rows(coco: fmt.PairDataset) -> None:
    data = load_train_data(coco, tokenize)
    assert data.image_ids == coco.image_ids
    score = torch.rand(len(data), generator=torch.Generator().manual_seed(3))
    ctx = SimpleNamespace(data=data)
    per_image = DEFENSES.get("otcclip+filter")(DEFENSES.options("otcclip+filter", {"filter_fraction": 0.2}))
    keep = per_image.filter_rows(ctx, score)  # type: ignore[arg-type]
    groups = image_groups(data.image_ids)
    kept_images = {int(g) for g in groups[keep]}
    assert len(kept_images) == 16  # 1 - 0.2 of the 20 images ...
    assert int(keep.sum()) == 80  # ... with all five captions each
    for g in range(20):  # every image is kept or left out whole
        assert bool(keep[groups == g].all()) or not bool(keep[groups == g].any())
    # the four images left out are those with the weakest captions
    worst = torch.stack([score[groups == g].min() for g in range(20)])
    assert set(torch.argsort(worst)[:4].tolist()) == set(range(20)) - kept_images
    # the row rule (filter_duplicates=false) leaves out 20 % of the rows, touching more images
    per_row = DEFENSES.get("otcclip+filter")(DEFENSES.options("otcclip+filter", {"filter_fraction": 0.2,
                                                                                  "filter_duplicates": False}))
    rows = per_row.filter_rows(ctx, score)  # type: ignore[arg-type]
    assert int(rows.sum()) == 80 and len({int(g) for g in groups[rows]}) > 16


def test_without_ids_pixel_identical_images_are_one_image() -> None:
    images = torch.zeros(6, 3, 2, 2, dtype=torch.uint8)
    images[:, 0, 0, 0] = torch.tensor([0, 1, 2, 3, 1, 5], dtype=torch.uint8)  # rows 1 and 4 show one image
    data = TrainData(images, torch.zeros(6, 2, dtype=torch.long), torch.zeros(6, dtype=torch.long), [""] * 6,
                     list("abcdef"))
    d = DEFENSES.get("otcclip+filter")(DEFENSES.options("otcclip+filter", {"filter_fraction": 0.4}))
    keep = d.filter_rows(SimpleNamespace(data=data), torch.tensor([0.9, 0.1, 0.8, 0.2, 0.7, 0.6]))  # type: ignore
    # five images, two left out: {1, 4} (its weakest row scores 0.1) and row 3 (0.2)
    assert keep.tolist() == [True, False, True, False, False, True]


def test_safeclip_splits_per_caption_so_an_image_keeps_its_good_captions(monkeypatch: pytest.MonkeyPatch) -> None:
    # 80 images x 5 captions; the last caption of each image does not describe it (cosine ~ 0)
    g = torch.Generator().manual_seed(0)
    cos = (0.4 + 0.05 * torch.randn(80, 5, generator=g))
    cos[:, 4] = 0.02 * torch.randn(80, generator=g)
    d = SafeCLIP(SafeCLIPOptions())
    monkeypatch.setattr(d, "_scores", lambda ctx, epoch: cos.flatten())
    ctx = SimpleNamespace(caption_index=torch.arange(400), global_step=0, log=lambda r: None,
                          data=SimpleNamespace(poison=[""] * 400))
    res = d.data_step(ctx)  # type: ignore[arg-type]
    safe = res.keep.view(80, 5)
    assert not bool(safe[:, 4].any())  # the wrong captions are risky ...
    assert float(safe[:, :4].float().mean()) > 0.9  # ... and the images train on their good ones
    assert bool(safe.any(dim=1).all())


def test_roclip_repairing_to_a_sibling_caption_counts_as_a_correct_match(
        coco: fmt.PairDataset, monkeypatch: pytest.MonkeyPatch) -> None:
    data = load_train_data(coco, tokenize)
    n = len(data)
    # every image's nearest caption is the next caption of its own image (row 5i+j -> 5i+(j+1)%5)
    nxt = torch.tensor([5 * (r // 5) + (r % 5 + 1) % 5 for r in range(n)])
    caps = torch.eye(n)
    monkeypatch.setattr(roclip_mod, "embed_images", lambda ctx, rows=None: caps[nxt])
    monkeypatch.setattr(roclip_mod, "embed_captions", lambda ctx, rows=None: caps[rows])
    d = DEFENSES.get("roclip")(DEFENSES.options("roclip", {}))
    ctx = SimpleNamespace(data=data, caption_index=torch.arange(n), embed_batch_size=32)
    res = d.data_step(ctx)  # type: ignore[arg-type]
    assert torch.equal(res.caption_index, nxt) and bool(res.flagged.all())  # per caption: every row re-paired
    assert res.summary["match_precision"] == 1.0  # ... each to a caption of its own image
    data.image_ids = [f"{i}" for i in range(n)]  # had every row its own image, nothing would be known
    assert d.data_step(ctx).summary["match_precision"] is None  # type: ignore[arg-type]
