"""Output formats of search results: table, CSV and JSON on a stream; GeoJSON and PNG maps as files.

One home for every format: :data:`WRITERS` maps a ``--format`` name to the writer that streams
results in it, and :func:`encode_geojson` / :func:`encode_map` give the files' bytes (the map
is drawn by :mod:`geoindex.render`). Adding a stream format is one class and one entry here.

Probabilities are those of the result's final level (calibrated where the index is; see
``geoindex.calibration``), over all k tiles the final level kept. Neighbouring
tiles of the final level often look alike (the same forest, the same sea) and split the
probability between them; :func:`areas` merges tiles that touch (8-neighbourhood, wrapping at
the antimeridian) into areas and sums their probability, which is the confidence a user wants.
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
from collections.abc import Sequence
from typing import Any, TextIO

import mercantile

from geoindex.calibration import EVERYWHERE_KM, RADIUS_LEVELS, describe_radius
from geoindex.imagery import ImageInput
from geoindex.metrics import circle_points, great_circle_km
from geoindex.render import LatLon, colormap, draw_map
from geoindex.results import Area, Candidate, SearchResult, areas, final_level, tile_probabilities
from geoindex.sources import TileSource

__all__ = [
    "FORMATS",
    "WRITERS",
    "Area",
    "ResultWriter",
    "areas",
    "encode_geojson",
    "encode_map",
    "final_level",
    "one_line",
    "result_to_dict",
    "tile_probabilities",
    "to_geojson",
]


def _level_key(q: float) -> str:
    """``"50"``, ``"90"``: a radius's key in JSON, by the percentage it holds."""
    return f"{100 * q:g}"


def _tile_json(t: mercantile.Tile) -> list[int]:
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
    best_area = result.areas
    out: dict[str, Any] = {
        "image": result.image,
        "lat": result.lat,
        "lon": result.lon,
        "tile": _tile_json(result.tile),
        "bbox": list(result.bbox),
        "score": result.score,
        "probability": result.probability,
        "area_probability": result.area_probability,
        "calibrated": result.calibrated,
        "radius_km": {_level_key(q): r for q, r in zip(RADIUS_LEVELS, result.radius_km, strict=True)},
        "confident": result.confident,
        "reason": result.reason,
        "ood_score": result.ood_score if math.isfinite(result.ood_score) else None,  # NaN is not JSON
        "candidates": [
            {"lat": c.lat, "lon": c.lon, "tile": _tile_json(c.tile), "score": c.score,
             "probability": c.probability}
            for c in result.candidates[:n]
        ],
        "areas": [
            {"lat": a.lat, "lon": a.lon, "tile": _tile_json(a.best), "bbox": list(a.bbox),
             "tiles": len(a.tiles), "probability": a.probability}
            for a in best_area[:n]
        ],
    }
    if exif is not None:
        error = float(great_circle_km(exif[0], exif[1], result.lat, result.lon))
        out["exif"] = {
            "lat": exif[0],
            "lon": exif[1],
            "error_km": error,
            "inside_radius": {_level_key(q): error <= r for q, r in zip(RADIUS_LEVELS, result.radius_km, strict=True)},
        }
    if trace:
        out["trace"] = [
            {"zoom": lv.zoom, "tiles": [_tile_json(t) for t in lv.tiles], "scores": list(lv.scores),
             **({"note": lv.note} if lv.note else {})}  # lazy levels: stored, encoded, or on the fly
            for lv in result.trace
        ]
    return out


# -- GeoJSON -----------------------------------------------------------------------------------


def _polygon(bbox: Sequence[float]) -> dict[str, Any]:
    w, s, e, n = (round(float(v), 7) for v in bbox)
    return {"type": "Polygon", "coordinates": [[[w, s], [e, s], [e, n], [w, n], [w, s]]]}


def _point(lat: float, lon: float) -> dict[str, Any]:
    return {"type": "Point", "coordinates": [round(lon, 7), round(lat, 7)]}


