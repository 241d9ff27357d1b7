"""Property tests for geoindex.geometry.tiles: agreement with mercantile and with the paper's eq. 1-6."""

from __future__ import annotations

import dataclasses
import itertools
import math

import mercantile
import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from geoindex.errors import ConfigError
from geoindex.geometry.tiles import (
    MAX_LATITUDE,
    MAX_ZOOM,
    LevelSchedule,
    child_offsets_array,
    children,
    children_array,
    merc_latlon_array,
    merc_xy_array,
    quadkey_int,
    quadkey_int_array,
    tile_bounds,
    tile_bounds_array,
    tile_center,
    tile_center_array,
    tile_merc_bounds_array,
    tile_of,
    tile_of_array,
    view_merc_grid,
)

settings.register_profile("geoindex-tiles", max_examples=150, deadline=None)
PROFILE = settings.get_profile("geoindex-tiles")

lats = st.floats(min_value=-85.05, max_value=85.05, allow_nan=False)
# Longitude 180 itself is tested separately: mercantile clamps it, we wrap it (see below).
lons = st.floats(min_value=-180.0, max_value=180.0, exclude_max=True, allow_nan=False)
zooms = st.integers(min_value=0, max_value=20)


@st.composite
def tiles_st(draw: st.DrawFn, max_zoom: int = MAX_ZOOM, min_zoom: int = 0) -> mercantile.Tile:
    z = draw(st.integers(min_value=min_zoom, max_value=max_zoom))
    x = draw(st.integers(min_value=0, max_value=2**z - 1))
    y = draw(st.integers(min_value=0, max_value=2**z - 1))
    return mercantile.Tile(x, y, z)


# --- the paper's equations, written out literally -------------------------------------------


def paper_eq_1_2(x: float, y: float, zoom: int) -> tuple[float, float]:
    """Eq. 1-2: continuous tile coordinates -> (lat, lon) in degrees."""
    lon = x / 2**zoom * 360.0 - 180.0
    lat = math.degrees(math.atan(math.sinh(math.pi * (1.0 - 2.0 * y / 2**zoom))))
    return lat, lon


def paper_eq_3_6_continuous(lat: float, lon: float, zoom: int) -> tuple[float, float]:
    """Eq. 3-6 before the floor: (lat, lon) in degrees -> continuous tile coordinates (x, y)."""
    lat_r = math.radians(lat)
    x = (lon + 180.0) / 360.0 * 2**zoom
    y = (1.0 - math.log(math.tan(lat_r) + 1.0 / math.cos(lat_r)) / math.pi) / 2.0 * 2**zoom
    return x, y


def paper_eq_3_6(lat: float, lon: float, zoom: int) -> tuple[int, int]:
    x, y = paper_eq_3_6_continuous(lat, lon, zoom)
    return math.floor(x), math.floor(y)


def frac_distance(v: float) -> float:
    """Distance of v from the nearest integer (i.e. from a tile edge, in tile units)."""
    return abs(v - round(v))


def mercantile_tile(lat: float, lon: float, zoom: int) -> mercantile.Tile:
    """mercantile.tile, with its one out-of-grid answer corrected.

    For a longitude within mercantile.EPSILON (3.6e-12 degrees) below 180 mercantile returns
    x = 2**zoom, a column that does not exist (e.g. tile(180 - 1e-13, 0, 3) has x=8); the last
    column is meant. ``test_longitude_just_below_180_stays_in_the_grid`` pins that case.
    """
    t = mercantile.tile(lon, lat, zoom)
    return mercantile.Tile(min(t.x, 2**zoom - 1), min(t.y, 2**zoom - 1), zoom)


# --- tile_of / tile_of_array against mercantile ------------------------------------------------


@pytest.mark.filterwarnings("ignore:Mercantile 2.0:FutureWarning")  # from mercantile_tile()
@PROFILE
@given(lat=lats, lon=lons, zoom=zooms)
def test_tile_of_equals_mercantile(lat: float, lon: float, zoom: int) -> None:
    assert tile_of(lat, lon, zoom=zoom) == mercantile_tile(lat, lon, zoom)


