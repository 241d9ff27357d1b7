"""Tests for geoindex.geometry.coverage: tiles and intersects against brute force, JSON, GeoJSON, errors."""

from __future__ import annotations

import json
import math

import mercantile
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from geoindex.errors import ConfigError
from geoindex.geometry.coverage import Coverage
from geoindex.geometry.tiles import MAX_LATITUDE, quadkey_int_array


def all_tiles(zoom: int) -> tuple[np.ndarray, np.ndarray]:
    x, y = np.meshgrid(np.arange(2**zoom), np.arange(2**zoom))
    return x.ravel(), y.ravel()


def as_set(x: np.ndarray, y: np.ndarray) -> set[tuple[int, int]]:
    return set(zip(x.tolist(), y.tolist(), strict=True))


def check_consistent(cov: Coverage, zoom: int) -> set[tuple[int, int]]:
    """tiles() is sorted by quadkey, unique, and exactly the tiles intersects() accepts; returns them."""
    x, y = cov.tiles(zoom=zoom)
    assert x.dtype == np.int64 and y.dtype == np.int64
    keys = quadkey_int_array(x, y, zoom=zoom)
    assert np.all(keys[1:] > keys[:-1])
    ax, ay = all_tiles(zoom)
    hit = cov.intersects(ax, ay, zoom=zoom)
    assert as_set(ax[hit], ay[hit]) == as_set(x, y)
    return as_set(x, y)


def mercantile_set(bbox: tuple[float, float, float, float], zoom: int) -> set[tuple[int, int]]:
    return {(t.x, t.y) for t in mercantile.tiles(*bbox, zoom)}


def rectangle(w: float, s: float, e: float, n: float) -> tuple[tuple[float, float], ...]:
    return ((w, s), (e, s), (e, n), (w, n))


def test_world_is_every_tile_in_quadkey_order():
    x, y = Coverage.world().tiles(zoom=2)
    assert [mercantile.quadkey(mercantile.Tile(a, b, 2)) for a, b in zip(x, y, strict=True)] == sorted(
        mercantile.quadkey(t) for t in mercantile.tiles(-180, -85, 180, 85, 2)
    )
    assert Coverage().is_world and Coverage.world().intersects([0, 3], [3, 0], zoom=2).all()


@pytest.mark.parametrize(
    "bbox",
    [
        (-10.0, -20.0, 30.0, 40.0),
        (2.35, 48.85, 2.36, 48.86),  # a few tiles around Paris
        (0.0, 0.0, 90.0, 45.0),  # edges on tile boundaries: touching tiles excluded
        (170.0, -10.0, -170.0, 10.0),  # crosses the antimeridian
        (179.9, 60.0, -179.9, 61.0),
        (-180.0, -90.0, 180.0, 90.0),  # latitudes clamped
    ],
)
@pytest.mark.parametrize("zoom", [0, 3, 6])
def test_bbox_matches_mercantile(bbox, zoom):
    assert check_consistent(Coverage.from_bbox(*bbox), zoom) == mercantile_set(bbox, zoom)


@settings(max_examples=40, deadline=None)
@given(
    w=st.floats(-180, 180),
    e=st.floats(-180, 180),
    s=st.floats(-85, 84),
    h=st.floats(0.001, 60),
    zoom=st.integers(0, 6),
)
def test_random_bbox_matches_mercantile(w, e, s, h, zoom):
    if w == e:
        return
    bbox = (w, s, e, min(s + h, 85.0))
    assert check_consistent(Coverage.from_bbox(*bbox), zoom) == mercantile_set(bbox, zoom)


def test_several_bboxes_are_a_union_without_duplicates():
    a, b = (-10.0, -10.0, 10.0, 10.0), (5.0, 5.0, 40.0, 30.0)
    cov = Coverage(bboxes=(a, b))
    assert check_consistent(cov, 4) == mercantile_set(a, 4) | mercantile_set(b, 4)


@pytest.mark.parametrize(
    "bbox", [(-10.0, -20.0, 30.0, 40.0), (0.0, 0.0, 90.0, 45.0), (-170.3, -60.1, 20.7, 70.9)]
)
def test_rectangular_polygon_equals_its_bbox(bbox):
    cov = Coverage(polygons=((rectangle(*bbox),),))
    for zoom in range(6):
        assert check_consistent(cov, zoom) == mercantile_set(bbox, zoom), zoom


def sat_triangle_meets_rect(tri: np.ndarray, w: float, s: float, e: float, n: float) -> bool:
    """Separating-axis test: a convex triangle and a rectangle overlap with positive area."""
    rect = np.array([(w, s), (e, s), (e, n), (w, n)])
    axes = [np.array([1.0, 0.0]), np.array([0.0, 1.0])]
    axes += [np.array([-(b - a)[1], (b - a)[0]]) for a, b in zip(tri, np.roll(tri, -1, axis=0), strict=True)]
    for axis in axes:
        p, q = tri @ axis, rect @ axis
        if p.max() <= q.min() or q.max() <= p.min():
            return False
    return True


@pytest.mark.parametrize("zoom", [2, 4, 6])
def test_triangle_matches_separating_axis_brute_force(zoom):
    tri = np.array([(-40.3, -30.2), (60.1, -10.7), (5.5, 70.3)])
    cov = Coverage(polygons=((tuple(map(tuple, tri)),),))
    got = check_consistent(cov, zoom)
    ax, ay = all_tiles(zoom)
    expected = set()
    for x, y in zip(ax.tolist(), ay.tolist(), strict=True):
        b = mercantile.bounds(x, y, zoom)
        if sat_triangle_meets_rect(tri, b.west, b.south, b.east, b.north):
            expected.add((x, y))
    assert got == expected


