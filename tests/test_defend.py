"""Tests for ``otcbench defend`` (otcbench.defenses.defend): the re-paired dataset, per-pair scores, the report
with detection metrics, any data-side defense, and one-line errors on bad input."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest
import torch
from click.testing import Result
from typer.testing import CliRunner

from otcbench.attacks.poison import poison_dataset
from otcbench.cli import app
from otcbench.config import Options
from otcbench.data.format import load_pair_dataset
from otcbench.defenses import DEFENSES
from otcbench.defenses.base import DataContext, DataStepResult, Defense
from otcbench.defenses.defend import PAIR_SCORES, REPORT, run_defend
from otcbench.eval.asr import load_poisoned
from otcbench.eval.detection import detection_metrics

pytestmark = pytest.mark.slow  # every test here trains (pytest -m "not slow": the quick loop)

runner = CliRunner()


def invoke(*args: str | Path) -> Result:
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def poisoned(tiny_world: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny world with a badnet backdoor (16 pairs) and a targeted attack (2 targets × 4 pairs)."""
    out = tmp_path_factory.mktemp("defend") / "p"
    poison_dataset(tiny_world, out, [("badnet", {"count": 16}),
                                     ("targeted", {"n_targets": 2, "poisons_per_target": 4,
                                                   "caption_source": "names"})], seed=0)
    return out


