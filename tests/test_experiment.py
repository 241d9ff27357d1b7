"""The training experiment's places: held-out tiles and regions never reach training, and the plan is seeded."""

from __future__ import annotations

import mercantile
import numpy as np
import pytest
from PIL import Image

from geoindex.geometry.tiles import tile_of
from geoindex.sources import MemorySource
from geoindex.training.dataset import read_photo_csv
from pipelines.experiment import Config, parse_args, plan_places, prepare


def _textured(tile: mercantile.Tile) -> Image.Image:
    rng = np.random.default_rng(tile.x * 131 + tile.y)
    return Image.fromarray(rng.integers(0, 256 // (1 + tile.x % 7), (32, 32, 3), dtype=np.uint8))


@pytest.fixture()
def source() -> MemorySource:
    return MemorySource(_textured, name="textured")


def _cfg(tmp_path, **kw) -> Config:
    base = dict(out=tmp_path, tiles=16, candidates=64, views=4, regions=2, train_views=1, results_md=None,
                results_json=None, quiet=True)
    return Config(**{**base, **kw})


def test_heldout_tiles_and_regions_are_disjoint_from_training(tmp_path, source):
    plan = plan_places(_cfg(tmp_path), source)
    trained, held, region = set(plan.trained), set(plan.heldout_tiles), set(plan.heldout_regions)
    extra = set(plan.extra)
    assert len(trained) == len(held) == 8 and region
    assert not (held & (trained | extra)) and not (region & (trained | extra | held))
    in_blocks = {(x, y) for bx, by in plan.region_blocks for x in range(bx * 4, bx * 4 + 8)
                 for y in range(by * 4, by * 4 + 8)}
    assert all((t.x, t.y) in in_blocks for t in region)
    assert not any((t.x, t.y) in in_blocks for t in trained | held | extra)
    assert all(abs(mercantile.ul(t).lat) <= 71 for t in trained | held | extra)  # |lat| < 70 rows
    assert plan == plan_places(_cfg(tmp_path), source)  # seeded
    assert plan != plan_places(_cfg(tmp_path, seed=1), source)
    assert plan_places(_cfg(tmp_path, train_tiles="eval"), source).extra == ()


def test_views_of_heldout_places_never_reach_the_training_csv(tmp_path, source):
    cfg = _cfg(tmp_path, candidates=32, tiles=8, regions=1, train_tiles="eval")
    plan, counts = prepare(cfg, source)
    training = read_photo_csv(tmp_path / "views-training.csv")
    trained_tiles = {tile_of(a, o, zoom=6) for a, o in zip(training.lat, training.lon)}
    assert trained_tiles == set(plan.trained) | set(plan.extra)
    for name, tiles in (("heldout-tiles", plan.heldout_tiles), ("heldout-regions", plan.heldout_regions)):
        table = read_photo_csv(tmp_path / f"views-{name}.csv")
        assert {tile_of(a, o, zoom=6) for a, o in zip(table.lat, table.lon)} == set(tiles)
        assert len(table) == counts[name] == cfg.views * len(tiles)
    # Other views of trained tiles are held out by view: the training CSV marks them test.
    heldout = read_photo_csv(tmp_path / "views-heldout.csv")
    assert set(heldout.paths) <= {p for p, s in zip(training.paths, training.split) if s == "test"}
    again = prepare(cfg, source)  # same identity: reused, not rendered again
    assert again == (plan, counts)


def test_the_schedule_must_end_at_the_views_zoom():
    assert parse_args(["--schedule", "2", "6", "2"]).zooms == [2, 4, 6]
    with pytest.raises(Exception, match="must end at zoom 6"):
        parse_args(["--schedule", "4", "8", "2"])
