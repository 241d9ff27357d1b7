"""Tests for fetch_to_directory and pipelines.fetch_tiles against a loopback tile server.

The server renders a distinct image per tile and can be told to misbehave per tile: throttling,
server errors, resets, stalls, truncated bodies, error pages and missing tiles.
"""

from __future__ import annotations

import email.utils
import io
import json
import socket
import struct
import threading
import time
from collections import Counter
from collections.abc import Iterator
from functools import cache
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import mercantile
import numpy as np
import pytest
from PIL import Image

from geoindex.errors import ConfigError
from geoindex.sources import DirectorySource, HttpSource, MemorySource, fetch_to_directory, open_source
from pipelines import fetch_tiles


@cache
def tile_bytes(tile: mercantile.Tile, fmt: str) -> bytes:
    ramp = np.arange(32, dtype=np.int64)[:, None] * 4
    arr = np.zeros((32, 32, 3), dtype=np.uint8)
    arr[..., 0] = (tile.z * 50 + ramp) % 256
    arr[..., 1] = (tile.x * 17 + ramp.T) % 256
    arr[..., 2] = (tile.y * 31) % 256
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt.upper())
    return buf.getvalue()


class TileServer:
    """A threaded tile server on 127.0.0.1 with scripted faults per tile.

    ``faults[tile]`` is a list of faults served one per request, then the tile; ``sticky[tile]``
    is served on every request.
    """

    def __init__(self, fmt: str = "png") -> None:
        self.fmt = fmt
        self.faults: dict[mercantile.Tile, list[str]] = {}
        self.sticky: dict[mercantile.Tile, str] = {}
        self.hits: Counter[mercantile.Tile] = Counter()
        self.release = threading.Event()  # ends stalls at shutdown
        self._lock = threading.Lock()
        self.httpd = _QuietServer(("127.0.0.1", 0), _Handler)
        self.httpd.tiles = self
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/{{z}}/{{x}}/{{y}}.{self.fmt}"

    def take_fault(self, tile: mercantile.Tile) -> str | None:
        with self._lock:
            self.hits[tile] += 1
            if tile in self.sticky:
                return self.sticky[tile]
            queue = self.faults.get(tile)
            return queue.pop(0) if queue else None


class _QuietServer(ThreadingHTTPServer):
    daemon_threads = True
    tiles: TileServer

    def handle_error(self, request, client_address) -> None:  # clients that time out break pipes
        pass


