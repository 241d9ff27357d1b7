"""What every tile source is: the TileSource and ByteTileSource protocols, and the checks of encoded tiles.

A tile source maps a ``mercantile.Tile`` to an RGB ``PIL.Image`` and raises
``TileNotFoundError`` when it has no such tile. Every source in this package also has a
``spec``: the string that ``geoindex.sources.open_source`` opens to get an equivalent source.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol, Self, runtime_checkable

import mercantile
import numpy as np
import numpy.typing as npt
from PIL import Image, UnidentifiedImageError

from geoindex.errors import ImageError
from geoindex.imagery import decode_tile

__all__ = [
    "TILE_EXTENSIONS", "ByteTileSource", "ClosingSource", "ListableTileSource", "Opener", "Scheme", "SourceKind",
    "TileSource", "after_colon", "check_tile", "image_extension",
    "source_spec",
]

# Pillow format name -> the file extension fetch_tiles writes tiles of that format with.
_FORMAT_EXTENSIONS = {"JPEG": "jpeg", "PNG": "png", "WEBP": "webp"}
# Every extension a tile folder is read with (compared case-insensitively): what is written, and
# ``jpg``, which other tools (GDAL, QGIS, the Landsat tiles in ../shared/data) use for JPEG.
TILE_EXTENSIONS = ("jpeg", "jpg", "png", "webp")


Opener = Callable[[str, Mapping[str, Any]], "TileSource"]
"""Opens a spec (given whole, scheme included) with the HTTP options a caller passed."""


@dataclass(frozen=True)
class Scheme:
    """How one kind of spec opens.

    Attributes:
        open: the opener; it gets the whole spec and the HTTP options (local kinds ignore them).
        local: the tiles are on this machine, so a map may reopen an index's imagery from its spec.
        bare: the scheme is the whole spec (``bluemarble``), not a ``scheme:`` prefix.
    """

    open: Opener
    local: bool
    bare: bool = False


@dataclass(frozen=True)
class SourceKind:
    """One kind of tile source as ``open_source`` sees it: each source module declares one as ``KIND``.

    Attributes:
        schemes: spec scheme (the part before the first ``:``, or a bare spec's whole) -> how it opens.
        forms: how this kind's specs look, for the error that lists every accepted form.
        guess: opens a spec without a scheme when its shape is this kind's (a ``.mbtiles`` path, a
            folder, a provider name), else returns None.
        guess_rank: when ``guess`` is tried, lowest first: a more specific shape (a ``.mbtiles``
            suffix) goes before a broader one (an existing folder, then a provider name).
    """

    schemes: Mapping[str, Scheme]
    forms: str = ""
    guess: Callable[[str, Mapping[str, Any]], TileSource | None] | None = None
    guess_rank: int = 100


def after_colon(spec: str) -> str:
    """The part of a ``scheme:rest`` spec after its scheme."""
    return spec.partition(":")[2]


class ClosingSource:
    """A source that holds a resource (connections, a database): ``close`` frees it, and ``with`` closes it."""

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@runtime_checkable
class TileSource(Protocol):
    """Anything that returns the RGB image of a tile, or raises TileNotFoundError.

    ``spec`` is not part of the protocol, so that wrappers and test doubles need only ``name``
    and ``get``; read it with :func:`source_spec`.
    """

    @property
    def name(self) -> str:
        """Identifies the imagery in manifests; equal names must mean equal tiles."""
        ...

    def get(self, tile: mercantile.Tile) -> Image.Image:
        """The tile's RGB image; TileNotFoundError if the source has no such tile."""
        ...


@runtime_checkable
class ByteTileSource(TileSource, Protocol):
    """A tile source that can also return a tile's original encoded bytes (validated)."""

    def fetch_bytes(self, tile: mercantile.Tile) -> bytes:
        """The tile's encoded image; TileNotFoundError if absent, TileSourceError on failure."""
        ...


@runtime_checkable
class ListableTileSource(TileSource, Protocol):
    """A tile source that can say which tiles it holds (a folder, an MBTiles archive), not only fetch them."""

    def tiles(self, *, zoom: int) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
        """The x and y of every tile the source holds at ``zoom``, each shape (n,), int64, no repeats."""
        ...


def source_spec(source: TileSource) -> str | None:
    """The string that reopens ``source`` through ``open_source``; None for a source without one.

    Every source of this package has a ``spec``; wrappers and test doubles may not.
    """
    spec = getattr(source, "spec", None)
    return spec if isinstance(spec, str) else None


def image_extension(data: bytes, *, what: str) -> str:
    """File extension for encoded tile bytes from their header alone (no full decode)."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            fmt = img.format or "?"
    except (UnidentifiedImageError, OSError) as e:
        raise ImageError(f"{what}: not a readable image ({e})") from e
    if fmt not in _FORMAT_EXTENSIONS:
        raise ImageError(f"{what}: unsupported tile format {fmt}; expected one of JPEG, PNG, WEBP")
    return _FORMAT_EXTENSIONS[fmt]


def check_tile(data: bytes, *, what: str) -> str:
    """Decode ``data`` completely (catching truncation) and return its file extension; ImageError if bad."""
    ext = image_extension(data, what=what)
    decode_tile(data, what=what)
    return ext
