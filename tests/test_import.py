"""Tests for ``otcbench data import`` (otcbench.data.importers) and poisoning path-based datasets.

Every format gets a small fixture written here with PIL (a few dozen tiny PNG/JPEG images) in its real
layout; the imports are checked for counts, captions, labels and storage; broken and missing images are
counted (and an error past the threshold); bad input is one line on stderr through the CLI. An imported
dataset trains for one tiny epoch, an imported eval set evaluates, and poisoning a path-based dataset
writes only the poisoned images.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from click.testing import Result
from PIL import Image
from typer.testing import CliRunner

from otcbench.attacks.poison import SOURCE_LINK, attack_options, poison_dataset
from otcbench.cli import app
from otcbench.config import EvalConfig, TrainConfig, TrainJob
from otcbench.data import format as fmt
from otcbench.data.importers import import_dataset, make_importer
from otcbench.data.importers import pipeline as pipeline_mod
from otcbench.data.importers.classes import DEFAULT_TEMPLATES, assign_splits, parse_splits, resolve_labels
from otcbench.data.importers.webdataset import expand_braces, split_key
from otcbench.errors import UserError

runner = CliRunner()
CLASSES = ["cat", "dog", "bird", "fish", "frog", "horse"]


def invoke(*args: str | Path) -> Result:
    return runner.invoke(app, [str(a) for a in args])


def one_line_error(result: Result, *fragments: str) -> str:
    """Exit 2, one ``error:`` line on stderr, nothing on stdout, no traceback."""
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert result.stdout.strip() == "" and "Traceback" not in result.stderr
    for f in fragments:
        assert f in lines[0], (f, lines[0])
    return lines[0]


def pixels(seed: int, size: tuple[int, int] = (32, 32), cls: int | None = None) -> np.ndarray:
    """A tiny image: noise, or for a class a distinct base colour plus noise (learnable by a nano model)."""
    rng = np.random.default_rng(seed)
    w, h = size
    if cls is None:
        return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    base = np.array([(cls * 97) % 256, (cls * 53 + 80) % 256, (cls * 151 + 160) % 256], dtype=np.int16)
    return np.clip(base + rng.integers(-20, 21, (h, w, 3)), 0, 255).astype(np.uint8)


def gradient(seed: int, size: tuple[int, int]) -> np.ndarray:
    """A smooth image (survives JPEG re-encoding nearly unchanged, unlike noise)."""
    w, h = size
    y, x = np.mgrid[0:h, 0:w]
    return np.stack([x * 6 % 256, y * 8 % 256, np.full_like(x, 40 * seed % 256)], axis=-1).astype(np.uint8)


def save_image(path: Path, arr: np.ndarray, format: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path, format=format)
    return path


def encoded(arr: np.ndarray, format: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=format)
    return buf.getvalue()


def leftovers(parent: Path) -> list[str]:
    """Hidden temporary/staging entries left beside an output."""
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def cells(path: Path) -> list[dict]:
    return fmt.image_cells(fmt.load_pair_dataset(path).ds)


def make_csv(root: Path, n: int = 24, *, missing: int = 0, broken: int = 0, size: tuple[int, int] = (32, 32),
             name: str = "train.csv", delimiter: str = ",", header: str = "image,caption") -> Path:
    """CleanCLIP's layout: ``train.csv`` (image,caption) with paths relative to it under ``images/``."""
    lines = [header.replace(",", delimiter)]
    for i in range(n):
        save_image(root / "images" / f"{i:03d}.png", pixels(i, size))
        lines.append(f'images/{i:03d}.png{delimiter}"a photo of thing {i}, small"')
    for j in range(missing):
        lines.append(f"images/missing{j}.png{delimiter}a ghost {j}")
    for j in range(broken):
        (root / "images" / f"broken{j}.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
        lines.append(f"images/broken{j}.png{delimiter}a broken {j}")
    p = root / name
    p.write_text("\n".join(lines) + "\n")
    return p


# --------------------------------------------------------------------------------------------------
# csv / tsv, storage modes


def test_csv_import_counts_captions_and_bad_images(tmp_path: Path) -> None:
    src = make_csv(tmp_path / "cc3m", 24, missing=1, broken=1)
    res = import_dataset(src, tmp_path / "out", "csv", {"max_bad_fraction": 0.1})
    assert res.rows == 24 and res.storage == "bytes"  # auto: a small set is stored as bytes
    assert res.skipped == {"missing_image": 1, "unreadable_image": 1}
    pd = fmt.load_pair_dataset(tmp_path / "out")
    assert pd.captions == [f"a photo of thing {i}, small" for i in range(24)]
    assert pd.ds["label"] == [-1] * 24 and set(pd.poison_flags) == {""}
    imgs = fmt.images_to_tensor(pd.ds, root=pd.path)
    assert torch.equal(imgs[5], torch.from_numpy(pixels(5)).permute(2, 0, 1))
    meta = json.loads((tmp_path / "out" / fmt.META_FILE).read_text())
    assert meta["counts"]["records"] == 26 and meta["counts"]["rows"] == 24 and meta["counts"]["pairs"] == 24
    assert meta["counts"]["skipped_missing_image"] == 1 and meta["counts"]["skipped_unreadable_image"] == 1
    assert meta["created_by"]["format"] == "csv" and meta["created_by"]["options"]["max_bad_fraction"] == 0.1
    ex = meta["import_report"]["skipped_examples"]
    assert "missing0.png" in ex["missing_image"][0] and "broken0.png" in ex["unreadable_image"][0]
    assert meta["fingerprint"] == fmt.fingerprint_dataset(pd.ds)


def test_bad_images_past_threshold_is_one_line_and_writes_nothing(tmp_path: Path) -> None:
    src = make_csv(tmp_path / "cc3m", 24, missing=1, broken=1)
    line = one_line_error(invoke("data", "import", src, tmp_path / "out", "--format", "csv"),
                          "2 of 26 images", "1 missing image, 1 unreadable image", "--max-bad-fraction 0.01")
    assert "missing0.png" in line
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []
    # 2/26 = 7.7 %: allowed at 0.08, refused at 0.07
    assert import_dataset(src, tmp_path / "ok", "csv", {"max_bad_fraction": 0.08}).rows == 24
    with pytest.raises(UserError, match="more than --max-bad-fraction 0.07"):
        import_dataset(src, tmp_path / "no", "csv", {"max_bad_fraction": 0.07})


def test_error_after_progress_started_is_still_one_line_in_a_log(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Without OTCBENCH_NO_PROGRESS, stderr to a file/pipe: no bar frame lands before the error line."""
    monkeypatch.delenv("OTCBENCH_NO_PROGRESS", raising=False)
    src = make_csv(tmp_path / "cc3m", 24, missing=1, broken=1)
    one_line_error(invoke("data", "import", src, tmp_path / "out", "--format", "csv"), "2 of 26 images")


def test_threshold_stops_early_when_it_cannot_be_met(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "src"
    lines = ["image,caption"] + [f"images/none{i}.png,cap {i}" for i in range(600)]
    root.mkdir()
    (root / "train.csv").write_text("\n".join(lines) + "\n")
    seen = []
    real = pipeline_mod.load_image
    monkeypatch.setattr(pipeline_mod, "load_image", lambda t: seen.append(1) or real(t))
    with pytest.raises(UserError, match=r"of the first 256 \(of 600\)"):
        import_dataset(root / "train.csv", tmp_path / "out", "csv")
    assert len(seen) == pipeline_mod.CHUNK  # one chunk read, not all 600
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("storage", ["bytes", "copy", "link"])
def test_storage_modes_hold_identical_pixels(tmp_path: Path, storage: str) -> None:
    src = make_csv(tmp_path / "cc3m", 12)
    res = import_dataset(src, tmp_path / storage, "csv", {"storage": storage})
    assert res.storage == storage
    pd = fmt.load_pair_dataset(tmp_path / storage)
    cs = fmt.image_cells(pd.ds)
    if storage == "bytes":
        assert all(c["bytes"] is not None and c["path"] is None for c in cs)
        assert not (tmp_path / storage / "images").exists()
    else:
        assert [c["path"] for c in cs] == [f"images/images/{i:03d}.png" for i in range(12)]
        assert all(c["bytes"] is None for c in cs)
        stored = tmp_path / storage / "images" / "images" / "003.png"
        same_inode = stored.stat().st_ino == (tmp_path / "cc3m" / "images" / "003.png").stat().st_ino
        assert same_inode == (storage == "link")  # hard link on one file system, a real copy otherwise
        assert res.meta.counts["image_files"] == 12
    expected = torch.from_numpy(np.stack([pixels(i) for i in range(12)])).permute(0, 3, 1, 2)
    assert torch.equal(fmt.images_to_tensor(pd.ds, root=pd.path), expected)


def test_path_based_dataset_is_stored_as_paths_not_embedded(tmp_path: Path) -> None:
    """save_to_disk would embed the files of a datasets.Image column: the struct storage keeps paths."""
    src = make_csv(tmp_path / "cc3m", 6)
    import_dataset(src, tmp_path / "out", "csv", {"storage": "copy"})
    arrow_bytes = sum(f.stat().st_size for f in (tmp_path / "out" / "data").glob("*.arrow"))
    image_bytes = sum(f.stat().st_size for f in (tmp_path / "out" / "images").rglob("*.png"))
    assert arrow_bytes < image_bytes / 2
    pd = fmt.load_pair_dataset(tmp_path / "out")
    assert isinstance(pd.ds.features["image"], datasets.Image)  # loaded as an Image column again
    assert np.array_equal(fmt.decode_image(fmt.image_cells(pd.ds)[2], pd.path), pixels(2))


def test_moved_dataset_still_loads_and_dedupes_repeated_images(tmp_path: Path) -> None:
    root = tmp_path / "src"
    save_image(root / "a.png", pixels(1))
    save_image(root / "b.png", pixels(2))
    (root / "t.csv").write_text("image,caption\na.png,first\na.png,second\nb.png,third\n")
    import_dataset(root / "t.csv", tmp_path / "out", "csv", {"storage": "copy"})
    assert sorted(p.name for p in (tmp_path / "out" / "images").iterdir()) == ["a.png", "b.png"]
    os.replace(tmp_path / "out", tmp_path / "moved")  # paths are relative to the dataset directory
    pd = fmt.load_pair_dataset(tmp_path / "moved")
    imgs = fmt.images_to_tensor(pd.ds, root=pd.path)
    assert pd.captions == ["first", "second", "third"] and torch.equal(imgs[0], imgs[1])


def test_tsv_with_custom_columns_labels_and_classnames(tmp_path: Path) -> None:
    root = tmp_path / "roclip"
    lines = ["filepath\ttitle\tcls"]
    for i in range(12):
        save_image(root / "img" / f"{i}.jpg", pixels(i), "JPEG")
        lines.append(f"img/{i}.jpg\ta {CLASSES[i % 3]} photo {i}\t{CLASSES[i % 3] if i % 2 else i % 3}")
    (root / "train.tsv").write_text("\n".join(lines) + "\n")
    names = tmp_path / "names.txt"
    names.write_text("\n".join(CLASSES[:3]) + "\n")
    res = ok(invoke("data", "import", root / "train.tsv", tmp_path / "out", "-f", "tsv", "--image-column",
                    "filepath", "--caption-column", "title", "--label-column", "cls", "--classnames", names, "--json"))
    out = json.loads(res.stdout)
    assert out["rows"] == 12 and out["kind"] == "pairs" and out["storage"] == "bytes"
    pd = fmt.load_pair_dataset(tmp_path / "out")
    assert pd.ds["label"] == [i % 3 for i in range(12)]  # indices and names both map to the class index
    assert pd.meta.classnames == CLASSES[:3] and pd.meta.templates == list(DEFAULT_TEMPLATES)
    assert pd.captions[4] == "a dog photo 4"
    # the same file read as CSV with --delimiter
    res = ok(invoke("data", "import", root / "train.tsv", tmp_path / "out2", "-f", "csv", "--delimiter", "\t",
                    "--image-column", "filepath", "--caption-column", "title"))
    assert fmt.load_pair_dataset(tmp_path / "out2").captions == pd.captions


def test_limit_workers_and_verify(tmp_path: Path) -> None:
    src = make_csv(tmp_path / "cc3m", 30)
    a = import_dataset(src, tmp_path / "a", "csv", {"workers": 1})
    b = import_dataset(src, tmp_path / "b", "csv", {"workers": 2})
    assert a.meta.fingerprint == b.meta.fingerprint  # worker processes change nothing in the result
    assert import_dataset(src, tmp_path / "c", "csv", {"limit": 7}).rows == 7
    # a truncated JPEG: its header reads fine, decoding it fails
    jpeg = encoded(pixels(0, (64, 64)), "JPEG")
    (tmp_path / "cc3m" / "images" / "005.png").write_bytes(jpeg[: len(jpeg) // 2])
    d = import_dataset(src, tmp_path / "d", "csv", {"max_bad_fraction": 0.1})
    assert d.rows == 29 and d.skipped == {"unreadable_image": 1}
    assert import_dataset(src, tmp_path / "e", "csv", {"verify": "header", "storage": "link"}).rows == 30
    assert import_dataset(src, tmp_path / "f", "csv", {"verify": "none", "storage": "link"}).rows == 30


def test_image_size_resizes_and_centre_crops(tmp_path: Path) -> None:
    root = tmp_path / "src"
    wide = np.zeros((20, 40, 3), dtype=np.uint8)
    wide[:, 10:30] = 255  # the white centre survives a centre crop
    save_image(root / "wide.png", wide)
    save_image(root / "small.jpg", pixels(3, (12, 12)), "JPEG")
    (root / "t.csv").write_text("image,caption\nwide.png,wide\nsmall.jpg,small\n")
    import_dataset(root / "t.csv", tmp_path / "out", "csv", {"image_size": 16, "storage": "copy"})
    pd = fmt.load_pair_dataset(tmp_path / "out")
    assert [c["path"] for c in fmt.image_cells(pd.ds)] == ["images/wide.s16.png", "images/small.s16.jpg"]
    imgs = fmt.images_to_tensor(pd.ds, root=pd.path)
    assert imgs.shape == (2, 3, 16, 16)
    assert imgs[0].float().mean() > 250  # 40x20 → 32x16 → centre 16x16: all white


# --------------------------------------------------------------------------------------------------
# bad input


def ok(result: Result) -> Result:
    assert result.exit_code == 0, (result.output, result.exception)
    return result


def test_bad_input_is_one_line(tmp_path: Path) -> None:
    src = make_csv(tmp_path / "cc3m", 4)
    out = tmp_path / "out"
    one_line_error(invoke("data", "import", src, out, "--format", "parquet"), "unknown format 'parquet'",
                   "csv", "otcbench list formats")
    one_line_error(invoke("data", "import", src, out, "--format", "cvs"), "did you mean 'csv'")
    one_line_error(invoke("data", "import", tmp_path / "nope.csv", out, "--format", "csv"), "nope.csv does not exist")
    one_line_error(invoke("data", "import", src, out, "--format", "csv", "--caption-column", "text"),
                   "no column 'text'", "columns: image, caption", "--caption-column")
    (tmp_path / "semi.csv").write_text("image;caption\na.png;x\n")
    one_line_error(invoke("data", "import", tmp_path / "semi.csv", out, "--format", "csv"), "--delimiter")
    (tmp_path / "empty.csv").write_text("")
    one_line_error(invoke("data", "import", tmp_path / "empty.csv", out, "--format", "csv"), "is empty")
    (tmp_path / "header.csv").write_text("image,caption\n")
    one_line_error(invoke("data", "import", tmp_path / "header.csv", out, "--format", "csv"), "no rows")
    (tmp_path / "emptydir").mkdir()
    one_line_error(invoke("data", "import", tmp_path / "emptydir", out, "--format", "imagefolder"), "no class folders")
    one_line_error(invoke("data", "import", src, out, "--format", "csv", "--regions", "crop"),
                   "--regions does not apply to --format csv")
    one_line_error(invoke("data", "import", src, out, "--format", "csv", "--bytes", "--link-images"),
                   "exclude each other")
    one_line_error(invoke("data", "import", src, out, "--format", "csv", "--verify", "maybe"), "verify")
    one_line_error(invoke("data", "import", src, out, "--format", "csv", "--classnames", tmp_path / "no.txt"),
                   "no such file")
    one_line_error(invoke("data", "import", src, src.parent, "--format", "csv"), "already exists")
    assert not out.exists() and leftovers(tmp_path) == []


def test_bad_input_in_every_format_is_one_line(tmp_path: Path) -> None:
    """The importers' bad-input list, format by format: an unknown format, a table without the needed columns,
    an empty source — each one ``error:`` line, exit 2, nothing written."""
    out = tmp_path / "out"
    save_image(tmp_path / "a.png", pixels(0))

    def fails(src: Path | str, fmt_name: str, *fragments: str) -> None:
        one_line_error(invoke("data", "import", src, out, "--format", fmt_name), *fragments)

    # no format at all: one line naming the formats, not click's usage box
    one_line_error(invoke("data", "import", tmp_path / "a.png", out), "--format is required", "csv", "webdataset")
    # unknown format, also from Python
    fails(tmp_path / "a.png", "jpeg-folder", "unknown format 'jpeg-folder'", "known: coco, csv")
    with pytest.raises(UserError, match="unknown format 'parquet'"):
        import_dataset(tmp_path / "a.png", out, "parquet")
    # tables without the needed columns, by their default names: the error lists the columns there are
    (tmp_path / "other.csv").write_text("file,text\na.png,x\n")
    fails(tmp_path / "other.csv", "csv", "no column 'image'", "columns: file, text", "--image-column")
    (tmp_path / "nocap.csv").write_text("image\na.png\n")
    fails(tmp_path / "nocap.csv", "csv", "no column 'caption'", "--caption-column")
    (tmp_path / "other.tsv").write_text("file\ttext\na.png\tx\n")
    fails(tmp_path / "other.tsv", "tsv", "no column 'image'", "--image-column")
    (tmp_path / "nolabel.csv").write_text("image,caption\na.png,x\n")
    fails(tmp_path / "nolabel.csv", "labelcsv", "no column 'label'", "columns: image, caption", "--label-column")
    # empty sources
    (tmp_path / "labels-header.csv").write_text("image,label\n")
    fails(tmp_path / "labels-header.csv", "labelcsv", "no rows")
    (tmp_path / "noshards").mkdir()
    fails(tmp_path / "noshards", "webdataset", "holds no .tar shards")
    tarfile.open(tmp_path / "empty.tar", "w").close()
    fails(tmp_path / "empty.tar", "webdataset", "hold no samples")
    (tmp_path / "coco.json").write_text(json.dumps({"images": [], "annotations": []}))
    fails(tmp_path / "coco.json", "coco", "lists no images or no captions")
    (tmp_path / "vg.json").write_text("[]")
    fails(tmp_path / "vg.json", "vg", "not a Visual Genome region descriptions file", "non-empty list")
    (tmp_path / "classes" / "cat").mkdir(parents=True)
    (tmp_path / "classes" / "dog").mkdir()
    fails(tmp_path / "classes", "imagefolder", "holds no images")
    # a zero-row save_to_disk directory (datasets itself cannot load it back: IndexError)
    datasets.Dataset.from_dict({"image": [], "caption": []}).save_to_disk(str(tmp_path / "emptyhf"))
    fails(tmp_path / "emptyhf", "hf", "is a Hugging Face dataset with no rows")
    assert not out.exists() and leftovers(tmp_path) == []


def test_stored_paths_cannot_escape_the_dataset_root(tmp_path: Path) -> None:
    secret = save_image(tmp_path / "secret.png", pixels(0))
    for bad in ("../secret.png", str(secret)):
        ds = fmt.build_pair_dataset([bad], ["x"])
        with pytest.raises(UserError, match="outside the dataset directory"):
            fmt.images_to_tensor(ds, root=tmp_path / "data")
        with pytest.raises(UserError, match="outside the dataset directory"):
            fmt.image_bytes(ds, tmp_path / "data")
    ds = fmt.build_pair_dataset(["gone.png"], ["x"])
    with pytest.raises(UserError, match=r"row 0 \(gone.png\).*could not be read"):
        fmt.images_to_tensor(ds, root=tmp_path)


def test_interrupted_import_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = make_csv(tmp_path / "cc3m", 8)
    calls = []

    def boom(task):  # noqa: ANN001, ANN202
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return real(task)

    real = pipeline_mod.load_image
    monkeypatch.setattr(pipeline_mod, "load_image", boom)
    with pytest.raises(KeyboardInterrupt):
        import_dataset(src, tmp_path / "out", "csv", {"storage": "copy"})
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


# --------------------------------------------------------------------------------------------------
# coco, vg, webdataset, hf


def make_coco(root: Path, n_images: int = 6) -> Path:
    images, anns = [], []
    aid = 100
    for i in range(n_images):
        fname = f"{i:012d}.jpg"
        save_image(root / "train2017" / fname, pixels(i), "JPEG")
        images.append({"id": 10 + i, "file_name": fname, "width": 32, "height": 32})
        for j in range(2 + i % 2):  # 2 or 3 captions
            aid -= 1  # ids descending: ordering must come from the ids, not the file
            anns.append({"image_id": 10 + i, "id": aid, "caption": f"  image {i} caption {j}\n"})
    anns.append({"image_id": 999, "id": 1, "caption": "orphan"})
    anns.append({"image_id": 10, "id": 2, "caption": "   "})
    p = root / "annotations" / "captions_train2017.json"
    p.parent.mkdir(parents=True)
    p.write_text(json.dumps({"info": {}, "images": images, "annotations": anns}))
    return p


def test_coco_per_caption_and_per_image(tmp_path: Path) -> None:
    src = make_coco(tmp_path / "coco")
    res = import_dataset(src, tmp_path / "pairs", "coco")  # image root found: annotations/../train2017
    assert res.rows == 15  # 3 images x 2 + 3 x 3
    assert res.skipped == {"unknown_image_id": 1, "empty_caption": 1}
    pd = fmt.load_pair_dataset(tmp_path / "pairs")
    assert pd.captions[:2] == ["image 0 caption 1", "image 0 caption 0"]  # annotation id order, stripped
    imgs = fmt.images_to_tensor(pd.ds, root=pd.path)
    assert torch.equal(imgs[0], imgs[1]) and not torch.equal(imgs[1], imgs[2])
    res = import_dataset(src, tmp_path / "per-image", "coco", {"per_image": True, "storage": "link"})
    pd = fmt.load_pair_dataset(tmp_path / "per-image")
    assert res.rows == 6 and pd.captions[3] == "image 3 caption 2"
    assert fmt.image_cells(pd.ds)[3]["path"] == "images/000000000003.jpg"
    with pytest.raises(UserError, match="pass --image-root"):
        os.replace(tmp_path / "coco" / "train2017", tmp_path / "elsewhere")
        import_dataset(src, tmp_path / "x", "coco")
    assert import_dataset(src, tmp_path / "y", "coco", {"image_root": str(tmp_path / "elsewhere")}).rows == 15
    (tmp_path / "bad.json").write_text(json.dumps({"images": []}))
    with pytest.raises(UserError, match="not a COCO captions file"):
        import_dataset(tmp_path / "bad.json", tmp_path / "z", "coco")


def make_vg(root: Path) -> Path:
    regions_doc, image_data = [], []
    for i in range(1, 5):
        sub = "VG_100K" if i % 2 else "VG_100K_2"
        save_image(root / sub / f"{i}.jpg", gradient(i, (40, 30)), "JPEG")
        image_data.append({"image_id": i, "url": f"https://cs.stanford.edu/people/rak248/{sub}/{i}.jpg",
                           "width": 40, "height": 30})
        regions_doc.append({"id": i, "regions": [
            {"region_id": i * 10 + 0, "image_id": i, "phrase": f"red thing {i}", "x": 2, "y": 3, "width": 20,
             "height": 16},
            {"region_id": i * 10 + 1, "image_id": i, "phrase": f"tiny dot {i}", "x": 5, "y": 5, "width": 4,
             "height": 4},
            {"region_id": i * 10 + 2, "image_id": i, "phrase": f"edge {i}", "x": 30, "y": 20, "width": 30,
             "height": 30},  # runs off the image: clamped to 10x10
        ]})
    regions_doc.append({"id": 77, "regions": [{"region_id": 770, "image_id": 77, "phrase": "lost", "x": 0, "y": 0,
                                               "width": 20, "height": 20}]})
    (root / "image_data.json").write_text(json.dumps(image_data))
    (root / "region_descriptions.json").write_text(json.dumps(regions_doc))
    return root / "region_descriptions.json"


def test_visual_genome_whole_crop_and_per_image(tmp_path: Path) -> None:
    src = make_vg(tmp_path / "vg")
    opts = {"max_bad_fraction": 0.5}
    whole = import_dataset(src, tmp_path / "whole", "vg", opts)
    assert whole.rows == 12 and whole.skipped == {"missing_image": 1}  # image 77 has no file
    pd = fmt.load_pair_dataset(tmp_path / "whole")
    assert pd.captions[:3] == ["red thing 1", "tiny dot 1", "edge 1"]
    assert fmt.images_to_tensor(pd.ds, root=pd.path).shape == (12, 3, 30, 40)

    crop = import_dataset(tmp_path / "vg", tmp_path / "crop", "vg", {**opts, "regions": "crop", "storage": "copy"})
    assert crop.rows == 8 and crop.skipped == {"missing_image": 1, "small_region": 4}
    pd = fmt.load_pair_dataset(tmp_path / "crop")
    cs = fmt.image_cells(pd.ds)
    assert cs[0]["path"] == "images/VG_100K/1.x2y3w20h16.jpg" and cs[3]["path"].startswith("images/VG_100K_2/2.")
    first = fmt.decode_image(cs[0], pd.path)
    assert first.shape == (16, 20, 3) and fmt.decode_image(cs[1], pd.path).shape == (10, 10, 3)
    full = np.asarray(Image.open(tmp_path / "vg" / "VG_100K" / "1.jpg").convert("RGB")).astype(int)
    assert np.abs(first.astype(int) - full[3:19, 2:22]).mean() < 2  # the region's pixels (JPEG re-encoded)
    assert np.abs(first.astype(int) - full[4:20, 3:23]).mean() > 5  # … and not the pixels one step off

    per = import_dataset(src, tmp_path / "per", "vg", {**opts, "per_image": True})
    assert per.rows == 4 and fmt.load_pair_dataset(tmp_path / "per").captions[1] == "red thing 2"
    assert import_dataset(src, tmp_path / "two", "vg", {**opts, "max_regions": 2}).rows == 8
    os.remove(tmp_path / "vg" / "image_data.json")  # without it, files are found by id in VG_100K*/
    assert import_dataset(src, tmp_path / "noidx", "vg", opts).rows == 12


def make_shards(root: Path, n_shards: int = 2, per: int = 10) -> None:
    root.mkdir(parents=True)
    k = 0
    for s in range(n_shards):
        with tarfile.open(root / f"{s:05d}.tar", "w") as tf:
            for _ in range(per):
                members = {"jpg" if k % 2 else "png": encoded(pixels(k), "JPEG" if k % 2 else "PNG"),
                           "txt": f"shard {s} sample {k}".encode()}
                if k == 3:
                    del members["txt"]  # no caption
                if k == 4:
                    members["cls"] = b"2"
                if k == 5:
                    members = {"txt": b"caption without image"}
                for ext, blob in members.items():
                    info = tarfile.TarInfo(f"sample{k:06d}.{ext}")
                    info.size = len(blob)
                    tf.addfile(info, io.BytesIO(blob))
                k += 1


def test_webdataset_shards_by_pattern_and_directory(tmp_path: Path) -> None:
    make_shards(tmp_path / "wds")
    res = import_dataset(f"{tmp_path}/wds/{{00000..00001}}.tar", tmp_path / "a", "webdataset",
                         {"max_bad_fraction": 0.1})
    assert res.rows == 18 and res.skipped == {"missing_caption": 1, "missing_image": 1}
    pd = fmt.load_pair_dataset(tmp_path / "a")
    assert pd.captions[0] == "shard 0 sample 0" and pd.captions[-1] == "shard 1 sample 19"
    assert pd.ds["label"][3] == 2 and pd.ds["label"][0] == -1  # sample 4 (row 3) has a .cls
    imgs = fmt.images_to_tensor(pd.ds, root=pd.path)
    assert torch.equal(imgs[0], torch.from_numpy(pixels(0)).permute(2, 0, 1))  # PNG: bit-exact
    import_dataset(tmp_path / "wds", tmp_path / "b", "webdataset", {"max_bad_fraction": 0.1, "storage": "copy"})
    pd_b = fmt.load_pair_dataset(tmp_path / "b")
    assert pd_b.captions == pd.captions
    assert fmt.image_cells(pd_b.ds)[1]["path"] == "images/00000-00000/sample000001.jpg"
    assert torch.equal(fmt.images_to_tensor(pd_b.ds, root=pd_b.path), imgs)
    with pytest.raises(UserError, match="1 of 3 shards"):
        import_dataset(f"{tmp_path}/wds/{{00000..00002}}.tar", tmp_path / "c", "webdataset")


def test_brace_expansion_and_keys() -> None:
    assert expand_braces("s/{000..002}.tar") == ["s/000.tar", "s/001.tar", "s/002.tar"]
    assert expand_braces("{a,b}-{1..2}") == ["a-1", "a-2", "b-1", "b-2"]
    assert expand_braces("plain.tar") == ["plain.tar"]
    assert split_key("dir/abc.seg.png") == ("dir/abc", "seg.png")
    with pytest.raises(UserError, match="backwards"):
        expand_braces("{5..1}")


def test_hf_dataset_on_disk_and_offline_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ds = datasets.Dataset.from_dict(
        {"img": [{"bytes": encoded(pixels(i)), "path": None} for i in range(8)],
         "text": [[f"a {i}", f"b {i}"] if i % 2 else [f"c {i}"] for i in range(8)]},
        features=datasets.Features({"img": datasets.Image(), "text": datasets.Sequence(datasets.Value("string"))}),
    )
    datasets.DatasetDict({"train": ds, "validation": ds.select(range(2))}).save_to_disk(str(tmp_path / "hfds"))
    res = import_dataset(tmp_path / "hfds", tmp_path / "a", "hf", {"image_column": "img", "caption_column": "text"})
    assert res.rows == 12  # lists of captions: one pair per caption
    pd = fmt.load_pair_dataset(tmp_path / "a")
    assert pd.captions[:3] == ["c 0", "a 1", "b 1"]
    imgs = fmt.images_to_tensor(pd.ds, root=pd.path)
    assert torch.equal(imgs[1], imgs[2]) and torch.equal(imgs[0], torch.from_numpy(pixels(0)).permute(2, 0, 1))
    assert import_dataset(tmp_path / "hfds", tmp_path / "b", "hf", {"image_column": "img", "caption_column": "text",
                                                                    "split": "validation"}).rows == 3
    with pytest.raises(UserError, match="no split 'test'"):
        import_dataset(tmp_path / "hfds", tmp_path / "c", "hf", {"split": "test"})
    with pytest.raises(UserError, match="no column 'image'"):
        import_dataset(tmp_path / "hfds", tmp_path / "c", "hf")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    line = one_line_error(invoke("data", "import", "someone/cc3m-mini", tmp_path / "d", "-f", "hf"),
                          "not a local directory", "offline")
    assert "someone/cc3m-mini" in line


# --------------------------------------------------------------------------------------------------
# eval sets: imagefolder, labelcsv


def make_folders(root: Path, per_class: int = 10, classes: list[str] = CLASSES, sizes: bool = False) -> Path:
    for c, name in enumerate(classes):
        for i in range(per_class):
            size = (32 + (i % 2) * 8, 32) if sizes else (32, 32)
            save_image(root / name.replace(" ", "_") / f"img{i}.png", pixels(100 * c + i, size, cls=c))
    (root / classes[0] / "notes.txt").write_text("not an image")
    return root


def test_imagefolder_eval_set_splits(tmp_path: Path) -> None:
    src = make_folders(tmp_path / "folders")
    res = ok(invoke("data", "import", src, tmp_path / "ev", "-f", "imagefolder", "--splits",
                    "train=0.5,val=0.2,test=0.3", "--seed", "1"))
    assert "train 30, val 12, test 18; 6 classes" in " ".join(res.stdout.split())
    es = fmt.load_eval_set(tmp_path / "ev")
    assert es.classnames == sorted(CLASSES) and es.templates == list(DEFAULT_TEMPLATES)
    assert set(es.splits) == {"train", "val", "test"}
    for split, per in (("train", 5), ("val", 2), ("test", 3)):
        assert np.bincount(es.splits[split]["label"]).tolist() == [per] * 6  # stratified per class
    test_imgs = fmt.images_to_tensor(es.splits["test"], root=es.path)
    assert test_imgs.shape == (18, 3, 32, 32)
    # same seed → same assignment; another seed → another one
    import_dataset(src, tmp_path / "ev2", "imagefolder", {"splits": "train=0.5,val=0.2,test=0.3", "seed": 1})
    import_dataset(src, tmp_path / "ev3", "imagefolder", {"splits": "train=0.5,val=0.2,test=0.3", "seed": 2})
    fps = [json.loads((tmp_path / n / fmt.META_FILE).read_text())["fingerprint"] for n in ("ev", "ev2", "ev3")]
    assert fps[0] == fps[1] != fps[2]
    counts = import_dataset(src, tmp_path / "ev4", "imagefolder", {"splits": "train=3,test=4,targets=1"})
    assert counts.meta.counts["train"] == 18 and counts.meta.counts["targets"] == 6
    assert counts.skipped == {"not_in_splits": 12}  # 10 - 8 per class left out


def test_imagefolder_presplit_classnames_templates_and_sizes(tmp_path: Path) -> None:
    root = tmp_path / "split"
    make_folders(root / "train", 3, CLASSES[:3])
    make_folders(root / "test", 2, CLASSES[:3])
    (root / "test" / "zebra").mkdir()  # an empty class folder is still a class
    names = tmp_path / "names.txt"
    names.write_text("tabby cat\nsparrow\ngolden retriever\nzebra\n")  # sorted folder order: bird cat dog zebra
    res = import_dataset(root, tmp_path / "ev", "imagefolder", {"classnames": str(names), "templates": "imagenet"})
    es = fmt.load_eval_set(tmp_path / "ev")
    assert es.classnames == ["tabby cat", "sparrow", "golden retriever", "zebra"]
    assert len(es.templates) == 80 and es.templates[0] == "a bad photo of a {}."
    assert res.meta.counts["train"] == 9 and res.meta.counts["test"] == 6
    assert sorted(set(es.splits["test"]["label"])) == [0, 1, 2]  # bird→0 (tabby cat) … by sorted order
    with pytest.raises(UserError, match="already split"):
        import_dataset(root, tmp_path / "x", "imagefolder", {"splits": "test=1.0"})
    with pytest.raises(UserError, match="not one of the 1000 class names"):
        import_dataset(root, tmp_path / "x", "imagefolder", {"classnames": "imagenet"})
    mixed = make_folders(tmp_path / "mixed", 4, CLASSES[:2], sizes=True)
    with pytest.raises(UserError, match=r"differ in size \(32x32, 40x32: .*img1.png\).*pass --image-size PX"):
        import_dataset(mixed, tmp_path / "x", "imagefolder")
    res = import_dataset(mixed, tmp_path / "sized", "imagefolder", {"image_size": 24, "splits": "train=0.5,test=0.5"})
    es = fmt.load_eval_set(tmp_path / "sized")
    assert fmt.images_to_tensor(es.splits["train"], root=es.path).shape == (4, 3, 24, 24)
    assert not list(tmp_path.glob(".x*"))


def test_imagenet_classnames_map_wnid_folders_in_sorted_order(tmp_path: Path) -> None:
    import open_clip

    root = tmp_path / "inet"
    wnids = [f"n{10000000 + 7 * i:08d}" for i in range(1000)]
    for w in wnids:
        (root / w).mkdir(parents=True)
    for i in (0, 1, 999):
        save_image(root / wnids[i] / "x.png", pixels(i))
    res = import_dataset(root, tmp_path / "ev", "imagefolder", {"classnames": "imagenet", "splits": "test=1.0"})
    es = fmt.load_eval_set(tmp_path / "ev")
    assert es.classnames == list(open_clip.IMAGENET_CLASSNAMES) and len(es.templates) == 80
    assert sorted(es.splits["test"]["label"]) == [0, 1, 999] and res.rows == 3


def test_labelcsv_eval_set(tmp_path: Path) -> None:
    root = tmp_path / "lab"
    lines = ["path,y,part"]
    for i in range(12):
        save_image(root / "im" / f"{i}.png", pixels(i, cls=i % 3))
        lines.append(f"im/{i}.png,{i % 3},{'test' if i < 6 else 'train'}")
    (root / "labels.csv").write_text("\n".join(lines) + "\n")
    names = tmp_path / "n.json"
    names.write_text(json.dumps(["ant", "bee", "cow"]))
    opts = {"image_column": "path", "label_column": "y", "split_column": "part", "classnames": str(names)}
    res = import_dataset(root / "labels.csv", tmp_path / "ev", "labelcsv", opts)
    es = fmt.load_eval_set(tmp_path / "ev")
    assert es.classnames == ["ant", "bee", "cow"] and res.meta.counts["test"] == 6 and res.meta.counts["train"] == 6
    assert es.splits["test"]["label"] == [0, 1, 2, 0, 1, 2]
    with pytest.raises(UserError, match="labels are class indices; pass --classnames"):
        import_dataset(root / "labels.csv", tmp_path / "x", "labelcsv", {"image_column": "path", "label_column": "y"})
    lines = ["image,label"] + [f"im/{i}.png,{['ant', 'bee'][i % 2]}" for i in range(12)]
    (root / "names.csv").write_text("\n".join(lines) + "\n")
    import_dataset(root / "names.csv", tmp_path / "ev2", "labelcsv", {"splits": "test=0.5,train=0.5"})
    es = fmt.load_eval_set(tmp_path / "ev2")
    assert es.classnames == ["ant", "bee"] and len(es.splits["test"]) == 6


def test_split_helpers() -> None:
    assert parse_splits(None) == ("fraction", {"train": 0.5, "val": 0.1, "test": 0.4})
    assert parse_splits("train=20,test=5") == ("count", {"train": 20.0, "test": 5.0})
    for bad, msg in (("train=0.5", "needs a test split"), ("test=0.7,train=0.5", "add up to"),
                     ("test=2,train=0.5", "either fractions"), ("tset=1", "NAME in"), ("test=x", "not a number")):
        with pytest.raises(UserError, match=msg):
            parse_splits(bad)
    labels = [0] * 10 + [1] * 4
    s = assign_splits(labels, "train=0.5,test=0.5", 0, ["a", "b"])
    assert s.count("train") == 7 and s.count("test") == 7
    assert assign_splits(labels, "train=0.5,test=0.5", 0, ["a", "b"]) == s
    with pytest.raises(UserError, match="class 'b' has 4"):
        assign_splits(labels, "train=3,test=2", 0, ["a", "b"])
    assert resolve_labels(["b_x", "a"], None, "w") == (["a", "b x"], [1, 0])


# --------------------------------------------------------------------------------------------------
# training, evaluation and poisoning on imported data


def tiny_job(data: Path, **train: object) -> TrainJob:
    return TrainJob.model_validate({
        "data": str(data), "model": {"name": "otc-rn-nano"},
        "train": TrainConfig(**{"epochs": 1, "batch_size": 16, "threads": 1, "device": "cpu", "log_every": 1,
                                **train}).model_dump(mode="json"),
    })


def make_class_csv(root: Path, n: int = 48) -> Path:
    lines = ["image,caption,label"]
    for i in range(n):
        c = i % 6
        save_image(root / "images" / f"{i:03d}.png", pixels(1000 + i, cls=c))
        lines.append(f"images/{i:03d}.png,a photo of a {CLASSES[c]},{c}")
    (root / "train.csv").write_text("\n".join(lines) + "\n")
    return root / "train.csv"


@pytest.mark.slow
def test_imported_pairs_train_and_imported_eval_set_evaluates(tmp_path: Path) -> None:
    from otcbench.eval.run import evaluate
    from otcbench.train.loop import Trainer

    csv_path = make_class_csv(tmp_path / "pairs-src")
    names = tmp_path / "classes.txt"
    names.write_text("\n".join(CLASSES) + "\n")
    import_dataset(csv_path, tmp_path / "pairs", "csv", {"storage": "link", "label_column": "label",
                                                         "classnames": str(names)})
    import_dataset(make_folders(tmp_path / "folders", 6), tmp_path / "ev", "imagefolder",
                   {"splits": "train=0.5,val=0.17,test=0.33", "storage": "copy"})
    last = Trainer(tiny_job(tmp_path / "pairs"), tmp_path / "run", show_progress=False).fit()
    assert last.is_file()
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    steps = [r for r in log if r["type"] == "step"]
    assert len(steps) == 3 and all(np.isfinite(r["loss"]) for r in steps)  # 48 pairs / batch 16
    metrics = evaluate(tmp_path / "run", tmp_path / "ev", EvalConfig(device="cpu"))
    assert metrics["n_test"] == 12 and 0 <= metrics["zeroshot_top1"] <= 1 and 0 <= metrics["linear_probe_top1"] <= 1


def test_poisoning_a_path_based_dataset_writes_only_poisoned_images(tmp_path: Path) -> None:
    from otcbench.models import get_tokenizer
    from otcbench.train.data import load_train_data

    csv_path = make_class_csv(tmp_path / "src")
    names = tmp_path / "classes.txt"
    names.write_text("\n".join(CLASSES) + "\n")
    clean = tmp_path / "data" / "clean"
    import_dataset(csv_path, clean, "csv", {"storage": "link", "label_column": "label", "classnames": str(names)})
    before = {p: p.stat().st_mtime_ns for p in clean.rglob("*")}
    out = tmp_path / "data" / "badnet"
    meta = poison_dataset(clean, out, attack_options(["badnet"], ["count=4", "target=dog"]), seed=0)
    assert {p: p.stat().st_mtime_ns for p in clean.rglob("*")} == before  # the source is never written

    link = out / SOURCE_LINK
    assert link.is_symlink() and os.readlink(link) == "../clean" and link.resolve() == clean.resolve()
    assert not (out / "images").exists()  # no clean image was copied
    cs = cells(out)
    rows = meta.poison["attacks"][0]["rows"]
    assert len(cs) == 52 and rows == [48, 49, 50, 51]
    assert all(c["path"] == f"source/images/images/{i:03d}.png" and c["bytes"] is None for i, c in enumerate(cs[:48]))
    assert all(c["bytes"] is not None and c["path"] is None for c in cs[48:])
    assert meta.poison["source"]["link"] == SOURCE_LINK
    # clean rows read through the link are the clean images; poisoned rows carry the trigger
    pd = fmt.load_pair_dataset(out)
    imgs = fmt.images_to_tensor(pd.ds, root=pd.path)
    src_rows = meta.poison["attacks"][0]["source_rows"]
    clean_imgs = fmt.images_to_tensor(fmt.load_pair_dataset(clean).ds, root=clean)
    assert torch.equal(imgs[:48], clean_imgs)
    assert all(not torch.equal(imgs[48 + j], clean_imgs[r]) for j, r in enumerate(src_rows))
    assert pd.poison_flags[48:] == ["badnet"] * 4 and pd.ds["caption"][48].count("dog") == 1
    # the trainer reads it (paths resolved through the link, inside the dataset directory)
    data = load_train_data(pd, get_tokenizer("otc-rn-nano"), 32)
    assert data.images.shape == (52, 3, 32, 32) and data.poison.count("badnet") == 4
    # poisoning the poisoned set chains the links: still only new rows get bytes
    meta2 = poison_dataset(out, tmp_path / "data" / "twice", attack_options(["blended"], ["count=2", "target=cat"]))
    cs2 = cells(tmp_path / "data" / "twice")
    assert cs2[0]["path"] == "source/source/images/images/000.png" and cs2[50]["bytes"] is not None
    assert meta2.counts["poisoned"] == 6
    twice = fmt.load_pair_dataset(tmp_path / "data" / "twice")
    assert torch.equal(fmt.images_to_tensor(twice.ds, root=twice.path)[:52], imgs)


def test_eval_set_carried_by_imported_pairs_feeds_targeted_poisoning(tmp_path: Path) -> None:
    ev = tmp_path / "ev"
    import_dataset(make_folders(tmp_path / "folders", 6), ev, "imagefolder",
                   {"splits": "train=0.5,test=0.33,targets=0.17"})
    csv_path = make_class_csv(tmp_path / "src", 24)
    res = ok(invoke("data", "import", csv_path, tmp_path / "pairs", "-f", "csv", "--eval-set", ev, "--link-images"))
    assert "images stored as link" in " ".join(res.stdout.split())
    pd = fmt.load_pair_dataset(tmp_path / "pairs")
    assert pd.meta.classnames == sorted(CLASSES) and pd.meta.eval_set == "eval"
    assert fmt.load_eval_set(tmp_path / "pairs").classnames == sorted(CLASSES)
    meta = poison_dataset(tmp_path / "pairs", tmp_path / "targeted",
                          attack_options(["targeted"], ["n_targets=2", "poisons_per_target=3", "caption_source=names"]))
    assert meta.counts["poisoned"] == 6 and len(cells(tmp_path / "targeted")) == 30
    assert (tmp_path / "targeted" / "targets").is_dir()


def test_make_importer_validates_options() -> None:
    imp = make_importer("x.csv", "tsv", {"caption_column": "text"})
    assert imp.name == "tsv" and imp.options.caption_column == "text"  # type: ignore[attr-defined]
    with pytest.raises(UserError, match="storage"):
        make_importer("x.csv", "csv", {"storage": "cloud"})


def test_help_examples_list_formats_and_show(tmp_path: Path) -> None:
    import re

    for command in (["data", "import"], ["list", "formats"]):
        res = ok(runner.invoke(app, [*command, "--help"], env={"COLUMNS": "160"}))
        assert re.search(r"Examples?: otcbench " + " ".join(command) + r"\b", res.stdout), res.stdout
    res = ok(runner.invoke(app, ["list", "formats"], env={"COLUMNS": "200"}))
    for name in ("csv", "tsv", "coco", "vg", "webdataset", "hf", "imagefolder", "labelcsv"):
        assert re.search(rf"│ {name}\s+│", res.stdout), name
    assert "caption_ext='txt'" in res.stdout and "eval set" in res.stdout
    # data show reads a linked (path-based) dataset through its stored paths
    src = make_csv(tmp_path / "cc3m", 6)
    ok(invoke("data", "import", src, tmp_path / "out", "-f", "csv", "--link-images", "--no-progress"))
    res = ok(invoke("data", "show", tmp_path / "out", "--out", tmp_path / "grid.png", "-n", "4", "--json"))
    stats = json.loads(res.stdout)
    assert stats["rows"] == 6 and stats["fingerprint_ok"] is True and (tmp_path / "grid.png").stat().st_size > 0


def test_backdoor_on_mixed_sizes_asks_for_image_size(tmp_path: Path) -> None:
    src = make_csv(tmp_path / "src", 4)
    save_image(tmp_path / "src" / "images" / "001.png", pixels(1, (40, 32)))  # one image of another size
    names = tmp_path / "classes.txt"
    names.write_text("cat\ndog\n")
    import_dataset(src, tmp_path / "mixed", "csv", {"classnames": str(names), "storage": "link"})
    with pytest.raises(UserError, match=r"2 different sizes .*--image-size PX"):
        poison_dataset(tmp_path / "mixed", tmp_path / "p", attack_options(["badnet"], ["count=4"]))
    assert not (tmp_path / "p").exists()
    import_dataset(src, tmp_path / "sized", "csv", {"classnames": str(names), "storage": "link", "image_size": 32})
    meta = poison_dataset(tmp_path / "sized", tmp_path / "p", attack_options(["badnet"], ["count=4"]))
    assert meta.counts["poisoned"] == 4
