"""The HTTP service, exercised through a real uvicorn server on 127.0.0.1 (a free port, stopped after the tests)."""

from __future__ import annotations

import io
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import mercantile
import pytest

httpx = pytest.importorskip("httpx")
uvicorn = pytest.importorskip("uvicorn")
pytest.importorskip("fastapi")
pytest.importorskip("multipart")

from PIL import ExifTags, Image  # noqa: E402
from PIL.TiffImagePlugin import IFDRational as R  # noqa: E402

from geoindex.errors import ConfigError  # noqa: E402
from geoindex.geometry.coverage import Coverage  # noqa: E402
from geoindex.interfaces.service import create_app  # noqa: E402
from tests.conftest import render_tile, serving  # noqa: E402

T = mercantile.Tile
LIMIT = 200_000  # bytes: small, so that the 413 tests send little
TIMEOUT = 30.0


@pytest.fixture(scope="module")
def server(small_index) -> Iterator[str]:
    app = create_app(small_index, max_upload_bytes=LIMIT, default_k=8, device="cpu")
    with serving(app) as url:
        yield url


def _png(tile: mercantile.Tile) -> bytes:
    buf = io.BytesIO()
    render_tile(tile, size=64).save(buf, "PNG")
    return buf.getvalue()


def _locate(base: str, data: bytes, name: str = "photo.png", **form: object) -> httpx.Response:
    return httpx.post(f"{base}/locate", files={"image": (name, data, "application/octet-stream")},
                      data={k: str(v) for k, v in form.items()}, timeout=TIMEOUT)


def test_health(server):
    r = httpx.get(f"{server}/health", timeout=TIMEOUT)
    assert r.status_code == 200
    body = r.json()
    assert body["status"] == "ok" and body["encoder"] == "tiny" and body["device"] == "cpu"
    assert body["levels"] == [{"zoom": 1, "tiles": 4}, {"zoom": 2, "tiles": 16}, {"zoom": 3, "tiles": 64}]
    assert body["max_upload_bytes"] == LIMIT and body["default_k"] == 8


def test_openapi_and_docs(server):
    spec = httpx.get(f"{server}/openapi.json", timeout=TIMEOUT).json()
    assert {"/locate", "/health"} <= set(spec["paths"])
    assert "post" in spec["paths"]["/locate"]
    docs = httpx.get(f"{server}/docs", timeout=TIMEOUT)
    assert docs.status_code == 200 and "swagger" in docs.text.lower()


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_api_docs_load_their_scripts_from_this_server(server, page):
    """Swagger UI and ReDoc work offline: every script and style they name is served here, none by a CDN."""
    import re

    r = httpx.get(f"{server}{page}", timeout=TIMEOUT)
    html = r.text
    if page == "/redoc":  # ReDoc would show a logo from its CDN: the page may show no image from elsewhere
        assert r.headers["content-security-policy"] == "img-src 'self' data:"
    else:  # Swagger UI without the validator badge, an image from validator.swagger.io
        assert '"validatorUrl": null' in html
    assets = re.findall(r"""(?:src|href)=["']([^"']+\.(?:js|css))["']""", html)
    assert assets, f"{page} names no script or style"
    for url in assets:
        assert url.startswith("/"), f"{page} loads {url} from another host"
        r = httpx.get(f"{server}{url}", timeout=TIMEOUT)
        assert r.status_code == 200 and len(r.content) > 10_000, url


def test_vendored_map_library_is_served(server):
    js = httpx.get(f"{server}/vendor/leaflet/leaflet.js", timeout=TIMEOUT)
    assert js.status_code == 200 and "javascript" in js.headers["content-type"] and "Leaflet" in js.text[:200]
    css = httpx.get(f"{server}/vendor/leaflet/leaflet.css", timeout=TIMEOUT)
    assert css.status_code == 200 and ".leaflet-container" in css.text
    assert httpx.get(f"{server}/vendor/leaflet/images/layers.png", timeout=TIMEOUT).status_code == 200


