"""The output-format registry: every format is one registered object that the command line, the service
(``POST /locate/{format}``, ``include_<name>``, ``GET /formats``) and the page pick up by name; a format
registered here, in the test, is offered by all of them without touching another module."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Sequence
from pathlib import Path
from typing import TextIO

import mercantile
import pytest
from PIL import Image

from geoindex.errors import ConfigError
from geoindex.interfaces.cli import main
from geoindex.interfaces.outputs import (
    REGISTRY,
    Encoded,
    FileInputs,
    OutputFormat,
    ResultWriter,
    file_formats,
    get_format,
    register,
    stream_formats,
)
from geoindex.retrieval.results import Candidate, SearchResult
from tests.conftest import render_tile


class _Lines(ResultWriter):
    """One ``image<TAB>rank<TAB>z/x/y`` line per candidate; ``image<TAB>!<TAB>reason`` per failure."""

    def __init__(self, out: TextIO, *, top_n: int, trace: bool) -> None:
        super().__init__(out, top_n=top_n, trace=trace)

    def row(self, result: SearchResult, rank: int, c: Candidate, area_p: float, exif: dict[str, float] | None) -> None:
        self.out.write(f"{result.image}\t{rank}\t{c.tile.z}/{c.tile.x}/{c.tile.y}\n")

    def failure(self, image: str, reason: str) -> None:
        self.out.write(f"{image}\t!\t{reason}\n")


def _tiles_file(results: Sequence[SearchResult], inputs: FileInputs) -> Encoded:
    lines = [f"{r.tile.z}/{r.tile.x}/{r.tile.y}" for r in results]
    return Encoded(("\n".join(lines) + "\n").encode(), f"{len(lines)} tiles")


LINES = OutputFormat("lines", "tab-separated lines", "text/tab-separated-values", ".tsv", writer=_Lines)
TILES = OutputFormat("best_tiles", "the best tile of each photo", "text/plain", ".txt", encode=_tiles_file)


@pytest.fixture()
def extra_formats(monkeypatch):
    """Two formats registered for one test: a stream (``lines``) and a file (``best_tiles``)."""
    monkeypatch.setitem(REGISTRY, LINES.name, LINES)
    monkeypatch.setitem(REGISTRY, TILES.name, TILES)
    return LINES, TILES


def _png(tile: mercantile.Tile) -> bytes:
    buf = io.BytesIO()
    render_tile(tile, size=64).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture()
def photos(tmp_path) -> Path:
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "a.png").write_bytes(_png(mercantile.Tile(5, 2, 3)))
    (folder / "b.png").write_bytes(_png(mercantile.Tile(1, 6, 3)))
    return folder


# -- the registry ------------------------------------------------------------------------------


def test_shipped_formats_are_registered_streams_first_then_files():
    assert [f.name for f in stream_formats()] == ["table", "json", "csv"]
    assert [f.name for f in file_formats()] == ["geojson", "map"]
    drawn = get_format("map")
    assert drawn.per_result and drawn.needs_imagery and drawn.media_type == "image/png"
    assert get_format("geojson").answer_field == "geojson" and get_format("map").answer_field == "map_png"


def test_a_format_is_a_stream_or_a_file_and_names_are_unique():
    with pytest.raises(ConfigError, match="exactly one of writer"):
        OutputFormat("both", "x", "text/plain", ".txt", writer=_Lines, encode=_tiles_file)
    with pytest.raises(ConfigError, match="exactly one of writer"):
        OutputFormat("neither", "x", "text/plain", ".txt")
    with pytest.raises(ConfigError, match="lower-case"):
        OutputFormat("Bad Name", "x", "text/plain", ".txt", writer=_Lines)
    with pytest.raises(ConfigError, match="registered already"):
        register(OutputFormat("csv", "another csv", "text/csv", ".csv", writer=_Lines))
    with pytest.raises(ConfigError, match=r"unknown output format 'nope'; choose one of \['table'"):
        get_format("nope")


# -- a new format reaches the command line ------------------------------------------------------


def test_a_registered_stream_format_is_a_locate_format(capsys, extra_formats, small_index, photos):
    code = main(["locate", str(photos / "a.png"), str(photos / "missing.png"), "--index", str(small_index),
                 "-k", "4", "--top-n", "2", "--format", "lines", "--device", "cpu", "-q"])
    out, err = capsys.readouterr()
    assert code == 1, err
    rows = [line.split("\t") for line in out.splitlines()]
    assert [r[1] for r in rows if r[0].endswith("a.png")] == ["1", "2"]
    assert [r[1] for r in rows if r[0].endswith("missing.png")] == ["!"]


def test_a_registered_file_format_is_a_locate_option(capsys, extra_formats, small_index, photos, tmp_path):
    out_file = tmp_path / "best.txt"
    code = main(["locate", str(photos), "--index", str(small_index), "-k", "4", "--format", "json",
                 "--best-tiles", str(out_file), "--device", "cpu", "-q"])
    out, err = capsys.readouterr()
    assert code == 0, err
    answers = json.loads(out)
    assert out_file.read_text().split() == ["/".join(map(str, a["tile"])) for a in answers]
    assert f"wrote {out_file} (2 tiles)" in err


def test_a_file_format_path_is_checked_before_the_search(capsys, extra_formats, small_index, photos, tmp_path):
    code = main(["locate", str(photos / "a.png"), "--index", str(small_index), "--best-tiles", str(tmp_path),
                 "--device", "cpu", "-q"])
    assert code == 2 and f"--best-tiles {tmp_path}: is a directory; give a file name, e.g. --best-tiles " \
                          f"{tmp_path / 'out.txt'}" in capsys.readouterr().err


# -- a new format reaches the service -----------------------------------------------------------


def _client(index, **kw):
    pytest.importorskip("httpx")
    pytest.importorskip("multipart")
    from fastapi.testclient import TestClient

    from geoindex.interfaces.service import create_app

    return TestClient(create_app(index, default_k=4, device="cpu", **kw))


def test_the_service_lists_every_registered_format(extra_formats, small_index):
    listed = {f["name"]: f for f in _client(small_index).get("/formats").json()}
    assert list(listed) == list(REGISTRY)
    assert listed["lines"]["streams"] and listed["lines"]["field"] is None
    assert listed["best_tiles"] == {"name": "best_tiles", "label": "the best tile of each photo",
                                    "media_type": "text/plain", "extension": ".txt", "streams": False,
                                    "per_result": False, "field": "best_tiles", "download": "-best_tiles.txt"}
    assert listed["map"]["field"] == "map_png" and listed["map"]["download"] == "-map.png"


def test_the_service_answers_in_a_registered_stream_format(extra_formats, small_index):
    client = _client(small_index)
    r = client.post("/locate/lines", data={"top_n": "3"},
                    files=[("image", ("a.png", _png(mercantile.Tile(5, 2, 3)))), ("image", ("bad.png", b"no"))])
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/tab-separated-values")
    rows = [line.split("\t") for line in r.text.splitlines()]
    assert [row[1] for row in rows] == ["1", "2", "3", "!"] and "not an image" in rows[3][2]
    one_bad = client.post("/locate/lines", files={"image": ("bad.png", b"no")})
    assert one_bad.status_code == 400 and "not an image" in one_bad.json()["detail"]


def test_a_registered_file_format_is_an_include_field_and_a_route(extra_formats, small_index):
    client = _client(small_index)
    spec = client.get("/openapi.json").json()
    form = spec["components"]["schemas"]["Body_locate_locate_post"]["properties"]
    assert {"include_best_tiles", "include_geojson", "include_map"} <= set(form)
    d = client.post("/locate", files={"image": ("a.png", _png(mercantile.Tile(5, 2, 3)))},
                    data={"include_best_tiles": "true"}).json()
    assert d["best_tiles"] == "data:text/plain;base64," + _b64("/".join(map(str, d["tile"])) + "\n")
    assert "best_tiles_ms" in d["timings"] and "map_png" not in d and "geojson" not in d
    r = client.post("/locate/best_tiles", files={"image": ("a.png", _png(mercantile.Tile(5, 2, 3)))})
    assert r.status_code == 200 and r.text == "/".join(map(str, d["tile"])) + "\n"


def _b64(text: str) -> str:
    import base64

    return base64.b64encode(text.encode()).decode()


# -- the shipped formats through POST /locate/{format} ------------------------------------------


def test_locate_as_csv_geojson_and_map(small_index):
    from geoindex.sources import MemorySource

    client = _client(small_index, map_source=MemorySource(render_tile))
    files = [("image", ("a.png", _png(mercantile.Tile(5, 2, 3)))), ("image", ("b.png", _png(mercantile.Tile(1, 6, 3))))]
    rows = list(csv.DictReader(io.StringIO(client.post("/locate/csv", files=files, data={"top_n": "2"}).text)))
    assert [(r["image"], r["rank"]) for r in rows] == [("a.png", "1"), ("a.png", "2"), ("b.png", "1"), ("b.png", "2")]
    fc = client.post("/locate/geojson", files=files).json()
    assert fc["type"] == "FeatureCollection"
    assert {f["properties"]["image"] for f in fc["features"] if f["properties"]["kind"] == "prediction"} == {"a.png",
                                                                                                              "b.png"}
    assert client.post("/locate/map", files=files).status_code == 422  # one picture per photo
    r = client.post("/locate/map", files=files[:1])
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    with Image.open(io.BytesIO(r.content)) as img:
        assert img.format == "PNG" and img.width > 100
    missing = client.post("/locate/nope", files=files[:1])
    assert missing.status_code == 404 and "GET /formats" in missing.json()["detail"]
