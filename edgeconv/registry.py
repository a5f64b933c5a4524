"""A tiny name -> object registry that refuses duplicates and suggests near misses."""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from edgeconv.errors import EdgeconvError

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, kind: str, ordered: bool = False):
        """`ordered`: names() in registration order (a table's own order) instead of sorted."""
        self.kind = kind
        self.ordered = ordered
        self._entries: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator: ``@REG.register("name")``. A duplicate name raises at import time."""

        def add(obj: T) -> T:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._entries[name] = obj
            return obj

        return add

    def get(self, name: str) -> T:
        if name in self._entries:
            return self._entries[name]
        close = difflib.get_close_matches(name, list(self._entries), n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise EdgeconvError(
            f"unknown {self.kind} {name!r}",
            f"{hint}known {self.kind}s: {', '.join(self.names())}",
        )

    def names(self) -> list[str]:
        return list(self._entries) if self.ordered else sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def items(self) -> list[tuple[str, T]]:
        return [(n, self._entries[n]) for n in self.names()]
