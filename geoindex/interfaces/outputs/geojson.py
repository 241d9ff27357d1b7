"""``geojson``: a FeatureCollection of results, a heat map of the candidates with their probabilities.

``geoindex locate --geojson FILE`` writes one file for every located photo; the service's
``include_geojson`` adds the collection of one photo to its answer as ``geojson``.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from typing import Any

import mercantile

from geoindex.geometry.metrics import circle_points
from geoindex.interfaces.outputs.base import Encoded, FileInputs, OutputFormat
from geoindex.interfaces.outputs.record import tile_json
from geoindex.interfaces.render import colormap
from geoindex.retrieval.calibration import EVERYWHERE_KM, RADIUS_LEVELS
from geoindex.retrieval.results import LatLon, SearchResult, tile_probabilities

__all__ = ["FORMAT", "encode_geojson", "to_geojson"]

Feature = dict[str, Any]


def to_geojson(
    results: Sequence[SearchResult],
    *,
    exif: Sequence[LatLon | None] | None = None,
) -> dict[str, Any]:
    """A GeoJSON FeatureCollection of results: a heat map of candidates with probabilities.

    Per result: one Polygon per kept final tile (``kind: candidate``, ``probability``, ``score``,
    ``rank``), one Polygon per area (``kind: area``, summed ``probability``), the uncertainty
    radii as geodesic circles (``kind: radius``, ``level`` 0.5 or 0.9, ``radius_km``; a radius
    of "anywhere" has no circle; longitudes are unwrapped around the prediction so that a circle
    across the antimeridian stays one ring), the prediction (``kind: prediction``, a Point, with
    ``calibrated``, ``confident`` and ``reason``) and, when given, the EXIF position (``kind:
    exif``). Fill colours and opacities follow the simplestyle spec, so geojson.io shows them as
    a heat map.
    """
    features: list[Feature] = []
    for i, result in enumerate(results):
        base = {"image": result.image}
        features += _candidates(result, base) + _areas(result, base) + _radii(result, base)
        features.append(_feature(_point(result.lat, result.lon), {
            **base, "kind": "prediction", "tile": tile_json(result.tile), "score": result.score,
            "probability": result.probability, "calibrated": result.calibrated,
            "radius_km": list(result.radius_km), "confident": result.confident, "reason": result.reason,
            "marker-color": "#e41a1c",
        }))
        truth = exif[i] if exif is not None else result.exif
        if truth is not None:
            features.append(_feature(_point(*truth), {
                **base, "kind": "exif", "error_km": dataclasses.replace(result, exif=truth).error_km,
                "marker-color": "#4daf4a",
            }))
    return {"type": "FeatureCollection", "features": features}


def _candidates(result: SearchResult, base: dict[str, Any]) -> list[Feature]:
    """One square per kept final tile, coloured by its probability relative to the best."""
    scored = tile_probabilities(result)
    pmax = max(p for _, _, p in scored)
    out = []
    for rank, (t, s, p) in enumerate(scored, start=1):
        w = p / pmax
        out.append(_feature(_polygon(mercantile.bounds(t)), {
            **base, "kind": "candidate", "rank": rank, "tile": tile_json(t), "score": s,
            "probability": p, "fill": _heat_hex(w), "fill-opacity": round(0.15 + 0.6 * w, 3),
            "stroke": _heat_hex(w), "stroke-width": 1,
        }))
    return out


def _areas(result: SearchResult, base: dict[str, Any]) -> list[Feature]:
    return [_feature(_polygon(a.bbox), {
        **base, "kind": "area", "rank": rank, "tiles": len(a.tiles), "probability": a.probability,
        "fill-opacity": 0.0, "stroke": "#ffffff", "stroke-width": 2,
    }) for rank, a in enumerate(result.areas, start=1)]


def _radii(result: SearchResult, base: dict[str, Any]) -> list[Feature]:
    out = []
    for q, r in zip(RADIUS_LEVELS, result.radius_km, strict=True):
        if r < EVERYWHERE_KM:
            circle = circle_points(result.lat, result.lon, r)
            ring = [[round(float(lo), 7), round(float(la), 7)] for la, lo in circle]
            out.append(_feature({"type": "Polygon", "coordinates": [ring]}, {
                **base, "kind": "radius", "level": q, "radius_km": r, "calibrated": result.calibrated,
                "fill-opacity": 0.0, "stroke": "#ffffff" if q < 0.9 else "#00c8ff", "stroke-width": 2}))
    return out


def _feature(geometry: dict[str, Any], properties: dict[str, Any]) -> Feature:
    return {"type": "Feature", "geometry": geometry, "properties": properties}


def _polygon(bbox: Sequence[float]) -> dict[str, Any]:
    w, s, e, n = (round(float(v), 7) for v in bbox)
    return {"type": "Polygon", "coordinates": [[[w, s], [e, s], [e, n], [w, n], [w, s]]]}


def _point(lat: float, lon: float) -> dict[str, Any]:
    return {"type": "Point", "coordinates": [round(lon, 7), round(lat, 7)]}


def _heat_hex(w: float) -> str:
    r, g, b = colormap(w)
    return f"#{r:02x}{g:02x}{b:02x}"


def encode_geojson(results: Sequence[SearchResult], exif: Sequence[LatLon | None] | None = None) -> tuple[bytes, int]:
    """The bytes of a GeoJSON file of ``results`` (see :func:`to_geojson`) and its number of features."""
    collection = to_geojson(results, exif=exif)
    return json.dumps(collection).encode(), len(collection["features"])


def _encode(results: Sequence[SearchResult], inputs: FileInputs) -> Encoded:
    data, features = encode_geojson(results, inputs.exif)
    return Encoded(data, f"{features} features")


FORMAT = OutputFormat(
    "geojson", "the candidates (GeoJSON)", "application/geo+json", ".geojson", encode=_encode,
    to_json=lambda result, inputs: to_geojson([result], exif=inputs.exif), download=".geojson",
    help="write the candidates with probabilities as GeoJSON (open in any GIS or geojson.io)",
)
