"""Which part of the world an index or a fetch covers: the world, bounding boxes, or GeoJSON polygons.

A tile belongs to a coverage when it shares a region of positive area with it: a tile that
only touches a bbox or polygon along an edge or at a corner does not. Bboxes follow
``mercantile.tiles`` exactly. Polygons are tested exactly in longitude/latitude (GeoJSON
edges are straight lines there, and tiles are axis-aligned rectangles there too), with numpy.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import mercantile
import numpy as np
import numpy.typing as npt

from geoindex.errors import ConfigError
from geoindex.geometry.tiles import MAX_LATITUDE, MAX_ZOOM, children_array, quadkey_int_array, tile_bounds_array

__all__ = ["BBox", "Coverage"]

BBox = tuple[float, float, float, float]
"""(west, south, east, north) in degrees; west > east crosses the antimeridian."""
Ring = tuple[tuple[float, float], ...]
"""(lon, lat) vertices of a closed ring, without repeating the first vertex."""
Polygon = tuple[Ring, ...]
"""An exterior ring followed by its holes."""

_IntArray = npt.NDArray[np.int64]
_BoolArray = npt.NDArray[np.bool_]
_FloatArray = npt.NDArray[np.float64]

# Bounds on the (tiles x edges) temporaries of the polygon tests: about 64 MB of float64.
_PAIRS_PER_CHUNK = 1 << 23


def _check_lonlat(lon: float, lat: float, what: str) -> None:
    if not (np.isfinite(lon) and -180.0 <= lon <= 180.0):
        raise ConfigError(f"{what}: longitude {lon!r} is outside [-180, 180]")
    if not (np.isfinite(lat) and -90.0 <= lat <= 90.0):
        raise ConfigError(f"{what}: latitude {lat!r} is outside [-90, 90]")


def _normalise_bbox(bbox: Sequence[float]) -> BBox:
    """Validate a bbox and clamp its latitudes to Web-Mercator's +-85.0511 (tiles end there)."""
    try:
        west, south, east, north = (float(v) for v in bbox)
    except (TypeError, ValueError) as e:
        raise ConfigError(
            f"a bbox needs 4 numbers (west, south, east, north), got {bbox!r} (--bbox W S E N)"
        ) from e
    what = f"bbox {[west, south, east, north]} (--bbox W S E N)"
    _check_lonlat(west, south, what)
    _check_lonlat(east, north, what)
    if south >= north:
        raise ConfigError(f"{what}: south {south} must be less than north {north}")
    if west == east or (west, east) == (180.0, -180.0):  # 180 and -180 are one meridian: zero width
        raise ConfigError(f"{what}: west equals east, so the bbox is empty")
    if north <= -MAX_LATITUDE or south >= MAX_LATITUDE:
        raise ConfigError(
            f"{what}: lies outside Web-Mercator's latitude range [-{MAX_LATITUDE:.4f}, {MAX_LATITUDE:.4f}]"
        )
    return west, max(south, -MAX_LATITUDE), east, min(north, MAX_LATITUDE)


def _split_antimeridian(bbox: BBox) -> list[BBox]:
    west, south, east, north = bbox
    if west > east:
        return [(-180.0, south, east, north), (west, south, 180.0, north)]
    return [bbox]


def _bbox_tile_range(bbox: BBox, zoom: int) -> tuple[int, int, int, int]:
    """(x0, y0, x1, y1) inclusive, exactly as ``mercantile.tiles`` picks them (for a bbox west <= east)."""
    west, south, east, north = bbox
    ul = mercantile.tile(west, north, zoom)
    lr = mercantile.tile(east - mercantile.LL_EPSILON, south + mercantile.LL_EPSILON, zoom)
    return ul.x, ul.y, lr.x, lr.y


def _check_zoom(zoom: int) -> None:
    if not isinstance(zoom, (int, np.integer)) or not 0 <= zoom <= MAX_ZOOM:
        raise ConfigError(f"zoom must be an integer in 0..{MAX_ZOOM}, got {zoom!r}")


def _edges(polygon: Polygon) -> _FloatArray:
    """All edges of a polygon's rings as an (E, 4) array of (x0, y0, x1, y1)."""
    parts = []
    for ring in polygon:
        pts = np.asarray(ring, dtype=np.float64)
        parts.append(np.hstack([pts, np.roll(pts, -1, axis=0)]))
    return np.vstack(parts)


