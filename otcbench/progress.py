"""The one way otcbench shows progress: a rich bar, on only when asked for, on a terminal, and when
``OTCBENCH_NO_PROGRESS`` is not set (tests and CI set it).

Every bar has the same columns: description, bar, done/total and time left (or elapsed), optionally a
free-text ``info`` field (loss, learning rate, the run in progress).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rich.console import Console
    from rich.progress import Progress

#: Set (to anything but "") to turn every progress bar off.
ENV_OFF = "OTCBENCH_NO_PROGRESS"


def progress_enabled(requested: bool = True, console: Console | None = None) -> bool:
    """Whether to show bars: ``requested``, ``OTCBENCH_NO_PROGRESS`` unset, and — with a ``console`` — that
    console is a terminal (in a log file or pipe a bar's last frame would sit before an error line)."""
    if not requested or os.environ.get(ENV_OFF, ""):
        return False
    return console is None or console.is_terminal


def progress_bar(enabled: bool, *, console: Console | None = None, transient: bool = False, info: bool = False,
                 elapsed: bool = False) -> Progress:
    """A rich ``Progress`` (disabled unless ``enabled``): use it as a context manager and add tasks to it.

    ``info``: a ``{task.fields[info]}`` column (give ``info=""`` to ``add_task``); ``elapsed``: time elapsed
    instead of time remaining; ``transient``: the bar disappears when done.
    """
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        ProgressColumn,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    columns: list[ProgressColumn] = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                     TimeElapsedColumn() if elapsed else TimeRemainingColumn()]
    if info:
        columns.append(TextColumn("{task.fields[info]}"))
    return Progress(*columns, disable=not enabled, console=console, transient=transient)


@contextmanager
def counted(enabled: bool, total: int, description: str) -> Iterator[Callable[[], None]]:
    """A transient bar over ``total`` items; yields ``advance()`` (a no-op when disabled)."""
    if not enabled:
        yield lambda: None
        return
    with progress_bar(True, transient=True) as progress:
        task = progress.add_task(description, total=total)
        yield lambda: progress.advance(task)
