"""The CLI's shape: options built by library functions (otcbench.options), tables in one module
(otcbench.render), listings that describe every option, boolean flags shown as flags in ``--help``."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from otcbench.cli import app
from otcbench.errors import UserError
from otcbench.options import eval_config, storage_option, train_job

runner = CliRunner()
ROOT = Path(__file__).resolve().parents[1]
LEAF_COMMANDS = [["data", "synth"], ["data", "show"], ["data", "import"], ["train"], ["eval"], ["poison"],
                 ["defend"], ["list", "models"], ["run"], ["report"], ["bench", "ot"], ["bench", "train"]]


@pytest.mark.parametrize("command", LEAF_COMMANDS, ids=" ".join)
def test_boolean_flags_read_as_flags_in_help(command: list[str]) -> None:
    res = runner.invoke(app, [*command, "--help"], env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    options = [line for line in res.stdout.splitlines() if re.search(r"│ +--", line)]
    assert options, res.stdout
    # typer's own --help keeps its <bool>; every flag of ours is bare
    offenders = [line.split()[1] for line in options if "<bool>" in line and "--help" not in line]
    assert not offenders, f"flags shown as taking a value: {offenders}"
    if command == ["data", "synth"]:
        line = next(x for x in options if "--overwrite" in x)
        assert re.search(r"--overwrite +Replace an existing output", line), line


@pytest.mark.parametrize(("command", "method", "option", "described"), [
    (["list", "defenses"], "roclip", "pool_size", "caption pool entries"),
    (["list", "attacks"], "badnet", "trigger.size", "patch side as a fraction of the image side"),
])
def test_listings_describe_every_option(command: list[str], method: str, option: str, described: str) -> None:
    res = runner.invoke(app, command, env={"COLUMNS": "250"})
    assert res.exit_code == 0, res.output
    lines = res.stdout.splitlines()
    start = next(i for i, x in enumerate(lines) if re.match(rf"│ {re.escape(method)} +│", x))
    row = next(x for x in lines[start:] if re.search(rf"│ {re.escape(option)} +│", x))
    assert described in row, row


def test_nested_option_rows_keep_the_default_instances_values() -> None:
    from otcbench.attacks import ATTACKS
    from otcbench.registry import option_rows

    rows = {k: (v, d) for k, v, d in option_rows(ATTACKS.get("badnet").Options)}
    default = ATTACKS.options("badnet").trigger  # badnet's own trigger default, not TriggerSpec's class default
    assert rows["trigger.size"][0] == default.size and rows["trigger.kind"][0] == "badnet"
    assert rows["rate"][1].startswith("poisoned pairs as a fraction")


def test_commands_render_only_through_the_render_module() -> None:
    """No command module builds a rich Table itself: tables live in otcbench/render.py."""
    for path in sorted((ROOT / "otcbench" / "commands").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module == "rich.table":
                pytest.fail(f"{path.name} imports rich.table; put the table in otcbench/render.py")


def test_option_builders_are_what_the_commands_validate(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("train: {lr: 0.001, epochs: 3}\nmodel: {name: otc-vit-tiny}\n")
    job = train_job("data/world", defense="roclip", epochs=5, config=cfg, overrides=["train.batch_size=32"])
    assert (job.data, job.defense.name, job.model.name) == ("data/world", "roclip", "otc-vit-tiny")
    assert (job.train.lr, job.train.epochs, job.train.batch_size) == (0.001, 5, 32)  # argument over the file
    with pytest.raises(UserError, match="train"):
        train_job("d", overrides=["train.no_such_key=1"])
    every = eval_config()
    assert every.zeroshot and every.linear_probe and not every.asr
    assert eval_config(poison=True).asr
    only = eval_config(linear_probe=True, poison=True)
    assert (only.zeroshot, only.linear_probe, only.asr) == (False, True, False)
    assert storage_option({"--bytes": False, "--copy-images": True}) == "copy"
    assert storage_option({"--bytes": False}) is None
    with pytest.raises(UserError, match="--bytes and --link-images exclude each other"):
        storage_option({"--bytes": True, "--link-images": True})
