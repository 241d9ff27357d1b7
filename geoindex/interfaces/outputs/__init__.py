"""Output formats of search results, one module each, found by name in :data:`REGISTRY`.

A format (:class:`~geoindex.interfaces.outputs.base.OutputFormat`) either streams results one at a time to a
text stream (``table``, ``csv``, ``json``: ``geoindex locate --format NAME``) or writes a whole file
(``geojson``, ``map``: ``geoindex locate --NAME FILE``, the service's ``include_NAME``). The command
line, the service (``POST /locate/NAME``, ``GET /formats``) and the web page all read this registry;
nothing else names a format.

To add a format: one module in this package that defines ``FORMAT = OutputFormat(...)`` (it is found
and registered on import), plus its test.
"""

from __future__ import annotations

from geoindex.interfaces.outputs.base import Encoded, FileInputs, OutputFormat, ResultWriter, clip, one_line
from geoindex.interfaces.outputs.record import result_to_dict
from geoindex.registry import Registry, discover

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

REGISTRY: Registry[OutputFormat] = Registry("an output format")
register = REGISTRY.register
get_format = REGISTRY.named


def stream_formats() -> list[OutputFormat]:
    """The formats that write one result at a time to a text stream (``--format``)."""
    return [f for f in REGISTRY.values() if f.streams]


def file_formats() -> list[OutputFormat]:
    """The formats that write a whole file (``--NAME FILE``, ``include_NAME``)."""
    return [f for f in REGISTRY.values() if not f.streams]


REGISTRY.register_all(discover(__name__, __path__, "FORMAT", skip={"base", "record"}).values(),
                      first=("table", "json", "csv", "geojson", "map"))  # help texts list the default first
