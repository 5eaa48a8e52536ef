"""One small typed name -> object registry for observers, models, datasets (and backends, QAT algorithms...).

Usage (the whole API)::

    THINGS: Registry[Thing] = Registry("thing")

    @THINGS.register("name")                 # decorator: registers the decorated object under "name"
    class MyThing: ...

    @THINGS.register("other", wrap=lambda name, fn: Thing(name, fn))   # store a value built from it
    def build_other(): ...

    THINGS.add("third", obj)                 # the same without a decorator
    THINGS.get("name")                       # the object; an unknown name raises UnknownNameError listing
                                             # the valid ones
    THINGS.list()                            # sorted names
    THINGS.list("res*")                      # names matching a glob (as timm's ``list_models(filter=...)``)
    THINGS.list(["res*", "mob*"], exclude="*_large")   # any of several globs, minus excluded ones
    "name" in THINGS; len(THINGS); for name in THINGS: ...

A package exposes ``register_<thing>`` (a decorator) and ``list_<things>(filter=None, exclude=None)``
built on this class.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Generic, TypeVar

from quantbench.errors import UnknownNameError

T = TypeVar("T")

Patterns = str | Iterable[str] | None


def _patterns(p: Patterns) -> list[str]:
    if p is None:
        return []
    return [p] if isinstance(p, str) else list(p)


class Registry(Generic[T]):
    """Maps names to objects; unknown names raise an error listing the valid ones."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str, wrap: Callable[[str, Any], T] | None = None) -> Callable[[Any], Any]:
        """Decorator registering the decorated object under ``name`` (or ``wrap(name, obj)`` when given)
        and returning the decorated object unchanged."""

        def deco(obj: Any) -> Any:
            self.add(name, obj if wrap is None else wrap(name, obj))
            return obj

        return deco

    def add(self, name: str, obj: T) -> T:
        """Register ``obj`` under ``name`` (a name may be registered once) and return it."""
        if not isinstance(name, str) or not name:
            raise ValueError(f"{self.kind} names must be non-empty strings, got {name!r}")
        if name in self._items:
            raise ValueError(f"{self.kind} {name!r} is registered twice")
        self._items[name] = obj
        return obj

    def get(self, name: str) -> T:
        try:
            return self._items[name]
        except (KeyError, TypeError):
            raise UnknownNameError(self.kind, str(name), list(self._items)) from None

    def list(self, filter: Patterns = None, exclude: Patterns = None) -> list[str]:
        """Sorted names matching any glob of ``filter`` (all when ``None``) and none of ``exclude``
        (``fnmatch`` globs, case-sensitive)."""
        keep, drop = _patterns(filter), _patterns(exclude)
        return [
            n for n in sorted(self._items)
            if (not keep or any(fnmatch.fnmatchcase(n, p) for p in keep))
            and not any(fnmatch.fnmatchcase(n, p) for p in drop)
        ]

    def names(self) -> list[str]:
        """All names, sorted (``list()`` without a filter)."""
        return self.list()

    def items(self) -> list[tuple[str, T]]:
        return [(n, self._items[n]) for n in self.list()]

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._items)


def import_submodules(package: str, path: Iterable[str], skip: Iterable[str] = ("base",)) -> None:
    """Import every module of a package (each registers what it defines): one file per observer, QAT
    algorithm, sweep method kind or data generator, and no list to keep in step."""
    import importlib
    import pkgutil

    skipped = set(skip)
    for mod in pkgutil.iter_modules(list(path)):
        if mod.name not in skipped:
            importlib.import_module(f"{package}.{mod.name}")