@pytest.mark.filterwarnings("ignore:Mercantile 2.0:FutureWarning")  # from mercantile_tile()
@PROFILE
@given(points=st.lists(st.tuples(lats, lons), min_size=1, max_size=50), zoom=zooms)
def test_tile_of_array_equals_mercantile(points: list[tuple[float, float]], zoom: int) -> None:
    lat = np.array([p[0] for p in points])
    lon = np.array([p[1] for p in points])
    x, y = tile_of_array(lat, lon, zoom=zoom)
    assert x.dtype == np.int64 and y.dtype == np.int64
    assert x.shape == lat.shape and y.shape == lat.shape
    expected = [mercantile_tile(a, b, zoom) for a, b in points]
    assert list(zip(x.tolist(), y.tolist(), strict=True)) == [(t.x, t.y) for t in expected]


@pytest.mark.filterwarnings("ignore:Mercantile 2.0:FutureWarning")
def test_tile_of_array_many_random_points_all_zooms() -> None:
    rng = np.random.default_rng(0)
    lat = rng.uniform(-85.05, 85.05, 2000)
    lon = rng.uniform(-180.0, 180.0, 2000)
    for zoom in range(0, 31, 3):
        x, y = tile_of_array(lat, lon, zoom=zoom)
        expected = np.array([mercantile_tile(a, b, zoom)[:2] for a, b in zip(lat, lon, strict=True)])
        np.testing.assert_array_equal(np.stack([x, y], axis=1), expected)


def test_tile_of_array_keeps_shape() -> None:
    lat = np.zeros((3, 4))
    lon = np.linspace(-170, 170, 12).reshape(3, 4)
    x, y = tile_of_array(lat, lon, zoom=5)
    assert x.shape == (3, 4) and y.shape == (3, 4)
    assert int(x[0, 0]) == tile_of(0.0, -170.0, zoom=5).x


def _edge_points(rng: np.random.Generator) -> list[tuple[int, float, float]]:
    """Points on tile edges, on mercantile's EPSILON boundary next to them, and a few ulps around."""
    points = []
    for zoom in range(1, 31):
        n = 2**zoom
        for k in rng.integers(1, n, size=6):
            for offset in (0.0, -mercantile.EPSILON, mercantile.EPSILON):
                f = int(k) / n + offset
                lon0 = (f - 0.5) * 360.0  # mercantile's x = lon / 360 + 0.5
                lat0 = math.degrees(math.atan(math.sinh(math.pi * (1.0 - 2.0 * f))))
                lon, lat = lon0, lat0
                for _ in range(4):
                    lon, lat = math.nextafter(lon, -180.0), math.nextafter(lat, -90.0)
                for _ in range(9):
                    if -180.0 <= lon < 180.0 and abs(lat) <= 85.05:
                        points.append((zoom, lat, 0.0))
                        points.append((zoom, 0.0, lon))
                    lon, lat = math.nextafter(lon, 180.0), math.nextafter(lat, 90.0)
    return points


@pytest.mark.filterwarnings("ignore:Mercantile 2.0:FutureWarning")
def test_tile_of_equals_mercantile_on_and_next_to_tile_edges() -> None:
    # Random floats essentially never land within an ulp of a tile edge; these points do. They
    # caught (1) longitude wrapping that rounded in-range longitudes and (2) numpy's SIMD log
    # differing from libm's by an ulp next to mercantile's EPSILON boundary.
    points = _edge_points(np.random.default_rng(7))
    assert len(points) > 5000
    for zoom in range(1, 31):
        sel = [(lat, lon) for z, lat, lon in points if z == zoom]
        x, y = tile_of_array(np.array([p[0] for p in sel]), np.array([p[1] for p in sel]), zoom=zoom)
        expected = [mercantile_tile(lat, lon, zoom)[:2] for lat, lon in sel]
        assert list(zip(x.tolist(), y.tolist(), strict=True)) == expected, f"zoom {zoom}"
    for zoom, lat, lon in points[::50]:
        assert tile_of(lat, lon, zoom=zoom) == mercantile_tile(lat, lon, zoom)


