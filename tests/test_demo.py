"""`make demo`: its table explains itself (confidence, the random-guess baseline, what "(same)" means)."""

from __future__ import annotations

import statistics

import mercantile

from geoindex.geometry.metrics import great_circle_km, random_tile_errors_km
from geoindex.geometry.tiles import tile_center
from pipelines import demo


def test_random_guess_baseline_is_the_median_over_every_tile():
    places = [("a", 46.5, 10.0), ("b", -25.0, 133.0), ("c", 72.0, -40.0)]
    slow = [float(great_circle_km(lat, lon, *tile_center(t)))
            for _, lat, lon in places for t in mercantile.tiles(-180, -85, 180, 85, zooms=[2])]
    assert random_tile_errors_km([p[1] for p in places], [p[2] for p in places], zoom=2).shape == (3, 16)
    assert demo.random_guess_km(places, 2) == statistics.median(slow)
    assert 5_000 < demo.random_guess_km(demo.PLACES, 6) < 15_000  # half the Earth's circumference is 20,000 km


def test_demo_table_has_confidence_baseline_and_legend(capsys, tmp_path):
    code = demo.main(["--encoder", "tiny", "--max-zoom", "4", "--index", str(tmp_path / "demo"), "-k", "4",
                      "--onthefly-queries", "1", "--quiet"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "encoder tiny (asked for with --encoder)" in out and "zoom levels 2, 4" in out
    header = next(line for line in out.splitlines() if line.startswith("place"))
    assert "conf" in header.split()
    rows = [line for line in out.splitlines() if line.startswith(tuple(name for name, _, _ in demo.PLACES))]
    assert len(rows) == len(demo.PLACES) and all("%" in row for row in rows)
    assert "(same)" in rows[0] or "(DIFFERENT)" in rows[0]
    guess = next(line for line in out.splitlines() if line.startswith("random guess"))
    assert f"{demo.random_guess_km(demo.PLACES, 4):.0f}" in guess
    assert "(same) means it" in out and "conf: the probability" in out
