"""Calibration of an index's answers: probabilities, uncertainty radii and "no confident match", before and after.

The calibration is fitted as ``build_index --calibrate`` fits it (views of the index's own imagery,
``--calibrate-seed``), in memory: the index on disk is not changed. It is then judged on held-out
views rendered with another seed (``--eval-seed``; never the calibration views, never the indexed
tiles) and on the real photos of ``../shared/data/photos`` (ground photos with EXIF positions,
skipped with a note where absent):

* expected calibration error (10 equal-width bins) of the final tile's probability (is the best
  tile the true one?) and of the best area's probability (is the truth in the best area?),
  uncalibrated (softmax at temperature 0.01) and calibrated;
* coverage of the 50 % and 90 % radii (the truth within that distance of the prediction), also
  for radii holding exactly 0.5 and 0.9 of the calibrated mass (no conformal correction) and for
  the uncalibrated softmax;
* the out-of-domain test: the fraction flagged "no confident match" on held-out views, on the
  photos and on a flat grey image, and the AUROC of its score between views and photos.

Run: ``.venv/bin/python benchmarks/calibration.py --index indexes/demo`` (an EfficientNet-Lite0
demo index: ``python -m pipelines.demo``). ``--smoke`` builds a tiny random-init index instead.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import mercantile
import numpy as np
from PIL import Image

import geoindex
from benchmarks._common import REPO, BenchRun, Report, benchmark_parser, markdown_table, run_benchmark
from geoindex.geometry.metrics import great_circle_km
from geoindex.retrieval.calibration import RADIUS_LEVELS, expected_calibration_error, kept_probabilities, radii_km
from geoindex.retrieval.results import SearchResult, areas, final_level
from geoindex.training.calibrate import DEFAULT_COUNT, DEFAULT_K, DEFAULT_SEED, calibration_source, fit_calibration

NAME = "calibration"
PHOTOS = REPO.parent / "shared" / "data" / "photos" / "photos.csv"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = benchmark_parser(NAME, __doc__, raw=True, default_encoder="efficientnet-lite0")
    p.add_argument("--index", type=Path, nargs="+", default=[Path("indexes/demo")],
                   help="indexes to judge, each on its own views (default: indexes/demo)")
    p.add_argument("--views", type=int, default=512, help="held-out views (default 512)")
    p.add_argument("--eval-seed", type=int, default=1, help="seed of the held-out views (default 1)")
    p.add_argument("--calibrate-count", type=int, default=DEFAULT_COUNT)
    p.add_argument("--calibrate-seed", type=int, default=DEFAULT_SEED)
    p.add_argument("-k", type=int, default=DEFAULT_K, help=f"beam width (default {DEFAULT_K}, as the fit)")
    p.add_argument("--photos", type=Path, default=PHOTOS, help="CSV of real photos (file,lat,lon)")
    a = p.parse_args(argv)
    if a.eval_seed == a.calibrate_seed:
        p.error("--eval-seed must differ from --calibrate-seed: held-out views must not be the calibration views")
    if a.smoke:
        a.views, a.calibrate_count = 24, 24
    return a


def _correct(results: Sequence[SearchResult], lat: Sequence[float], lon: Sequence[float]) -> dict[str, Any]:
    """Per result: final-tile and area probabilities and hits, radii and error."""
    p_tile, ok_tile, p_area, ok_area, err, r50, r90 = [], [], [], [], [], [], []
    for r, la, lo in zip(results, lat, lon, strict=True):
        truth = mercantile.tile(lo, la, r.tile.z)
        p_tile.append(r.candidates[0].probability)
        ok_tile.append(r.tile == truth)
        best = next(a for a in areas(r) if r.tile in a.tiles)
        p_area.append(best.probability)
        ok_area.append(truth in best.tiles)
        err.append(float(great_circle_km(la, lo, r.lat, r.lon)))
        r50.append(r.radius_km[0])
        r90.append(r.radius_km[1])
    return {k: np.asarray(v) for k, v in dict(p_tile=p_tile, ok_tile=ok_tile, p_area=p_area, ok_area=ok_area,
                                              err=err, r50=r50, r90=r90).items()}


def _summary(m: dict[str, Any]) -> dict[str, float]:
    return {
        "top1_accuracy": float(m["ok_tile"].mean()),
        "mean_tile_probability": float(m["p_tile"].mean()),
        "ece_tile": expected_calibration_error(m["p_tile"], m["ok_tile"]),
        "area_accuracy": float(m["ok_area"].mean()),
        "mean_area_probability": float(m["p_area"].mean()),
        "ece_area": expected_calibration_error(m["p_area"], m["ok_area"]),
        "coverage_r50": float(np.mean(m["err"] <= m["r50"])),
        "coverage_r90": float(np.mean(m["err"] <= m["r90"])),
        "median_r50_km": float(np.median(m["r50"])),
        "median_r90_km": float(np.median(m["r90"])),
        "r90_anywhere": float(np.mean(m["r90"] >= 20_037.5)),
        "median_error_km": float(np.median(m["err"])),
    }


def _raw_mass_coverage(results: Sequence[SearchResult], lat: Sequence[float], lon: Sequence[float],
                       calibration: Any) -> tuple[float, float]:
    """Coverage of radii holding exactly 0.5 and 0.9 of the calibrated mass (no conformal masses)."""
    inside = []
    for r, la, lo in zip(results, lat, lon, strict=True):
        final = final_level(r)
        fit = calibration.level(final.zoom)
        p = kept_probabilities(final.scores, temperature=fit.temperature, bias=fit.bias)
        radii = radii_km(r.lat, r.lon, final.tiles, p, RADIUS_LEVELS)
        err = float(great_circle_km(la, lo, r.lat, r.lon))
        inside.append([err <= x for x in radii])
    cov = np.mean(inside, axis=0)
    return float(cov[0]), float(cov[1])


def _auroc(positive: np.ndarray, negative: np.ndarray) -> float:
    """P(score of a random in-domain query > that of a random out-of-domain one), ties half."""
    if not positive.size or not negative.size:
        return float("nan")
    diff = positive[:, None] - negative[None, :]
    return float(np.mean(diff > 0) + 0.5 * np.mean(diff == 0))


def _smoke_index(workdir: Path) -> Path:
    from pipelines import build_index

    index = workdir / "smoke"
    build_index.run(build_index.parse_args(["--all", "--schedule", "2", "4", "2", "--index", str(index),
                                            "--encoder", "tiny", "--quiet", "--no-calibrate", "--bbox",
                                            "-30", "-30", "60", "60"]))
    return index


def run(a: argparse.Namespace, argv: Sequence[str] | None) -> Report:
    bench = BenchRun.start(NAME, argv)
    with tempfile.TemporaryDirectory() as tmp:
        dirs = [_smoke_index(Path(tmp))] if a.smoke else a.index
        judged = [_judge(a, geoindex.open_index(d)) for d in dirs]
    encoders = sorted({j["encoder"] for j in judged})
    results = {"indexes": [j["results"] for j in judged]}
    tables = tuple(t for j in judged for t in j["tables"])
    notes = [n for j in judged for n in j["notes"]]
    targets = [(f"{j['label']}: {t}", v, ok) for j in judged for t, v, ok in j["targets"]]
    if a.smoke:
        notes.append("smoke run: tiny random-init encoder; figures say nothing about quality")
    return bench.report("Calibration: probabilities, radii, no confident match", ", ".join(encoders), results,
                        tables, notes, targets)


def _judge(a: argparse.Namespace, index: geoindex.GeoIndex) -> dict[str, Any]:
    """One index: fit in memory, judge on held-out views and photos; results, tables, notes, targets."""
    from geoindex.training.calibrate import photo_queries, view_queries

    source = calibration_source(index.manifest)
    encoder = index.manifest.photo_encoder.name
    started = time.perf_counter()
    cal_queries = view_queries(index, source, count=a.calibrate_count, seed=a.calibrate_seed)
    calibration, reference = fit_calibration(index, cal_queries, k=a.k)
    fit_s = time.perf_counter() - started

    held = view_queries(index, source, count=a.views, seed=a.eval_seed)
    xv = index.embed(list(held.images))
    index.calibration, index.ood_reference = None, None
    before = index.search_embeddings(xv, a.k, top_n=1)
    index.calibration, index.ood_reference = calibration, reference
    after = index.search_embeddings(xv, a.k, top_n=1)
    m_before, m_after = _correct(before, held.lat, held.lon), _correct(after, held.lat, held.lon)
    s_before, s_after = _summary(m_before), _summary(m_after)
    raw50, raw90 = _raw_mass_coverage(after, held.lat, held.lon, calibration)
    view_scores = np.array([r.ood_score for r in after])
    views_flagged = float(np.mean([r.confident is False for r in after]))

    grey = index.search_embeddings(index.embed([Image.new("RGB", (256, 256), (128, 128, 128))]), a.k, top_n=1)[0]
    photos: dict[str, Any] = {"available": a.photos.is_file()}
    photo_scores = np.array([])
    if a.photos.is_file():
        pq = photo_queries(a.photos)
        xp = index.embed(list(pq.images))
        rp = index.search_embeddings(xp, a.k, top_n=1)
        photo_scores = np.array([r.ood_score for r in rp])
        mp = _correct(rp, pq.lat, pq.lon)
        photos.update(count=len(rp), flagged=float(np.mean([r.confident is False for r in rp])),
                      median_error_km=float(np.median(mp["err"])), coverage_r90=float(np.mean(mp["err"] <= mp["r90"])),
                      median_score=float(np.median(photo_scores)), max_score=float(photo_scores.max()))
    auroc = _auroc(view_scores, photo_scores)

    results = {
        "index": str(index.path), "k": a.k, "levels": list(index.zooms),
        "calibration": {**calibration.to_dict(), "fit_seconds": fit_s},
        "held_out_views": {"count": len(after), "seed": a.eval_seed, "zoom": held.zoom,
                           "before": s_before, "after": s_after,
                           "coverage_raw_mass": {"r50": raw50, "r90": raw90},
                           "flagged": views_flagged, "median_score": float(np.median(view_scores)),
                           "min_score": float(view_scores.min())},
        "photos": photos,
        "grey_image": {"flagged": grey.confident is False, "score": grey.ood_score},
        "ood_auroc_views_vs_photos": auroc,
    }
    rows = [["final-tile ECE (10 bins)", s_before["ece_tile"], s_after["ece_tile"]],
            ["area ECE (10 bins)", s_before["ece_area"], s_after["ece_area"]],
            ["mean final-tile probability", s_before["mean_tile_probability"], s_after["mean_tile_probability"]],
            ["final-tile top-1 accuracy", s_before["top1_accuracy"], s_after["top1_accuracy"]],
            ["truth inside 50 % radius", s_before["coverage_r50"], s_after["coverage_r50"]],
            ["truth inside 90 % radius", s_before["coverage_r90"], s_after["coverage_r90"]],
            ["median 50 % radius, km", s_before["median_r50_km"], s_after["median_r50_km"]],
            ["median 90 % radius, km", s_before["median_r90_km"], s_after["median_r90_km"]],
            ["90 % radius 'anywhere'", s_before["r90_anywhere"], s_after["r90_anywhere"]],
            ["median error, km", s_before["median_error_km"], s_after["median_error_km"]]]
    label = str(index.path)
    table = f"**{label}**\n\n" + markdown_table(["held-out views", "uncalibrated", "calibrated"], rows)
    ood_rows = [["held-out views", len(after), views_flagged],
                ["real photos", photos.get("count", 0), photos.get("flagged", float("nan"))],
                ["flat grey image", 1, float(grey.confident is False)]]
    ood_table = markdown_table(["'no confident match'", "queries", "flagged"], ood_rows)
    photo_flagged = photos.get("flagged")
    targets = [
        ("final-tile ECE <= 0.05 after", f"{s_after['ece_tile']:.3f} (before {s_before['ece_tile']:.3f})",
         s_after["ece_tile"] <= 0.05),
        ("truth inside 90 % radius for 85-95 %", f"{s_after['coverage_r90']:.3f}",
         0.85 <= s_after["coverage_r90"] <= 0.95),
        ("truth inside 50 % radius for 40-60 %", f"{s_after['coverage_r50']:.3f}",
         0.40 <= s_after["coverage_r50"] <= 0.60),
        (">= 90 % of the real photos flagged", "-" if photo_flagged is None else f"{photo_flagged:.3f}",
         None if photo_flagged is None else photo_flagged >= 0.90),
        ("<= 10 % of held-out views flagged", f"{views_flagged:.3f}", views_flagged <= 0.10),
    ]
    temps = ", ".join(f"z{lv.zoom}: T {lv.temperature:.3g}, bias {lv.bias:.3g}" for lv in calibration.levels)
    notes = [
        f"index {index.path} (levels {list(index.zooms)}), k={a.k}; calibration fitted in {fit_s:.0f} s on "
        f"{calibration.fitted_on.count} views (seed {a.calibrate_seed}) of z{cal_queries.zoom} tiles: {temps}; "
        f"radii hold {calibration.radius_mass[0]:.3f} / {calibration.radius_mass[1]:.3f} of the calibrated mass; "
        f"threshold {calibration.ood_threshold:.3f} ({calibration.ood_neighbours} nearest calibration views)",
        f"held-out: {len(after)} views, seed {a.eval_seed}; radii holding exactly 0.5 / 0.9 of the calibrated "
        f"mass (no conformal masses) cover {raw50:.3f} / {raw90:.3f}",
        f"out-of-domain score AUROC, held-out views vs photos: {auroc:.3f}; views' median score "
        f"{np.median(view_scores):.3f}, photos' {photos.get('median_score', float('nan')):.3f}",
    ]
    if not photos["available"]:
        notes.append(f"{a.photos} is absent: the photo rows are empty")
    return {"label": label, "encoder": encoder, "results": results, "tables": (table, ood_table), "notes": notes,
            "targets": targets}


def main(argv: Sequence[str] | None = None) -> int:
    return run_benchmark(parse_args, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())