@pytest.mark.parametrize("lat", [73.49487943196945, 73.49487943196947])
def test_tile_of_row_where_numpy_log_differs_from_libm(lat: float) -> None:
    # On an AVX-512 numpy, np.log is one ulp off math.log here, right at mercantile's EPSILON
    # boundary below row 101036 of zoom 19; the row must still be mercantile's.
    assert mercantile.tile(0.0, lat, 19).y == 101036
    assert tile_of(lat, 0.0, zoom=19).y == 101036
    assert tile_of_array(np.array([lat, lat]), np.zeros(2), zoom=19)[1].tolist() == [101036, 101036]


# --- the antimeridian ------------------------------------------------------------------------


@pytest.mark.parametrize("zoom", [0, 1, 4, 12, 20, 30])
@pytest.mark.parametrize("lat", [-85.0, -33.3, 0.0, 51.5, 85.0])
def test_longitude_180_wraps_to_the_first_column(lat: float, zoom: int) -> None:
    # Our documented choice, where we differ from mercantile: 180 and -180 are one meridian, and
    # tiles are half-open [west, east), so the point belongs to column 0, like -180.
    # mercantile instead clamps lon=180 into the last column.
    n = 2**zoom
    assert tile_of(lat, 180.0, zoom=zoom) == tile_of(lat, -180.0, zoom=zoom)
    assert tile_of(lat, 180.0, zoom=zoom).x == 0
    assert mercantile.tile(-180.0, lat, zoom).x == 0
    assert mercantile.tile(180.0, lat, zoom).x == n - 1  # mercantile's differing behaviour
    x, _ = tile_of_array(np.array([lat, lat]), np.array([180.0, -180.0]), zoom=zoom)
    assert x.tolist() == [0, 0]


@pytest.mark.filterwarnings("ignore:Mercantile 2.0:FutureWarning")
@pytest.mark.parametrize("zoom", [0, 3, 20, 30])
def test_longitude_just_below_180_stays_in_the_grid(zoom: int) -> None:
    n = 2**zoom
    for lon in (math.nextafter(180.0, 0.0), 180.0 - 1e-13, 180.0 - 1e-9):
        assert tile_of(0.0, lon, zoom=zoom).x == n - 1
    if zoom == 3:  # mercantile's out-of-grid answer that mercantile_tile() corrects
        assert mercantile.tile(180.0 - 1e-13, 0.0, 3).x == 8


@PROFILE
@given(lat=lats, lon=lons, zoom=zooms, turns=st.integers(min_value=-3, max_value=3))
def test_longitude_wraps_by_whole_turns(lat: float, lon: float, zoom: int, turns: int) -> None:
    # lon + 360 * turns is rounded; stay away from tile edges so that rounding cannot matter.
    assume(frac_distance((lon / 360.0 + 0.5) * 2**zoom) > 1e-6)
    assert tile_of(lat, lon + 360.0 * turns, zoom=zoom) == tile_of(lat, lon, zoom=zoom)


# --- the paper's equations -------------------------------------------------------------------


@PROFILE
@given(lat=lats, lon=lons, zoom=zooms)
def test_tile_of_equals_paper_eq_3_6_away_from_edges(lat: float, lon: float, zoom: int) -> None:
    fx, fy = paper_eq_3_6_continuous(lat, lon, zoom)
    # "Away from edges": the literal eq. 4 is off by up to ~1e-14 of the map near the poles.
    margin = max(1e-9, 2**zoom * 1e-12)
    assume(frac_distance(fx) > margin and frac_distance(fy) > margin)
    assert tuple(tile_of(lat, lon, zoom=zoom)) == (*paper_eq_3_6(lat, lon, zoom), zoom)


@PROFILE
@given(lat=lats, lon=lons, zoom=zooms)
def test_paper_eq_3_6_inverts_eq_1_2(lat: float, lon: float, zoom: int) -> None:
    fx, fy = paper_eq_3_6_continuous(lat, lon, zoom)
    lat2, lon2 = paper_eq_1_2(fx, fy, zoom)
    assert lat2 == pytest.approx(lat, abs=1e-9)
    assert lon2 == pytest.approx(lon, abs=1e-9)


