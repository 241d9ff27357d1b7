"""Views with known centres: deterministic, centred in their tile, sampled across tile edges and the antimeridian."""

from __future__ import annotations

import mercantile
import numpy as np
import pytest
from PIL import Image

from geoindex.errors import ConfigError
from geoindex.geometry.tiles import tile_of
from geoindex.sources import MemorySource
from geoindex.training.views import Mosaic, ViewStyle, random_views


def _flat_colour(tile: mercantile.Tile) -> tuple[int, int, int]:
    return (40 * tile.x % 256, 40 * tile.y % 256, 100)


@pytest.fixture()
def flat_tiles() -> MemorySource:
    return MemorySource(lambda t: Image.new("RGB", (256, 256), _flat_colour(t)) if t.z == 3 else None)


def test_a_small_view_inside_a_tile_has_that_tiles_colour(flat_tiles):
    tile = mercantile.Tile(5, 2, 3)
    lon, lat = mercantile.ul(5, 2, 3)
    east, south = mercantile.ul(6, 3, 3)
    view = Mosaic(flat_tiles, 3).render_view((lat + south) / 2, (lon + east) / 2, zoom=6, size=32, rotation_deg=33)
    assert (np.asarray(view) == _flat_colour(tile)).all()


def test_a_view_across_the_antimeridian_sees_both_edges(flat_tiles):
    view = np.asarray(Mosaic(flat_tiles, 3).render_view(20.0, 180.0, zoom=4, size=64))
    west_half, east_half = view[:, :20], view[:, -20:]
    assert (west_half == _flat_colour(mercantile.Tile(7, 3, 3))).all()  # the last column of tiles ...
    assert (east_half == _flat_colour(mercantile.Tile(0, 3, 3))).all()  # ... then the first, wrapped


def test_random_views_are_seeded_and_centred_in_their_tile(flat_tiles):
    tiles = [mercantile.Tile(x, y, 3) for x in (1, 6) for y in (2, 5)]
    a = random_views(flat_tiles, tiles, per_tile=3, seed=7, size=64)
    b = random_views(flat_tiles, tiles, per_tile=3, seed=7, size=64)
    c = random_views(flat_tiles, tiles, per_tile=3, seed=8, size=64)
    assert [v.tile for v in a] == [t for t in tiles for _ in range(3)]
    assert all(tile_of(v.lat, v.lon, zoom=3) == v.tile for v in a)
    assert all(np.array_equal(np.asarray(x.image), np.asarray(y.image)) for x, y in zip(a, b))
    assert [(v.lat, v.lon) for v in a] != [(v.lat, v.lon) for v in c]


def test_views_refuse_mixed_zooms_and_bad_styles(flat_tiles):
    with pytest.raises(ConfigError, match="one zoom"):
        random_views(flat_tiles, [mercantile.Tile(0, 0, 3), mercantile.Tile(0, 0, 4)])
    with pytest.raises(ConfigError, match="out of range"):
        ViewStyle(brightness=1.5)
