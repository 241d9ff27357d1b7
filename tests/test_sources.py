"""Tests for geoindex.sources: URL templates and providers, HTTP retry rules, MBTiles, open_source."""

from __future__ import annotations

import email.utils
import io
import sqlite3
import threading
import time
from pathlib import Path

import mercantile
import numpy as np
import pytest
import requests
from PIL import Image

from geoindex.errors import ConfigError, SourceNotReopenableError, TileNotFoundError, TileSourceError
from geoindex.sources import (
    SCHEMES,
    USER_AGENT,
    DirectorySource,
    HttpSource,
    MBTilesSource,
    MemorySource,
    RasterSource,
    map_source,
    open_source,
    source_spec,
    write_mbtiles,
)

TILE = mercantile.Tile(3, 5, 4)


def encode_tile(tile: mercantile.Tile, fmt: str = "PNG") -> bytes:
    """A small image whose pixels depend on (z, x, y)."""
    ramp = np.arange(16, dtype=np.int64)[:, None] * 8
    arr = np.zeros((16, 16, 3), dtype=np.uint8)
    arr[..., 0] = (tile.z * 40 + ramp) % 256
    arr[..., 1] = (tile.x * 13) % 256
    arr[..., 2] = (tile.y * 29 + ramp.T) % 256
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt)
    return buf.getvalue()


def response(status: int = 200, body: bytes = b"", content_type: str | None = "image/png", **headers: str):
    resp = requests.Response()
    resp.status_code = status
    resp.reason = "test"
    resp._content = body
    if content_type is not None:
        resp.headers["Content-Type"] = content_type
    resp.headers.update({k.replace("_", "-"): v for k, v in headers.items()})
    return resp


class ScriptedSession:
    """Stands in for requests.Session: returns (or raises) the scripted items in order, the last forever."""

    def __init__(self, *script: requests.Response | Exception) -> None:
        self.script = list(script)
        self.urls: list[str] = []
        self.headers: dict[str, str] = {}
        self.lock = threading.Lock()

    def get(self, url: str, timeout: float) -> requests.Response:
        with self.lock:
            self.urls.append(url)
            item = self.script.pop(0) if len(self.script) > 1 else self.script[0]
        if isinstance(item, Exception):
            raise item
        return item

    def close(self) -> None:
        pass


def http_source(session: ScriptedSession, sleeps: list[float], **kwargs) -> HttpSource:
    kwargs.setdefault("max_retries", 3)
    return HttpSource(
        "http://tiles.test/{z}/{x}/{y}.png",
        session=session,
        sleep=sleeps.append,
        backoff=1.0,
        seed=0,
        **kwargs,
    )


GOOD = encode_tile(TILE)


# --- URL templates and providers ------------------------------------------------------------------


def test_template_fills_zxy_subdomains_and_quadkey():
    src = HttpSource("https://{s}.tiles.test/{z}/{x}/{y}.png?v={q}", subdomains=["a", "b", "c"])
    urls = {t: src.url(t) for t in mercantile.tiles(-10, -10, 10, 10, 3)}
    for t, url in urls.items():
        assert (
            url
            == f"https://{'abc'[(t.x + t.y) % 3]}.tiles.test/{t.z}/{t.x}/{t.y}.png?v={mercantile.quadkey(t)}"
        )
        assert src.url(t) == url  # deterministic per tile
    assert {u.split(".")[0] for u in urls.values()} == {"https://a", "https://b", "https://c"}


def test_quadkey_only_template():
    assert (
        HttpSource("https://t.test/{q}.jpeg").url(TILE) == f"https://t.test/{mercantile.quadkey(TILE)}.jpeg"
    )