@PROFILE
@given(tile=tiles_st())
def test_tile_center_is_paper_eq_1_2_at_half_tile(tile: mercantile.Tile) -> None:
    lat, lon = tile_center(tile)
    plat, plon = paper_eq_1_2(tile.x + 0.5, tile.y + 0.5, tile.z)
    assert lat == pytest.approx(plat, abs=1e-9)
    assert lon == pytest.approx(plon, abs=1e-9)
    # and eq. 3-6 of the centre gives back the centre, as a fraction of the map's width. (Near
    # the poles tan(lat) + sec(lat) cancels: the literal eq. 4 loses ~1e-14 of the width there.)
    fx, fy = paper_eq_3_6_continuous(lat, lon, tile.z)
    n = 2**tile.z
    assert fx / n == pytest.approx((tile.x + 0.5) / n, abs=1e-12)
    assert fy / n == pytest.approx((tile.y + 0.5) / n, abs=1e-12)


def test_paper_eq_3_6_known_values() -> None:
    # Hand-checkable anchors: the origin, and the paper's zoom-4 grid around Seoul (37.57, 126.98).
    assert paper_eq_3_6(0.0, 0.0, 1) == (1, 1)
    assert tile_of(0.0, 0.0, zoom=1) == mercantile.Tile(1, 1, 1)
    assert tile_of(37.57, 126.98, zoom=4) == mercantile.Tile(13, 6, 4)
    assert paper_eq_3_6(37.57, 126.98, 4) == (13, 6)
    assert tile_of(-33.86, 151.21, zoom=10) == mercantile.tile(151.21, -33.86, 10)


# --- tile_center -------------------------------------------------------------------------------


@PROFILE
@given(tile=tiles_st())
def test_tile_center_round_trips(tile: mercantile.Tile) -> None:
    lat, lon = tile_center(tile)
    assert tile_of(lat, lon, zoom=tile.z) == tile


@PROFILE
@given(tile=tiles_st())
def test_tile_center_is_the_mercator_midpoint(tile: mercantile.Tile) -> None:
    lat, lon = tile_center(tile)
    b = mercantile.bounds(tile)
    assert lon == pytest.approx((b.west + b.east) / 2.0, abs=1e-9)
    assert lon == pytest.approx(mercantile.ul(tile).lng + (b.east - b.west) / 2.0, abs=1e-9)
    # y: the midpoint in Mercator metres, not in degrees (they differ except at the equator)
    xy = mercantile.xy_bounds(tile)
    mid = mercantile.lnglat((xy.left + xy.right) / 2.0, (xy.bottom + xy.top) / 2.0)
    assert lat == pytest.approx(mid.lat, abs=1e-9)
    assert b.south < lat < b.north


def test_tile_center_y_is_not_the_degree_midpoint() -> None:
    t = mercantile.Tile(0, 0, 1)  # spans 0..85.05 degrees; the Mercator midpoint is ~66.5
    lat, lon = tile_center(t)
    assert lat == pytest.approx(66.51326044311186, abs=1e-9)
    assert lon == -90.0
    assert abs(lat - MAX_LATITUDE / 2.0) > 20


@PROFILE
@given(tiles=st.lists(tiles_st(max_zoom=20, min_zoom=8), min_size=1, max_size=20))
def test_tile_center_array_matches_scalar(tiles: list[mercantile.Tile]) -> None:
    z = tiles[0].z
    same = [mercantile.Tile(t.x % 2**z, t.y % 2**z, z) for t in tiles]
    lat, lon = tile_center_array([t.x for t in same], [t.y for t in same], zoom=z)
    assert lat.dtype == np.float64 and lat.shape == (len(same),)
    for i, t in enumerate(same):
        slat, slon = tile_center(t)
        assert lat[i] == pytest.approx(slat, abs=1e-12)
        assert lon[i] == pytest.approx(slon, abs=1e-12)


def test_tile_bounds_is_mercantile_bounds() -> None:
    t = mercantile.Tile(5, 3, 4)
    assert tile_bounds(t) == mercantile.bounds(t)


# --- quadkeys and children ---------------------------------------------------------------------


