"""The ``otcbench`` command line: thin — parse, validate, call the library, render with rich.

This module only assembles the app; each group of commands lives in :mod:`otcbench.commands` (``data``,
``training``, ``listing``, ``grid``, ``bench``) and renders through :mod:`otcbench.render`.
"""

from __future__ import annotations

import typer

from otcbench.commands import grid, training
from otcbench.commands.bench import bench_app
from otcbench.commands.data import data_app
from otcbench.commands.listing import list_app

app = typer.Typer(
    name="otcbench",
    help="Poisoning and backdoor attacks on CLIP pre-training, and the defenses against them.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
app.add_typer(data_app, name="data")
app.command("train")(training.train)
app.command("eval")(training.eval_cmd)
app.command("poison")(training.poison_cmd)
app.command("defend")(training.defend_cmd)
app.add_typer(list_app, name="list")
app.command("run")(grid.run_cmd)
app.command("report")(grid.report_cmd)
app.command("detect")(grid.detect_cmd)
app.add_typer(bench_app, name="bench")


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()
