"""Plug-ins found by name: the codecs and the output formats, each declared by one module of its package.

A package lists its kind of plug-in once: every module but the named helpers defines one object
(``CODEC = Codec(...)``, ``FORMAT = OutputFormat(...)``, ``KIND = SourceKind(...)``), and
:func:`discover` imports them in a stable order. :class:`Registry` is the dict of the named ones,
with the two checks every registry needs: a name is taken once, and an unknown name gets an error
that lists the choices.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Iterable, Sequence
from typing import Any, Generic, Protocol, TypeVar

from geoindex.errors import ConfigError

__all__ = ["Registry", "discover"]


class Named(Protocol):
    @property
    def name(self) -> str: ...


T = TypeVar("T", bound=Named)


def discover(package: str, path: Iterable[str], attribute: str, *, skip: Iterable[str] = ()) -> dict[str, Any]:
    """Module name -> its ``attribute``, for every module of ``package`` (at ``path``) but ``skip`` and
    private ones, in module-name order."""
    names = sorted(m.name for m in pkgutil.iter_modules(path) if m.name not in set(skip) and not m.name.startswith("_"))
    return {name: getattr(importlib.import_module(f"{package}.{name}"), attribute) for name in names}


class Registry(dict[str, T], Generic[T]):
    """Name -> plug-in, in the order help texts list them.

    Args:
        what: the kind of plug-in with its article, as error messages say it ("a codec").
        option: the command-line option that chooses one, named in the unknown-name error.
    """

    def __init__(self, what: str, option: str = "") -> None:
        super().__init__()
        self.what = what
        self.option = option

    def register(self, item: T) -> T:
        """Add ``item`` (a test or a plug-in may add its own); returns it."""
        if item.name in self and self[item.name] is not item:
            raise ConfigError(f"{self.what} named {item.name!r} is registered already")
        self[item.name] = item
        return item

    def named(self, name: str) -> T:
        """The plug-in ``name``; ConfigError naming the choices otherwise."""
        try:
            return self[name]
        except (KeyError, TypeError):
            kind = self.what.split(" ", 1)[1]
            hint = f" ({self.option})" if self.option else ""
            raise ConfigError(f"unknown {kind} {name!r}; choose one of {list(self)}{hint}") from None

    def register_all(self, items: Iterable[T], *, first: Sequence[str] = ()) -> None:
        """Register ``items``, those named in ``first`` first and in that order (help texts list a default first)."""
        for item in sorted(items, key=lambda i: (first.index(i.name) if i.name in first else len(first), i.name)):
            self.register(item)
