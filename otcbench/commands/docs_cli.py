"""The command reference (docs/cli.md), generated from the ``otcbench`` command line itself.

:func:`cli_reference` walks the Typer app's click command tree (``typer.main.get_command``): every group and
command in registration order, its help text, its arguments and its options with their help and defaults.
``python -m otcbench.commands.docs_cli > docs/cli.md`` regenerates the file; ``tests/test_cli_docs.py`` fails
when the committed file differs, so a changed option or help text shows up in the docs in the same change.
"""

from __future__ import annotations

import enum
import re
from pathlib import Path
from typing import Any

#: The command that regenerates docs/cli.md (quoted by the test that checks it).
REGENERATE = "python -m otcbench.commands.docs_cli > docs/cli.md"

_HEADER = f"""# Command reference

Every `otcbench` command with its arguments and options, generated from the command line itself:
`{REGENERATE}` rewrites this file, and `tests/test_cli_docs.py` fails when it is out of date.
`otcbench COMMAND --help` prints the same on a terminal. The options a stage takes through
`--set section.key=value` are listed by `otcbench list attacks`, `otcbench list defenses` and
`otcbench list detectors`, and explained in docs/attacks.md, docs/baselines.md, docs/otcclip.md and, for
recipes, docs/recipes.md.
"""


def _paragraphs(text: str | None) -> str:
    """Help text as markdown: a docstring's wrapped lines joined, its blank lines kept as paragraph breaks."""
    if not text:
        return ""
    text = text.replace("\b", "")
    paragraphs = [" ".join(line.strip() for line in block.splitlines()) for block in re.split(r"\n\s*\n", text)]
    return "\n\n".join(p for p in paragraphs if p)


def _cell(text: str) -> str:
    """One markdown table cell: a single line, pipes escaped."""
    return " ".join(text.split()).replace("|", "\\|")


def _default(param: Any) -> str:
    """A parameter's default as the reference shows it ("" when it has none worth showing)."""
    value = param.default
    if getattr(param, "is_flag", False) and not getattr(param, "secondary_opts", None):
        return "off" if not value else "on"
    if callable(value) or value is None or value == () or value == []:
        return ""
    if isinstance(value, enum.Enum):
        value = value.value
    if isinstance(value, (list, tuple)):
        return ", ".join(f"`{v}`" for v in value)
    if isinstance(value, Path):
        value = value.as_posix()
    if isinstance(value, bool):
        return "on" if value else "off"
    return f"`{value}`"


def _names(param: Any) -> str:
    opts = [*param.opts, *getattr(param, "secondary_opts", [])]
    return ", ".join(f"`{o}`" for o in opts)


def _is_option(param: Any) -> bool:
    return type(param).__name__.endswith("Option")


def _usage(path: list[str], params: list[Any], group: bool) -> str:
    args = []
    for p in params:
        if not _is_option(p):
            name = p.name.upper() + ("..." if getattr(p, "nargs", 1) == -1 else "")
            args.append(name if p.required else f"[{name}]")
    tail = " COMMAND [ARGS]..." if group else ""
    return f"`{' '.join(path)} [OPTIONS]{' ' if args else ''}{' '.join(args)}{tail}`"


def _params(params: list[Any]) -> list[str]:
    """The arguments table, then the options table (hidden parameters left out)."""
    out: list[str] = []
    args = [p for p in params if not _is_option(p) and not getattr(p, "hidden", False)]
    opts = [p for p in params if _is_option(p) and not getattr(p, "hidden", False)]
    if args:
        out += ["", "| argument | description |", "|---|---|"]
        out += [f"| `{p.name.upper()}`{'' if p.required else ' (optional)'} | {_cell(p.help or '')} |" for p in args]
    if opts:
        out += ["", "| option | default | description |", "|---|---|---|"]
        for p in opts:
            default = "required" if p.required else _default(p)
            repeat = " (repeatable)" if getattr(p, "multiple", False) and "repeat" not in (p.help or "") else ""
            out.append(f"| {_names(p)} | {default} | {_cell((p.help or '') + repeat)} |")
    return out


def _subcommands(command: Any) -> list[tuple[str, Any]]:
    """A group's commands in registration order (the order of `otcbench --help`), hidden ones left out."""
    return [(n, c) for n, c in (getattr(command, "commands", None) or {}).items() if not getattr(c, "hidden", False)]


def _section(path: list[str], command: Any) -> list[str]:
    subs = _subcommands(command)
    lines = [f"## {' '.join(path)}", ""]
    help_text = _paragraphs(command.help)
    if help_text:
        lines += [help_text, ""]
    lines.append("Usage: " + _usage(path, command.params, bool(subs)))
    if subs:
        lines += ["", "Commands: " + ", ".join(f"[`{n}`](#{'-'.join([*path, n])})" for n, _ in subs) + "."]
    lines += _params(command.params)
    lines.append("")
    for name, sub in subs:
        lines += _section([*path, name], sub)
    return lines


def cli_reference() -> str:
    """docs/cli.md: the whole ``otcbench`` command tree as markdown, one section per group and command."""
    import typer

    from otcbench.cli import app

    root = typer.main.get_command(app)
    return _HEADER + "\n" + "\n".join(_section(["otcbench"], root)).rstrip("\n") + "\n"


if __name__ == "__main__":
    print(cli_reference(), end="")
