"""The JSON record of a search result (:func:`result_to_dict`): the JSON stream's items, the service's answer,
and the EXIF columns of the table and CSV.

Probabilities are those of the result's final level (calibrated where the index is; see
``geoindex.retrieval.calibration``), over all k tiles the final level kept; ``areas`` sums them over tiles
that touch (:func:`geoindex.retrieval.results.areas`), which is the confidence a user wants.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import mercantile

from geoindex.retrieval.calibration import RADIUS_LEVELS
from geoindex.retrieval.results import LatLon, SearchResult

__all__ = ["exif_record", "level_key", "result_to_dict", "tile_json"]


def level_key(q: float) -> str:
    """``"50"``, ``"90"``: a radius's key in JSON, by the percentage it holds."""
    return f"{100 * q:g}"


def tile_json(t: mercantile.Tile) -> list[int]:
    return [t.z, t.x, t.y]


def result_to_dict(
    result: SearchResult,
    *,
    exif: LatLon | None = None,
    top_n: int | None = None,
    trace: bool = False,
) -> dict[str, Any]:
    """A JSON-ready dict of a result: prediction, radii, confidence, candidates, areas, optionally trace and EXIF GPS.

    ``calibrated`` says whether the probabilities were fitted (``build_index --calibrate``);
    ``radius_km`` holds the radii around the prediction that hold the truth with 50 % and 90 %
    probability (20,037.5: anywhere); ``confident`` is false, with a ``reason``, when the photo
    does not resemble what the index can match (null, with the reason, for an uncalibrated index).

    Args:
        exif: the photo's own GPS position (default: ``result.exif``): adds ``exif`` with the
            great-circle distance to the prediction and whether it lies inside each radius.
        top_n: candidates and areas to include (default: as many candidates as the result has).
        trace: include the per-level kept tiles and scores.
    """
    n = top_n or len(result.candidates)
    exif = exif if exif is not None else result.exif
    out: dict[str, Any] = {
        "image": result.image,
        "lat": result.lat,
        "lon": result.lon,
        "tile": tile_json(result.tile),
        "bbox": list(result.bbox),
        "score": result.score,
        "probability": result.probability,
        "area_probability": result.area_probability,
        "calibrated": result.calibrated,
        "radius_km": {level_key(q): r for q, r in zip(RADIUS_LEVELS, result.radius_km, strict=True)},
        "confident": result.confident,
        "reason": result.reason,
        "ood_score": result.ood_score if math.isfinite(result.ood_score) else None,  # NaN is not JSON
        "candidates": [
            {"lat": c.lat, "lon": c.lon, "tile": tile_json(c.tile), "score": c.score,
             "probability": c.probability}
            for c in result.candidates[:n]
        ],
        "areas": [
            {"lat": a.lat, "lon": a.lon, "tile": tile_json(a.best), "bbox": list(a.bbox),
             "tiles": len(a.tiles), "probability": a.probability}
            for a in result.areas[:n]
        ],
    }
    if exif is not None:
        out["exif"] = exif_record(result, exif)
    if trace:
        out["trace"] = [
            {"zoom": lv.zoom, "tiles": [tile_json(t) for t in lv.tiles], "scores": list(lv.scores),
             **({"note": lv.note} if lv.note else {})}  # lazy levels: stored, encoded, or on the fly
            for lv in result.trace
        ]
    return out


def exif_record(result: SearchResult, exif: LatLon) -> dict[str, Any]:
    """The photo's GPS position, its great-circle distance to the prediction and whether each radius holds it."""
    located = dataclasses.replace(result, exif=exif)  # SearchResult measures the error against its own exif
    inside = located.inside_radius
    assert inside is not None
    return {
        "lat": exif[0],
        "lon": exif[1],
        "error_km": located.error_km,
        "inside_radius": {level_key(q): held for q, held in zip(RADIUS_LEVELS, inside, strict=True)},
    }
