"""The one registry idiom: a named collection of one kind of extension, filled by a decorator.

Projectors, vision towers, backends, dataset formats, eval tasks, training objectives and built-in models each
have one :class:`Registry`; adding an extension is one new module whose entry is decorated with
``@REGISTRY.register("name")``. Unknown names raise :class:`~vlmkit.errors.RegistryError` listing the valid ones.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Generic, TypeVar

from vlmkit.errors import RegistryError

T = TypeVar("T")


class Registry(Generic[T]):
    """Entries of one ``kind`` by exact name, plus optional name families (a pattern and a builder).

    Names are listed sorted, or in registration order with ``ordered=True`` (where the order means something,
    e.g. the eval tasks a help text lists)."""

    def __init__(self, kind: str, *, ordered: bool = False) -> None:
        self.kind = kind
        self.ordered = ordered
        self._entries: dict[str, T] = {}
        self._families: list[tuple[re.Pattern[str], Callable[[re.Match[str]], T], str]] = []

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator: register the decorated object under ``name`` (a second registration is an error)."""

        def decorator(entry: T) -> T:
            self.add(name, entry)
            return entry

        return decorator

    def add(self, name: str, entry: T) -> None:
        if name in self._entries or any(pattern.fullmatch(name) for pattern, _, _ in self._families):
            raise RegistryError(f"{self.kind} {name!r} is already registered")
        self._entries[name] = entry

    def register_family(self, pattern: str, build: Callable[[re.Match[str]], T], shown_as: str) -> None:
        """Names matching ``pattern`` (e.g. ``mlp(\\d+)x_gelu``) resolve to ``build(match)``; ``shown_as`` is how
        the family is listed among the valid names."""
        self._families.append((re.compile(pattern), build, shown_as))

    def get(self, name: str) -> T:
        """The entry named ``name``; an unknown name raises an error listing the valid ones."""
        if name in self._entries:
            return self._entries[name]
        for pattern, build, _ in self._families:
            match = pattern.fullmatch(name)
            if match:
                return build(match)
        raise RegistryError(f"unknown {self.kind} {name!r}; valid names: {', '.join(self.names())}")

    def names(self) -> list[str]:
        """The registered names (sorted, or in registration order), then each family as it is shown."""
        return [*self, *(shown for _, _, shown in self._families)]

    @contextmanager
    def temporary(self, name: str, entry: T) -> Iterator[T]:
        """Register ``entry`` for the duration of a ``with`` block (tests, experiments)."""
        self.add(name, entry)
        try:
            yield entry
        finally:
            del self._entries[name]

    def __contains__(self, name: object) -> bool:
        if not isinstance(name, str):
            return False
        return name in self._entries or any(pattern.fullmatch(name) for pattern, _, _ in self._families)

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._entries) if self.ordered else sorted(self._entries))

    def __len__(self) -> int:
        return len(self._entries)

    def items(self) -> list[tuple[str, T]]:
        """The exactly-named entries in listing order (families are not enumerable)."""
        return [(name, self._entries[name]) for name in self]