def test_polygon_hole_excludes_tiles_inside_it():
    outer, hole = (-60.2, -50.3, 60.4, 55.1), (-30.7, -20.9, 35.3, 30.6)
    cov = Coverage(polygons=((rectangle(*outer), rectangle(*hole)),))
    for zoom in (4, 6):
        in_hole = set()
        for x, y in mercantile_set(outer, zoom):
            b = mercantile.bounds(x, y, zoom)
            if hole[0] <= b.west and b.east <= hole[2] and hole[1] <= b.south and b.north <= hole[3]:
                in_hole.add((x, y))
        assert in_hole, "the hole should swallow some whole tiles at this zoom"
        assert check_consistent(cov, zoom) == mercantile_set(outer, zoom) - in_hole


def test_deep_polygon_is_refined_along_its_boundary_only():
    ring = tuple(
        (10 + 2 * math.cos(a), 40 + 1.5 * math.sin(a)) for a in np.linspace(0, 2 * math.pi, 400)[:-1]
    )
    x, y = Coverage(polygons=((ring,),)).tiles(zoom=12)
    # Every tile centre that lies well inside the ellipse is present; nothing outside its bbox.
    lat, lon = zip(*(mercantile.ul(int(a), int(b), 12)[::-1] for a, b in zip(x, y, strict=True)), strict=True)
    assert min(lon) >= 7.9 and max(lon) <= 12.0 and min(lat) >= 38.4 and max(lat) <= 41.6
    centre = mercantile.tile(10.0, 40.0, 12)
    assert (centre.x, centre.y) in as_set(x, y)


def test_geojson_feature_collection_with_multipolygon(tmp_path):
    gj = {
        "type": "FeatureCollection",
        "features": [
            {
                "type": "Feature",
                "properties": {},
                "geometry": {
                    "type": "Polygon",
                    "coordinates": [
                        [[-10.0, -10.0], [10.0, -10.0], [10.0, 10.0], [-10.0, 10.0], [-10.0, -10.0]]
                    ],
                },
            },
            {
                "type": "Feature",
                "properties": {},
                "geometry": {
                    "type": "MultiPolygon",
                    "coordinates": [
                        [[[100.0, 0.0], [110.0, 0.0], [110.0, 5.0], [100.0, 0.0]]],
                        [[[-170.0, 50.0], [-160.0, 50.0], [-160.0, 60.0], [-170.0, 60.0], [-170.0, 50.0]]],
                    ],
                },
            },
        ],
    }
    path = tmp_path / "area.geojson"
    path.write_text(json.dumps(gj))
    cov = Coverage.from_geojson(path)
    assert len(cov.polygons) == 3 and cov.polygons[0][0] == (
        (-10.0, -10.0),
        (10.0, -10.0),
        (10.0, 10.0),
        (-10.0, 10.0),
    )
    tiles = check_consistent(cov, 4)
    assert mercantile_set((-10.0, -10.0, 10.0, 10.0), 4) <= tiles
    assert (mercantile.tile(105.0, 1.0, 4).x, mercantile.tile(105.0, 1.0, 4).y) in tiles


@pytest.mark.parametrize(
    "cov",
    [
        Coverage.world(),
        Coverage.from_bbox(170.0, -10.0, -170.0, 10.0),
        Coverage(
            bboxes=((0.0, 0.0, 1.0, 1.0),), polygons=((rectangle(5, 5, 6, 6), rectangle(5.2, 5.2, 5.4, 5.4)),)
        ),
    ],
)
def test_json_round_trip(cov):
    assert Coverage.from_json(json.loads(json.dumps(cov.to_json()))) == cov


@pytest.mark.parametrize(
    ("bbox", "match"),
    [
        ((0.0, 10.0, 5.0, 5.0), "south 10.0 must be less than north 5.0"),
        ((5.0, 0.0, 5.0, 1.0), "empty"),
        ((0.0, 86.0, 5.0, 89.0), r"outside Web-Mercator's latitude range \[-85.0511, 85.0511\]"),
        ((0.0, -95.0, 5.0, 0.0), r"latitude -95.0 is outside \[-90, 90\]"),
        ((0.0, 0.0, 200.0, 1.0), r"longitude 200.0 is outside \[-180, 180\]"),
        ((0.0, float("nan"), 1.0, 1.0), "latitude nan"),
    ],
)
def test_bad_bbox_is_a_config_error(bbox, match):
    with pytest.raises(ConfigError, match=match) as info:
        Coverage.from_bbox(*bbox)
    assert "--bbox" in str(info.value)


def test_latitudes_are_clamped_to_web_mercator():
    assert Coverage.from_bbox(-180, -90, 180, 90).bboxes == ((-180.0, -MAX_LATITUDE, 180.0, MAX_LATITUDE),)


def test_bad_geojson_and_json(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        Coverage.from_geojson(tmp_path / "absent.geojson")
    bad = tmp_path / "bad.geojson"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match=r"bad.geojson \(--geojson\): not a readable GeoJSON"):
        Coverage.from_geojson(bad)
    bad.write_text(json.dumps({"type": "LineString", "coordinates": [[0, 0], [1, 1]]}))
    with pytest.raises(ConfigError, match="unsupported GeoJSON type 'LineString'"):
        Coverage.from_geojson(bad)
    bad.write_text(json.dumps({"type": "Polygon", "coordinates": [[[0, 0], [1, 1], [0, 0]]]}))
    with pytest.raises(ConfigError, match="at least 3 distinct"):
        Coverage.from_geojson(bad)
    with pytest.raises(ConfigError, match="'bboxes' and 'polygons'"):
        Coverage.from_json({"bbox": [0, 0, 1, 1]})
    with pytest.raises(ConfigError, match="4 numbers"):
        Coverage.from_json({"bboxes": [[0, 0, 1]]})
