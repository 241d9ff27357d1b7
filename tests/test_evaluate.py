"""Evaluation metrics on hand-computed cases (antimeridian, poles), beam recall, and the evaluate pipeline."""

from __future__ import annotations

import json
import math

import mercantile
import numpy as np
import pytest

from geoindex.geometry.metrics import EARTH_RADIUS_KM, THRESHOLDS_KM, accuracy_at, great_circle_km
from geoindex.geometry.tiles import tile_center
from geoindex.retrieval.levels import LevelHits
from geoindex.training.dataset import PhotoTable, write_photo_csv
from geoindex.training.evaluate import error_summary, level_stats, predict
from pipelines import evaluate as evaluate_pipeline
from tests.conftest import render_tile

DEG_KM = math.pi * EARTH_RADIUS_KM / 180.0  # one degree of a great circle: 111.195 km


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.parametrize(
    ("a", "b", "km"),
    [
        ((0.0, 0.0), (0.0, 1.0), DEG_KM),
        ((0.0, 0.0), (1.0, 0.0), DEG_KM),
        ((0.0, 179.5), (0.0, -179.5), DEG_KM),  # across the antimeridian, not around the world
        ((10.0, 180.0), (10.0, -180.0), 0.0),  # the same meridian
        ((-30.0, -179.9), (-30.0, 179.9), 0.2 * DEG_KM * math.cos(math.radians(30.0))),
        ((90.0, 0.0), (90.0, 123.0), 0.0),  # every longitude is the north pole
        ((-90.0, 45.0), (-90.0, -135.0), 0.0),
        ((89.0, 0.0), (89.0, 180.0), 2.0 * DEG_KM),  # over the pole
        ((90.0, 0.0), (-90.0, 0.0), 180.0 * DEG_KM),  # pole to pole
        ((0.0, 0.0), (0.0, 180.0), 180.0 * DEG_KM),  # antipodes on the equator
    ],
)
def test_great_circle_hand_cases(a, b, km):
    d = float(great_circle_km(*a, *b))
    # The short east-west hop at 30 S is nearly straight: allow the chord/arc difference.
    assert d == pytest.approx(km, rel=1e-4, abs=1e-6)
    assert float(great_circle_km(*b, *a)) == pytest.approx(d, abs=1e-9)


def test_accuracy_thresholds_are_inclusive_and_median():
    errors = [0.5, 1.0, 24.0, 25.0, 200.1, 749.0, 2500.0, 9000.0]
    acc = accuracy_at(errors)
    assert acc == {1.0: 2 / 8, 25.0: 4 / 8, 200.0: 4 / 8, 750.0: 6 / 8, 2500.0: 7 / 8}
    s = error_summary(errors)
    assert s["n"] == 8 and s["median_km"] == pytest.approx((25.0 + 200.1) / 2)
    assert s["mean_km"] == pytest.approx(np.mean(errors))
    assert tuple(s["accuracy"]) == THRESHOLDS_KM
    assert math.isnan(error_summary([])["median_km"])


def _hits(zoom, tiles_per_query, scores=None):
    n, k = len(tiles_per_query), max(len(t) for t in tiles_per_query)
    x = np.full((n, k), -1, np.int64)
    y = np.full((n, k), -1, np.int64)
    ids = np.full((n, k), -1, np.int64)
    for q, tiles in enumerate(tiles_per_query):
        for j, (tx, ty) in enumerate(tiles):
            x[q, j], y[q, j], ids[q, j] = tx, ty, j
    d = np.zeros((n, k), np.float32) if scores is None else np.asarray(scores, np.float32)
    return LevelHits(zoom, d, ids, x, y)


def test_beam_recall_and_top1_hand_case_with_poles_and_antimeridian():
    # Query 0 near the north pole (clamped to row 0), query 1 just west of the antimeridian,
    # query 2 at the south pole (last row).
    lat = np.array([89.9, 10.0, -90.0])
    lon = np.array([0.0, 179.99, 100.0])
    z = 2
    hits = _hits(z, [
        [(2, 0), (1, 0)],           # true tile (2, 0) first: top-1 and kept
        [(0, 1), (3, 1)],           # true tile (3, 1) second: kept, not top-1 ((0, 1) is east of 180)
        [(2, 2), (-1, -1)],         # true tile (2, 3) missing; the -1 slot never matches
    ])
    hits.I[2, 1] = -1
    top1, recall = level_stats([hits], lat, lon)
    assert top1 == {2: pytest.approx(1 / 3)} and recall == {2: pytest.approx(2 / 3)}