@pytest.fixture(scope="module")
def defended(poisoned: Path, trained_run: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("defended") / "out"
    report = run_defend(poisoned, out, defense="otcclip+filter", checkpoint=trained_run, options={"top_k": 3},
                        batch_size=128, device="cpu", show_progress=False)
    return out, report


def test_defend_writes_repaired_dataset(defended: tuple[Path, dict], poisoned: Path) -> None:
    out, _ = defended
    src, dst = load_pair_dataset(poisoned), load_pair_dataset(out)  # fingerprints verified
    scores = pd.read_parquet(out / PAIR_SCORES)
    assert len(dst) == len(src) == len(scores) == 408
    ci = scores["caption_row"].tolist()
    assert dst.captions == [src.captions[j] for j in ci]
    for col in ("label", "poison", "origin"):
        assert list(dst.ds[col]) == list(src.ds[col])
    assert dst.meta.poison == src.meta.poison and dst.meta.classnames == src.meta.classnames
    assert dst.meta.created_by["options"]["defense"] == "otcclip+filter"
    # the eval set and the targets travel with it: `eval --poison OUT` works on the defended dataset
    assert (out / "eval").is_dir() and (out / "targets").is_dir()
    load_poisoned(out)


def test_pair_scores_and_report_agree(defended: tuple[Path, dict]) -> None:
    out, report = defended
    scores = pd.read_parquet(out / PAIR_SCORES)
    assert list(scores.columns) == ["row", "caption_row", "poison", "flagged", "repaired", "keep",
                                    "score_match", "score_ot", "score_global", "score_gap"]
    assert scores["row"].tolist() == list(range(408))
    repaired = scores["caption_row"] != scores["row"]
    assert (scores["repaired"] == repaired).all()
    # otcclip flags its re-pairs and the pairs its filter leaves out: the 20 % lowest match scores (81 of
    # 408) and, with them, every copy of their images (a target's 4 poisoned copies go together)
    assert (scores["flagged"] == (repaired | ~scores["keep"])).all()
    dropped = ~scores["keep"]
    lowest = scores["score_match"].rank(method="first") <= 81
    assert (dropped[lowest]).all() and dropped.sum() >= 81
    targeted = scores[scores["poison"] == "targeted"]
    assert targeted.groupby(targeted.index // 4)["keep"].nunique().eq(1).all()
    on_disk = json.loads((out / REPORT).read_text())
    assert on_disk == {k: v for k, v in report.items() if k != "out"}
    assert report["n"] == 408 and report["n_flagged"] == int(scores["flagged"].sum())
    assert report["scores"] == ["match", "ot", "global", "gap"]
    # the detection metrics are those of the per-pair table
    expected = detection_metrics(torch.tensor(scores["flagged"].to_numpy()),
                                 {k: torch.tensor(scores[f"score_{k}"].to_numpy()) for k in report["scores"]},
                                 scores["poison"].tolist(),
                                 caption_index=torch.tensor(scores["caption_row"].to_numpy()))
    for k, v in expected.items():
        assert report[k] == pytest.approx(v), k
    assert report["detect_n_poison"] == 24
    for name in ("match", "ot", "global", "gap"):
        assert 0.0 <= report[f"detect_auroc_{name}"] <= 1.0
    assert report["detect_auroc"] == report["detect_auroc_match"]
    # match precision of the re-pairs, and of what the global score alone would have picked
    summary = report["summary"]
    assert summary["match_n"] == int(repaired.sum())
    assert summary["match_precision"] is None or 0.0 <= summary["match_precision"] <= 1.0
    assert "match_precision_global" in summary and "match_precision_ot" in summary


class _Filter(Defense):
    """A test-only data-side defense: swaps the captions of rows 0 and 1, drops row 2, flags all three."""

    Options = Options

    def data_step(self, ctx: DataContext, epoch: int | None = None) -> DataStepResult:
        n = len(ctx.data)
        ci = torch.arange(n)
        ci[0], ci[1] = 1, 0
        keep = torch.ones(n, dtype=torch.bool)
        keep[2] = False
        flagged = torch.zeros(n, dtype=torch.bool)
        flagged[:3] = True
        return DataStepResult(caption_index=ci, flagged=flagged, keep=keep, scores={"row": -torch.arange(n).float()})


@pytest.fixture
def filter_defense(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    _Filter.name = "test-filter"
    monkeypatch.setitem(DEFENSES._items, "test-filter", _Filter)
    yield "test-filter"


def test_defend_works_for_any_data_side_defense(
    filter_defense: str, tiny_world: Path, trained_run: Path, tmp_path: Path
) -> None:
    report = run_defend(tiny_world, tmp_path / "out", defense=filter_defense, checkpoint=trained_run,
                        device="cpu", show_progress=False)
    src, dst = load_pair_dataset(tiny_world), load_pair_dataset(tmp_path / "out")
    assert dst.captions[:3] == [src.captions[1], src.captions[0], src.captions[2]]
    assert dst.captions[3:] == src.captions[3:]
    scores = pd.read_parquet(tmp_path / "out" / PAIR_SCORES)
    assert scores["keep"].tolist()[:4] == [True, True, False, True]  # dropped rows are kept, marked
    assert scores["repaired"].tolist()[:3] == [True, True, False]
    assert (report["n_flagged"], report["n_repaired"], report["n_keep"]) == (3, 2, 383)
    assert "detect_auroc" not in report  # a clean world: nothing to detect


def test_defend_cli_shows_both_aurocs(poisoned: Path, trained_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "cli"
    out.mkdir()  # an existing empty directory is fine
    res = invoke("defend", poisoned, out, "--defense", "otcclip", "--checkpoint", trained_run / "checkpoints" /
                 "last.pt", "--set", "defense.options.top_k=2", "--set", "defense.options.score=global",
                 "--device", "cpu", "--batch-size", "100")
    assert res.exit_code == 0, res.output
    assert "AUROC (ot score)" in res.stdout and "AUROC (global score)" in res.stdout
    report = json.loads((out / REPORT).read_text())
    assert report["options"]["top_k"] == 2 and report["options"]["score"] == "global"


def _one_line_error(res: Result, fragment: str) -> None:
    assert res.exit_code == 2, (res.output, res.exception)
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], res.stderr
    assert "Traceback" not in res.output


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--defense", "none"], "has no data-side step"),
        (["--defense", "otcclp"], "unknown defense"),
        (["--defense", "otcclip", "--set", "topk=3"], "unknown key"),
        (["--defense", "otcclip", "--model", "otc-vit-tiny"], "trained with model 'otc-rn-nano'"),
        (["--defense", "otcclip", "--batch-size", "0"], "--batch-size must be at least 1"),
    ],
)
def test_defend_bad_input_is_one_line(
    args: list[str], fragment: str, poisoned: Path, trained_run: Path, tmp_path: Path
) -> None:
    _one_line_error(invoke("defend", poisoned, tmp_path / "o", "--checkpoint", trained_run, *args), fragment)
    assert not (tmp_path / "o").exists()  # nothing written on bad input


def test_defend_missing_checkpoint_and_nonempty_out(poisoned: Path, trained_run: Path, tmp_path: Path) -> None:
    _one_line_error(invoke("defend", poisoned, tmp_path / "o", "--defense", "otcclip",
                           "--checkpoint", tmp_path / "nope.pt"), "does not exist")
    full = tmp_path / "full"
    full.mkdir()
    (full / "x").write_text("keep me")
    _one_line_error(invoke("defend", poisoned, full, "--defense", "otcclip", "--checkpoint", trained_run),
                    "not empty")
    assert (full / "x").read_text() == "keep me"
    _one_line_error(invoke("defend", tmp_path / "nodata", tmp_path / "o2", "--defense", "otcclip",
                           "--checkpoint", trained_run), "does not exist")



# --------------------------------------------------------------------------------------------------
# images in memory or streamed (train.data_mode), path-based sources


@pytest.fixture(scope="module")
def path_poisoned(tiny_world: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The first 96 pairs of the tiny world as PNG files imported path-based, then poisoned (badnet: 8 pairs added):
    clean rows are paths under ``source/``, poisoned rows bytes."""
    import csv

    from otcbench.attacks.poison import poison_dataset
    from otcbench.data.format import image_bytes
    from otcbench.data.importers import import_dataset

    root = tmp_path_factory.mktemp("defend-paths")
    world = load_pair_dataset(tiny_world).ds.select(range(96))
    (root / "src" / "images").mkdir(parents=True)
    with open(root / "src" / "t.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "caption", "label"])
        for i, (png, cap, lab) in enumerate(zip(image_bytes(world), world["caption"], world["label"], strict=True)):
            (root / "src" / "images" / f"{i:03d}.png").write_bytes(png)
            w.writerow([f"images/{i:03d}.png", cap, lab])
    names = root / "names.txt"
    names.write_text("\n".join(load_pair_dataset(tiny_world).meta.classnames) + "\n")
    import_dataset(root / "src" / "t.csv", root / "clean", "csv",
                   {"storage": "copy", "label_column": "label", "classnames": str(names)})
    poison_dataset(root / "clean", root / "p", [("badnet", {"count": 8})], seed=0)
    return root / "p"


@pytest.mark.parametrize(("defense", "opts"), [("otcclip", ["top_k=3"]), ("safeclip", [])])
def test_defend_streamed_gives_the_memory_scores(
    defense: str, opts: list[str], path_poisoned: Path, trained_run: Path, tmp_path: Path
) -> None:
    from otcbench.config import apply_overrides
    from otcbench.defenses.defend import DataOptions

    mem = run_defend(path_poisoned, tmp_path / "mem", defense=defense, checkpoint=trained_run,
                     options=apply_overrides({}, opts), batch_size=40, device="cpu", show_progress=False,
                     loading=DataOptions(data_mode="memory"))
    # the CLI path, with worker processes for the whole-dataset embedding
    sets = [a for o in opts for a in ("--set", o)]
    res = invoke("defend", path_poisoned, tmp_path / "st", "--defense", defense, "--checkpoint", trained_run,
                 *sets, "--set", "train.data_mode=stream", "--set", "train.num_workers=2",
                 "--device", "cpu", "--batch-size", "40", "--json")
    assert res.exit_code == 0, res.output
    st = json.loads((tmp_path / "st" / REPORT).read_text())
    assert (mem["data_mode"], st["data_mode"], st["num_workers"], st["bad_images"]) == ("memory", "stream", 2, 0)
    a, b = pd.read_parquet(tmp_path / "mem" / PAIR_SCORES), pd.read_parquet(tmp_path / "st" / PAIR_SCORES)
    pd.testing.assert_frame_equal(a, b)  # same pixels, same chunks: the same scores to the bit
    assert mem["n"] == 104 and mem["detect_n_poison"] == 8
    assert mem["detect_auroc"] == st["detect_auroc"]


def test_defend_path_based_output_links_the_source(path_poisoned: Path, trained_run: Path, tmp_path: Path) -> None:
    """Writing OUT reads no image: clean rows keep their paths under ``OUT/source`` (a relative link)."""
    from otcbench.data.format import image_cells, images_to_tensor

    out = tmp_path / "d"
    report = run_defend(path_poisoned, out, defense="otcclip", checkpoint=trained_run, device="cpu",
                        show_progress=False)
    src, dst = load_pair_dataset(path_poisoned), load_pair_dataset(out)
    assert (out / "source").is_symlink() and not Path(os.readlink(out / "source")).is_absolute()
    cells, src_cells = image_cells(dst.ds), image_cells(src.ds)
    for c, s in zip(cells, src_cells, strict=True):
        if s["bytes"] is None:
            assert c["bytes"] is None and c["path"] == f"source/{s['path']}"  # source/source/images/…
        else:
            assert c["bytes"] == s["bytes"]  # the poisoned rows' own images
    assert torch.equal(images_to_tensor(dst.ds, root=dst.path), images_to_tensor(src.ds, root=src.path))
    assert dst.meta.created_by["options"]["source_link"] == "source" and report["n"] == 104


def test_defend_auto_streams_what_memory_would_not_hold(
    path_poisoned: Path, trained_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from otcbench.train import data as train_data

    monkeypatch.setattr(train_data, "MAX_IN_MEMORY_BYTES", 104 * 3 * 32 * 32 - 1)  # one byte short
    report = run_defend(path_poisoned, tmp_path / "auto", defense="otcclip", checkpoint=trained_run,
                        device="cpu", show_progress=False)
    assert report["data_mode"] == "stream"
    _one_line_error(invoke("defend", path_poisoned, tmp_path / "m", "--defense", "otcclip", "--checkpoint",
                           trained_run, "--set", "train.data_mode=memory"), "too large to decode into memory")


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--set", "train.lr=1e-3"], "--set train.lr does not apply"),
        (["--set", "train.data_mode=disk"], "train.data_mode: Input should be"),
        (["--set", "train.num_workers=-1"], "train.num_workers: Input should be greater than or equal to 0"),
    ],
)
def test_defend_bad_train_set_is_one_line(
    args: list[str], fragment: str, poisoned: Path, trained_run: Path, tmp_path: Path
) -> None:
    _one_line_error(invoke("defend", poisoned, tmp_path / "o", "--defense", "otcclip", "--checkpoint",
                           trained_run, *args), fragment)
    assert not (tmp_path / "o").exists()
