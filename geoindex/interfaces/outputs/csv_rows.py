"""``csv``: one row per candidate, one per failure (with its reason in ``error``)."""

from __future__ import annotations

import csv
from typing import TextIO

from geoindex.interfaces.outputs.base import OutputFormat, ResultWriter
from geoindex.retrieval.results import Candidate, SearchResult

COLUMNS = ("image", "rank", "lat", "lon", "zoom", "x", "y", "score", "probability", "area_probability", "exif_lat",
           "exif_lon", "error_km", "radius50_km", "radius90_km", "calibrated", "confident", "reason", "error")


class CsvWriter(ResultWriter):
    """One row per candidate, one per failure (with its reason in ``error``)."""

    def __init__(self, out: TextIO, *, top_n: int, trace: bool) -> None:
        super().__init__(out, top_n=top_n, trace=trace)
        self.csv = csv.writer(out, lineterminator="\n")
        self.csv.writerow(COLUMNS)

    def row(self, result: SearchResult, rank: int, c: Candidate, area_p: float, exif: dict[str, float] | None) -> None:
        e = exif or {}
        self.csv.writerow([result.image, rank, f"{c.lat:.6f}", f"{c.lon:.6f}", c.tile.z, c.tile.x,
                           c.tile.y, f"{c.score:.5f}", f"{c.probability:.5f}", f"{area_p:.5f}",
                           e.get("lat", ""), e.get("lon", ""),
                           f"{e['error_km']:.3f}" if e else "", f"{result.radius_km[0]:.1f}",
                           f"{result.radius_km[1]:.1f}", str(result.calibrated).lower(),
                           "" if result.confident is None else str(result.confident).lower(), result.reason or "", ""])

    def failure(self, image: str, reason: str) -> None:
        self.csv.writerow([image] + [""] * (len(COLUMNS) - 2) + [reason])


FORMAT = OutputFormat("csv", "one row per candidate", "text/csv", ".csv", writer=CsvWriter)