def _boundary_crosses(
    west: _FloatArray, south: _FloatArray, east: _FloatArray, north: _FloatArray, edges: _FloatArray
) -> _BoolArray:
    """Whether any edge passes through the open interior of each rectangle (Liang-Barsky clipping).

    Open means strict inequalities, so an edge lying along a tile's side does not count.
    """
    out = np.zeros(west.shape, dtype=bool)
    step = max(1, _PAIRS_PER_CHUNK // max(len(edges), 1))
    for lo in range(0, len(west), step):
        w, s, e, n = (a[lo : lo + step, None] for a in (west, south, east, north))
        # Spatially coherent chunks (quadkey order) meet few edges: drop the rest first.
        near = (
            (np.maximum(edges[:, 0], edges[:, 2]) > w.min())
            & (np.minimum(edges[:, 0], edges[:, 2]) < e.max())
            & (np.maximum(edges[:, 1], edges[:, 3]) > s.min())
            & (np.minimum(edges[:, 1], edges[:, 3]) < n.max())
        )
        x0, y0, x1, y1 = edges[near].T
        dx, dy = x1 - x0, y1 - y0
        t_in = np.zeros((len(w), len(x0)))
        t_out = np.ones((len(w), len(x0)))
        inside = np.ones((len(w), len(x0)), dtype=bool)
        # Each side of the rectangle bounds t from below (p < 0) or above (p > 0); p == 0 means the
        # edge is parallel to that side and must lie strictly on the inner side of it.
        with np.errstate(divide="ignore", invalid="ignore"):
            for p, q in ((-dx, x0 - w), (dx, e - x0), (-dy, y0 - s), (dy, n - y0)):
                r = q / p
                inside &= (p != 0) | (q > 0)
                t_in = np.where(p < 0, np.maximum(t_in, r), t_in)
                t_out = np.where(p > 0, np.minimum(t_out, r), t_out)
        out[lo : lo + step] = (inside & (t_in < t_out)).any(axis=1)
    return out


def _points_inside(px: _FloatArray, py: _FloatArray, edges: _FloatArray) -> _BoolArray:
    """Even-odd point-in-polygon test (holes included) for points (px, py) against (E, 4) edges."""
    out = np.zeros(px.shape, dtype=bool)
    step = max(1, _PAIRS_PER_CHUNK // max(len(edges), 1))
    for lo in range(0, len(px), step):
        x, y = px[lo : lo + step, None], py[lo : lo + step, None]
        # Only edges spanning the chunk's latitudes can cross a ray cast eastward from its points.
        near = (np.maximum(edges[:, 1], edges[:, 3]) > y.min()) & (
            np.minimum(edges[:, 1], edges[:, 3]) <= y.max()
        )
        x0, y0, x1, y1 = edges[near].T
        spans = (y0 > y) != (y1 > y)
        with np.errstate(divide="ignore", invalid="ignore"):
            x_cross = x0 + (y - y0) * (x1 - x0) / (y1 - y0)
        out[lo : lo + step] = (np.count_nonzero(spans & (x < x_cross), axis=1) % 2).astype(bool)
    return out


def _classify(x: _IntArray, y: _IntArray, zoom: int, edges: _FloatArray) -> tuple[_BoolArray, _BoolArray]:
    """(crossed, inside) per tile: the polygon's boundary passes through the tile; the tile centre is inside.

    A tile meets the polygon iff crossed or inside; it lies wholly within it iff inside and not crossed.
    """
    w, s, e, n = tile_bounds_array(x, y, zoom=zoom)
    crossed = _boundary_crosses(w, s, e, n, edges)
    inside = _points_inside((w + e) / 2.0, (s + n) / 2.0, edges)
    return crossed, inside


def _quadkey_sorted_unique(x: _IntArray, y: _IntArray, zoom: int) -> tuple[_IntArray, _IntArray]:
    _, first = np.unique(quadkey_int_array(x, y, zoom=zoom), return_index=True)
    return x[first], y[first]


def _parse_ring(coords: Any, what: str) -> Ring:
    try:
        ring = tuple((float(p[0]), float(p[1])) for p in coords)
    except (TypeError, ValueError, IndexError) as e:
        raise ConfigError(f"{what}: a ring must be a list of [lon, lat] positions ({e})") from e
    if len(ring) > 1 and ring[0] == ring[-1]:
        ring = ring[:-1]  # GeoJSON repeats the first position to close a ring
    if len(set(ring)) < 3:
        raise ConfigError(f"{what}: a polygon ring needs at least 3 distinct positions, got {len(set(ring))}")
    for lon, lat in ring:
        _check_lonlat(lon, lat, what)
    return ring


def _geojson_polygons(obj: Any, what: str) -> list[Polygon]:
    """Polygons of a GeoJSON FeatureCollection, Feature, Polygon, MultiPolygon or GeometryCollection."""
    kind = obj.get("type") if isinstance(obj, dict) else None
    if kind == "FeatureCollection":
        return [p for f in obj.get("features", []) for p in _geojson_polygons(f, what)]
    if kind == "Feature":
        return _geojson_polygons(obj.get("geometry"), what)
    if kind == "GeometryCollection":
        return [p for g in obj.get("geometries", []) for p in _geojson_polygons(g, what)]
    if kind == "Polygon":
        return [tuple(_parse_ring(r, what) for r in obj["coordinates"])]
    if kind == "MultiPolygon":
        return [tuple(_parse_ring(r, what) for r in poly) for poly in obj["coordinates"]]
    raise ConfigError(
        f"{what}: unsupported GeoJSON type {kind!r}; use Polygon or MultiPolygon geometries "
        "(in a Feature or FeatureCollection)"
    )


@dataclass(frozen=True)
class Coverage:
    """The union of some bboxes and polygons; neither given means the whole world.

    Attributes:
        bboxes: (west, south, east, north) in degrees; latitudes are clamped to +-85.0511.
        polygons: each an exterior ring then holes, as (lon, lat) vertex tuples; rings are
            interpreted even-odd and must not cross the antimeridian (split them, as RFC 7946 asks).
    """

    bboxes: tuple[BBox, ...] = ()
    polygons: tuple[Polygon, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "bboxes", tuple(_normalise_bbox(b) for b in self.bboxes))
        polygons = tuple(tuple(_parse_ring(r, "polygon") for r in p) for p in self.polygons)
        if any(not p for p in polygons):
            raise ConfigError("polygon: needs an exterior ring, got none")
        object.__setattr__(self, "polygons", polygons)

    @classmethod
    def world(cls) -> Coverage:
        """The whole Web-Mercator world."""
        return cls()

    @classmethod
    def from_bbox(cls, west: float, south: float, east: float, north: float) -> Coverage:
        """One bbox in degrees; west > east crosses the antimeridian."""
        return cls(bboxes=((west, south, east, north),))

    @classmethod
    def from_options(
        cls, bbox: Sequence[float] | None = None, geojson: str | os.PathLike[str] | None = None
    ) -> Coverage:
        """The coverage a command line asked for: ``--bbox W S E N``, ``--geojson FILE``, or the world."""
        if bbox and geojson:
            raise ConfigError("give either --bbox or --geojson, not both")
        if bbox:
            return cls.from_bbox(*bbox)
        if geojson:
            return cls.from_geojson(geojson)
        return cls.world()

    @classmethod
    def from_geojson(cls, path: str | os.PathLike[str], *, option: str = "--geojson") -> Coverage:
        """The polygons of a GeoJSON file (Polygon/MultiPolygon, bare or in Features).

        Args:
            option: the command-line option that named the file, for error messages.

        Raises:
            ConfigError: missing or unreadable file, invalid JSON, or no polygon in it.
        """
        path = Path(path)
        what = f"{path} ({option})"
        try:
            obj = json.loads(path.read_text())
        except FileNotFoundError as e:
            raise ConfigError(f"{what}: no such file") from e
        except (OSError, ValueError) as e:
            raise ConfigError(f"{what}: not a readable GeoJSON file ({e})") from e
        except RecursionError as e:
            raise ConfigError(f"{what}: JSON nested too deeply to be GeoJSON") from e
        try:
            polygons = _geojson_polygons(obj, what)
        except (TypeError, KeyError, AttributeError, RecursionError) as e:  # e.g. "coordinates": 5
            raise ConfigError(f"{what}: malformed GeoJSON ({type(e).__name__}: {e}); "
                              "Polygon coordinates are lists of rings of [lon, lat]") from e
        if not polygons:
            raise ConfigError(f"{what}: contains no polygons")
        return cls(polygons=tuple(polygons))

    @property
    def is_world(self) -> bool:
        """True when the coverage is the whole world."""
        return not self.bboxes and not self.polygons

    @cached_property
    def _polygon_edges(self) -> list[_FloatArray]:
        return [_edges(p) for p in self.polygons]

    @cached_property
    def _polygon_bboxes(self) -> list[BBox]:
        boxes = []
        for edges in self._polygon_edges:
            lon, lat = edges[:, 0], np.clip(edges[:, 1], -MAX_LATITUDE, MAX_LATITUDE)
            boxes.append((float(lon.min()), float(lat.min()), float(lon.max()), float(lat.max())))
        return boxes

    def tiles(self, *, zoom: int) -> tuple[_IntArray, _IntArray]:
        """The tiles at ``zoom`` that meet the coverage.

        Returns:
            (x, y): int64 arrays of shape (n,), sorted in quadkey order, without duplicates.
        """
        _check_zoom(zoom)
        if self.is_world:
            side = np.arange(1 << zoom, dtype=np.int64)
            x, y = (a.ravel() for a in np.meshgrid(side, side))
            return _quadkey_sorted_unique(x, y, zoom)
        xs: list[_IntArray] = []
        ys: list[_IntArray] = []
        for bbox in self.bboxes:
            for part in _split_antimeridian(bbox):
                x0, y0, x1, y1 = _bbox_tile_range(part, zoom)
                gx, gy = np.meshgrid(
                    np.arange(x0, x1 + 1, dtype=np.int64), np.arange(y0, y1 + 1, dtype=np.int64)
                )
                xs.append(gx.ravel())
                ys.append(gy.ravel())
        for edges in self._polygon_edges:
            px, py = self._polygon_tiles(edges, zoom)
            xs.append(px)
            ys.append(py)
        return _quadkey_sorted_unique(np.concatenate(xs), np.concatenate(ys), zoom)

    @staticmethod
    def _polygon_tiles(edges: _FloatArray, zoom: int) -> tuple[_IntArray, _IntArray]:
        """Refine from zoom 0: only tiles the boundary crosses are split; tiles wholly inside are kept whole.

        The work grows with the polygon's perimeter in tiles, not with its area.
        """
        full_x: list[_IntArray] = []
        full_y: list[_IntArray] = []
        bx = by = np.zeros(1, dtype=np.int64)
        for z in range(zoom + 1):
            if z:
                cx, cy = children_array(bx, by, zoom=z - 1, step=1)
                bx, by = cx.ravel(), cy.ravel()
            crossed, inside = _classify(bx, by, z, edges)
            full = inside & ~crossed
            if full.any():
                fx, fy = children_array(bx[full], by[full], zoom=z, step=zoom - z)
                full_x.append(fx.ravel())
                full_y.append(fy.ravel())
            bx, by = bx[crossed], by[crossed]
        return np.concatenate([*full_x, bx]), np.concatenate([*full_y, by])

    def intersects(self, x: npt.ArrayLike, y: npt.ArrayLike, *, zoom: int) -> _BoolArray:
        """Whether each tile (x, y) at ``zoom`` meets the coverage.

        Args:
            x, y: integer tile coordinates, shape (n,).

        Returns:
            Bool array of shape (n,); True exactly for the tiles that ``tiles(zoom=zoom)`` returns.
        """
        _check_zoom(zoom)
        xa = np.asarray(x, dtype=np.int64).ravel()
        ya = np.asarray(y, dtype=np.int64).ravel()
        if self.is_world:
            return np.ones(xa.shape, dtype=bool)
        hit = np.zeros(xa.shape, dtype=bool)
        for bbox in self.bboxes:
            for part in _split_antimeridian(bbox):
                x0, y0, x1, y1 = _bbox_tile_range(part, zoom)
                hit |= (xa >= x0) & (xa <= x1) & (ya >= y0) & (ya <= y1)
        for edges, bbox in zip(self._polygon_edges, self._polygon_bboxes, strict=True):
            # The bbox test is cheap and exact for "outside"; classify only the tiles it keeps.
            x0, y0, x1, y1 = _bbox_tile_range(bbox, zoom)
            near = np.flatnonzero(~hit & (xa >= x0) & (xa <= x1) & (ya >= y0) & (ya <= y1))
            crossed, inside = _classify(xa[near], ya[near], zoom, edges)
            hit[near] = crossed | inside
        return hit

    def to_json(self) -> dict[str, Any]:
        """A plain dict for a manifest; :meth:`from_json` reads it back."""
        return {
            "bboxes": [list(b) for b in self.bboxes],
            "polygons": [[[list(v) for v in ring] for ring in poly] for poly in self.polygons],
        }

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> Coverage:
        """Inverse of :meth:`to_json`; ConfigError if ``obj`` is not such a dict."""
        if not isinstance(obj, dict) or set(obj) - {"bboxes", "polygons"}:
            raise ConfigError(f"coverage must be a dict with 'bboxes' and 'polygons', got {obj!r:.200}")
        bboxes = tuple(_normalise_bbox(b) for b in obj.get("bboxes", []))
        try:
            polygons = tuple(
                tuple(_parse_ring(r, "coverage polygon") for r in p) for p in obj.get("polygons", [])
            )
        except TypeError as e:
            raise ConfigError(f"coverage: polygons must be lists of rings of [lon, lat] ({e})") from e
        return cls(bboxes=bboxes, polygons=polygons)