@PROFILE
@given(tile=tiles_st(max_zoom=28))
def test_children_at_z_plus_2(tile: mercantile.Tile) -> None:
    kids = children(tile, zoom=tile.z + 2)
    assert len(kids) == 16 and len(set(kids)) == 16
    assert set(kids) == set(mercantile.children(tile, zoom=tile.z + 2))
    assert kids == sorted(kids, key=mercantile.quadkey)
    assert [mercantile.quadkey(k) for k in kids] == sorted(mercantile.quadkey(k) for k in kids)
    offsets = {(k.x - 4 * tile.x, k.y - 4 * tile.y) for k in kids}
    assert offsets == {(i, j) for i in range(4) for j in range(4)}
    for k in kids:
        assert k.z == tile.z + 2
        assert mercantile.parent(k, zoom=tile.z) == tile
        assert tile_of(*tile_center(k), zoom=tile.z) == tile
    # quadkey order: the first child is the north-west corner, the last the south-east one
    assert kids[0] == mercantile.Tile(4 * tile.x, 4 * tile.y, tile.z + 2)
    assert kids[-1] == mercantile.Tile(4 * tile.x + 3, 4 * tile.y + 3, tile.z + 2)


@pytest.mark.parametrize("step,count", [(1, 4), (2, 16), (3, 64)])
def test_children_other_steps(step: int, count: int) -> None:
    for tile in [mercantile.Tile(0, 0, 0), mercantile.Tile(5, 9, 4), mercantile.Tile(1000, 77, 12)]:
        kids = children(tile, zoom=tile.z + step)
        assert len(kids) == count
        assert set(kids) == set(mercantile.children(tile, zoom=tile.z + step))
        assert kids == sorted(kids, key=mercantile.quadkey)
        cx, cy = children_array(tile.x, tile.y, zoom=tile.z, step=step)
        assert cx.shape == (1, count) and cy.shape == (1, count)
        got = [mercantile.Tile(int(a), int(b), tile.z + step) for a, b in zip(cx[0], cy[0], strict=True)]
        assert got == kids


def test_children_array_shapes_and_rows() -> None:
    x = np.array([0, 3, 7])
    y = np.array([1, 2, 0])
    cx, cy = children_array(x, y, zoom=3)
    assert cx.shape == (3, 16) and cy.shape == (3, 16)
    assert cx.dtype == np.int64 and cy.dtype == np.int64
    for i in range(3):
        row = [mercantile.Tile(int(a), int(b), 5) for a, b in zip(cx[i], cy[i], strict=True)]
        assert row == children(mercantile.Tile(int(x[i]), int(y[i]), 3), zoom=5)
    cx0, cy0 = children_array(np.array([], dtype=np.int64), np.array([], dtype=np.int64), zoom=3)
    assert cx0.shape == (0, 16) and cy0.shape == (0, 16)


def test_children_rows_are_contiguous_in_quadkey_order() -> None:
    # Sorting all children of a level by quadkey keeps each parent's 16 children together.
    parents = [mercantile.Tile(x, y, 3) for x in range(8) for y in range(8)]
    cx, cy = children_array([p.x for p in parents], [p.y for p in parents], zoom=3)
    keys = quadkey_int_array(cx.ravel(), cy.ravel(), zoom=5)
    order = np.argsort(keys, kind="stable")
    parent_of_sorted = order // 16
    runs = np.flatnonzero(np.diff(parent_of_sorted)) + 1
    assert len(runs) == len(parents) - 1
    assert np.all(np.diff(runs) == 16)


def test_children_invalid_zoom() -> None:
    with pytest.raises(ConfigError):
        children(mercantile.Tile(1, 1, 4), zoom=4)
    with pytest.raises(ConfigError):
        children(mercantile.Tile(1, 1, 4), zoom=3)
    with pytest.raises(ConfigError):
        children(mercantile.Tile(1, 1, 29), zoom=31)
    with pytest.raises(ConfigError):
        children_array([1], [1], zoom=29, step=2)


