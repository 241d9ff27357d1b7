"""``table``: aligned columns for people, one row per candidate; failures go to stderr only."""

from __future__ import annotations

from typing import TextIO

from geoindex.interfaces.outputs.base import OutputFormat, ResultWriter, clip, one_line
from geoindex.retrieval.calibration import EVERYWHERE_KM, describe_radius
from geoindex.retrieval.results import Candidate, SearchResult

NO_MATCH_LINE = ("no confident match: the photo does not resemble what this index can match; "
                 "the candidates above are likely wrong")
UNCALIBRATED_LINE = ("uncalibrated index: prob is a fixed softmax, not a calibrated probability "
                     "(python -m pipelines.build_index --calibrate)")


class TableWriter(ResultWriter):
    """Aligned columns for people; failures go to stderr only."""

    def __init__(self, out: TextIO, *, top_n: int, trace: bool) -> None:
        super().__init__(out, top_n=top_n, trace=trace)
        out.write(f"{'image':<32} {'#':>2} {'lat':>9} {'lon':>10} {'tile z/x/y':>14} {'score':>6} "
                  f"{'prob':>5} {'area':>5} {'r50 km':>8} {'r90 km':>8}  {'EXIF lat,lon':<20} {'error km':>9}\n")

    def row(self, result: SearchResult, rank: int, c: Candidate, area_p: float, exif: dict[str, float] | None) -> None:
        name = clip(one_line(result.image or ""), 32) if rank == 1 else ""
        gps_text = f"{exif['lat']:.5f},{exif['lon']:.5f}" if exif else ""
        err = f"{exif['error_km']:9,.1f}" if exif else ""
        tile = f"{c.tile.z}/{c.tile.x}/{c.tile.y}"
        r50, r90 = (_radius_cell(r) for r in result.radius_km) if rank == 1 else ("", "")
        row = (f"{name:<32} {rank:>2} {c.lat:>9.5f} {c.lon:>10.5f} {tile:>14} {c.score:>6.3f} "
               f"{c.probability:>5.2f} {area_p:>5.2f} {r50:>8} {r90:>8}  {gps_text:<20} {err:>9}")
        self.out.write(row.rstrip() + "\n")

    def note(self, result: SearchResult) -> None:
        if result.confident is False:
            self.out.write(f"{'':<32}  ! {NO_MATCH_LINE}\n")
        elif not result.calibrated:
            self.out.write(f"{'':<32}  ! {UNCALIBRATED_LINE}\n")


def _radius_cell(km: float) -> str:
    return "anywhere" if km >= EVERYWHERE_KM else describe_radius(km).removesuffix(" km")


FORMAT = OutputFormat("table", "aligned columns for people", "text/plain", ".txt", writer=TableWriter)
