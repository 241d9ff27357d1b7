"""Tiles stored as files in a local ``{z}/{x}/{y}.{ext}`` folder: the store that fetch_tiles writes."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import mercantile
import numpy as np
import numpy.typing as npt
from PIL import Image

from geoindex.errors import ConfigError, ImageError, TileNotFoundError, TileSourceError
from geoindex.imagery import TILE_MAX_SIDE, load_image
from geoindex.sources.base import TILE_EXTENSIONS, Scheme, SourceKind, after_colon

__all__ = ["KIND", "DirectorySource", "open_directory", "stored_tile_path"]


@dataclass(frozen=True)
class DirectorySource:
    """Tiles stored as ``root/{z}/{x}/{y}.{ext}`` (XYZ, y from the north), e.g. by fetch_tiles.

    With ``ext`` None every extension in ``TILE_EXTENSIONS`` is accepted, in any case (``5.JPG``),
    so a store that mixes PNG and JPEG tiles (as servers sometimes do) reads completely.
    ``spec`` is ``dir:ROOT``; it does not carry ``ext``, so a reopened source reads every one.
    """

    root: Path
    ext: str | None = None

    EXTENSIONS = TILE_EXTENSIONS

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
        return _find_tile_file(self.root / str(tile.z) / str(tile.x), tile.y,
                               (self.ext,) if self.ext else self.EXTENSIONS)

    def tiles(self, *, zoom: int) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
        """The x and y of every tile file under ``root/{zoom}`` (one per tile whatever its extensions)."""
        wanted = {e.lower() for e in ((self.ext,) if self.ext else self.EXTENSIONS)}
        found: set[tuple[int, int]] = set()
        z_dir = self.root / str(zoom)
        for x_dir in (p for p in z_dir.iterdir() if p.is_dir() and p.name.isdigit()) if z_dir.is_dir() else ():
            for f in x_dir.iterdir():
                stem, _, ext = f.name.partition(".")
                if stem.isdigit() and ext.lower() in wanted:
                    found.add((int(x_dir.name), int(stem)))
        xy = np.array(sorted(found), dtype=np.int64).reshape(-1, 2)
        return xy[:, 0].copy(), xy[:, 1].copy()

    def get(self, tile: mercantile.Tile) -> Image.Image:
        path = self.path(tile)
        if path is None:
            pattern = f"{tile.y}.{self.ext or '{' + ','.join(self.EXTENSIONS) + '}'}"
            raise TileNotFoundError(f"{self.root / str(tile.z) / str(tile.x) / pattern}: no such tile")
        try:
            return load_image(path, max_side=TILE_MAX_SIDE)
        except ImageError as e:
            raise TileSourceError(f"{path}: stored tile is damaged ({e}); delete it and fetch again") from e


def _find_tile_file(folder: Path, y: int, extensions: tuple[str, ...]) -> Path | None:
    """The file ``folder/{y}.{ext}`` for one of ``extensions``, matched case-insensitively; None if absent.

    The lower- and upper-case names are tried directly; only when both miss in a folder that
    exists is it listed, for mixed case (``5.Jpg``).
    """
    for ext in extensions:
        for spelling in dict.fromkeys((ext.lower(), ext.upper())):
            candidate = folder / f"{y}.{spelling}"
            if os.path.lexists(candidate):  # any entry, so that a FIFO or a broken link is a bad tile, not a gap
                return candidate
    if not folder.is_dir():
        return None
    stem, wanted = str(y), {e.lower() for e in extensions}
    for entry in folder.iterdir():
        name, _, ext = entry.name.partition(".")
        if name == stem and ext.lower() in wanted:
            return entry
    return None


def _directory_extension(root: Path) -> str:
    """The tile extension used in a ``{z}/{x}/{y}.{ext}`` store (lower case): the first tile file found decides."""
    for z_dir in sorted(p for p in root.iterdir() if p.is_dir() and p.name.isdigit()):
        for x_dir in (p for p in z_dir.iterdir() if p.is_dir()):
            for f in x_dir.iterdir():
                if f.suffix[1:].lower() in TILE_EXTENSIONS:
                    return f.suffix[1:].lower()
    raise ConfigError(
        f"directory {root} holds no {{z}}/{{x}}/{{y}}.{{ext}} tiles with ext one of {', '.join(TILE_EXTENSIONS)} "
        "(any case); fetch tiles into it first (python -m pipelines.fetch_tiles --out DIR) or pass another --source"
    )


def open_directory(root: str | Path) -> DirectorySource:
    """A DirectorySource for a ``--source`` folder; ConfigError at once if it holds no tiles."""
    root = Path(root)
    if not root.is_dir():
        raise ConfigError(f"tile directory {root} does not exist; fetch tiles into it first")
    _directory_extension(root)
    return DirectorySource(root)


def stored_tile_path(root: Path, tile: mercantile.Tile) -> Path | None:
    """The stored file of a tile under ``root/{z}/{x}/{y}.{ext}``, whatever its extension; None if absent."""
    return _find_tile_file(root / str(tile.z) / str(tile.x), tile.y, TILE_EXTENSIONS)


KIND = SourceKind(
    schemes={"dir": Scheme(lambda spec, _: open_directory(after_colon(spec)), local=True)},
    forms="an existing {z}/{x}/{y}.{ext} directory (or 'dir:PATH')",
    guess=lambda spec, _: open_directory(spec) if Path(spec).is_dir() else None,
    guess_rank=20,
)
