"""Web-Mercator tile math (the paper's eq. 1-6): pure functions over mercantile tiles and numpy arrays.

No I/O, no torch, no faiss. Scalar functions take and return ``mercantile.Tile``; the
``*_array`` variants take and return numpy arrays for whole levels at once. Zoom is
keyword-only everywhere.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import mercantile
import numpy as np
import numpy.typing as npt

from geoindex.errors import ConfigError

__all__ = [
    "MAX_LATITUDE",
    "MAX_ZOOM",
    "LevelSchedule",
    "children",
    "children_array",
    "child_offsets_array",
    "merc_latlon_array",
    "merc_xy_array",
    "quadkey_int",
    "quadkey_int_array",
    "tile_bounds",
    "tile_center",
    "tile_center_array",
    "tile_bounds_array",
    "tile_merc_bounds_array",
    "tile_code",
    "tile_code_array",
    "tile_of",
    "tile_of_array",
    "tile_of_code",
    "tile_xy_of_code_array",
    "view_merc_grid",
]

MAX_LATITUDE = 85.0511287798066  # Web-Mercator's limit: atan(sinh(pi)) in degrees.
MAX_ZOOM = 30  # quadkeys of zoom <= 30 fit in 60 bits; deeper tiles make no sense for photos.

# mercantile counts a point within this distance of a tile's right/bottom edge in the next tile,
# so that tile -> centre -> tile round trips survive floating-point error. We do the same.
_EPSILON = 1e-14


def _check_zoom(zoom: int) -> None:
    if not isinstance(zoom, (int, np.integer)) or not 0 <= zoom <= MAX_ZOOM:
        raise ConfigError(f"zoom must be an integer in 0..{MAX_ZOOM}, got {zoom!r}")


def _check_latitude(lat: npt.ArrayLike) -> None:
    lat = np.asarray(lat, dtype=np.float64)
    if lat.size and not (np.all(np.isfinite(lat)) and np.all(np.abs(lat) <= 90.0)):
        bad = lat[~(np.isfinite(lat) & (np.abs(lat) <= 90.0))].ravel()[0]
        raise ConfigError(f"latitude must be finite and within [-90, 90], got {bad!r}")


def tile_center(tile: mercantile.Tile) -> tuple[float, float]:
    """Centre of a tile as (lat, lon) in degrees: the paper's eq. 1-2 evaluated at x + 1/2, y + 1/2."""
    n = 2.0**tile.z
    lon = (tile.x + 0.5) / n * 360.0 - 180.0
    lat = math.degrees(math.atan(math.sinh(math.pi * (1.0 - 2.0 * (tile.y + 0.5) / n))))
    return lat, lon