class _Handler(BaseHTTPRequestHandler):
    server: _QuietServer

    def log_message(self, format, *args) -> None:
        pass

    def _send(
        self, status: int, body: bytes, content_type: str, headers: dict[str, str] | None = None
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        srv = self.server.tiles
        z, x, name = self.path.strip("/").split("/")
        tile = mercantile.Tile(int(x), int(name.split(".")[0]), int(z))
        fault = srv.take_fault(tile)
        body = tile_bytes(tile, srv.fmt)
        ctype = f"image/{srv.fmt}"
        if fault is None:
            self._send(200, body, ctype)
        elif fault == "404":
            self._send(404, b"no such tile", "text/plain")
        elif fault == "429":
            self._send(429, b"slow down", "text/plain")
        elif fault == "429-seconds":
            self._send(429, b"slow down", "text/plain", {"Retry-After": "7"})
        elif fault == "503-date":
            self._send(
                503, b"later", "text/plain", {"Retry-After": email.utils.formatdate(time.time() + 3600)}
            )
        elif fault.isdigit():
            self._send(int(fault), b"server error", "text/plain")
        elif fault == "reset":  # RST without any response
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.close_connection = True
        elif fault == "stall":
            srv.release.wait(3.0)
            self._send(200, body, ctype)
        elif fault == "truncated":  # promises the whole body, sends half, hangs up
            self.send_response(200)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body[: len(body) // 2])
            self.close_connection = True
        elif fault == "short":  # a consistent response whose image is cut off
            self._send(200, body[: len(body) // 2], ctype)
        elif fault == "html":
            self._send(200, b"<html><body>Rate limit exceeded</body></html>", "text/html; charset=utf-8")
        elif fault == "json":
            self._send(200, b'{"error": "quota exceeded"}', "application/json")
        else:
            raise AssertionError(f"unknown fault {fault}")


@pytest.fixture
def tile_server() -> Iterator[TileServer]:
    server = TileServer()
    server.thread.start()
    yield server
    server.release.set()
    server.httpd.shutdown()
    server.httpd.server_close()


def world(zoom: int) -> list[mercantile.Tile]:
    return list(mercantile.tiles(-180, -85, 180, 85, zoom))


def stored_files(root: Path) -> dict[mercantile.Tile, Path]:
    out = {}
    for path in root.glob("*/*/*.*"):
        out[mercantile.Tile(int(path.parent.name), int(path.stem), int(path.parent.parent.name))] = path
    return out


def test_fetch_survives_every_fault_and_resumes_without_requests(tile_server, tmp_path):
    tiles = world(2) + world(3)
    faulty = {
        "429": ["429", "429"],
        "429-seconds": ["429-seconds"],
        "503-date": ["503-date"],
        "burst": ["500", "503", "502", "504"],
        "reset": ["reset"],
        "stall": ["stall"],
        "truncated": ["truncated"],
        "short": ["short"],
        "html": ["html"],
        "json": ["json"],
    }
    for tile, script in zip(tiles[3::5], faulty.values(), strict=False):
        tile_server.faults[tile] = list(script)
    burst_tile = tiles[3::5][3]
    missing = {tiles[1], tiles[-1]}
    for tile in missing:
        tile_server.sticky[tile] = "404"

    sleeps: list[float] = []
    source = HttpSource(
        tile_server.url, timeout=0.5, max_retries=5, backoff=0.01, max_retry_after=30.0, sleep=sleeps.append
    )
    summary = fetch_to_directory(source, tmp_path, tiles, total=len(tiles), workers=8)

    assert (summary.total, summary.fetched, summary.skipped, summary.missing, summary.failed) == (
        80,
        78,
        0,
        2,
        0,
    )
    assert summary.ok and not summary.failures
    assert 7.0 in sleeps and 30.0 in sleeps  # Retry-After in seconds, and an HTTP date an hour away (capped)
    stored = stored_files(tmp_path)
    assert set(stored) == set(tiles) - missing
    reader = DirectorySource(tmp_path, ext="png")
    for tile, path in stored.items():
        assert path.read_bytes() == tile_bytes(tile, "png")
        assert np.array_equal(
            np.asarray(reader.get(tile)), np.asarray(Image.open(io.BytesIO(tile_bytes(tile, "png"))))
        )
    assert not list(tmp_path.rglob("*.tmp"))
    assert json.loads((tmp_path / "missing.json").read_text())["tiles"] == sorted(
        [t.z, t.x, t.y] for t in missing
    )
    for tile, script in zip(tiles[3::5], faulty.values(), strict=False):
        assert tile_server.hits[tile] == len(script) + 1, script  # each fault cost exactly one retry
    assert tile_server.hits[burst_tile] == 5
    assert all(tile_server.hits[t] == 1 for t in missing)
    assert all(tile_server.hits[t] == 1 for t in set(tiles) - set(tile_server.faults) - missing)

    hits = Counter(tile_server.hits)
    again = fetch_to_directory(source, tmp_path, tiles, workers=8)
    assert (again.fetched, again.skipped, again.missing, again.failed) == (0, 78, 2, 0)
    assert tile_server.hits == hits  # nothing requested: stored tiles validated locally, 404s remembered

    retried = fetch_to_directory(source, tmp_path, tiles, workers=8, retry_missing=True)
    assert (retried.fetched, retried.missing) == (0, 2)
    assert tile_server.hits - hits == Counter({t: 1 for t in missing})

    damaged = tiles[10]
    stored[damaged].write_bytes(b"\x89PNG garbage")
    hits = Counter(tile_server.hits)
    repaired = fetch_to_directory(source, tmp_path, tiles, workers=8)
    assert (repaired.fetched, repaired.skipped, repaired.missing) == (1, 77, 2)
    assert tile_server.hits - hits == Counter({damaged: 1})
    assert stored[damaged].read_bytes() == tile_bytes(damaged, "png")


def test_pipeline_exit_status_and_rerun(tile_server, tmp_path, capsys):
    bad = mercantile.Tile(1, 1, 1)
    tile_server.sticky[bad] = "503"
    argv = ["--source", tile_server.url, "--out", str(tmp_path), "--zoom", "0", "1"]
    argv += ["--retries", "1", "--timeout", "2", "--max-rps", "0", "--workers", "2", "--quiet"]
    assert fetch_tiles.main(argv) == 1
    out = capsys.readouterr().out
    assert "5 tiles: 4 fetched, 0 already stored, 0 missing, 1 failed" in out and "rerun" in out
    assert tile_server.hits[bad] == 2
    assert set(stored_files(tmp_path)) == {*world(0), *world(1)} - {bad}

    del tile_server.sticky[bad]
    assert fetch_tiles.main(argv) == 0
    assert "5 tiles: 1 fetched, 4 already stored, 0 missing, 0 failed" in capsys.readouterr().out
    assert tile_server.hits[bad] == 3 and sum(tile_server.hits.values()) == 7


def test_bbox_and_jpeg_tiles(tmp_path):
    server = TileServer(fmt="jpeg")
    server.thread.start()
    try:
        cfg = fetch_tiles.parse_args(
            [
                "--source",
                server.url,
                "--out",
                str(tmp_path),
                "--zoom",
                "3",
                "--bbox",
                "170",
                "-10",
                "-170",
                "10",
            ]
        )
        summary = fetch_tiles.run(cfg)
    finally:
        server.httpd.shutdown()
        server.httpd.server_close()
    expected = set(mercantile.tiles(170, -10, -170, 10, 3))
    assert summary.fetched == len(expected) == 4
    assert {p.suffix for p in tmp_path.rglob("*.*")} == {".jpeg"}
    source = open_source(str(tmp_path))
    assert isinstance(source, DirectorySource) and source.ext is None
    for tile in expected:
        assert source.get(tile).size == (32, 32)


def test_rendered_source_is_stored_as_png_and_absence_recorded(tmp_path):
    images = {t: Image.open(io.BytesIO(tile_bytes(t, "png"))).convert("RGB") for t in world(1)[:3]}
    summary = fetch_to_directory(MemorySource(images), tmp_path, world(1), workers=2)
    assert (summary.fetched, summary.missing) == (3, 1)
    reader = DirectorySource(tmp_path, ext="png")
    for tile, img in images.items():
        assert np.array_equal(np.asarray(reader.get(tile)), np.asarray(img))
    assert json.loads((tmp_path / "missing.json").read_text())["tiles"] == [[1, *world(1)[3][:2]]]


def test_config_errors(tmp_path, capsys):
    with pytest.raises(SystemExit):
        fetch_tiles.parse_args(
            [
                "--source",
                "bluemarble",
                "--out",
                "o",
                "--zoom",
                "1",
                "--bbox",
                "0",
                "0",
                "1",
                "1",
                "--geojson",
                "a.json",
            ]
        )
    with pytest.raises(ConfigError, match="--zoom"):
        fetch_tiles.Config(source="bluemarble", out=tmp_path, zooms=(31,))
    assert fetch_tiles.main(["--source", "nonsense", "--out", str(tmp_path), "--zoom", "1", "--quiet"]) == 2
    assert "cannot use --source 'nonsense'" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="--workers"):
        fetch_to_directory(MemorySource({}), tmp_path, [], workers=0)


def test_http_spec_round_trips_against_a_loopback_server(tile_server):
    source = open_source(tile_server.url, timeout=2.0, max_retries=0)
    assert source.spec == tile_server.url
    again = open_source(source.spec)
    assert isinstance(again, HttpSource) and again.name == source.name
    for tile in world(1):
        assert again.fetch_bytes(tile) == source.fetch_bytes(tile)


def test_summary_of_a_slow_fetch_does_not_say_zero_tiles_per_second():
    from geoindex.sources import FetchSummary

    assert "(0.033 tiles/s)" in FetchSummary(1, 0, 0, 0, 1, seconds=30.0).line()
    assert "(25.0 tiles/s)" in FetchSummary(50, 50, 0, 0, 0, seconds=2.0).line()
