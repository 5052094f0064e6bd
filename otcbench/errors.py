"""The one exception type the CLI turns into a single clear line and a non-zero exit."""

from __future__ import annotations


class UserError(Exception):
    """Bad input from the user: the message says what is wrong, where, and how to fix it.

    The CLI prints ``error: <message>`` on one line and exits with code 2; library callers
    (notebooks, scripts) catch it like any exception.
    """

    exit_code = 2
