"""Tile sources, one module per kind, opened from ``--source`` strings through one scheme table.

Kinds: a local ``{z}/{x}/{y}.{ext}`` folder (``folder``), an in-memory mapping (``memory``), an
equirectangular raster such as the embedded Blue Marble (``raster``), an HTTP tile server or
xyzservices provider (``http``) and an MBTiles archive (``mbtiles``); ``fetch`` copies any of
them into a folder. ``open_source`` turns a spec string into a source; every source's ``spec``
opens an equivalent source again (``open_source(src.spec)``), except an in-memory one.

To add a kind: one module in this package with its class (``name``, ``spec``, ``get``) and a
``KIND = SourceKind(...)`` saying which spec schemes open it (found on import, like the codecs).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from geoindex.errors import ConfigError, ImageError
from geoindex.registry import discover
from geoindex.sources.base import (
    TILE_EXTENSIONS,
    ByteTileSource,
    ListableTileSource,
    Scheme,
    SourceKind,
    TileSource,
    source_spec,
)
from geoindex.sources.fetch import MISSING_FILE, FetchSummary, ProgressBar, fetch_to_directory
from geoindex.sources.folder import DirectorySource, stored_tile_path
from geoindex.sources.http import USER_AGENT, HttpSource
from geoindex.sources.mbtiles import MBTilesSource, write_mbtiles
from geoindex.sources.memory import MemorySource
from geoindex.sources.raster import RasterSource, embedded_world_raster

__all__ = [
    "MAP_HTTP_OPTIONS",
    "MISSING_FILE",
    "KINDS",
    "SCHEMES",
    "TILE_EXTENSIONS",
    "USER_AGENT",
    "ByteTileSource",
    "DirectorySource",
    "FetchSummary",
    "HttpSource",
    "ListableTileSource",
    "MBTilesSource",
    "MemorySource",
    "ProgressBar",
    "RasterSource",
    "Scheme",
    "SourceKind",
    "TileSource",
    "embedded_world_raster",
    "fetch_to_directory",
    "is_local_spec",
    "map_source",
    "open_source",
    "source_spec",
    "stored_tile_path",
    "write_mbtiles",
]

log = logging.getLogger(__name__)

KINDS: list[SourceKind] = list(discover(__name__, __path__, "KIND", skip={"base", "fetch"}).values())
"""Every kind of source, in module-name order (scheme-less specs are guessed in ``guess_rank`` order)."""
SCHEMES: dict[str, Scheme] = {scheme: entry for kind in KINDS for scheme, entry in kind.schemes.items()}
"""Spec scheme (the part before the first ``:``, or the whole of a bare spec) -> how it opens."""

_SPEC_FORMS = ", ".join(kind.forms for kind in KINDS if kind.forms)


def _scheme(spec: str) -> Scheme | None:
    """The table entry of a spec, or None when it has no scheme (a plain path or provider name)."""
    scheme, colon, _ = spec.partition(":")
    entry = SCHEMES.get(scheme if colon else spec)
    return entry if entry is not None and entry.bare == (not colon) else None


def is_local_spec(spec: str) -> bool:
    """True when ``spec`` names a scheme whose tiles are on this machine (``dir:``, ``mbtiles:``, ``raster:``, ...)."""
    entry = _scheme(spec)
    return entry is not None and entry.local


def _guess(spec: str, http_options: Mapping[str, Any]) -> TileSource:
    """Specs without a scheme, recognised by their shape, tried in ``guess_rank`` order: a ``.mbtiles``
    path, then an existing folder, then a provider name."""
    for kind in sorted(KINDS, key=lambda k: k.guess_rank):
        source = kind.guess(spec, http_options) if kind.guess is not None else None
        if source is not None:
            return source
    raise ConfigError(f"cannot use --source {spec!r}: expected {_SPEC_FORMS}")


def open_source(spec: str, *, option: str = "--source", **http_options: Any) -> TileSource:
    """Turn a ``--source`` string (or a source's ``spec``) into a tile source.

    Args:
        spec: ``scheme:...`` for a scheme of :data:`SCHEMES` (``http(s)://`` URL template,
            ``xyz:PROVIDER``, ``dir:PATH``, ``mbtiles:PATH``, ``raster:PATH``), ``bluemarble``,
            or without a scheme a path ending in ``.mbtiles``, a tile folder, or a provider name.
        option: the command-line option that gave ``spec``, named in error messages.
        **http_options: keyword arguments for :class:`HttpSource` (timeout, max_retries,
            max_rps, ...); local sources do not use them.

    Raises:
        SourceNotReopenableError: ``spec`` is an in-memory source's (``memory:NAME``).
        ConfigError: the spec matches none of the accepted forms, or its target is invalid or
            cannot be read.
    """
    spec = spec.strip()
    try:
        entry = _scheme(spec)
        return entry.open(spec, http_options) if entry is not None else _guess(spec, http_options)
    except ConfigError as e:
        if option == "--source":
            raise
        raise type(e)(str(e).replace("--source", option)) from e
    except (OSError, ImageError) as e:
        reason = f"{e.strerror} ({e.filename})" if isinstance(e, OSError) and e.strerror else str(e)
        raise ConfigError(f"cannot use {option} {spec!r}: {reason}") from e


# Maps ask for ~17 tiles after the answer is known: a dead server must cost seconds, not minutes.
MAP_HTTP_OPTIONS: dict[str, Any] = {"timeout": 5.0, "max_retries": 1}

_EMBEDDED_NAME = "raster:bmng.jpg"  # the name of RasterSource(): the embedded Blue Marble


def map_source(imagery: str, spec: str | None = None, *, imagery_spec: str | None = None) -> TileSource:
    """The imagery to draw maps over: ``spec`` if given, else an index's own imagery when local.

    Args:
        imagery: the index manifest's ``imagery`` (the source's name, such as ``dir:PATH``).
        spec: a ``--map-source`` string for :func:`open_source`, overriding the index's imagery.
        imagery_spec: the manifest's ``imagery_spec``, reopened when its scheme is local. Indexes
            built before it was recorded have None; their ``dir:`` and ``mbtiles:`` names are
            such specs, other names are not.

    Returns:
        The tile source; the embedded Blue Marble where the index's imagery is remote, gone or unreadable.

    Raises:
        ConfigError: ``spec`` cannot be opened (the message names ``--map-source``).
    """
    if spec:
        return open_source(spec, option="--map-source", **MAP_HTTP_OPTIONS)
    if imagery_spec is None and imagery.partition(":")[0] in ("dir", "mbtiles"):
        imagery_spec = imagery
    entry = _scheme(imagery_spec) if imagery_spec else None
    if imagery_spec and entry is not None and entry.local:
        try:
            return open_source(imagery_spec, option="--map-source")
        except ConfigError as e:
            log.warning("the index's imagery %s cannot be used (%s); drawing over the embedded Blue Marble "
                        "(choose another with --map-source)", imagery_spec, e)
            return RasterSource()
    if imagery != _EMBEDDED_NAME:
        log.info("the index's imagery %r is not local; drawing over the embedded Blue Marble "
                 "(choose another with --map-source)", imagery)
    return RasterSource()
