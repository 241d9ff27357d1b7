"""Tiles held in memory: a mapping or a render function (tests, benchmarks and rendered data)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import mercantile
from PIL import Image

from geoindex.errors import SourceNotReopenableError, TileNotFoundError
from geoindex.sources.base import Scheme, SourceKind, TileSource

__all__ = ["KIND", "MemorySource"]


class MemorySource:
    """Tiles from a mapping or a render function; for tests and rendered data.

    Its ``spec`` is ``memory:NAME``, which records what the imagery was but cannot be opened
    again: the tiles live only in this process. ``open_source`` refuses it with
    ``SourceNotReopenableError``.
    """

    def __init__(
        self,
        tiles: Mapping[mercantile.Tile, Image.Image] | Callable[[mercantile.Tile], Image.Image | None],
        name: str = "memory",
    ) -> None:
        self._tiles = tiles
        self.name = name

    @property
    def spec(self) -> str:
        """``memory:NAME``; ``open_source`` raises SourceNotReopenableError for it."""
        return f"memory:{self.name}"

    def get(self, tile: mercantile.Tile) -> Image.Image:
        img = self._tiles.get(tile) if isinstance(self._tiles, Mapping) else self._tiles(tile)
        if img is None:
            raise TileNotFoundError(f"{self.name}: no tile {tuple(tile)}")
        return img


def _refuse(spec: str, _: Mapping[str, Any]) -> TileSource:
    raise SourceNotReopenableError(
        f"cannot use --source {spec!r}: an in-memory source cannot be opened from a string (its tiles lived "
        "in the process that made it); pass the MemorySource object itself, or choose imagery on disk"
    )


KIND = SourceKind(schemes={"memory": Scheme(_refuse, local=False)})