@PROFILE
@given(tile=tiles_st())
def test_quadkey_int_is_the_base4_quadkey(tile: mercantile.Tile) -> None:
    qk = mercantile.quadkey(tile)
    assert quadkey_int(tile) == (int(qk, 4) if qk else 0)
    assert int(quadkey_int_array(tile.x, tile.y, zoom=tile.z)) == quadkey_int(tile)


@PROFILE
@given(zoom=st.integers(min_value=1, max_value=MAX_ZOOM), data=st.data())
def test_quadkey_int_order_is_quadkey_string_order(zoom: int, data: st.DataObject) -> None:
    coord = st.integers(min_value=0, max_value=2**zoom - 1)
    tile = st.builds(mercantile.Tile, coord, coord, st.just(zoom))
    tiles = data.draw(st.lists(tile, min_size=2, max_size=30))
    keys = quadkey_int_array([t.x for t in tiles], [t.y for t in tiles], zoom=zoom)
    assert keys.dtype == np.uint64
    by_int = [tiles[i] for i in np.argsort(keys, kind="stable")]
    by_str = sorted(tiles, key=mercantile.quadkey)
    assert [mercantile.quadkey(t) for t in by_int] == [mercantile.quadkey(t) for t in by_str]
    assert sorted(tiles, key=quadkey_int) == by_str


def test_quadkey_int_at_zoom_30_uses_all_60_bits() -> None:
    n = 2**30
    t = mercantile.Tile(n - 1, n - 1, 30)
    assert quadkey_int(t) == 4**30 - 1 == int(mercantile.quadkey(t), 4)


# --- validation -------------------------------------------------------------------------------


@pytest.mark.parametrize("lat", [90.0000001, -90.5, 91.0, 1e9, float("nan"), float("inf"), -float("inf")])
def test_bad_latitude_raises(lat: float) -> None:
    with pytest.raises(ConfigError) as exc:
        tile_of(lat, 0.0, zoom=5)
    assert isinstance(exc.value, ValueError)
    assert "latitude" in str(exc.value)
    with pytest.raises(ConfigError):
        tile_of_array(np.array([0.0, lat, 10.0]), np.zeros(3), zoom=5)


@pytest.mark.parametrize("lon", [float("nan"), float("inf"), -float("inf")])
def test_bad_longitude_raises(lon: float) -> None:
    with pytest.raises(ConfigError, match="longitude"):
        tile_of(0.0, lon, zoom=5)


@pytest.mark.parametrize("zoom", [-1, MAX_ZOOM + 1, 2.5, "4", None])
def test_bad_zoom_raises(zoom: object) -> None:
    with pytest.raises(ConfigError, match="zoom"):
        tile_of(0.0, 0.0, zoom=zoom)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="zoom"):
        tile_center_array([0], [0], zoom=zoom)  # type: ignore[arg-type]


def test_zoom_is_keyword_only() -> None:
    with pytest.raises(TypeError):
        tile_of(0.0, 0.0, 5)  # type: ignore[call-arg]


@pytest.mark.parametrize("zoom", [0, 1, 6, 16, 30])
@pytest.mark.parametrize("lat", [85.0512, 86.0, 89.9999, 90.0])
def test_latitude_beyond_mercator_clamps_to_the_edge_rows(lat: float, zoom: int) -> None:
    n = 2**zoom
    assert tile_of(lat, 10.0, zoom=zoom).y == 0
    assert tile_of(-lat, 10.0, zoom=zoom).y == n - 1
    assert tile_of(MAX_LATITUDE, 10.0, zoom=zoom).y == 0
    assert tile_of(-MAX_LATITUDE, 10.0, zoom=zoom).y == n - 1
    if lat < 90.0:  # mercantile cannot compute y at the poles themselves
        assert mercantile.tile(10.0, lat, zoom).y == 0
        assert mercantile.tile(10.0, -lat, zoom).y == n - 1


# --- LevelSchedule ----------------------------------------------------------------------------


def test_level_schedule_default_is_the_papers() -> None:
    s = LevelSchedule()
    assert s.zooms == (4, 6, 8, 10, 12, 14, 16)
    assert s.fanout == 16
    assert s.index_of(4) == 0 and s.index_of(16) == 6
    assert s.parent_zoom(4) is None
    assert s.parent_zoom(6) == 4 and s.parent_zoom(16) == 14
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.start = 2  # type: ignore[misc]