def test_predict_takes_the_deepest_level_that_found_a_tile():
    coarse = _hits(1, [[(0, 0)], [(1, 1)]])
    fine = _hits(3, [[(2, 1)], [(-1, -1)]])
    fine.I[1, 0] = -1
    pred = predict([coarse, fine])
    assert pred.zoom.tolist() == [3, 1]
    assert (pred.lat[0], pred.lon[0]) == pytest.approx(tile_center(mercantile.Tile(2, 1, 3)))
    assert (pred.lat[1], pred.lon[1]) == pytest.approx(tile_center(mercantile.Tile(1, 1, 1)))


@pytest.fixture(scope="module")
def tile_photos(tmp_path_factory):
    """The rendered zoom-3 tiles saved as photos at their tile centres, plus an unreadable file."""
    folder = tmp_path_factory.mktemp("photos")
    tiles = [mercantile.Tile(x, y, 3) for x in (0, 3, 7) for y in (1, 4, 6)]
    paths, lat, lon = [], [], []
    for t in tiles:
        p = folder / f"{t.x}_{t.y}.png"
        render_tile(t).save(p)
        c = tile_center(t)
        paths.append(str(p))
        lat.append(c[0])
        lon.append(c[1])
    (folder / "broken.jpg").write_bytes(b"not an image")
    paths.append(str(folder / "broken.jpg"))
    lat.append(0.0)
    lon.append(0.0)
    csv = folder / "photos.csv"
    write_photo_csv(csv, PhotoTable(tuple(paths), np.array(lat), np.array(lon)), relative_to=folder)
    return csv


def test_evaluate_pipeline_indexed_and_onthefly(tmp_path, small_index, rendered_source, tile_photos, monkeypatch):
    # A photo identical to its tile is found exactly when the beam keeps every parent (k >= 16).
    out = tmp_path / "eval"
    report = evaluate_pipeline.run(evaluate_pipeline.parse_args(
        ["--photos", str(tile_photos), "--index", str(small_index), "--k", "4", "16", "--out", str(out),
         "--predictions", "--quiet"]))
    assert report.photos == 10 and report.unreadable == 1 and [r.k for r in report.results] == [4, 16]
    k16 = report.results[1]
    assert k16.n == 9 and k16.accuracy[1.0] == 1.0 and k16.median_km == pytest.approx(0.0, abs=1e-3)
    assert k16.tile_top1 == {1: pytest.approx(k16.tile_top1[1]), 2: pytest.approx(k16.tile_top1[2]), 3: 1.0}
    assert k16.beam_recall == {1: 1.0, 2: 1.0, 3: 1.0}
    assert report.results[0].beam_recall[1] == 1.0  # all four zoom-1 tiles fit in a beam of 4
    data = json.loads((tmp_path / "eval.json").read_text())
    assert data["results"][1]["accuracy"]["1km"] == 1.0 and data["results"][1]["beam_recall"]["z03"] == 1.0
    md = (tmp_path / "eval.md").read_text()
    assert "| k | 1 km | 25 km | 200 km | 750 km | 2500 km | median km | time / image |" in md
    assert "| 16 | 100.0 % | 100.0 % |" in md and "Beam recall" in md
    preds = (tmp_path / "eval.predictions.csv").read_text().splitlines()
    assert preds[0].startswith("path,k,lat,lon") and len(preds) == 1 + 2 * 9

    # On the fly over the same tiles and encoders: the same scores.
    monkeypatch.setattr(evaluate_pipeline, "open_source", lambda spec, **kw: rendered_source)
    otf = evaluate_pipeline.run(evaluate_pipeline.parse_args(
        ["--photos", str(tile_photos), "--index", str(small_index), "--k", "16", "--mode", "onthefly",
         "--source", "rendered", "--out", str(tmp_path / "otf"), "--quiet"]))
    r = otf.results[0]
    assert r.accuracy == k16.accuracy and r.beam_recall == k16.beam_recall and r.tile_top1 == k16.tile_top1
    assert r.tiles_encoded_per_image is not None and r.tiles_encoded_per_image > 0


def test_onthefly_needs_a_source(capsys):
    with pytest.raises(SystemExit):
        evaluate_pipeline.parse_args(["--photos", "x.csv", "--mode", "onthefly"])
    assert "--source" in capsys.readouterr().err
