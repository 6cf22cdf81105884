"""A small name -> object registry shared by models, recalibrators and range estimators."""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterable
from typing import Generic, TypeVar

T = TypeVar("T")


def closest(name: str, choices: Iterable[str]) -> str | None:
    """The choice most similar to ``name`` (for "did you mean" hints), or None."""
    matches = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.5)
    return matches[0] if matches else None


def unknown_name_message(kind: str, name: str, choices: Iterable[str]) -> str:
    """A message naming the unknown ``name``, the closest valid one and all valid ones."""
    choices = sorted(choices)
    hint = closest(name, choices)
    did_you_mean = f" Did you mean {hint!r}?" if hint else ""
    return f"unknown {kind} {name!r}.{did_you_mean} Available: {', '.join(choices)}."


class Registry(Generic[T]):
    """Maps lower-case names to objects (classes or factories); ``register`` is a decorator."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        key = name.lower()

        def decorator(obj: T) -> T:
            if key in self._items and self._items[key] is not obj:
                raise ValueError(f"{self.kind} {key!r} is already registered")
            self._items[key] = obj
            return obj

        return decorator

    def get(self, name: str) -> T:
        key = str(name).lower()
        if key not in self._items:
            raise ValueError(unknown_name_message(self.kind, str(name), self._items))
        return self._items[key]

    def available(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name.lower() in self._items