def test_vendored_map_library_matches_its_recorded_sums():
    """The committed Leaflet files are the ones `make vendor` fetched (their sha256 sums are recorded beside them)."""
    import hashlib
    from pathlib import Path

    import geoindex

    root = Path(geoindex.__file__).parent / "static" / "vendor" / "leaflet"
    lines = (root / "SHA256SUMS").read_text().splitlines()
    assert {"leaflet.js", "leaflet.css", "LICENSE", "images/layers.png"} <= {line.split()[1] for line in lines}
    for line in lines:
        digest, name = line.split()
        assert hashlib.sha256((root / name).read_bytes()).hexdigest() == digest, f"{root / name} differs; make vendor"
    assert (root / "VERSION").read_text().startswith("leaflet 1.9.4")


@pytest.fixture(scope="module")
def basemap_server(tmp_path_factory, small_index, rendered_source) -> Iterator[str]:
    """The small index with its coverage cut to the tiles around (0 N, 0 E), drawing from the rendered tiles."""
    import dataclasses
    import shutil

    from geoindex.storage.manifest import Manifest

    path = tmp_path_factory.mktemp("basemap") / "index"
    shutil.copytree(small_index, path)
    manifest = Manifest.load(path)
    dataclasses.replace(manifest, coverage={"bboxes": [[1.0, 1.0, 10.0, 10.0]], "polygons": []}).save(path)
    with serving(create_app(path, default_k=4, device="cpu", map_source=rendered_source)) as url:
        yield url


