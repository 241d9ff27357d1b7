"""Tiles in an MBTiles archive (sqlite): a read-only source and an atomic writer."""

from __future__ import annotations

import contextlib
import os
import sqlite3
import threading
from collections.abc import Mapping
from pathlib import Path

import mercantile
import numpy as np
import numpy.typing as npt
from PIL import Image

from geoindex.errors import ConfigError, ImageError, TileNotFoundError, TileSourceError
from geoindex.files import atomic_path
from geoindex.imagery import decode_tile
from geoindex.sources.base import ClosingSource, Scheme, SourceKind, after_colon, check_tile, image_extension

__all__ = ["KIND", "MBTilesSource", "write_mbtiles"]

_MBTILES_QUERY = "SELECT tile_data FROM tiles WHERE zoom_level = ? AND tile_column = ? AND tile_row = ?"


def _tms_row(tile: mercantile.Tile) -> int:
    """MBTiles store rows in TMS order (y from the south)."""
    return (1 << tile.z) - 1 - tile.y


class MBTilesSource(ClosingSource):
    """Tiles from an MBTiles archive (sqlite, read-only); safe to share between threads.

    ``spec`` is ``mbtiles:PATH`` (equal to the name). A copy in another process (pickled, or in a
    tile-loading worker, ``reopen_in_workers``) opens its own connection: one must not cross a fork.
    """

    reopen_in_workers = True

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.name = f"mbtiles:{self.path}"
        if not self.path.is_file():
            raise ConfigError(f"MBTiles file {self.path} does not exist; check --source")
        try:
            self._db = sqlite3.connect(
                f"{self.path.resolve().as_uri()}?mode=ro", uri=True, check_same_thread=False
            )
            self._db.execute(_MBTILES_QUERY, (0, 0, 0)).fetchall()
        except sqlite3.Error as e:
            raise ConfigError(f"{self.path} is not an MBTiles file ({e}); it needs a 'tiles' table") from e
        self._lock = threading.Lock()  # one sqlite connection; serialise its use across threads

    @property
    def spec(self) -> str:
        """``mbtiles:PATH``: what ``open_source`` reopens this archive from."""
        return f"mbtiles:{self.path}"

    @property
    def metadata(self) -> dict[str, str]:
        """The archive's ``metadata`` table as a dict (empty if it has none)."""
        with self._lock:
            try:
                return dict(self._db.execute("SELECT name, value FROM metadata").fetchall())
            except sqlite3.Error:
                return {}

    def fetch_bytes(self, tile: mercantile.Tile) -> bytes:
        """The stored encoded image of a tile, validated; TileNotFoundError if absent."""
        with self._lock:
            row = self._db.execute(_MBTILES_QUERY, (tile.z, tile.x, _tms_row(tile))).fetchone()
        if row is None:
            raise TileNotFoundError(f"{self.path}: no tile {tuple(tile)}")
        data = bytes(row[0])
        try:
            check_tile(data, what=f"{self.path} tile {tuple(tile)}")
        except ImageError as e:
            raise TileSourceError(f"{e}; the archive is damaged") from e
        return data

    def tiles(self, *, zoom: int) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
        """The x and y (XYZ, from the north) of every tile the archive holds at ``zoom``."""
        with self._lock:
            rows = self._db.execute(
                "SELECT DISTINCT tile_column, tile_row FROM tiles WHERE zoom_level = ?", (zoom,)).fetchall()
        xy = np.array(rows, dtype=np.int64).reshape(-1, 2)
        return xy[:, 0].copy(), (1 << zoom) - 1 - xy[:, 1]

    def get(self, tile: mercantile.Tile) -> Image.Image:
        """The tile as an RGB image."""
        return decode_tile(self.fetch_bytes(tile), what=f"{self.path} tile {tuple(tile)}")

    def __reduce__(self) -> tuple[type[MBTilesSource], tuple[Path]]:
        return (MBTilesSource, (self.path,))

    def close(self) -> None:
        """Close the database."""
        self._db.close()


def write_mbtiles(
    path: str | os.PathLike[str],
    tiles: Mapping[mercantile.Tile, bytes],
    metadata: Mapping[str, str] | None = None,
) -> Path:
    """Write encoded tiles to a new MBTiles archive atomically (``*.tmp``, then rename).

    Args:
        path: the archive to create; an existing file is replaced.
        tiles: XYZ tile -> encoded image bytes (rows are flipped to TMS on write).
        metadata: the ``metadata`` table; ``name`` and ``format`` default from the path and tiles.

    Returns:
        The archive's path.
    """
    path = Path(path)
    meta = {"name": path.stem, **dict(metadata or {})}
    if "format" not in meta and tiles:
        ext = image_extension(next(iter(tiles.values())), what=str(path))
        meta["format"] = "jpg" if ext == "jpeg" else ext  # the MBTiles spec's spelling
    with atomic_path(path) as tmp, contextlib.closing(sqlite3.connect(tmp)) as db, db:  # one transaction
        db.execute("CREATE TABLE metadata (name TEXT, value TEXT)")
        db.execute(
            "CREATE TABLE tiles "
            "(zoom_level INTEGER, tile_column INTEGER, tile_row INTEGER, tile_data BLOB)"
        )
        db.execute("CREATE UNIQUE INDEX tile_index ON tiles (zoom_level, tile_column, tile_row)")
        db.executemany("INSERT INTO metadata VALUES (?, ?)", sorted(meta.items()))
        db.executemany(
            "INSERT INTO tiles VALUES (?, ?, ?, ?)",
            ((t.z, t.x, _tms_row(t), sqlite3.Binary(data)) for t, data in tiles.items()),
        )
    return path


KIND = SourceKind(
    schemes={"mbtiles": Scheme(lambda spec, _: MBTilesSource(after_colon(spec)), local=True)},
    forms="a path ending in .mbtiles (or 'mbtiles:PATH')",
    guess=lambda spec, _: MBTilesSource(spec) if spec.endswith(".mbtiles") else None,
    guess_rank=10,
)