@pytest.mark.parametrize(
    "start,stop,step,zooms,fanout",
    [
        (4, 16, 1, tuple(range(4, 17)), 4),
        (4, 16, 3, (4, 7, 10, 13, 16), 64),
        (8, 8, 2, (8,), 16),
        (0, 30, 2, tuple(range(0, 31, 2)), 16),
    ],
)
def test_level_schedule_other_steps(
    start: int, stop: int, step: int, zooms: tuple[int, ...], fanout: int
) -> None:
    s = LevelSchedule(start, stop, step)
    assert s.zooms == zooms
    assert s.fanout == fanout
    assert s.parent_zoom(zooms[0]) is None
    for a, b in itertools.pairwise(zooms):
        assert s.parent_zoom(b) == a
        assert len(children(mercantile.Tile(0, 0, a), zoom=b)) == s.fanout


@pytest.mark.parametrize("zoom", [3, 5, 17, 18, -2])
def test_level_schedule_index_of_unknown_zoom(zoom: int) -> None:
    s = LevelSchedule()
    with pytest.raises(ConfigError, match=str(zoom)) as exc:
        s.index_of(zoom)
    assert "[4, 6, 8, 10, 12, 14, 16]" in str(exc.value)
    with pytest.raises(ConfigError):
        s.parent_zoom(zoom)


@pytest.mark.parametrize(
    "start,stop,step",
    [(6, 4, 2), (-1, 15, 2), (4, 31, 1), (4, 16, 0), (4, 16, -2), (4, 16, 5), (4, 15, 2)],
)
def test_level_schedule_invalid(start: int, stop: int, step: int) -> None:
    with pytest.raises(ConfigError) as exc:
        LevelSchedule(start, stop, step)
    assert isinstance(exc.value, ValueError)


def test_level_schedule_replace_validates() -> None:
    s = LevelSchedule()
    assert dataclasses.replace(s, stop=12).zooms == (4, 6, 8, 10, 12)
    with pytest.raises(ConfigError):
        dataclasses.replace(s, stop=13)


@given(z=st.integers(0, 30), data=st.data())
def test_tile_codes_round_trip(z, data):
    from geoindex.geometry.tiles import tile_code, tile_code_array, tile_of_code, tile_xy_of_code_array

    x = data.draw(st.integers(0, (1 << z) - 1))
    y = data.draw(st.integers(0, (1 << z) - 1))
    tile = mercantile.Tile(x, y, z)
    code = tile_code(tile)
    assert tile_of_code(code, zoom=z) == tile and code == y * 2**z + x
    cx, cy = tile_xy_of_code_array(tile_code_array([x, 0], [y, 0], zoom=z), zoom=z)
    assert cx.tolist() == [x, 0] and cy.tolist() == [y, 0]


# --- normalised Web-Mercator arrays and tile bounds against mercantile ---------------------------

_WORLD_M = 2.0 * math.pi * 6378137.0  # the Web-Mercator map's width in metres (mercantile.xy's units)


@PROFILE
@given(points=st.lists(st.tuples(lats, lons), min_size=1, max_size=50))
def test_merc_xy_array_equals_mercantile_xy(points: list[tuple[float, float]]) -> None:
    lat, lon = (np.array(v) for v in zip(*points))
    fx, fy = merc_xy_array(lat, lon)
    for i, (la, lo) in enumerate(points):
        mx, my = mercantile.xy(lo, la)
        assert fx[i] == pytest.approx(mx / _WORLD_M + 0.5, abs=1e-12)
        assert fy[i] == pytest.approx(0.5 - my / _WORLD_M, abs=1e-12)


@PROFILE
@given(lat=lats, lon=lons)
def test_merc_latlon_array_inverts_merc_xy_array(lat: float, lon: float) -> None:
    lat2, lon2 = merc_latlon_array(*merc_xy_array(lat, lon))
    assert float(lat2) == pytest.approx(lat, abs=1e-9)
    assert float(lon2) == pytest.approx(lon, abs=1e-9)
    mlon, mlat = mercantile.lnglat(*mercantile.xy(lon, lat))
    assert float(lat2) == pytest.approx(mlat, abs=1e-9)


