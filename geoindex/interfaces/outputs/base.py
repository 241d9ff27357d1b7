"""What an output format is: :class:`OutputFormat`, the stream writers' base :class:`ResultWriter`, and
:class:`FileInputs`, what a file format may draw on beside the results.

A format either streams (its :class:`ResultWriter` writes one result at a time to a text stream: the
table, CSV, JSON of ``geoindex locate --format``) or writes a whole file (its ``encode`` gives the
bytes: GeoJSON, the map picture; ``geoindex locate --NAME FILE`` and the service's ``include_NAME``).
"""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TextIO

from geoindex.errors import ConfigError
from geoindex.imagery import ImageInput
from geoindex.interfaces.outputs.record import exif_record
from geoindex.retrieval.results import Candidate, LatLon, SearchResult
from geoindex.sources import TileSource

__all__ = ["Encoded", "FileInputs", "OutputFormat", "ResultWriter", "clip", "one_line"]


class ResultWriter:
    """Streams results to ``out`` in one format: a header first, then each result and failure, then ``close``."""

    def __init__(self, out: TextIO, *, top_n: int, trace: bool) -> None:
        self.out, self.top_n, self.trace = out, top_n, trace

    def result(self, result: SearchResult, gps: LatLon | None = None) -> None:
        """Write one located image; ``gps`` is its EXIF position (default: ``result.exif``)."""
        position = gps if gps is not None else result.exif
        exif = exif_record(result, position) if position is not None else None
        area_of = {t: a.probability for a in result.areas for t in a.tiles}
        for rank, c in enumerate(result.candidates[: self.top_n], start=1):
            self.row(result, rank, c, area_of.get(c.tile, c.probability), exif if rank == 1 else None)
        self.note(result)
        self.out.flush()

    def note(self, result: SearchResult) -> None:
        """After an image's rows: whatever its answer should be read with (formats with columns for it skip it)."""

    def row(self, result: SearchResult, rank: int, c: Candidate, area_p: float, exif: dict[str, float] | None) -> None:
        """One candidate's row; ``exif`` only on the first row of an image that has it."""

    def failure(self, image: str, reason: str) -> None:
        """Write one input that produced no result (formats without an error column skip it)."""

    def close(self) -> None:
        self.out.flush()


@dataclass(frozen=True)
class FileInputs:
    """What a file format may draw on beside the results, each sequence in the order of the results.

    Attributes:
        exif: the photos' own GPS positions (default: each result's ``exif``).
        photos: the photos themselves (paths or bytes), for formats that show them.
        imagery: opens the tile source of formats that draw on a map (called only by those).
        suffix: the file's extension as the user named it (``.jpg``); picks a picture's encoding.
    """

    exif: Sequence[LatLon | None] | None = None
    photos: Sequence[ImageInput | None] = ()
    imagery: Callable[[], TileSource] | None = None
    suffix: str = ""

    def truth(self, i: int, result: SearchResult) -> LatLon | None:
        """The GPS position of the ``i``-th result."""
        return self.exif[i] if self.exif is not None else result.exif

    def photo(self, i: int) -> ImageInput | None:
        return self.photos[i] if i < len(self.photos) else None

    def source(self, fmt: str) -> TileSource:
        """The tile source a map is drawn on; ConfigError naming ``fmt`` when none was given."""
        if self.imagery is None:
            raise ConfigError(f"output format {fmt!r} draws on a map: give it imagery (--map-source)")
        return self.imagery()


@dataclass(frozen=True)
class Encoded:
    """A file's bytes, and a few words on what it holds (``12 features``, ``800x600``) for the log."""

    data: bytes
    summary: str


@dataclass(frozen=True)
class OutputFormat:
    """One output format, found by :mod:`geoindex.interfaces.outputs` in the module that declares it as ``FORMAT``.

    Exactly one of ``writer`` (a stream format) and ``encode`` (a file format) is set.

    Attributes:
        name: ``geoindex locate --format NAME`` for a stream; ``--NAME FILE`` and the service's
            ``include_NAME`` for a file; ``POST /locate/NAME`` for either.
        label: what it holds, in a few words, for help texts and the page's download link.
        media_type: the HTTP content type of its bytes.
        extension: the file extension it is saved under (with the dot).
        writer: streams results to a text stream, one at a time.
        encode: the bytes of one file holding ``results``.
        per_result: a file format draws one result per file (``--map`` writes one file per photo).
        needs_imagery: a file format draws on the index's imagery (``--map-source``).
        field: where the service's JSON answer carries it (default: ``name``).
        to_json: its value in the JSON answer (default: the decoded JSON of a JSON file, else a data URL).
        metavar: the file argument's name in ``--help``.
        download: the suffix of the page's download name after the photo's stem (default: ``-NAME.EXT``).
        trace: a stream format writes the per-level trace when asked (``--trace``).
        help: what ``--NAME FILE`` does, for ``--help`` (default: "write" and the label).
    """

    name: str
    label: str
    media_type: str
    extension: str
    writer: type[ResultWriter] | None = None
    encode: Callable[[Sequence[SearchResult], FileInputs], Encoded] | None = None
    per_result: bool = False
    needs_imagery: bool = False
    field: str = ""
    to_json: Callable[[SearchResult, FileInputs], Any] | None = None
    metavar: str = "FILE"
    download: str = ""
    trace: bool = False
    help: str = ""

    def __post_init__(self) -> None:
        if (self.writer is None) == (self.encode is None):
            raise ConfigError(f"output format {self.name!r}: give exactly one of writer (a stream) and encode (a file)")
        if not re.fullmatch(r"[a-z][a-z0-9_]*", self.name):
            raise ConfigError(f"output format name {self.name!r}: use lower-case letters, digits and '_'")

    @property
    def streams(self) -> bool:
        """Whether it writes one result at a time to a text stream (else it writes a whole file)."""
        return self.writer is not None

    @property
    def answer_field(self) -> str:
        return self.field or self.name

    def json_value(self, result: SearchResult, inputs: FileInputs) -> Any:
        """The value the service's JSON answer carries for one result."""
        if self.to_json is not None:
            return self.to_json(result, inputs)
        assert self.encode is not None
        data = self.encode([result], inputs).data
        if self.media_type.endswith("json"):
            return json.loads(data)
        return f"data:{self.media_type};base64," + base64.b64encode(data).decode("ascii")

    def describe(self) -> dict[str, Any]:
        """What ``GET /formats`` says of it."""
        return {"name": self.name, "label": self.label, "media_type": self.media_type, "extension": self.extension,
                "streams": self.streams, "per_result": self.per_result,
                "field": None if self.streams else self.answer_field,
                "download": self.download or f"-{self.name}{self.extension}"}


def one_line(text: str) -> str:
    """``text`` with control characters (a newline in a file name) escaped, so each record stays one line."""
    return _CONTROL.sub(lambda m: repr(m.group())[1:-1], text)


_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def clip(text: str, width: int) -> str:
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
