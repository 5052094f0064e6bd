"""Tests for the ``otcbench`` command line (otcbench.cli): end to end, --help, and one-line errors.

Most commands run in-process with Typer's CliRunner; two run as real processes to prove the entry points
(``python -m otcbench`` and the ``otcbench`` console script) work and that a bad input gives one line on
stderr there too.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import Result
from typer.testing import CliRunner

from otcbench.cli import app
from otcbench.models import bundled_model_names

runner = CliRunner()
FAST_TRAIN = ["--set", "train.batch_size=64", "--set", "train.threads=1", "--set", "train.device=cpu"]


def invoke(*args: str | Path) -> Result:
    return runner.invoke(app, [str(a) for a in args])


def ok(result: Result) -> Result:
    assert result.exit_code == 0, f"exit {result.exit_code}\n{result.output}\n{result.exception!r}"
    assert "Traceback" not in result.output
    return result


def assert_one_line_error(result: Result, *fragments: str) -> str:
    """Non-zero exit, exactly one line on stderr starting with ``error:``, nothing else, no traceback."""
    assert result.exit_code != 0
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    assert isinstance(result.exception, SystemExit), repr(result.exception)  # not an unhandled exception
    assert "Traceback" not in result.stdout and "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: "), lines[0]
    assert result.stdout.strip() == ""
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --------------------------------------------------------------------------------------------------
# end to end


@pytest.mark.slow
def test_end_to_end(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    world, run = tmp_path / "world", tmp_path / "run"

    res = ok(invoke("data", "synth", world, "--n-train", "128", "--seed", "3",
                    "--set", "probe_train_per_class=3", "--set", "probe_val_per_class=2", "--set", "test_per_class=3"))
    assert "wrote 128 pairs" in res.stdout
    meta = json.loads((world / "otcbench.json").read_text())
    assert meta["kind"] == "pairs" and meta["created_by"]["options"]["seed"] == 3
    assert json.loads((world / "eval" / "otcbench.json").read_text())["kind"] == "eval"

    res = ok(invoke("data", "show", world, "--out", tmp_path / "grid.png", "-n", "8", "--json"))
    stats = json.loads(res.stdout)
    assert stats["rows"] == 128 and stats["kind"] == "pairs" and stats["fingerprint_ok"] is True
    assert stats["png"] == str(tmp_path / "grid.png") and (tmp_path / "grid.png").stat().st_size > 0
    res = ok(invoke("data", "show", world / "eval", "--out", tmp_path / "eval.png", "-n", "4"))
    assert "eval" in res.stdout

    res = ok(invoke("train", world, run, "--epochs", "1", "--no-progress", *FAST_TRAIN))
    assert "trained 1 epochs" in res.stdout and "otc-rn-nano" in res.stdout
    for f in ("config.yaml", "env.json", "log.jsonl", "checkpoints/last.pt", "checkpoints/epoch_001.pt"):
        assert (run / f).is_file(), f
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    assert cfg["data"] == str(world) and cfg["train"]["epochs"] == 1 and cfg["defense"]["name"] == "none"
    ck = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert ck["model_name"] == "otc-rn-nano" and ck["epoch"] == 1 and ck["global_step"] == 2

    res = ok(invoke("eval", run, "--eval-data", world, "--json"))
    metrics = json.loads(res.stdout)
    written = json.loads((run / "metrics.json").read_text())
    for k in ("zeroshot_top1", "zeroshot_top5", "linear_probe_top1"):
        assert 0 <= written[k] <= 1 and metrics[k] == written[k]
    assert written["n_test"] == 3 * 12

    res = ok(invoke("eval", run / "checkpoints" / "epoch_001.pt", "--eval-data", world / "eval", "--zeroshot"))
    assert "zeroshot_top1" in res.stdout and "metrics written to" in res.stdout
    written = json.loads((run / "metrics.json").read_text())
    assert "zeroshot_top1" in written and "linear_probe_top1" not in written
    assert sorted(p.name for p in tmp_path.glob("*.png")) == ["eval.png", "grid.png"]
    assert not list(world.rglob("*.png"))  # nothing written into the dataset
    shutil.rmtree(run)  # 200 MB of checkpoints


def test_list_models() -> None:
    res = ok(runner.invoke(app, ["list", "models"], env={"COLUMNS": "160"}))
    names = bundled_model_names()
    assert {"otc-rn-nano", "otc-vit-tiny", "otc-rn-tiny", "otc-vit-small"} <= set(names)
    for name in names:
        assert name in res.stdout


def test_list_defenses() -> None:
    res = ok(runner.invoke(app, ["list", "defenses"], env={"COLUMNS": "160"}))
    assert "none" in res.stdout.split()  # a whole cell, not a substring
    assert "Undefended CLIP" in res.stdout


LEAF_COMMANDS = [
    ["data", "synth"], ["data", "show"], ["poison"], ["train"], ["eval"],
    ["list", "models"], ["list", "defenses"], ["list", "attacks"],
]
@pytest.mark.parametrize(
    "command",
    LEAF_COMMANDS,
    ids=" ".join,
)
def test_help_has_an_example(command: list[str]) -> None:
    res = ok(runner.invoke(app, [*command, "--help"], env={"COLUMNS": "160"}))
    assert "Usage: otcbench " + " ".join(command) in res.stdout
    assert re.search(r"Examples?: otcbench " + " ".join(command) + r"\b", res.stdout), res.stdout


@pytest.mark.parametrize(
    ("group", "subcommands"),
    [([], ["data", "train", "eval", "list"]), (["data"], ["synth", "show"]), (["list"], ["models", "defenses"])],
    ids=["otcbench", "data", "list"],
)
def test_group_help(group: list[str], subcommands: list[str]) -> None:
    res = ok(runner.invoke(app, [*group, "--help"], env={"COLUMNS": "160"}))
    for sub in subcommands:
        assert sub in res.stdout
    # no arguments: help as well (no_args_is_help), never a traceback
    res = runner.invoke(app, group, env={"COLUMNS": "160"})
    assert "Usage:" in res.output and "Traceback" not in res.output


# --------------------------------------------------------------------------------------------------
# bad input: one clear line, exit 2, before any work


def assert_no_run(run: Path) -> None:
    assert not run.exists(), sorted(p.name for p in run.rglob("*"))


def test_train_missing_dataset(tmp_path: Path) -> None:
    assert_one_line_error(invoke("train", tmp_path / "missing", tmp_path / "run"), "does not exist", "data synth")
    assert_no_run(tmp_path / "run")


def test_train_empty_dir_is_not_a_dataset(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    assert_one_line_error(invoke("train", tmp_path / "empty", tmp_path / "run"), "not an otcbench dataset")
    assert_no_run(tmp_path / "run")


def test_train_eval_set_is_not_a_pair_dataset(tiny_world: Path, tmp_path: Path) -> None:
    assert_one_line_error(invoke("train", tiny_world / "eval", tmp_path / "run"), "is an eval set, not a pair dataset")
    assert_no_run(tmp_path / "run")


def test_train_unknown_model_suggests_a_name(tiny_world: Path, tmp_path: Path) -> None:
    line = assert_one_line_error(invoke("train", tiny_world, tmp_path / "run", "--model", "otc-rn-nan"),
                                 "unknown model 'otc-rn-nan'", "did you mean")
    assert "'otc-rn-nano'" in line
    assert_no_run(tmp_path / "run")


@pytest.mark.parametrize(
    ("override", "fragments"),
    [
        ("train.epoch=3", ["train.epoch", "unknown key"]),
        ("train.epochs=abc", ["train.epochs", "integer", "'abc'"]),
        ("train.lr=-1", ["train.lr", "greater than 0"]),
        ("modle.name=x", ["modle", "unknown key"]),
        ("train.epochs.x=3", ["train.epochs", "integer"]),
        ("novalue", ["KEY=VALUE"]),
    ],
)
def test_train_bad_set(tiny_world: Path, tmp_path: Path, override: str, fragments: list[str]) -> None:
    assert_one_line_error(invoke("train", tiny_world, tmp_path / "run", "--set", override), *fragments)
    assert_no_run(tmp_path / "run")


def test_train_missing_config_file(tiny_world: Path, tmp_path: Path) -> None:
    assert_one_line_error(invoke("train", tiny_world, tmp_path / "run", "--config", tmp_path / "nope.yaml"),
                          "nope.yaml", "does not exist")
    assert_no_run(tmp_path / "run")


@pytest.mark.slow
def test_train_init_from_another_architecture(tiny_world: Path, trained_run: Path, tmp_path: Path) -> None:
    ckpt = trained_run / "checkpoints" / "epoch_001.pt"  # otc-rn-nano, records its model name
    line = assert_one_line_error(
        invoke("train", tiny_world, tmp_path / "run", "--model", "otc-vit-tiny", "--init", ckpt), "otc-rn-nano"
    )
    assert "otc-vit-tiny" in line
    assert_no_run(tmp_path / "run")
    # a bare state dict does not record its model: the weights themselves do not fit
    bare = tmp_path / "bare.pt"
    torch.save(torch.load(ckpt, weights_only=True)["model"], bare)
    assert_one_line_error(
        invoke("train", tiny_world, tmp_path / "run", "--model", "otc-vit-tiny", "--init", bare),
        "does not match model 'otc-vit-tiny'",
    )
    assert_no_run(tmp_path / "run")
    assert_one_line_error(invoke("train", tiny_world, tmp_path / "run", "--init", tmp_path / "no.pt"), "does not exist")
    assert_no_run(tmp_path / "run")


def test_train_unknown_defense(tiny_world: Path, tmp_path: Path) -> None:
    assert_one_line_error(invoke("train", tiny_world, tmp_path / "run", "--defense", "otcclipp"),
                          "unknown defense 'otcclipp'", "none", "otcbench list defenses")
    assert_no_run(tmp_path / "run")


@pytest.mark.slow
def test_train_refuses_existing_run_and_bad_resume(tiny_world: Path, trained_run: Path, tmp_path: Path) -> None:
    ck = trained_run / "checkpoints" / "last.pt"
    before = (sha256(ck), ck.stat().st_mtime_ns)
    assert_one_line_error(invoke("train", tiny_world, trained_run, "--epochs", "2", *FAST_TRAIN),
                          "already holds a training run", "--resume")
    assert_one_line_error(invoke("train", tiny_world, trained_run, "--resume", "--epochs", "2", *FAST_TRAIN,
                                 "--set", "train.lr=1e-3", "--set", "train.log_every=1"), "options differ", "train.lr")
    assert (sha256(ck), ck.stat().st_mtime_ns) == before
    (tmp_path / "empty").mkdir()
    assert_one_line_error(invoke("train", tiny_world, tmp_path / "empty", "--resume"), "holds no checkpoint")
    assert list((tmp_path / "empty").iterdir()) == []


@pytest.mark.slow
def test_eval_bad_inputs(tiny_world: Path, trained_run: Path, tmp_path: Path) -> None:
    assert_one_line_error(invoke("eval", tmp_path / "missing.pt", "--eval-data", tiny_world),
                          "missing.pt", "does not exist")
    assert_one_line_error(invoke("eval", tmp_path, "--eval-data", tiny_world), "checkpoints/last.pt")
    assert_one_line_error(invoke("eval", trained_run, "--eval-data", tmp_path / "none"), "does not exist")
    res = invoke("eval", trained_run)  # --eval-data is required: a usage error, not a traceback
    assert res.exit_code == 2 and "eval-data" in res.output and "Traceback" not in res.output


@pytest.mark.slow
@pytest.mark.parametrize("grid", ["[]", "[0]", "[-1]"])
def test_eval_bad_probe_c_grid(trained_run: Path, tiny_world: Path, tmp_path: Path, grid: str) -> None:
    res = invoke("eval", trained_run, "--eval-data", tiny_world, "--out", tmp_path / "m.json",
                 "--set", f"probe_c_grid={grid}", "--set", "device=cpu")
    assert_one_line_error(res, "probe_c_grid")
    assert not (tmp_path / "m.json").exists()


def test_data_synth_into_existing_dir(tiny_world: Path, tmp_path: Path) -> None:
    before = sha256(tiny_world / "otcbench.json")
    assert_one_line_error(invoke("data", "synth", tiny_world, "--n-train", "16"), "already exists", "--overwrite")
    assert sha256(tiny_world / "otcbench.json") == before
    assert_one_line_error(invoke("data", "synth", tmp_path / "w", "--n-train", "0"), "n_train")
    assert not (tmp_path / "w").exists()


def test_data_show_bad_inputs(tmp_path: Path, tiny_world: Path) -> None:
    assert_one_line_error(invoke("data", "show", tmp_path / "missing"), "does not exist")
    assert_one_line_error(invoke("data", "show", tiny_world, "-n", "0"), "-n")


# --------------------------------------------------------------------------------------------------
# real processes


@pytest.mark.slow
def test_python_m_otcbench_error_is_one_line(tmp_path: Path) -> None:
    env = {**os.environ, "OTCBENCH_NO_PROGRESS": "1", "COLUMNS": "80"}
    proc = subprocess.run(
        [sys.executable, "-m", "otcbench", "train", str(tmp_path / "missing"), str(tmp_path / "run")],
        capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "does not exist" in lines[0], proc.stderr
    assert proc.stdout == ""
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_console_script_help(tmp_path: Path) -> None:
    script = Path(sys.executable).with_name("otcbench")
    cmd = [str(script)] if script.is_file() else [sys.executable, "-m", "otcbench"]
    proc = subprocess.run([*cmd, "--help"], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "Usage: otcbench" in proc.stdout and "train" in proc.stdout