def _blocks(img: Image.Image) -> list[tuple[int, ...]]:
    """The colours at the centres of a rendered tile's 4x4 blocks (render_tile's pattern), at any size."""
    side = img.width // 4
    return [img.getpixel((side * i + side // 2, side * j + side // 2)) for j in range(4) for i in range(4)]


def test_basemap_tiles_are_the_index_imagery(basemap_server):
    r = httpx.get(f"{basemap_server}/tiles/3/4/3.jpg", timeout=TIMEOUT)
    assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg"
    assert "max-age" in r.headers["cache-control"]
    with Image.open(io.BytesIO(r.content)) as img:
        assert img.size == (256, 256)
        got = _blocks(img.convert("RGB"))
    want = _blocks(render_tile(T(4, 3, 3), size=256))
    assert max(abs(a - b) for g, w in zip(got, want) for a, b in zip(g, w)) < 24  # JPEG's error, not another tile
    health = httpx.get(f"{basemap_server}/health", timeout=TIMEOUT).json()
    assert health["basemap"] == {"url": "tiles/{z}/{x}/{y}.jpg", "min_native_zoom": 1, "max_native_zoom": 3}


@pytest.mark.parametrize(
    ("path", "reason"),
    [("4/8/7", "zoom 0 to 3"), ("3/8/0", "outside the zoom-3 grid"), ("3/0/0", "outside the index's coverage"),
     ("-1/0/0", "zoom 0 to 3")],
    ids=["too-deep", "off-the-grid", "outside-coverage", "negative-zoom"],
)
def test_basemap_tiles_outside_the_index_are_404(basemap_server, path, reason):
    r = httpx.get(f"{basemap_server}/tiles/{path}.jpg", timeout=TIMEOUT)
    assert r.status_code == 404 and reason in r.json()["detail"]


def test_locate(server):
    r = _locate(server, _png(T(5, 2, 3)), k=6, top_n=3)
    assert r.status_code == 200, r.text
    d = r.json()
    assert d["tile"] == [3, 5, 2] and d["image"] == "photo.png" and d["k"] == 6
    assert len(d["candidates"]) == 3 and len(d["areas"]) <= 3
    assert [lv["zoom"] for lv in d["trace"]] == [1, 2, 3] and len(d["trace"][2]["tiles"]) == 6
    assert set(d["timings"]) == {"read_ms", "encode_ms", "search_ms", "total_ms"}
    assert "exif" not in d  # a PNG without GPS


def test_default_k_is_the_apps(server):
    d = _locate(server, _png(T(5, 2, 3))).json()
    assert d["k"] == 8 and len(d["trace"][2]["tiles"]) == 8


def test_exif_gps_is_reported_unless_ignored(server):
    exif = Image.Exif()
    exif[ExifTags.IFD.GPSInfo] = {1: "N", 2: (R(48, 1), R(51, 1), R(24, 1)), 3: "E", 4: (R(2, 1), R(21, 1), R(3, 1))}
    buf = io.BytesIO()
    render_tile(T(5, 2, 3)).save(buf, "JPEG", exif=exif)
    d = _locate(server, buf.getvalue(), name="paris.jpg").json()
    assert d["exif"]["lat"] == pytest.approx(48.85667, abs=1e-4) and d["exif"]["error_km"] > 0
    assert "exif" not in _locate(server, buf.getvalue(), ignore_exif="true").json()


def test_bbox_restricts_the_search(server):
    bbox = (-100.0, -10.0, 60.0, 70.0)
    r = _locate(server, _png(T(1, 6, 3)), k=4, bbox=",".join(map(str, bbox)))
    assert r.status_code == 200, r.text
    d = r.json()
    assert d["tile"] != [3, 1, 6]  # that tile lies outside the box
    region = Coverage.from_bbox(*bbox)
    for level in d["trace"]:
        assert region.intersects([t[1] for t in level["tiles"]], [t[2] for t in level["tiles"]],
                                 zoom=level["zoom"]).all()


@pytest.mark.parametrize(
    ("data", "status", "message"),
    [
        (b"this is not an image", 400, "bad.png: not an image: 20 bytes of text; send a JPEG, PNG, WebP"),
        (b"", 400, "bad.png: the uploaded file is empty"),
        (None, 400, "bad.png: <"),  # a truncated PNG: the header is fine, the pixels are missing
    ],
    ids=["garbage", "empty", "truncated"],
)
def test_bad_images_are_4xx_with_the_reason(server, data, status, message):
    if data is None:
        data = _png(T(5, 2, 3))[:60]
    r = _locate(server, data, name="bad.png")
    assert r.status_code == status, r.text
    assert message in r.json()["detail"] and "BytesIO" not in r.json()["detail"]


@pytest.mark.parametrize(
    ("form", "message"),
    [
        ({"k": 0}, "greater than or equal to 1"),
        ({"k": 5000}, "less than or equal to 2048"),
        ({"top_n": 0}, "greater than or equal to 1"),
        ({"k": "many"}, "valid integer"),
        ({"bbox": "1,2,3"}, "bbox must be 4 numbers"),
        ({"bbox": "10,50,5,40"}, "must be less than north"),
    ],
)
def test_bad_parameters_are_422(server, form, message):
    r = _locate(server, _png(T(5, 2, 3)), **form)
    assert r.status_code == 422, r.text
    assert message in str(r.json()["detail"])


def test_missing_image_field_is_422(server):
    r = httpx.post(f"{server}/locate", data={"k": "4"}, timeout=TIMEOUT)
    assert r.status_code == 422


def test_upload_limit_declared_length(server):
    r = _locate(server, b"\0" * (LIMIT + 1000), name="huge.jpg")
    assert r.status_code == 413 and "byte limit" in r.json()["detail"]


def test_upload_limit_streamed_without_length(server):
    def body() -> Iterator[bytes]:  # chunked transfer encoding: no Content-Length to check up front
        yield b"--xyz\r\nContent-Disposition: form-data; name=\"image\"; filename=\"big.jpg\"\r\n\r\n"
        for _ in range(LIMIT // 10_000 + 2):
            yield b"\0" * 10_000

    r = httpx.post(f"{server}/locate", content=body(), timeout=TIMEOUT,
                   headers={"content-type": "multipart/form-data; boundary=xyz"})
    assert r.status_code == 413 and "byte limit" in r.json()["detail"]


def test_concurrent_requests_share_one_index(server):
    tiles = [T(5, 2, 3), T(1, 6, 3), T(7, 7, 3), T(0, 0, 3)] * 2
    with ThreadPoolExecutor(max_workers=4) as pool:
        responses = list(pool.map(lambda t: _locate(server, _png(t), k=8), tiles))
    assert all(r.status_code == 200 for r in responses)
    got = [tuple(r.json()["tile"]) for r in responses]
    assert got[:4] == got[4:]
    assert got[0] == (3, 5, 2)


def test_create_app_checks_its_arguments(small_index, tmp_path):
    with pytest.raises(ConfigError, match="1..2048"):
        create_app(small_index, default_k=0)
    from geoindex.errors import IndexNotFoundError

    with pytest.raises(IndexNotFoundError):
        create_app(tmp_path / "nothing")


@pytest.mark.parametrize(("data", "kind"), [
    (b"%PDF-1.7\n" + bytes(range(200)), "209 bytes of a PDF document"),
    (b"\x00\x00\x00\x18ftypheic" + bytes(100), "a HEIC/HEIF photo (iPhone), which is not supported: export it as JPEG"),
    (b"<!DOCTYPE html><html></html>", "28 bytes of an HTML page"),
])
def test_an_upload_that_is_not_an_image_says_what_it_was_and_what_is_accepted(server, data, kind):
    r = _locate(server, data, name="scan.jpg")
    assert r.status_code == 400, r.text
    detail = r.json()["detail"]
    assert detail.startswith("scan.jpg: not an image: ") and kind in detail
    assert "send a JPEG, PNG, WebP, TIFF, BMP or GIF photo" in detail and "cannot identify" not in detail


def test_several_photos_in_one_request_each_with_its_own_answer_or_error(server):
    files = [("image", ("a.png", _png(T(5, 2, 3)), "image/png")), ("image", ("bad.png", b"junk", "image/png")),
             ("image", ("b.png", _png(T(1, 6, 3)), "image/png"))]
    r = httpx.post(f"{server}/locate", files=files, data={"k": "6"}, timeout=TIMEOUT)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["k"] == 6 and [item["image"] for item in body["results"]] == ["a.png", "bad.png", "b.png"]
    good, bad, other = body["results"]
    assert good["tile"] == [3, 5, 2] and other["tile"] == [3, 1, 6]
    assert bad["status"] == 400 and bad["error"].startswith("bad.png: not an image") and "tile" not in bad
    single = _locate(server, _png(T(5, 2, 3)), name="a.png", k=6).json()  # one part: the answer itself
    assert single["tile"] == good["tile"] and single["candidates"] == good["candidates"]


def test_photos_per_request_are_bounded_in_count_and_bytes(small_index):
    app = create_app(small_index, max_upload_bytes=LIMIT, default_k=4, device="cpu", max_photos=2)
    photo = _png(T(5, 2, 3))
    with serving(app) as url:
        r = httpx.post(f"{url}/locate", files=[("image", (f"{i}.png", photo)) for i in range(3)], timeout=TIMEOUT)
        assert r.status_code == 413 and "3 photos in one request; at most 2 (--max-photos)" in r.json()["detail"]
        big = bytes(LIMIT // 2 + 1)
        r = httpx.post(f"{url}/locate", files=[("image", ("a.png", big)), ("image", ("b.png", big))],
                       timeout=TIMEOUT)
        assert r.status_code == 413 and "--max-upload-mb" in r.json()["detail"]
        assert httpx.get(f"{url}/health", timeout=TIMEOUT).json()["max_photos"] == 2
    with pytest.raises(ConfigError, match="--max-photos"):
        create_app(small_index, max_photos=0)


def test_favicon_is_served(server):
    r = httpx.get(f"{server}/favicon.ico", timeout=TIMEOUT)
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    with Image.open(io.BytesIO(r.content)) as icon:
        assert icon.size == (32, 32)


def test_basemap_tile_the_imagery_lacks_is_404_until_it_has_it_and_unreadable_is_503(small_index):
    from geoindex.errors import ImageError, TileNotFoundError

    class Imagery:
        name = "flaky"
        state = "down"

        def get(self, tile):
            if self.state == "down":
                raise TileNotFoundError(f"flaky: no tile {tuple(tile)}")
            if self.state == "corrupt":
                raise ImageError(f"flaky: tile {tuple(tile)} is not an image")
            return render_tile(tile)

    imagery = Imagery()
    with serving(create_app(small_index, default_k=4, device="cpu", map_source=imagery)) as base:
        r = httpx.get(f"{base}/tiles/2/1/1.jpg", timeout=TIMEOUT)
        assert r.status_code == 404 and "nor any of its ancestors" in r.json()["detail"]
        imagery.state = "up"  # a missing tile is not remembered as missing
        assert httpx.get(f"{base}/tiles/2/1/1.jpg", timeout=TIMEOUT).status_code == 200
        imagery.state = "corrupt"
        r = httpx.get(f"{base}/tiles/2/1/2.jpg", timeout=TIMEOUT)
        assert r.status_code == 503 and "is not an image" in r.json()["detail"]
        assert httpx.get(f"{base}/tiles/2/1/1.jpg", timeout=TIMEOUT).status_code == 200  # kept from before
