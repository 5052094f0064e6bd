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

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, type[T]] = {}

    def register(self, name: str) -> Callable[[type[T]], type[T]]:
        """Class decorator: ``@DEFENSES.register("none")``."""

        def deco(cls: type[T]) -> type[T]:
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} registered twice")
            cls.name = name  # type: ignore[attr-defined]
            self._items[name] = cls
            return cls

        return deco

    def names(self) -> list[str]:
        return sorted(self._items)

    def get(self, name: str) -> type[T]:
        """The class registered as ``name``; an unknown name is a one-line error with suggestions."""
        if name not in self._items:
            close = difflib.get_close_matches(name, self._items, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise UserError(
                f"unknown {self.kind} {name!r}; {hint}known: {', '.join(self.names())} "
                f"(`otcbench list {self.kind}s`)"
            )
        return self._items[name]

    def options(self, name: str, values: dict[str, Any] | None = None) -> BaseModel:
        """Validate ``values`` against the options model of ``name``."""
        cls = self.get(name)
        return validate(cls.Options, values or {}, where=f"{self.kind} {name}")  # type: ignore[attr-defined]