def tile_center_array(
    x: npt.ArrayLike, y: npt.ArrayLike, *, zoom: int
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """Vectorised :func:`tile_center`: integer arrays x, y at one zoom -> float64 (lat, lon)."""
    _check_zoom(zoom)
    n = 2.0**zoom
    xf = np.asarray(x, dtype=np.float64)
    yf = np.asarray(y, dtype=np.float64)
    lon = (xf + 0.5) / n * 360.0 - 180.0
    lat = np.degrees(np.arctan(np.sinh(np.pi * (1.0 - 2.0 * (yf + 0.5) / n))))
    return lat, lon


def tile_of_array(
    lat: npt.ArrayLike, lon: npt.ArrayLike, *, zoom: int
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """The tile containing each point (the paper's eq. 3-6), as int64 arrays (x, y).

    Eq. 3-6 use ``ln(tan(lat) + sec(lat))``; we evaluate the identical
    ``0.5 * ln((1 + sin lat) / (1 - sin lat))`` as mercantile does, so both agree to the bit.
    Latitudes beyond +-85.0511 clamp to the first/last row, longitudes wrap at the antimeridian
    (180 is the same meridian as -180).
    """
    _check_zoom(zoom)
    _check_latitude(lat)
    lat_d = np.asarray(np.clip(np.asarray(lat, dtype=np.float64), -MAX_LATITUDE, MAX_LATITUDE))
    lat_r = np.radians(lat_d)
    lon_a = np.asarray(lon, dtype=np.float64)
    if lon_a.size and not np.all(np.isfinite(lon_a)):
        raise ConfigError(f"longitude must be finite, got {lon_a[~np.isfinite(lon_a)].ravel()[0]!r}")
    # Wrap only what is outside [-180, 180): (lon + 180) % 360 - 180 rounds in-range values, which
    # moves points lying within EPSILON of a tile edge into the other tile than mercantile's.
    outside = (lon_a < -180.0) | (lon_a >= 180.0)
    lon_a = np.where(outside, (lon_a + 180.0) % 360.0 - 180.0, lon_a)
    n = 2**zoom
    fx = lon_a / 360.0 + 0.5
    sin = np.sin(lat_r)
    fy = np.array(0.5 - 0.25 * np.log((1.0 + sin) / (1.0 - sin)) / math.pi, dtype=np.float64)
    # numpy's SIMD sin/log may differ from libm's by an ulp; where that could decide the row,
    # recompute with math exactly as mercantile does.
    fy_n = (fy + _EPSILON) * n
    for i in np.flatnonzero(np.abs(fy_n - np.rint(fy_n)) < n * 5e-15):
        s = math.sin(math.radians(float(lat_d.flat[i])))
        fy.flat[i] = 0.5 - 0.25 * math.log((1.0 + s) / (1.0 - s)) / math.pi
    tx = np.floor((fx + _EPSILON) * n).astype(np.int64)
    ty = np.floor((fy + _EPSILON) * n).astype(np.int64)
    return np.clip(tx, 0, n - 1), np.clip(ty, 0, n - 1)


def tile_of(lat: float, lon: float, *, zoom: int) -> mercantile.Tile:
    """The tile at ``zoom`` that contains the point (lat, lon) in degrees (eq. 3-6)."""
    x, y = tile_of_array(lat, lon, zoom=zoom)
    return mercantile.Tile(int(x), int(y), zoom)


def tile_code(tile: mercantile.Tile) -> int:
    """A tile's code ``y * 2**z + x``: unique within one zoom level (row-major, not Z-order)."""
    return (tile.y << tile.z) + tile.x


def tile_code_array(x: npt.ArrayLike, y: npt.ArrayLike, *, zoom: int) -> npt.NDArray[np.int64]:
    """``tile_code`` of many tiles of one zoom: ``y * 2**zoom + x`` as int64."""
    return (np.asarray(y, dtype=np.int64) << zoom) + np.asarray(x, dtype=np.int64)


def tile_xy_of_code_array(codes: npt.ArrayLike, *, zoom: int) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """(x, y) of many ``tile_code`` values of one zoom; the inverse of :func:`tile_code_array` for codes >= 0."""
    codes = np.asarray(codes, dtype=np.int64)
    return codes & ((1 << zoom) - 1), codes >> zoom


def tile_of_code(code: int, *, zoom: int) -> mercantile.Tile:
    """The tile at ``zoom`` whose ``tile_code`` is ``code``."""
    return mercantile.Tile(code & ((1 << zoom) - 1), code >> zoom, zoom)


def tile_bounds(tile: mercantile.Tile) -> mercantile.LngLatBbox:
    """Bounding box (west, south, east, north) of a tile in degrees."""
    return mercantile.bounds(tile)


def tile_bounds_array(
    x: npt.ArrayLike, y: npt.ArrayLike, *, zoom: int
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64], npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """Vectorised :func:`tile_bounds`: integer arrays x, y at one zoom -> float64 (west, south, east, north).

    In degrees, as mercantile.bounds.
    """
    x0, y0, x1, y1 = tile_merc_bounds_array(x, y, zoom=zoom)
    west, north = merc_latlon_array(x0, y0)[::-1]
    east, south = merc_latlon_array(x1, y1)[::-1]
    return west, south, east, north


def tile_merc_bounds_array(
    x: npt.ArrayLike, y: npt.ArrayLike, *, zoom: int
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64], npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """Tiles' boxes on the normalised Web-Mercator plane: float64 (x0, y0, x1, y1) in [0, 1], y from the north."""
    n = float(1 << zoom)
    xf = np.asarray(x, dtype=np.float64)
    yf = np.asarray(y, dtype=np.float64)
    return xf / n, yf / n, (xf + 1.0) / n, (yf + 1.0) / n


def merc_xy_array(
    lat: npt.ArrayLike, lon: npt.ArrayLike
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """(lat, lon) in degrees -> normalised Web-Mercator (fx, fy), float64, y from the north.

    The whole map is the unit square, so ``fx * 2**z`` is the continuous tile column at zoom z
    (eq. 3-6 before the floor). Latitudes clamp to +-MAX_LATITUDE; longitudes are not wrapped.
    """
    lat_r = np.radians(np.clip(np.asarray(lat, dtype=np.float64), -MAX_LATITUDE, MAX_LATITUDE))
    fx = (np.asarray(lon, dtype=np.float64) + 180.0) / 360.0
    fy = (1.0 - np.arcsinh(np.tan(lat_r)) / np.pi) / 2.0
    return fx, fy


def merc_latlon_array(
    fx: npt.ArrayLike, fy: npt.ArrayLike
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """Normalised Web-Mercator (fx, fy) -> float64 (lat, lon) in degrees (eq. 1-2 with the map as unit square)."""
    lon = np.asarray(fx, dtype=np.float64) * 360.0 - 180.0
    lat = np.degrees(np.arctan(np.sinh(np.pi * (1.0 - 2.0 * np.asarray(fy, dtype=np.float64)))))
    return lat, lon


def view_merc_grid(
    lat: float, lon: float, *, zoom: float, size: int, rotation_deg: float = 0.0
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """Pixel centres of a square view on the normalised Web-Mercator plane, as (size, size) float64 (fx, fy).

    The view is centred on (lat, lon), spans ``2**-zoom`` of the map's width (``zoom`` may be
    fractional, like a tile of that zoom) and is rotated ``rotation_deg`` counter-clockwise about
    its centre. Row r, column c is pixel (r, c). Values are not wrapped or clamped to [0, 1].
    """
    cx, cy = (float(v) for v in merc_xy_array(lat, lon))
    t = (np.arange(size, dtype=np.float64) + 0.5) / size - 0.5
    u, v = np.meshgrid(t, t)  # u: right, v: down, in units of the view's side
    a = math.radians(rotation_deg)
    span = 2.0**-zoom
    fx = cx + span * (u * math.cos(a) + v * math.sin(a))
    fy = cy + span * (-u * math.sin(a) + v * math.cos(a))
    return fx, fy


def quadkey_int_array(x: npt.ArrayLike, y: npt.ArrayLike, *, zoom: int) -> npt.NDArray[np.uint64]:
    """Quadkeys as integers: the base-4 quadkey string read as a number (Z-order / Morton code).

    At one zoom, sorting by this integer is sorting by the quadkey string, and the children of a
    parent occupy one contiguous run.
    """
    _check_zoom(zoom)
    xa = np.asarray(x, dtype=np.uint64)
    ya = np.asarray(y, dtype=np.uint64)
    key = np.zeros(np.broadcast(xa, ya).shape, dtype=np.uint64)
    for bit in range(zoom):
        b = np.uint64(bit)
        key |= ((xa >> b) & np.uint64(1)) << np.uint64(2 * bit)
        key |= ((ya >> b) & np.uint64(1)) << np.uint64(2 * bit + 1)
    return key


def quadkey_int(tile: mercantile.Tile) -> int:
    """Integer quadkey of one tile (see :func:`quadkey_int_array`)."""
    return int(quadkey_int_array(tile.x, tile.y, zoom=tile.z))


def child_offsets_array(codes: npt.ArrayLike, *, step: int) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """(dx, dy) int64 offsets of descendants ``step`` zooms down from their positions in quadkey order.

    ``codes`` are Z-order (Morton) positions in ``[0, 4**step)``: bit 2b of a code is bit b of
    dx, bit 2b + 1 is bit b of dy. The inverse of :func:`quadkey_int_array` within one tile.
    """
    code = np.asarray(codes, dtype=np.int64)
    dx = np.zeros_like(code)
    dy = np.zeros_like(code)
    for bit in range(step):
        dx |= ((code >> (2 * bit)) & 1) << bit
        dy |= ((code >> (2 * bit + 1)) & 1) << bit
    return dx, dy


def _child_offsets(step: int) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """(dx, dy) of the 4**step descendants step zooms down, in quadkey order."""
    return child_offsets_array(np.arange(4**step, dtype=np.int64), step=step)


def children_array(
    x: npt.ArrayLike, y: npt.ArrayLike, *, zoom: int, step: int = 2
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """Descendants ``step`` zooms below tiles (x, y) at ``zoom``: arrays of shape (n, 4**step).

    Row i holds the children of tile i in quadkey order.
    """
    _check_zoom(zoom)
    _check_zoom(zoom + step)
    dx, dy = _child_offsets(step)
    xa = np.asarray(x, dtype=np.int64).reshape(-1, 1)
    ya = np.asarray(y, dtype=np.int64).reshape(-1, 1)
    return (xa << step) + dx, (ya << step) + dy


def children(tile: mercantile.Tile, *, zoom: int) -> list[mercantile.Tile]:
    """The tiles at ``zoom`` (> tile.z) inside ``tile``, in quadkey order (16 for zoom = z + 2)."""
    if zoom <= tile.z:
        raise ConfigError(f"children need a deeper zoom than the tile's {tile.z}, got zoom={zoom}")
    cx, cy = children_array(tile.x, tile.y, zoom=tile.z, step=zoom - tile.z)
    return [mercantile.Tile(int(a), int(b), zoom) for a, b in zip(cx[0], cy[0])]


@dataclass(frozen=True)
class LevelSchedule:
    """The zoom levels of the hierarchy: start, start + step, ..., stop (the paper: 4..16 step 2).

    Each level's tiles are the ``4**step`` children of the kept tiles of the level above.
    """

    start: int = 4
    stop: int = 16
    step: int = 2

    def __post_init__(self) -> None:
        if not (0 <= self.start <= self.stop <= MAX_ZOOM):
            raise ConfigError(
                f"level schedule needs 0 <= start <= stop <= {MAX_ZOOM}, "
                f"got start={self.start} stop={self.stop}"
            )
        if self.step < 1 or (self.stop - self.start) % self.step:
            raise ConfigError(
                f"level schedule step must be >= 1 and divide stop - start = "
                f"{self.stop - self.start}, got step={self.step}"
            )

    @property
    def zooms(self) -> tuple[int, ...]:
        """All zooms of the schedule, coarsest first."""
        return tuple(range(self.start, self.stop + 1, self.step))

    @property
    def fanout(self) -> int:
        """Children per parent tile: 4**step (16 for the paper's step of 2)."""
        return 4**self.step

    def index_of(self, zoom: int) -> int:
        """Position of ``zoom`` in the schedule; a ConfigError naming the valid zooms otherwise."""
        if zoom not in self.zooms:
            raise ConfigError(f"zoom {zoom} is not in the level schedule {list(self.zooms)}")
        return self.zooms.index(zoom)

    def parent_zoom(self, zoom: int) -> int | None:
        """The zoom above ``zoom`` in the schedule, or None for the first level."""
        i = self.index_of(zoom)
        return None if i == 0 else self.zooms[i - 1]