def _heat_hex(w: float) -> str:
    r, g, b = colormap(w)
    return f"#{r:02x}{g:02x}{b:02x}"


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
    features: list[dict[str, Any]] = []
    for i, result in enumerate(results):
        base = {"image": result.image}
        scored = tile_probabilities(result)
        pmax = max(p for _, _, p in scored)
        for rank, (t, s, p) in enumerate(scored, start=1):
            w = p / pmax
            features.append({"type": "Feature", "geometry": _polygon(mercantile.bounds(t)), "properties": {
                **base, "kind": "candidate", "rank": rank, "tile": _tile_json(t), "score": s,
                "probability": p, "fill": _heat_hex(w), "fill-opacity": round(0.15 + 0.6 * w, 3),
                "stroke": _heat_hex(w), "stroke-width": 1,
            }})
        for rank, a in enumerate(result.areas, start=1):
            features.append({"type": "Feature", "geometry": _polygon(a.bbox), "properties": {
                **base, "kind": "area", "rank": rank, "tiles": len(a.tiles), "probability": a.probability,
                "fill-opacity": 0.0, "stroke": "#ffffff", "stroke-width": 2,
            }})
        for q, r in zip(RADIUS_LEVELS, result.radius_km, strict=True):
            if r < EVERYWHERE_KM:
                circle = circle_points(result.lat, result.lon, r)
                ring = [[round(float(lo), 7), round(float(la), 7)] for la, lo in circle]
                features.append({"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [ring]},
                                 "properties": {**base, "kind": "radius", "level": q, "radius_km": r,
                                                "calibrated": result.calibrated, "fill-opacity": 0.0,
                                                "stroke": "#ffffff" if q < 0.9 else "#00c8ff", "stroke-width": 2}})
        features.append({"type": "Feature", "geometry": _point(result.lat, result.lon), "properties": {
            **base, "kind": "prediction", "tile": _tile_json(result.tile), "score": result.score,
            "probability": result.probability, "calibrated": result.calibrated,
            "radius_km": list(result.radius_km), "confident": result.confident, "reason": result.reason,
            "marker-color": "#e41a1c",
        }})
        truth = exif[i] if exif is not None else result.exif
        if truth is not None:
            features.append({"type": "Feature", "geometry": _point(*truth), "properties": {
                **base, "kind": "exif", "error_km": float(great_circle_km(*truth, result.lat, result.lon)),
                "marker-color": "#4daf4a",
            }})
    return {"type": "FeatureCollection", "features": features}



# -- streams: table, CSV, JSON -----------------------------------------------------------------


class ResultWriter:
    """Streams results to ``out`` in one format: a header first, then each result and failure, then ``close``."""

    def __init__(self, out: TextIO, *, top_n: int, trace: bool) -> None:
        self.out, self.top_n, self.trace = out, top_n, trace

    def result(self, result: SearchResult, gps: LatLon | None = None) -> None:
        """Write one located image; ``gps`` is its EXIF position (default: ``result.exif``)."""
        d = result_to_dict(result, exif=gps, top_n=self.top_n, trace=self.trace)
        area_of = {t: a.probability for a in result.areas for t in a.tiles}
        exif = d.get("exif")
        for rank, c in enumerate(result.candidates[: self.top_n], start=1):
            self._row(result, rank, c, area_of.get(c.tile, c.probability), exif if rank == 1 else None)
        self._note(result)
        self.out.flush()

    def _note(self, result: SearchResult) -> None:
        """After an image's rows: whatever its answer should be read with (formats with columns for it skip it)."""

    def _row(self, result: SearchResult, rank: int, c: Candidate, area_p: float, exif: dict[str, float] | None) -> None:
        """One candidate's row; ``exif`` only on the first row of an image that has it."""

    def failure(self, image: str, reason: str) -> None:
        """Write one input that produced no result (formats without an error column skip it)."""

    def close(self) -> None:
        self.out.flush()


class _Table(ResultWriter):
    """Aligned columns for people; failures go to stderr only."""

    def __init__(self, out: TextIO, *, top_n: int, trace: bool) -> None:
        super().__init__(out, top_n=top_n, trace=trace)
        out.write(f"{'image':<32} {'#':>2} {'lat':>9} {'lon':>10} {'tile z/x/y':>14} {'score':>6} "
                  f"{'prob':>5} {'area':>5} {'r50 km':>8} {'r90 km':>8}  {'EXIF lat,lon':<20} {'error km':>9}\n")

    def _row(self, result: SearchResult, rank: int, c: Candidate, area_p: float, exif: dict[str, float] | None) -> None:
        name = _clip(one_line(result.image or ""), 32) if rank == 1 else ""
        gps_text = f"{exif['lat']:.5f},{exif['lon']:.5f}" if exif else ""
        err = f"{exif['error_km']:9,.1f}" if exif else ""
        tile = f"{c.tile.z}/{c.tile.x}/{c.tile.y}"
        r50, r90 = (_radius_cell(r) for r in result.radius_km) if rank == 1 else ("", "")
        row = (f"{name:<32} {rank:>2} {c.lat:>9.5f} {c.lon:>10.5f} {tile:>14} {c.score:>6.3f} "
               f"{c.probability:>5.2f} {area_p:>5.2f} {r50:>8} {r90:>8}  {gps_text:<20} {err:>9}")
        self.out.write(row.rstrip() + "\n")

    def _note(self, result: SearchResult) -> None:
        if result.confident is False:
            self.out.write(f"{'':<32}  ! {_NO_MATCH_LINE}\n")
        elif not result.calibrated:
            self.out.write(f"{'':<32}  ! {_UNCALIBRATED_LINE}\n")


