"""One registry pattern for attacks and defenses: a decorator registers a class under a name.

Each registered class carries a typed ``Options`` model (pydantic); the CLI and recipes list and validate
options from it. Adding a method is one new file plus one import in the package's ``__init__``.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from typing import Any, Generic, TypeVar

from pydantic import BaseModel

from otcbench.config import validate
from otcbench.errors import UserError

T = TypeVar("T")


class Registry(Generic[T]):
    """Name → class mapping for one kind of method (``attack``, ``defense``)."""

    def __init__(self, kind: str, *, listing: str | None = None,
                 check: Callable[[type[T]], None] | None = None) -> None:
        """``listing``: the command that lists the names (default ``otcbench list {kind}s``); ``check(cls)``
        runs on every class at registration (after its name is set) and raises a UserError to refuse it."""
        self.kind = kind
        self.listing = listing or f"otcbench list {kind}s"
        self._check = check
        self._items: dict[str, type[T]] = {}

    def register(self, name: str) -> Callable[[type[T]], type[T]]:
        """Class decorator: ``@DEFENSES.register("none")``."""

        def deco(cls: type[T]) -> type[T]:
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} registered twice")
            cls.name = name  # type: ignore[attr-defined]
            if self._check is not None:
                self._check(cls)
            self._items[name] = cls
            return cls

        return deco

    def names(self) -> list[str]:
        return sorted(self._items)

    def registered(self) -> list[type[T]]:
        """The classes in registration order (where an order is shown, e.g. attack kinds' summary columns)."""
        return list(self._items.values())

    def get(self, name: str) -> type[T]:
        """The class registered as ``name``; an unknown name is a one-line error with suggestions."""
        if name not in self._items:
            close = difflib.get_close_matches(name, self._items, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise UserError(
                f"unknown {self.kind} {name!r}; {hint}known: {', '.join(self.names())} "
                f"(`{self.listing}`)"
            )
        return self._items[name]

    def options(self, name: str, values: dict[str, Any] | None = None) -> BaseModel:
        """Validate ``values`` against the options model of ``name``."""
        cls = self.get(name)
        return validate(cls.Options, values or {}, where=f"{self.kind} {name}")  # type: ignore[attr-defined]


def option_rows(options: type[BaseModel]) -> list[tuple[str, Any, str]]:
    """``(key, default, description)`` for every option of an options model, a nested model key by key
    (``trigger.size``); the description is the field's, "" when it has none."""
    rows: list[tuple[str, Any, str]] = []
    for key, field in options.model_fields.items():
        default = field.get_default(call_default_factory=True)
        if isinstance(default, BaseModel):  # nested options (a trigger spec): listed key by key
            # this default's own values (a default_factory may set some), not its class's defaults
            rows.extend((f"{key}.{k}", _dotted(default, k), d) for k, _, d in option_rows(type(default)))
        else:
            rows.append((key, default, field.description or ""))
    return rows


def _dotted(obj: Any, key: str) -> Any:
    for part in key.split("."):
        obj = getattr(obj, part)
    return obj
