"""``json``: one JSON list of result records (:func:`geoindex.interfaces.outputs.record.result_to_dict`) and
``{image, error}`` failures, written on close."""

from __future__ import annotations

import json
from typing import Any, TextIO

from geoindex.interfaces.outputs.base import OutputFormat, ResultWriter
from geoindex.interfaces.outputs.record import result_to_dict
from geoindex.retrieval.results import LatLon, SearchResult


class JsonWriter(ResultWriter):
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


FORMAT = OutputFormat("json", "one JSON record per image", "application/json", ".json", writer=JsonWriter,
                      trace=True)