@pytest.mark.parametrize(
    ("template", "kwargs", "match"),
    [
        ("https://t.test/tiles.png", {}, r"needs \{z\}, \{x\} and \{y\}"),
        ("https://t.test/{z}/{x}.png", {}, r"needs \{z\}"),
        ("https://{s}.t.test/{z}/{x}/{y}.png", {"subdomains": []}, "no subdomains"),
        ("https://t.test/{z}/{x}/{y}.png", {"max_rps": 0}, "--max-rps"),
        ("https://t.test/{z}/{x}/{y}.png", {"timeout": 0}, "--timeout"),
    ],
)
def test_bad_template_or_options_raise_config_error(template, kwargs, match):
    with pytest.raises(ConfigError, match=match):
        HttpSource(template, **kwargs)


def test_name_hides_api_keys_and_session_has_user_agent():
    session = ScriptedSession(response(body=GOOD))
    src = HttpSource("https://t.test/{z}/{x}/{y}.png?apikey=SECRET&style=sat", session=session)
    assert "SECRET" not in src.name and "style=sat" in src.name
    assert session.headers["User-Agent"] == USER_AGENT
    assert USER_AGENT.startswith("geoindex/") and "(+https://github.com/geoindex/geoindex)" in USER_AGENT


def test_provider_resolution_builds_urls_without_requests():
    src = HttpSource.from_provider("Esri.WorldImagery")
    assert src.name == "xyz:Esri.WorldImagery"
    assert src.url(mercantile.Tile(1, 2, 3)) == (
        "https://server.arcgisonline.com/ArcGIS/rest/services/World_Imagery/MapServer/tile/3/2/1"
    )
    assert HttpSource.from_provider("esri.worldimagery").template == src.template


def test_provider_with_subdomains_gets_them():
    src = HttpSource.from_provider("OpenTopoMap")
    assert "{s}" in src.template and "{s}" not in src.url(TILE)


def test_provider_needing_a_key_names_the_option():
    with pytest.raises(ConfigError, match=r"'apikey'.*xyz:Thunderforest\.OpenCycleMap\?apikey=YOUR_APIKEY"):
        HttpSource.from_provider("Thunderforest.OpenCycleMap")
    src = HttpSource.from_provider("Thunderforest.OpenCycleMap", provider_options={"apikey": "K123"})
    assert "apikey=K123" in src.url(TILE) and "K123" not in src.name


def test_unknown_provider():
    with pytest.raises(ConfigError, match="unknown xyzservices provider 'Nope.Nothing'"):
        HttpSource.from_provider("Nope.Nothing")


