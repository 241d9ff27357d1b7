"""Views of map imagery with known centres: queries that look unlike any indexed tile.

A view is a square crop of a tile source's imagery centred anywhere (not on the tile grid), at
another scale, rotated, with its colours, contrast and sharpness changed. Its true position is
known, so views stand in for photos wherever positions must be known: training the map encoders
(``pipelines.experiment``, ``pipelines.ship_encoders``) and fitting an index's calibration. The same
seed gives the same views.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import mercantile
import numpy as np
import numpy.typing as npt
from PIL import Image, ImageEnhance, ImageFilter

from geoindex.errors import ConfigError, TileNotFoundError
from geoindex.geometry.tiles import merc_latlon_array, view_merc_grid
from geoindex.sources import RasterSource, TileSource

__all__ = ["Mosaic", "View", "ViewStyle", "random_views", "view_sampler"]


class Mosaic:
    """Samples one zoom level of a tile source at arbitrary Web-Mercator points (missing tiles are black)."""

    def __init__(self, source: TileSource, zoom: int) -> None:
        self.source = source
        self.zoom = zoom
        self._tiles: dict[tuple[int, int], npt.NDArray[np.uint8]] = {}

    def _tile(self, x: int, y: int) -> npt.NDArray[np.uint8]:
        key = (x % (1 << self.zoom), min(max(y, 0), (1 << self.zoom) - 1))
        if key not in self._tiles:
            try:
                img = self.source.get(mercantile.Tile(key[0], key[1], self.zoom)).resize((256, 256))
                self._tiles[key] = np.asarray(img.convert("RGB"), dtype=np.uint8)
            except TileNotFoundError:
                self._tiles[key] = np.zeros((256, 256, 3), np.uint8)
        return self._tiles[key]

    def render_view(self, lat: float, lon: float, *, zoom: float, size: int = 256,
                    rotation_deg: float = 0.0) -> Image.Image:
        """Like ``RasterSource.render_view``: a view spanning 2**-zoom of the world, rotated about its centre."""
        world = 256 * (1 << self.zoom)
        fx_view, fy_view = view_merc_grid(lat, lon, zoom=zoom, size=size, rotation_deg=rotation_deg)
        px = fx_view * world - 0.5  # mosaic pixel coordinates, 0 at a pixel's centre
        py = np.clip(fy_view * world - 0.5, 0, world - 1)
        x0, y0 = np.floor(px).astype(np.int64), np.floor(py).astype(np.int64)
        fx, fy = (px - x0)[..., None], (py - y0)[..., None]
        # One patch of the tiles the view touches (unwrapped across the antimeridian), then one gather.
        tx0, tx1 = int(x0.min()) // 256, (int(x0.max()) + 1) // 256
        ty0, ty1 = int(y0.min()) // 256, min(int(y0.max()) + 1, world - 1) // 256
        patch = np.concatenate([np.concatenate([self._tile(tx, ty) for tx in range(tx0, tx1 + 1)], axis=1)
                                for ty in range(ty0, ty1 + 1)], axis=0).astype(np.float32)
        cols, rows = x0 - tx0 * 256, y0 - ty0 * 256
        bottom_row = np.minimum(y0 + 1, world - 1) - ty0 * 256

        top = patch[rows, cols] * (1 - fx) + patch[rows, cols + 1] * fx
        bottom = patch[bottom_row, cols] * (1 - fx) + patch[bottom_row, cols + 1] * fx
        return Image.fromarray(np.clip(top * (1 - fy) + bottom * fy + 0.5, 0, 255).astype(np.uint8), "RGB")


def view_sampler(source: TileSource, zoom: int) -> RasterSource | Mosaic:
    """What renders views of ``source`` near ``zoom``: a raster renders its own, other sources via a Mosaic."""
    return source if isinstance(source, RasterSource) else Mosaic(source, zoom)


@dataclass(frozen=True)
class ViewStyle:
    """How far a view may stray from its tile: scale, rotation and photometric changes (uniform ranges).

    Attributes:
        zoom_spread: the view spans a tile of zoom ``tile.z + u``, u in [-zoom_spread, zoom_spread].
        rotation_deg: rotation in [-rotation_deg, rotation_deg].
        brightness, colour, contrast: enhancement factors in [1 - x, 1 + x].
        blur_px: Gaussian blur radius in [0, blur_px].
        margin: the centre lies in the tile's inner square, ``margin`` of its side from each edge.
    """

    zoom_spread: float = 0.6
    rotation_deg: float = 180.0
    brightness: float = 0.25
    colour: float = 0.4
    contrast: float = 0.2
    blur_px: float = 1.5
    margin: float = 0.02

    def __post_init__(self) -> None:
        values = (self.zoom_spread, self.rotation_deg, self.brightness, self.colour, self.contrast, self.blur_px)
        if min(values) < 0 or not 0 <= self.margin < 0.5 or max(self.brightness, self.colour, self.contrast) >= 1:
            raise ConfigError(f"view style out of range: {self}")


@dataclass(frozen=True)
class View:
    """A rendered view, the tile it was made from, and its true centre (degrees)."""

    image: Image.Image
    tile: mercantile.Tile
    lat: float
    lon: float


def random_views(
    source: TileSource, tiles: Sequence[mercantile.Tile], *, per_tile: int = 1, seed: int | Sequence[int] = 0,
    style: ViewStyle = ViewStyle(), size: int = 256,
) -> list[View]:
    """``per_tile`` random views of each tile, centred inside it, in tile order then view order.

    The same seed, tiles and style give the same views. All tiles must share one zoom.
    """
    if not tiles:
        return []
    zooms = {t.z for t in tiles}
    if len(zooms) != 1:
        raise ConfigError(f"random_views takes tiles of one zoom, got zooms {sorted(zooms)}")
    zoom = zooms.pop()
    sampler = view_sampler(source, zoom)
    rng = np.random.default_rng(seed)
    lo, hi = style.margin, 1.0 - style.margin
    views = []
    for tile in tiles:
        for _ in range(per_tile):
            fx, fy = rng.uniform(lo, hi, size=2)
            lat_a, lon_a = merc_latlon_array((tile.x + fx) / 2**zoom, (tile.y + fy) / 2**zoom)
            lat, lon = float(lat_a), float(lon_a)
            img = sampler.render_view(lat, lon, size=size,
                                      zoom=zoom + float(rng.uniform(-style.zoom_spread, style.zoom_spread)),
                                      rotation_deg=float(rng.uniform(-style.rotation_deg, style.rotation_deg)))
            img = ImageEnhance.Brightness(img).enhance(float(rng.uniform(1 - style.brightness, 1 + style.brightness)))
            img = ImageEnhance.Color(img).enhance(float(rng.uniform(1 - style.colour, 1 + style.colour)))
            img = ImageEnhance.Contrast(img).enhance(float(rng.uniform(1 - style.contrast, 1 + style.contrast)))
            img = img.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.0, style.blur_px))))
            views.append(View(img, tile, lat, lon))
    return views
