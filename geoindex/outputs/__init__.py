"""Output formats of search results, one module each, found by name in :data:`REGISTRY`.

A format (:class:`~geoindex.outputs.base.OutputFormat`) either streams results one at a time to a
text stream (``table``, ``csv``, ``json``: ``geoindex locate --format NAME``) or writes a whole file
(``geojson``, ``map``: ``geoindex locate --NAME FILE``, the service's ``include_NAME``). The command
line, the service (``POST /locate/NAME``, ``GET /formats``) and the web page all read this registry;
nothing else names a format.

To add a format: one module in this package that defines ``FORMAT = OutputFormat(...)`` (it is found
and registered on import), plus its test.
"""

from __future__ import annotations

import importlib
import pkgutil

from geoindex.errors import ConfigError
from geoindex.outputs.base import Encoded, FileInputs, OutputFormat, ResultWriter, clip, one_line
from geoindex.outputs.record import result_to_dict

__all__ = [
    "REGISTRY",
    "Encoded",
    "FileInputs",
    "OutputFormat",
    "ResultWriter",
    "clip",
    "file_formats",
    "get_format",
    "one_line",
    "register",
    "result_to_dict",
    "stream_formats",
]

REGISTRY: dict[str, OutputFormat] = {}
_ORDER = ("table", "json", "csv", "geojson", "map")  # how help texts list the shipped formats: default first
_NOT_FORMATS = frozenset({"base", "record"})


def register(fmt: OutputFormat) -> OutputFormat:
    """Add ``fmt`` to the registry (a test or a plug-in may add its own); returns it."""
    if fmt.name in REGISTRY and REGISTRY[fmt.name] is not fmt:
        raise ConfigError(f"an output format named {fmt.name!r} is registered already")
    REGISTRY[fmt.name] = fmt
    return fmt


def get_format(name: str) -> OutputFormat:
    """The registered format ``name``; ConfigError naming the choices otherwise."""
    try:
        return REGISTRY[name]
    except (KeyError, TypeError):
        raise ConfigError(f"unknown output format {name!r}; choose one of {list(REGISTRY)}") from None


def stream_formats() -> list[OutputFormat]:
    """The formats that write one result at a time to a text stream (``--format``)."""
    return [f for f in REGISTRY.values() if f.streams]


def file_formats() -> list[OutputFormat]:
    """The formats that write a whole file (``--NAME FILE``, ``include_NAME``)."""
    return [f for f in REGISTRY.values() if not f.streams]


def _discover() -> None:
    found = {}
    for module in pkgutil.iter_modules(__path__):
        if module.name not in _NOT_FORMATS and not module.name.startswith("_"):
            fmt = importlib.import_module(f"{__name__}.{module.name}").FORMAT
            found[fmt.name] = fmt
    for name in sorted(found, key=lambda n: (_ORDER.index(n) if n in _ORDER else len(_ORDER), n)):
        register(found[name])


_discover()