# --- retry rules ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "failure",
    [
        response(429, b"slow down", "text/plain"),
        response(500, b"oops", "text/plain"),
        response(502),
        response(503),
        response(504),
        requests.ConnectionError("connection reset by peer"),
        requests.ReadTimeout("read timed out"),
        requests.exceptions.ChunkedEncodingError("IncompleteRead"),
        response(200, GOOD[: len(GOOD) // 2]),  # truncated body
        response(200, b"<html><body>Service unavailable</body></html>", "text/html"),
        response(200, b'{"error": "quota"}', "application/json"),
        response(200, GOOD, "text/html; charset=utf-8"),  # wrong content type, even with image bytes
        response(200, b""),
    ],
    ids=lambda f: getattr(f, "status_code", None) or type(f).__name__,
)
def test_transient_failure_is_retried_after_backoff(failure):
    session, sleeps = ScriptedSession(failure, response(body=GOOD)), []
    assert http_source(session, sleeps).fetch_bytes(TILE) == GOOD
    assert len(session.urls) == 2 and session.urls[0] == "http://tiles.test/4/3/5.png"
    assert len(sleeps) == 1 and 0.5 <= sleeps[0] <= 1.0  # backoff=1.0 with "equal jitter"


@pytest.mark.parametrize("content_type", ["image/png", "application/octet-stream", None])
def test_image_bytes_accepted_with_image_or_generic_content_type(content_type):
    session, sleeps = ScriptedSession(response(body=GOOD, content_type=content_type)), []
    assert http_source(session, sleeps).fetch_bytes(TILE) == GOOD and not sleeps


def test_retry_after_seconds_and_http_date_are_honoured_and_capped():
    future = email.utils.formatdate(time.time() + 3600, usegmt=True)
    past = email.utils.formatdate(time.time() - 3600, usegmt=True)
    session = ScriptedSession(
        response(429, Retry_After="7"),
        response(503, Retry_After=future),
        response(429, Retry_After=past),
        response(429, Retry_After="soon"),  # unparsable: ordinary backoff
        response(body=GOOD),
    )
    sleeps: list[float] = []
    assert http_source(session, sleeps, max_retries=4, max_retry_after=30.0).fetch_bytes(TILE) == GOOD
    assert sleeps[:3] == [7.0, 30.0, 0.0]
    assert 4.0 <= sleeps[3] <= 8.0  # fourth retry: backoff 1.0 * 2**3, jittered


def test_backoff_grows_exponentially_then_gives_up_naming_url_and_option():
    session, sleeps = ScriptedSession(response(503)), []
    with pytest.raises(
        TileSourceError, match=r"http://tiles.test/4/3/5.png: gave up after 4 attempts.*--retries"
    ):
        http_source(session, sleeps, max_backoff=3.0).fetch_bytes(TILE)
    assert len(session.urls) == 4
    assert 0.5 <= sleeps[0] <= 1.0 and 1.0 <= sleeps[1] <= 2.0 and 1.5 <= sleeps[2] <= 3.0  # capped at 3


@pytest.mark.parametrize("status", [404, 204])
def test_missing_tile_is_not_retried(status):
    session, sleeps = ScriptedSession(response(status, b"", "text/plain")), []
    with pytest.raises(TileNotFoundError, match=f"HTTP {status}"):
        http_source(session, sleeps).fetch_bytes(TILE)
    assert len(session.urls) == 1 and not sleeps


def test_forbidden_is_not_retried_and_hints_at_the_key():
    session, sleeps = ScriptedSession(response(403, b"denied", "text/plain")), []
    with pytest.raises(TileSourceError, match=r"tiles.test/4/3/5.png: HTTP 403.*API key"):
        http_source(session, sleeps).fetch_bytes(TILE)
    assert len(session.urls) == 1


def test_get_returns_rgb_image():
    session = ScriptedSession(response(body=encode_tile(TILE, "JPEG"), content_type="image/jpeg"))
    img = http_source(session, []).get(TILE)
    assert img.mode == "RGB" and img.size == (16, 16)


def test_rate_limit_is_shared_across_threads():
    # A frozen clock: every request after the burst must wait one more 1/rate slot than the last.
    session, sleeps = ScriptedSession(response(body=GOOD)), []
    src = http_source(session, sleeps, max_rps=2.0, clock=lambda: 100.0)
    threads = [threading.Thread(target=lambda: [src.fetch_bytes(TILE) for _ in range(5)]) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(session.urls) == 20
    assert sorted(sleeps) == [k / 2.0 for k in range(1, 19)]  # burst of 2, then 0.5 s, 1.0 s, ...


# --- MBTiles --------------------------------------------------------------------------------------


def test_mbtiles_round_trip_flips_rows_to_tms(tmp_path):
    tiles = {t: encode_tile(t) for z in range(3) for t in mercantile.tiles(-180, -85, 180, 85, z)}
    path = write_mbtiles(tmp_path / "world.mbtiles", tiles, {"attribution": "test"})
    assert not list(tmp_path.glob("*.tmp"))
    with sqlite3.connect(path) as db:
        row = db.execute("SELECT tile_row FROM tiles WHERE zoom_level = 2 AND tile_column = 1").fetchall()
        data = db.execute(
            "SELECT tile_data FROM tiles WHERE zoom_level=2 AND tile_column=1 AND tile_row=3"
        ).fetchone()
    assert sorted(r[0] for r in row) == [0, 1, 2, 3]
    assert bytes(data[0]) == tiles[mercantile.Tile(1, 0, 2)]  # XYZ y=0 is TMS row 2**2 - 1 - 0
    with MBTilesSource(path) as src:
        assert src.metadata == {"name": "world", "format": "png", "attribution": "test"}
        for tile, data in tiles.items():
            assert src.fetch_bytes(tile) == data
            assert np.array_equal(np.asarray(src.get(tile)), np.asarray(Image.open(io.BytesIO(data))))
        with pytest.raises(TileNotFoundError, match="no tile"):
            src.get(mercantile.Tile(0, 0, 5))


def test_mbtiles_damaged_tile_and_bad_files(tmp_path):
    path = write_mbtiles(tmp_path / "bad.mbtiles", {TILE: b"not an image"}, {"format": "png"})
    with MBTilesSource(path) as src, pytest.raises(TileSourceError, match="archive is damaged"):
        src.get(TILE)
    with pytest.raises(ConfigError, match="does not exist"):
        MBTilesSource(tmp_path / "absent.mbtiles")
    (tmp_path / "text.mbtiles").write_text("hello")
    with pytest.raises(ConfigError, match="not an MBTiles file"):
        MBTilesSource(tmp_path / "text.mbtiles")


# --- open_source ----------------------------------------------------------------------------------


def test_open_source_dispatch(tmp_path):
    http = open_source("http://127.0.0.1:9/{z}/{x}/{y}.png", timeout=3.0, max_retries=1)
    assert isinstance(http, HttpSource) and http.timeout == 3.0 and http.max_retries == 1
    for spec in ("xyz:Esri.WorldImagery", "Esri.WorldImagery"):
        src = open_source(spec)
        assert isinstance(src, HttpSource) and src.name == "xyz:Esri.WorldImagery"
    keyed = open_source("xyz:Thunderforest.OpenCycleMap?apikey=K9")
    assert isinstance(keyed, HttpSource) and "apikey=K9" in keyed.url(TILE)

    mb = write_mbtiles(tmp_path / "t.mbtiles", {TILE: GOOD})
    assert isinstance(open_source(str(mb)), MBTilesSource)

    store = tmp_path / "store"
    (store / "4" / "3").mkdir(parents=True)
    (store / "4" / "3" / "5.png").write_bytes(GOOD)
    directory = open_source(str(store))
    assert isinstance(directory, DirectorySource) and directory.ext is None
    assert directory.get(TILE).size == (16, 16)

    raster = tmp_path / "world.png"
    Image.new("RGB", (64, 32), (0, 90, 200)).save(raster)
    assert isinstance(open_source(f"raster:{raster}"), RasterSource)


def test_open_source_bluemarble():
    src = open_source("bluemarble")
    assert isinstance(src, RasterSource) and src.get(mercantile.Tile(0, 0, 1)).size == (256, 256)


def test_open_source_errors(tmp_path):
    with pytest.raises(
        ConfigError, match=r"cannot use --source 'nonsense'.*URL template.*\.mbtiles.*bluemarble"
    ):
        open_source("nonsense")
    with pytest.raises(ConfigError, match="holds no"):
        open_source(str(tmp_path))
    with pytest.raises(ConfigError, match="apikey"):
        open_source("Thunderforest.OpenCycleMap")
    with pytest.raises(ConfigError, match="does not exist"):
        open_source(str(Path(tmp_path) / "missing.mbtiles"))


# --- specs: open_source(src.spec) reopens an equivalent source -----------------------------------


def _same_tiles(a, b, tiles) -> None:
    assert type(a) is type(b) and a.name == b.name and a.spec == b.spec
    for tile in tiles:
        assert np.array_equal(np.asarray(a.get(tile)), np.asarray(b.get(tile)))


def test_directory_and_mbtiles_specs_round_trip(tmp_path):
    store = tmp_path / "store"
    (store / "4" / "3").mkdir(parents=True)
    (store / "4" / "3" / "5.png").write_bytes(GOOD)
    for given in (str(store), f"dir:{store}"):
        src = open_source(given)
        assert src.spec == f"dir:{store}" == src.name
        _same_tiles(src, open_source(src.spec), [TILE])

    mb = write_mbtiles(tmp_path / "t.mbtiles", {TILE: GOOD})
    for given in (str(mb), f"mbtiles:{mb}"):
        src = open_source(given)
        assert isinstance(src, MBTilesSource) and src.spec == f"mbtiles:{mb}"
        again = open_source(src.spec)
        assert again.fetch_bytes(TILE) == src.fetch_bytes(TILE) == GOOD
        src.close()
        again.close()


def test_raster_specs_round_trip_with_bounds_and_tile_size(tmp_path):
    raster = tmp_path / "world.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 64, 3), dtype=np.uint8)).save(raster)
    tiles = [mercantile.Tile(0, 0, 1), mercantile.Tile(1, 0, 1)]
    plain = RasterSource(raster)
    assert plain.spec == f"raster:{raster}"
    _same_tiles(plain, open_source(plain.spec), tiles)
    framed = RasterSource(raster, bounds=(-10.0, 35.0, 35.5, 70.0), tile_size=16)
    again = open_source(framed.spec)
    assert again.bounds == framed.bounds and again.tile_size == 16
    _same_tiles(framed, again, [mercantile.Tile(16, 10, 5)])
    with pytest.raises(ConfigError, match="tile_size=N"):
        open_source(f"raster:{raster}?size=3")


def test_bluemarble_spec_round_trips():
    src = open_source("bluemarble")
    assert src.spec == "bluemarble" and RasterSource().spec == "bluemarble"
    _same_tiles(src, open_source(src.spec), [mercantile.Tile(1, 1, 2)])


def test_provider_and_template_specs_round_trip_without_requests():
    for given in ("xyz:Esri.WorldImagery", "Esri.WorldImagery", "esri.worldimagery"):
        src = open_source(given)
        assert src.spec == "xyz:Esri.WorldImagery"
        again = open_source(src.spec)
        assert again.name == src.name and again.url(TILE) == src.url(TILE)
    keyed = open_source("xyz:Thunderforest.OpenCycleMap?apikey=K9")
    assert keyed.spec == "xyz:Thunderforest.OpenCycleMap?apikey=K9" and "K9" not in keyed.name
    assert open_source(keyed.spec).url(TILE) == keyed.url(TILE)
    template = "https://{s}.tile.example.com/{z}/{x}/{y}.png?key=SECRET"
    src = open_source(template)
    assert src.spec == template and "SECRET" not in src.name
    assert open_source(src.spec).url(TILE) == src.url(TILE)


def test_memory_spec_is_refused_with_a_typed_error():
    src = MemorySource({}, name="rendered")
    assert src.spec == "memory:rendered" and source_spec(src) == "memory:rendered"
    with pytest.raises(SourceNotReopenableError, match="in-memory source cannot be opened"):
        open_source(src.spec)
    with pytest.raises(ConfigError, match="--map-source"):
        open_source(src.spec, option="--map-source")


def test_every_scheme_is_in_the_error_message_and_source_spec_of_a_double_is_none():
    with pytest.raises(ConfigError) as e:
        open_source("nonsense")
    for scheme in set(SCHEMES) - {"https", "memory"}:
        assert scheme in str(e.value)

    class Double:
        name = "double"

        def get(self, tile):
            raise TileNotFoundError(tile)

    assert source_spec(Double()) is None


def test_map_source_reopens_the_recorded_spec(tmp_path, caplog):
    store = tmp_path / "store"
    (store / "4" / "3").mkdir(parents=True)
    (store / "4" / "3" / "5.png").write_bytes(GOOD)
    src = map_source(f"dir:{store}", imagery_spec=f"dir:{store}")
    assert isinstance(src, DirectorySource) and src.root == store
    # an index built before the spec was recorded: its dir:/mbtiles: name is the spec
    assert isinstance(map_source(f"dir:{store}"), DirectorySource)
    raster = tmp_path / "world.png"
    Image.new("RGB", (64, 32), (0, 90, 200)).save(raster)
    assert map_source("raster:world.png", imagery_spec=f"raster:{raster}").path == raster
    # remote or in-memory imagery, and local imagery that is gone: the embedded Blue Marble
    for name, spec in (("xyz:Esri.WorldImagery", "xyz:Esri.WorldImagery"), ("rendered", "memory:rendered"),
                       ("raster:other.jpg", None), (f"dir:{tmp_path}/gone", f"dir:{tmp_path}/gone")):
        assert map_source(name, imagery_spec=spec).spec == "bluemarble"
    assert "cannot be used" in caplog.text


def _bilinear_reference(pixels: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """The direct formula on an HxWx3 array, as RasterSource sampled before its packed fast path."""
    height, width = pixels.shape[:2]
    r, c = np.clip(rows, 0, height - 1), np.clip(cols, 0, width - 1)
    r0, c0 = np.floor(r).astype(np.intp), np.floor(c).astype(np.intp)
    r1, c1 = np.minimum(r0 + 1, height - 1), np.minimum(c0 + 1, width - 1)
    fr, fc = (r - r0).astype(np.float32)[..., None], (c - c0).astype(np.float32)[..., None]
    top = pixels[r0, c0] + (pixels[r0, c1] - pixels[r0, c0].astype(np.float32)) * fc
    bottom = pixels[r1, c0] + (pixels[r1, c1] - pixels[r1, c0].astype(np.float32)) * fc
    return np.clip(top + (bottom - top) * fr + 0.5, 0, 255).astype(np.uint8)


def test_raster_sampling_equals_the_direct_formula(tmp_path):
    """Tiles and rotated views of a raster, sampled through packed pixels, are bit-identical to the
    plain bilinear formula, edges (clamped) included."""
    from geoindex.sources.raster import bilinear_points

    rng = np.random.default_rng(7)
    pixels = rng.integers(0, 256, (90, 180, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "world.png")
    source = RasterSource(tmp_path / "world.png")
    for rows, cols in [(rng.uniform(-3, 93, (64, 1)), rng.uniform(-3, 183, (1, 48))),
                       (rng.uniform(-3, 93, (40, 40)), rng.uniform(-3, 183, (40, 40)))]:
        np.testing.assert_array_equal(bilinear_points(source._words, source._shape, rows, cols),
                                      _bilinear_reference(pixels, rows, cols))
    tile = mercantile.Tile(1, 1, 2)
    t = (np.arange(256) + 0.5) / 256
    lat = np.degrees(np.arctan(np.sinh(np.pi * (1 - 2 * (tile.y + t) / 4))))
    lon = (tile.x + t) / 4 * 360 - 180
    rows, cols = source._pixel_of(lat[:, None], lon[None, :])
    np.testing.assert_array_equal(np.asarray(source.get(tile)), _bilinear_reference(pixels, rows, cols))


# --- tile folders: every extension the reader reads, in any case ------------------------------------


@pytest.mark.parametrize("name", ["5.jpg", "5.jpeg", "5.JPG", "5.JPEG", "5.png", "5.PNG", "5.webp", "5.WebP"])
def test_tile_folder_of_any_readable_extension_opens_and_reads(tmp_path, name):
    fmt = {"jpg": "JPEG", "jpeg": "JPEG", "png": "PNG", "webp": "WEBP"}[name.split(".")[1].lower()]
    (tmp_path / "4" / "3").mkdir(parents=True)
    (tmp_path / "4" / "3" / name).write_bytes(encode_tile(TILE, fmt))
    src = open_source(str(tmp_path))
    assert isinstance(src, DirectorySource)
    assert src.get(TILE).size == (16, 16)
    from geoindex.sources import stored_tile_path

    assert stored_tile_path(tmp_path, TILE) == tmp_path / "4" / "3" / name


def test_tile_folder_of_unreadable_files_names_what_it_reads(tmp_path):
    (tmp_path / "4" / "3").mkdir(parents=True)
    (tmp_path / "4" / "3" / "5.txt").write_text("not a tile")
    with pytest.raises(ConfigError, match=r"holds no .*jpg.*--source"):
        open_source(str(tmp_path))


def test_real_landsat_jpg_folder_opens(shared_data):
    src = open_source(str(shared_data / "landsat-sf"))
    tile = next(mercantile.Tile(int(p.parent.name), int(p.stem), 12)
                for p in sorted((shared_data / "landsat-sf" / "12").glob("*/*.jpg")))
    assert src.get(tile).size == (256, 256)


def _dns_failure() -> requests.ConnectionError:
    """What requests raises when the host name does not resolve (urllib3 2.x wraps the socket.gaierror)."""
    import socket

    import urllib3.exceptions

    gai = socket.gaierror(-2, "Name or service not known")
    try:
        try:
            raise gai
        except socket.gaierror as e:
            raise urllib3.exceptions.NameResolutionError("tiles.test", None, e) from e  # type: ignore[arg-type]
    except urllib3.exceptions.NameResolutionError as e:
        return requests.ConnectionError(urllib3.exceptions.MaxRetryError(None, "/4/3/5.png", reason=e))  # type: ignore[arg-type]


def test_a_host_that_does_not_resolve_is_named_not_blamed_on_retries_or_rate():
    session, sleeps = ScriptedSession(_dns_failure()), []
    with pytest.raises(TileSourceError, match=r"cannot resolve the host name 'tiles.test'") as info:
        http_source(session, sleeps, max_retries=5).fetch_bytes(TILE)
    assert "--retries" not in str(info.value) and "--max-rps" not in str(info.value)
    assert "online" in str(info.value) and len(session.urls) == 2  # one retry for a resolver's hiccup, no more


def test_one_dns_hiccup_is_retried():
    session, sleeps = ScriptedSession(_dns_failure(), response(body=GOOD)), []
    assert http_source(session, sleeps).fetch_bytes(TILE) == GOOD and len(session.urls) == 2


def test_every_source_module_declares_its_kind_and_the_scheme_table_is_built_from_them():
    """Adding a kind of source is one module: ``open_source`` finds its ``KIND`` without any other edit."""
    import pkgutil

    import geoindex.sources as sources

    modules = {m.name for m in pkgutil.iter_modules(sources.__path__)} - {"base", "fetch"}
    assert len(sources.KINDS) == len(modules) >= 5
    declared = [scheme for kind in sources.KINDS for scheme in kind.schemes]
    assert sorted(declared) == sorted(sources.SCHEMES) and len(declared) == len(set(declared))
    for kind in sources.KINDS:
        assert kind.forms or kind.schemes.keys() == {"memory"}
        for form in kind.forms.split("'"):
            if form.endswith(":PATH"):
                assert form.partition(":")[0] in kind.schemes, form  # the message names schemes the kind opens


def test_a_spec_without_a_scheme_is_guessed_mbtiles_then_folder_then_provider(tmp_path, monkeypatch):
    """The order does not depend on module names: a folder named like an archive is still an archive path."""
    import geoindex.sources as sources
    from geoindex.sources import DirectorySource, HttpSource, open_source

    assert [k.guess_rank for k in sorted(sources.KINDS, key=lambda k: k.guess_rank) if k.guess][:3] == [10, 20, 30]
    archive_dir = tmp_path / "tiles.mbtiles"
    archive_dir.mkdir()
    with pytest.raises(ConfigError):  # an .mbtiles spec is opened as an archive, never as a folder
        open_source(str(archive_dir))
    folder = tmp_path / "Esri.WorldImagery"  # a folder named like a provider is the folder
    (folder / "0" / "0").mkdir(parents=True)
    Image.new("RGB", (8, 8), (10, 20, 30)).save(folder / "0" / "0" / "0.png")
    assert isinstance(open_source(str(folder)), DirectorySource)
    monkeypatch.chdir(tmp_path / "..")
    assert isinstance(open_source("Esri.WorldImagery"), HttpSource)  # no such path here: the provider
