"""Tiles stored as files in a local ``{z}/{x}/{y}.{ext}`` folder: the store that fetch_tiles writes."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import mercantile
from PIL import Image

from geoindex.errors import ConfigError, ImageError, TileNotFoundError, TileSourceError
from geoindex.imagery import load_image
from geoindex.sources.base import TILE_EXTENSIONS

__all__ = ["DirectorySource", "open_directory", "stored_tile_path"]


@dataclass(frozen=True)
class DirectorySource:
    """Tiles stored as ``root/{z}/{x}/{y}.{ext}`` (XYZ, y from the north), e.g. by fetch_tiles.

    With ``ext`` None any of the usual extensions is accepted, so a store that mixes PNG and
    JPEG tiles (as servers sometimes do) reads completely. ``spec`` is ``dir:ROOT``; it does
    not carry ``ext``, so a reopened source reads every usual extension.
    """

    root: Path
    ext: str | None = None

    EXTENSIONS = ("jpeg", "jpg", "png", "webp")

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))
        if not self.root.is_dir():
            raise ConfigError(f"tile directory {self.root} does not exist; fetch tiles into it first")

    @property
    def name(self) -> str:
        return f"dir:{self.root}"

    @property
    def spec(self) -> str:
        """``dir:ROOT``: what ``open_source`` reopens this folder from (equal to the name)."""
        return f"dir:{self.root}"

    def path(self, tile: mercantile.Tile) -> Path | None:
        """The file holding ``tile``, or None if there is none.

        Any entry at a tile's path counts, a regular file or not: a FIFO, a folder, or a broken or
        looping link there is a bad tile (``get`` names it), not a tile missing from the source.
        """
        folder = self.root / str(tile.z) / str(tile.x)
        for ext in (self.ext,) if self.ext else self.EXTENSIONS:
            candidate = folder / f"{tile.y}.{ext}"
            if candidate.is_file() or os.path.lexists(candidate):
                return candidate
        return None

    def get(self, tile: mercantile.Tile) -> Image.Image:
        path = self.path(tile)
        if path is None:
            pattern = f"{tile.y}.{self.ext or '{' + ','.join(self.EXTENSIONS) + '}'}"
            raise TileNotFoundError(f"{self.root / str(tile.z) / str(tile.x) / pattern}: no such tile")
        try:
            return load_image(path, max_side=4096)
        except ImageError as e:
            raise TileSourceError(f"{path}: stored tile is damaged ({e}); delete it and fetch again") from e


def _directory_extension(root: Path) -> str:
    """The tile extension used in a ``{z}/{x}/{y}.{ext}`` store: the first tile file found decides."""
    for z_dir in sorted(p for p in root.iterdir() if p.is_dir() and p.name.isdigit()):
        for x_dir in (p for p in z_dir.iterdir() if p.is_dir()):
            for f in x_dir.iterdir():
                if f.suffix[1:] in TILE_EXTENSIONS:
                    return f.suffix[1:]
    raise ConfigError(f"directory {root} holds no {{z}}/{{x}}/{{y}}.{{ext}} tiles; fetch tiles into it first")


def open_directory(root: str | Path) -> DirectorySource:
    """A DirectorySource for a ``--source`` folder; ConfigError at once if it holds no tiles."""
    root = Path(root)
    if not root.is_dir():
        raise ConfigError(f"tile directory {root} does not exist; fetch tiles into it first")
    _directory_extension(root)
    return DirectorySource(root)


def stored_tile_path(root: Path, tile: mercantile.Tile) -> Path | None:
    """The stored file of a tile under ``root/{z}/{x}/{y}.{ext}``, whatever its extension; None if absent."""
    base = root / str(tile.z) / str(tile.x)
    for ext in TILE_EXTENSIONS:
        path = base / f"{tile.y}.{ext}"
        if path.is_file():
            return path
    return None
