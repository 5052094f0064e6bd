"""The streaming training-data path (otcbench.train.stream, data.py): same pixels, same weights, bad images counted.

One tiny path-based dataset per module (48 PNG files of 32 px imported with ``--copy-images``: 3 steps of
16 per epoch with otc-rn-nano), trained in memory and streamed with 0 and 2 worker processes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from run_helpers import interrupt_at, last_state, with_defense

from otcbench.config import TrainConfig, TrainJob
from otcbench.data import format as fmt
from otcbench.data.importers import import_dataset
from otcbench.errors import UserError
from otcbench.models import get_tokenizer
from otcbench.train import data as train_data
from otcbench.train.data import LoaderOptions, load_for_model, load_train_data
from otcbench.train.loop import Trainer
from otcbench.train.stream import StreamImages, fit_square

pytestmark = pytest.mark.slow  # every test here trains (pytest -m "not slow": the quick loop)

CLASSES = ["cat", "dog", "bird", "fish"]
N = 48


def make_path_dataset(root: Path, n: int = N) -> Path:
    """``n`` random 32 px PNGs with captions and labels, imported as a path-based pair dataset."""
    rng = np.random.default_rng(0)
    src = root / "src"
    (src / "images").mkdir(parents=True)
    lines = ["image,caption,label"]
    for i in range(n):
        c = i % len(CLASSES)
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(src / "images" / f"{i:03d}.png")
        lines.append(f"images/{i:03d}.png,a photo of a {CLASSES[c]} number {i},{c}")
    (src / "t.csv").write_text("\n".join(lines) + "\n")
    (root / "names.txt").write_text("\n".join(CLASSES) + "\n")
    out = root / "data"
    import_dataset(src / "t.csv", out, "csv", {"storage": "copy", "label_column": "label",
                                               "classnames": str(root / "names.txt")})
    return out


@pytest.fixture(scope="module")
def paths_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_path_dataset(tmp_path_factory.mktemp("stream"))


def job(data: Path, model: str = "otc-rn-nano", **train: Any) -> TrainJob:
    return TrainJob.model_validate({
        "data": str(data), "model": {"name": model},
        "train": TrainConfig(**{"epochs": 1, "batch_size": 16, "threads": 1, "device": "cpu", "log_every": 1,
                                **train}).model_dump(mode="json"),
    })


def losses(run: Path) -> list[float]:
    return [r["loss"] for r in read_log(run) if r["type"] == "step"]


def read_log(run: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


def same_weights(a: Path, b: Path) -> bool:
    wa, wb = last_state(a)["model"], last_state(b)["model"]
    return all(torch.equal(wa[k], wb[k]) for k in wa)


# --------------------------------------------------------------------------------------------------
# the image source


def test_streamed_pixels_equal_decoded_pixels(paths_data: Path) -> None:
    pd = fmt.load_pair_dataset(paths_data)
    memory = fmt.images_to_tensor(pd.ds, root=pd.path)
    src = StreamImages(pd.ds, pd.path, 32, threads=2)
    rows = torch.tensor([5, 0, 47, 5])
    assert torch.equal(src[rows], memory[rows]) and torch.equal(src[3], memory[3])
    assert torch.equal(src[:4], memory[:4]) and src.shape == memory.shape and len(src) == N
    # another side: resized exactly as the in-memory path resizes
    assert torch.equal(StreamImages(pd.ds, pd.path, 24)[rows], fmt.images_to_tensor(pd.ds, size=24, root=pd.path)[rows])
    # a scan in row order reads the next chunk ahead (in a background thread): same pixels
    chunks = [src[torch.arange(0, 20)]]
    assert src._ahead is not None and src._ahead[0] == list(range(20, 40))
    chunks += [src[torch.arange(20, 40)], src[torch.arange(40, 48)]]
    assert src._ahead is None and torch.equal(torch.cat(chunks), memory)  # nothing after the last row
    assert torch.equal(src[torch.arange(10, 20)], memory[10:20]) and src._ahead is not None
    assert torch.equal(src[torch.tensor([1, 2])], memory[1:3])  # not the chunk read ahead: read now
    src.close()
    # non-square images: shorter side to the side, centre crop (the importers' --image-size)
    wide = np.zeros((10, 30, 3), dtype=np.uint8)
    wide[:, 10:20] = 255
    assert fit_square(wide, 10).shape == (10, 10, 3) and (fit_square(wide, 10) == 255).all()


def test_auto_memory_and_stream_selection(paths_data: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pd = fmt.load_pair_dataset(paths_data)
    tok = get_tokenizer("otc-rn-nano")
    assert load_for_model(pd, tok, 32, "auto", LoaderOptions()).mode == "memory"
    assert load_for_model(pd, tok, 32, "stream", LoaderOptions()).mode == "stream"
    monkeypatch.setattr(train_data, "MAX_IN_MEMORY_BYTES", N * 3 * 32 * 32 - 1)  # one byte short
    assert load_for_model(pd, tok, 32, "auto", LoaderOptions()).mode == "stream"
    # a 16 px model: memory would keep the 32 px images as stored (not 16 px): decided by what it would hold
    assert load_for_model(pd, tok, 16, "auto", LoaderOptions()).mode == "stream"
    monkeypatch.setattr(train_data, "MAX_IN_MEMORY_BYTES", N * 3 * 32 * 32)
    assert load_for_model(pd, tok, 16, "auto", LoaderOptions()).mode == "memory"
    monkeypatch.setattr(train_data, "MAX_IN_MEMORY_BYTES", N * 3 * 32 * 32 - 1)
    with pytest.raises(UserError, match="data_mode=stream"):
        load_for_model(pd, tok, 32, "memory", LoaderOptions())
    with pytest.raises(UserError, match="data_mode=stream"):
        load_train_data(pd, tok, 32)
    assert load_train_data(pd, tok, 32, mode="auto").mode == "stream"


# --------------------------------------------------------------------------------------------------
# training: in memory and streamed give the same run


def test_stream_trains_like_memory_with_and_without_workers(paths_data: Path, tmp_path: Path) -> None:
    runs = {}
    for name, opts in {"memory": {"data_mode": "memory"}, "stream0": {"data_mode": "stream"},
                       "stream2": {"data_mode": "stream", "num_workers": 2}}.items():
        runs[name] = tmp_path / name
        trainer = Trainer(job(paths_data, epochs=2, **opts), runs[name], show_progress=False)
        assert trainer.data.mode == opts["data_mode"]
        trainer.fit()
    assert len(losses(runs["memory"])) == 6
    for name in ("stream0", "stream2"):
        assert losses(runs[name]) == losses(runs["memory"])
        assert same_weights(runs[name], runs["memory"])
    env = json.loads((runs["stream2"] / "env.json").read_text())
    assert env["data_mode"] == "stream" and env["num_workers"] == 2
    assert [r["bad_images"] for r in read_log(runs["stream2"]) if r["type"] == "epoch"] == [0, 0]


def test_streamed_run_resumes_exactly(paths_data: Path, tmp_path: Path) -> None:
    ref = tmp_path / "ref"
    Trainer(job(paths_data, data_mode="memory"), ref, show_progress=False).fit()
    run = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        Trainer(job(paths_data, data_mode="stream", num_workers=2, checkpoint_every_steps=1), run,
                show_progress=False, on_step=interrupt_at(2)).fit()
    Trainer(job(paths_data, data_mode="stream", checkpoint_every_steps=1), run, resume=True,
            show_progress=False).fit()
    assert losses(run) == losses(ref) and same_weights(run, ref)


def test_streamed_torchrun_matches_one_process_in_memory(paths_data: Path, tmp_path: Path) -> None:
    """2 gloo processes, each streaming its shard of every step with a worker, train like one process."""
    one = tmp_path / "one"
    Trainer(job(paths_data, model="otc-vit-tiny", data_mode="memory"), one, show_progress=False).fit()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "otcbench",
           "train", str(paths_data), str(tmp_path / "two"), "--model", "otc-vit-tiny", "--no-progress"]
    for opt in ("epochs=1", "batch_size=16", "threads=1", "log_every=1", "device=cpu", "data_mode=stream",
                "num_workers=1"):
        cmd += ["--set", f"train.{opt}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OTCBENCH_NO_PROGRESS": "1"}
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert json.loads((tmp_path / "two" / "env.json").read_text())["data_mode"] == "stream"
    a, b = losses(one), losses(tmp_path / "two")
    assert len(a) == len(b) == 3 and torch.allclose(torch.tensor(a), torch.tensor(b), rtol=2e-3), (a, b)


def test_embedding_pass_streams_through_the_loader(paths_data: Path, tmp_path: Path) -> None:
    from otcbench.defenses.embed import embed_images

    mem = Trainer(job(paths_data, data_mode="memory"), tmp_path / "m", show_progress=False)
    stream = Trainer(job(paths_data, data_mode="stream", num_workers=2), tmp_path / "s", show_progress=False)
    reads: list[int] = []
    original = StreamImages.read

    def spy(self: StreamImages, rows: Any, pool: Any = None) -> Any:
        reads.append(len(rows))
        return original(self, rows, pool)

    # reads in this process would show up here; the loader's worker processes read instead
    StreamImages.read = spy  # type: ignore[method-assign]
    try:
        rows = torch.arange(3, 40)
        assert torch.allclose(embed_images(stream, rows), embed_images(mem, rows), atol=1e-6)
    finally:
        StreamImages.read = original  # type: ignore[method-assign]
    assert reads == []


# --------------------------------------------------------------------------------------------------
# defenses read a batch's pixels through the one accessor


def _spy_raw_images(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """Record, for each Trainer.raw_images call, whether it served the current batch's own images."""
    hits: list[bool] = []
    original = Trainer.raw_images

    def spy(self: Trainer, rows: torch.Tensor) -> torch.Tensor:
        out = original(self, rows)
        hits.append(self.current_batch is not None and out is self.current_batch.raw)
        return out

    monkeypatch.setattr(Trainer, "raw_images", spy)
    return hits