_NO_MATCH_LINE = ("no confident match: the photo does not resemble what this index can match; "
                  "the candidates above are likely wrong")
_UNCALIBRATED_LINE = ("uncalibrated index: prob is a fixed softmax, not a calibrated probability "
                      "(python -m pipelines.build_index --calibrate)")


def _radius_cell(km: float) -> str:
    return "anywhere" if km >= EVERYWHERE_KM else describe_radius(km).removesuffix(" km")


class _Csv(ResultWriter):
    """One row per candidate, one per failure (with its reason in ``error``)."""

    def __init__(self, out: TextIO, *, top_n: int, trace: bool) -> None:
        super().__init__(out, top_n=top_n, trace=trace)
        self._csv = csv.writer(out, lineterminator="\n")
        self._csv.writerow(["image", "rank", "lat", "lon", "zoom", "x", "y", "score", "probability",
                            "area_probability", "exif_lat", "exif_lon", "error_km", "radius50_km", "radius90_km",
                            "calibrated", "confident", "reason", "error"])

    def _row(self, result: SearchResult, rank: int, c: Candidate, area_p: float, exif: dict[str, float] | None) -> None:
        e = exif or {}
        self._csv.writerow([result.image, rank, f"{c.lat:.6f}", f"{c.lon:.6f}", c.tile.z, c.tile.x,
                            c.tile.y, f"{c.score:.5f}", f"{c.probability:.5f}", f"{area_p:.5f}",
                            e.get("lat", ""), e.get("lon", ""),
                            f"{e['error_km']:.3f}" if e else "", f"{result.radius_km[0]:.1f}",
                            f"{result.radius_km[1]:.1f}", str(result.calibrated).lower(),
                            "" if result.confident is None else str(result.confident).lower(), result.reason or "", ""])

    def failure(self, image: str, reason: str) -> None:
        self._csv.writerow([image] + [""] * 17 + [reason])


class _Json(ResultWriter):
    """One JSON list of :func:`result_to_dict` items and ``{image, error}`` failures, written on close."""

    def __init__(self, out: TextIO, *, top_n: int, trace: bool) -> None:
        super().__init__(out, top_n=top_n, trace=trace)
        self.items: list[dict[str, Any]] = []

    def result(self, result: SearchResult, gps: LatLon | None = None) -> None:
        self.items.append(result_to_dict(result, exif=gps, top_n=self.top_n, trace=self.trace))

    def failure(self, image: str, reason: str) -> None:
        self.items.append({"image": image, "error": reason})

    def close(self) -> None:
        json.dump(self.items, self.out, indent=2)
        self.out.write("\n")
        super().close()


WRITERS: dict[str, type[ResultWriter]] = {"table": _Table, "json": _Json, "csv": _Csv}
FORMATS = tuple(WRITERS)


def one_line(text: str) -> str:
    """``text`` with control characters (a newline in a file name) escaped, so each record stays one line."""
    return _CONTROL.sub(lambda m: repr(m.group())[1:-1], text)


_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def _clip(text: str, width: int) -> str:
    """``text`` in at most ``width`` characters, cut in the middle: a path keeps its file name whole when
    it fits, and the start and end of its folder (``/data...2024/trip/berlin.jpg``), else both ends of
    the name (``holiday-2...berlin-dom.jpg``)."""
    if len(text) <= width:
        return text
    folder, slash, name = text.rpartition("/")
    room = width - len(name) - 4  # for the folder, around "..." and before "/"
    if slash and room >= 2:
        head = room // 3  # the folders nearest the file say more than the root
        return folder[:head] + "..." + folder[len(folder) - (room - head):] + "/" + name
    name = name if slash else text
    tail = (width - 3) // 2 + (width - 3) % 2
    return name[: width - 3 - tail] + "..." + name[-tail:]


# -- files: GeoJSON, PNG -----------------------------------------------------------------------


def encode_geojson(results: Sequence[SearchResult], exif: Sequence[LatLon | None] | None = None) -> tuple[bytes, int]:
    """The bytes of a GeoJSON file of ``results`` (see :func:`to_geojson`) and its number of features."""
    collection = to_geojson(results, exif=exif)
    return json.dumps(collection).encode(), len(collection["features"])


def encode_map(
    result: SearchResult,
    source: TileSource,
    *,
    image_format: str = "PNG",
    truth: LatLon | None = None,
    photo: ImageInput | None = None,
) -> tuple[bytes, tuple[int, int]]:
    """The bytes of a map of one result (see :func:`geoindex.render.draw_map`) in a Pillow format, and its size."""
    picture = draw_map(result, source, truth=truth, photo=photo)
    buf = io.BytesIO()
    picture.save(buf, format=image_format)
    return buf.getvalue(), picture.size
