"""What every command shares: the consoles, one-line errors, ``--set``, flags, progress on a terminal only."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.markup import escape

from otcbench.errors import UserError

console = Console()
err_console = Console(stderr=True)

F = TypeVar("F", bound=Callable[..., Any])

SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", help="Override any option: --set train.lr=1e-3 (repeatable)."),
]


def handle_errors(fn: F) -> F:
    """Turn a UserError into one red line on stderr and exit code 2 — never a traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except UserError as err:
            # escaped: a message may hold brackets (pip extras, YAML lists) that rich would read as markup
            err_console.print(f"[bold red]error:[/] {escape(str(err))}", highlight=False, soft_wrap=True)
            raise typer.Exit(code=err.exit_code) from None
        except KeyboardInterrupt:
            err_console.print("[yellow]interrupted[/]")
            raise typer.Exit(code=130) from None

    return wrapper  # type: ignore[return-value]


def quiet_datasets() -> None:
    import datasets

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()


def progress_enabled(no_progress: bool) -> bool:
    """Bars only on a terminal: in a log file or pipe a bar's last frame would sit before an error line."""
    from otcbench.progress import progress_enabled as wanted

    return wanted(not no_progress, err_console)


def flag(*names: str, help: str | None = None) -> Any:
    """A boolean option that ``--help`` shows as a bare flag (typer would print it as taking a ``<bool>``)."""
    return typer.Option(*names, help=help, metavar="")
