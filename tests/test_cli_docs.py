"""docs/cli.md is the command line's own reference: generated from the Typer app, never edited by hand."""

from __future__ import annotations

from pathlib import Path

from otcbench.commands.docs_cli import REGENERATE, cli_reference

ROOT = Path(__file__).resolve().parents[1]


def test_docs_cli_md_is_the_generated_reference() -> None:
    committed = (ROOT / "docs" / "cli.md").read_text(encoding="utf-8")
    assert committed == cli_reference(), f"docs/cli.md is out of date with the command line; run `{REGENERATE}`"


def test_the_reference_names_every_command_and_option() -> None:
    import typer

    from otcbench.cli import app

    text = cli_reference()
    root = typer.main.get_command(app)
    stack = [(["otcbench"], root)]
    while stack:
        path, command = stack.pop()
        assert f"## {' '.join(path)}\n" in text
        for param in command.params:
            if type(param).__name__.endswith("Option") and not param.hidden:
                assert all(f"`{opt}`" in text for opt in param.opts)
        stack += [([*path, name], sub) for name, sub in (getattr(command, "commands", None) or {}).items()]
    assert "| `--attack` | required | Attack name (repeat for several). |" in text  # help and default in one row
    assert "| `--format` | `md` | What to print: md, csv or latex. |" in text