def test_merc_xy_array_clamps_the_poles() -> None:
    fx, fy = merc_xy_array(np.array([90.0, -90.0]), np.array([0.0, 0.0]))
    assert np.allclose(fy, [0.0, 1.0], atol=1e-12) and np.allclose(fx, 0.5)


@PROFILE
@given(tiles=st.lists(tiles_st(max_zoom=20), min_size=1, max_size=30).map(
    lambda ts: [mercantile.Tile(t.x % 2**ts[0].z, t.y % 2**ts[0].z, ts[0].z) for t in ts]))
def test_tile_bounds_array_equals_mercantile_bounds(tiles: list[mercantile.Tile]) -> None:
    zoom = tiles[0].z
    x, y = np.array([t.x for t in tiles]), np.array([t.y for t in tiles])
    bounds = np.stack(tile_bounds_array(x, y, zoom=zoom), axis=1)
    merc = np.stack(tile_merc_bounds_array(x, y, zoom=zoom), axis=1)
    for i, t in enumerate(tiles):
        assert bounds[i] == pytest.approx(tuple(mercantile.bounds(t)), abs=1e-9)
        xb = mercantile.xy_bounds(t)  # metres: (left, bottom, right, top)
        want = (xb.left / _WORLD_M + 0.5, 0.5 - xb.top / _WORLD_M,
                xb.right / _WORLD_M + 0.5, 0.5 - xb.bottom / _WORLD_M)
        assert merc[i] == pytest.approx(want, abs=1e-12)


@PROFILE
@given(lat=lats, lon=lons, zoom=st.floats(min_value=0.0, max_value=18.0),
       size=st.integers(min_value=1, max_value=9), turns=st.sampled_from([0.0, 90.0, 180.0, 270.0]))
def test_view_merc_grid_is_centred_and_spans_its_zoom(lat: float, lon: float, zoom: float, size: int,
                                                      turns: float) -> None:
    fx, fy = view_merc_grid(lat, lon, zoom=zoom, size=size, rotation_deg=turns)
    cx, cy = merc_xy_array(lat, lon)
    assert fx.shape == fy.shape == (size, size)
    assert fx.mean() == pytest.approx(float(cx), abs=1e-9) and fy.mean() == pytest.approx(float(cy), abs=1e-9)
    # a quarter turn keeps the grid; the pixels' extent is the view's span less one pixel
    extent = 2.0**-zoom * (size - 1) / size
    assert np.ptp(fx) == pytest.approx(extent, abs=1e-9) and np.ptp(fy) == pytest.approx(extent, abs=1e-9)


def test_view_merc_grid_of_a_tile_is_its_pixel_centres() -> None:
    tile = mercantile.Tile(5, 9, 4)
    lat, lon = tile_center(tile)
    fx, fy = view_merc_grid(lat, lon, zoom=4, size=8)
    t = (np.arange(8) + 0.5) / 8
    assert np.allclose(fx[0], (tile.x + t) / 16, atol=1e-12)
    assert np.allclose(fy[:, 0], (tile.y + t) / 16, atol=1e-12)


@PROFILE
@given(step=st.integers(min_value=0, max_value=6), data=st.data())
def test_child_offsets_array_inverts_quadkey_int_array(step: int, data: st.DataObject) -> None:
    codes = np.array(data.draw(st.lists(st.integers(min_value=0, max_value=4**step - 1), min_size=1, max_size=20)))
    dx, dy = child_offsets_array(codes, step=step)
    assert np.array_equal(quadkey_int_array(dx, dy, zoom=step).astype(np.int64), codes)
    # the children of one tile in quadkey order are exactly mercantile's descendants
    if step:
        kids = [(int(a), int(b)) for a, b in zip(*child_offsets_array(np.arange(4**step), step=step))]
        assert set(kids) == {(t.x, t.y) for t in mercantile.children(mercantile.Tile(0, 0, 0), zoom=step)}