@pytest.mark.parametrize("defense,options", [
    ("otcclip", {"warmup_epochs": 0, "match_every": 1, "top_k": 4, "intra_fraction": 0.5}),
    ("roclip", {"warmup_epochs": 0, "match_every": 1, "pool_size": 32}),
])
def test_matching_defenses_on_a_streamed_dataset(paths_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                 defense: str, options: dict[str, Any]) -> None:
    hits = _spy_raw_images(monkeypatch)
    runs = {}
    for mode in ("memory", "stream"):
        runs[mode] = tmp_path / mode
        Trainer(with_defense(job(paths_data, data_mode=mode, num_workers=2 if mode == "stream" else 0),
                             defense, **options), runs[mode], show_progress=False).fit()
    assert hits and all(hits)  # the augmented views were made from the batch's own images
    assert losses(runs["stream"]) == losses(runs["memory"]) and same_weights(runs["stream"], runs["memory"])


def test_cleanclip_fine_tunes_on_a_streamed_clean_set(paths_data: Path, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    init = tmp_path / "init"
    Trainer(job(paths_data, data_mode="memory"), init, show_progress=False).fit()
    hits = _spy_raw_images(monkeypatch)
    runs = {}
    for mode in ("memory", "stream"):
        runs[mode] = tmp_path / mode
        trainer = Trainer(with_defense(job(paths_data, data_mode=mode), "cleanclip",
                                       init=init / "checkpoints" / "last.pt", clean_data=str(paths_data)),
                          runs[mode], show_progress=False)
        assert trainer.data.mode == mode  # the clean set is held as the training data is
        trainer.fit()
    assert hits and all(hits)
    assert losses(runs["stream"]) == losses(runs["memory"]) and same_weights(runs["stream"], runs["memory"])


# --------------------------------------------------------------------------------------------------
# bad images at train time


def _break(data: Path, rows: list[int], how: Callable[[Path], None]) -> None:
    for r in rows:
        how(data / "images" / "images" / f"{r:03d}.png")


def test_unreadable_and_missing_images_are_black_and_counted(tmp_path: Path) -> None:
    data = make_path_dataset(tmp_path)
    _break(data, [7], lambda p: p.write_bytes(b"not a png"))
    _break(data, [30], lambda p: p.unlink())
    run = tmp_path / "run"
    trainer = Trainer(job(data, data_mode="stream", num_workers=2, max_bad_fraction=0.05), run, show_progress=False)
    trainer.fit()
    epoch = [r for r in read_log(run) if r["type"] == "epoch"][-1]
    assert epoch["bad_images"] == 2 and len(losses(run)) == 3
    assert any("row 7 (images/images/007.png)" in e for e in epoch["bad_image_examples"])
    assert any("row 30" in e and "FileNotFoundError" in e for e in epoch["bad_image_examples"])
    assert trainer.data.image_rows(torch.tensor([7, 30])).eq(0).all()  # trained as black images
    assert trainer.data.n_bad_images == 2  # each row counted once, however often read


def test_too_many_bad_images_is_one_line(tmp_path: Path) -> None:
    data = make_path_dataset(tmp_path)
    _break(data, [3, 4], lambda p: p.write_bytes(b""))  # 2 > 0.03 × 48
    with pytest.raises(UserError, match=r"2 of 48 images are missing or unreadable .*train.max_bad_fraction 0.03"):
        Trainer(job(data, data_mode="stream", max_bad_fraction=0.03), tmp_path / "run", show_progress=False).fit()


def test_a_path_outside_the_dataset_is_one_line_from_a_worker(tmp_path: Path) -> None:
    ds = fmt.build_pair_dataset(["../secret.png"] * 4, ["x"] * 4)
    data = train_data.TrainData(StreamImages(ds, tmp_path, 32), torch.zeros(4, 5, dtype=torch.long),
                                torch.zeros(4, dtype=torch.long), [""] * 4, ["x"] * 4, LoaderOptions(num_workers=1))
    with pytest.raises(UserError, match="outside the dataset directory") as err:
        list(data.image_batches([torch.arange(4)]))
    assert "\n" not in str(err.value)
    with pytest.raises(UserError, match="outside the dataset directory"):
        data.image_rows(torch.arange(2))

