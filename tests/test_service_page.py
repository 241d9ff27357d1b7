"""The web page at ``/``, in a real headless Chromium (selenium) against a real uvicorn on 127.0.0.1.

Needs Debian's ``chromium`` and ``chromium-driver`` (``.ci/run`` installs them when it runs as
root) and the ``selenium`` package; without them the browser tests skip and say which is missing.
Screenshots go to the test's tmp folder, or to ``$GEOINDEX_SCREENSHOT_DIR`` when set.
"""

from __future__ import annotations

import io
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mercantile
import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("uvicorn")
pytest.importorskip("fastapi")
pytest.importorskip("multipart")

from PIL import ExifTags, Image  # noqa: E402
from PIL.TiffImagePlugin import IFDRational as R  # noqa: E402

from geoindex.interfaces.service import create_app  # noqa: E402
from tests.conftest import render_tile, serving  # noqa: E402

T = mercantile.Tile
LIMIT = 200_000  # bytes
WAIT = 90.0  # seconds for one photo on a busy 2-core machine (the map is drawn too)
BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
# A closed network floods refused connections unless Chromium is told to stay quiet.
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", "--window-size=1280,1000")


@pytest.fixture(scope="module")
def page_server(small_index, rendered_source) -> Iterator[str]:
    app = create_app(small_index, max_upload_bytes=LIMIT, default_k=8, device="cpu", map_source=rendered_source)
    with serving(app) as base:
        yield base


def test_page_loads_nothing_from_another_host(page_server):
    import re

    r = httpx.get(f"{page_server}/", timeout=30)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    html = r.text
    assert 'type="file"' in html and "multiple" in html
    for external in ("http://", "https://", "//cdn"):  # works offline: nothing from elsewhere
        assert external not in html
    assets = re.findall(r'<(?:script|link)[^>]+(?:src|href)="([^"]+)"', html)
    assert "vendor/leaflet/leaflet.js" in assets and "vendor/leaflet/leaflet.css" in assets
    for url in assets:  # each is served by geoindex serve itself
        assert httpx.get(f"{page_server}/{url}", timeout=30).status_code == 200, url


def test_locate_can_include_map_and_geojson(page_server):
    buf = io.BytesIO()
    render_tile(T(5, 2, 3)).save(buf, "PNG")
    r = httpx.post(f"{page_server}/locate", files={"image": ("photo.png", buf.getvalue())},
                   data={"k": "4", "include_map": "true", "include_geojson": "true"}, timeout=60)
    assert r.status_code == 200, r.text
    d = r.json()
    assert d["map_png"].startswith("data:image/png;base64,")
    assert d["geojson"]["type"] == "FeatureCollection" and "map_ms" in d["timings"]
    kinds = [f["properties"]["kind"] for f in d["geojson"]["features"]]
    assert kinds.count("candidate") == 4 and kinds.count("prediction") == 1
    plain = httpx.post(f"{page_server}/locate", files={"image": ("photo.png", buf.getvalue())}, timeout=60).json()
    assert "map_png" not in plain and "geojson" not in plain and "map_ms" not in plain["timings"]


def test_a_map_that_cannot_be_drawn_leaves_the_answer(small_index):
    from geoindex.errors import ImageError

    class Broken:
        name = "broken"

        def get(self, tile):
            raise ImageError(f"broken: tile {tuple(tile)} is unreadable")

    buf = io.BytesIO()
    render_tile(T(5, 2, 3)).save(buf, "PNG")
    with serving(create_app(small_index, default_k=4, device="cpu", map_source=Broken())) as base:
        r = httpx.post(f"{base}/locate", files={"image": ("photo.png", buf.getvalue())},
                       data={"include_map": "true"}, timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["tile"] == [3, 5, 2] and "map_png" not in r.json()
    assert "is unreadable" in r.json()["map_error"]


# -- in the browser --------------------------------------------------------------------------------


def chromium(profile: Path) -> Any:
    """A headless Chromium driven by selenium, or a skip that says what is missing."""
    try:
        from selenium import webdriver
        from selenium.common.exceptions import WebDriverException
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.skip("selenium is not installed (pip install selenium), so the page is not tested in a browser")
    browser = next((p for p in map(shutil.which, BROWSERS) if p), None)
    driver = shutil.which("chromedriver")
    if browser is None or driver is None:
        missing = " and ".join(n for n, p in (("Chromium", browser), ("chromedriver", driver)) if p is None)
        pytest.skip(f"no {missing} on PATH (apt-get install chromium chromium-driver), "
                    "so the page is not tested in a browser")
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={profile}"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})  # the console: what the page refused to load
    try:  # an explicit driver path: selenium must not go looking for one on the network
        return webdriver.Chrome(service=Service(executable_path=driver), options=options)
    except WebDriverException as e:
        pytest.skip(f"{browser} with {driver} did not start: {e.msg or e}")


@pytest.fixture(scope="module")
def browser(tmp_path_factory) -> Iterator[Any]:
    chrome = chromium(tmp_path_factory.mktemp("chromium-profile"))
    chrome.set_page_load_timeout(30)
    try:
        yield chrome
    finally:
        chrome.quit()


@pytest.fixture
def shots(tmp_path) -> Path:
    where = Path(os.environ.get("GEOINDEX_SCREENSHOT_DIR") or tmp_path)
    where.mkdir(parents=True, exist_ok=True)
    return where


def _open(browser, base: str) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser.set_window_size(1280, 1000)
    browser.get(f"{base}/")
    WebDriverWait(browser, 30).until(lambda b: "encoder tiny" in b.find_element(By.ID, "server").text)


def _upload(browser, *paths: Path) -> None:
    from selenium.webdriver.common.by import By

    browser.find_element(By.ID, "files").send_keys("\n".join(str(p) for p in paths))


def _settled(browser, count: int) -> list[Any]:
    """The newest ``count`` cards once none of them is queued or working."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    def done(b: Any) -> list[Any] | bool:
        cards = b.find_elements(By.CSS_SELECTOR, "#results > li.card")[:count]
        states = [c.get_attribute("data-state") for c in cards]
        return cards if len(cards) == count and all(s in ("done", "error") for s in states) else False

    return WebDriverWait(browser, WAIT).until(done)


def _screenshot(browser, path: Path, width: int) -> None:
    """The whole page at ``width`` CSS pixels (the window grows to the page's height)."""
    browser.set_window_size(width, 1000)
    height = browser.execute_script("return document.documentElement.scrollHeight")
    browser.set_window_size(width, min(int(height) + 140, 4000))  # + the window's own chrome
    browser.save_screenshot(str(path))
    print(f"screenshot: {path}")


def foreign_requests(browser) -> list[str]:
    """Every resource the page has requested from a host other than its own server (none may be: no network)."""
    return list(browser.execute_script("""
        return performance.getEntriesByType("resource").map((e) => e.name)
            .filter((n) => !n.startsWith(location.origin + "/") && !/^(blob|data):/.test(n));
    """))


def _in_viewport(browser, element) -> bool:
    return bool(browser.execute_script("""
        const r = arguments[0].getBoundingClientRect();
        return r.width > 0 && r.left >= 0 && r.right <= window.innerWidth;
    """, element))


def _photo_with_gps(path: Path) -> Path:
    exif = Image.Exif()
    exif[ExifTags.IFD.GPSInfo] = {1: "N", 2: (R(48, 1), R(51, 1), R(24, 1)), 3: "E", 4: (R(2, 1), R(21, 1), R(3, 1))}
    render_tile(T(5, 2, 3), size=256).save(path, "JPEG", exif=exif)
    return path


def test_page_locates_photos_in_a_browser(browser, page_server, tmp_path, shots):
    from selenium.webdriver.common.by import By

    _open(browser, page_server)
    assert browser.find_element(By.ID, "k").get_attribute("placeholder") == "8 (default)"  # the server's
    photo = _photo_with_gps(tmp_path / "paris.jpg")
    plain = tmp_path / "plain.png"
    render_tile(T(1, 6, 3), size=128).save(plain)
    _upload(browser, photo, plain)  # two photos at once: located one after the other
    cards = _settled(browser, 2)
    assert [c.get_attribute("data-state") for c in cards] == ["done", "done"]
    by_name = {c.find_element(By.TAG_NAME, "h2").text: c for c in cards}
    card = by_name["paris.jpg"]

    rows = card.find_elements(By.CSS_SELECTOR, "table.candidates tbody tr")
    assert len(rows) == 5
    assert rows[0].find_elements(By.TAG_NAME, "td")[3].text == "3/5/2"  # the tile the photo was rendered from
    assert "%" in rows[0].text
    _check_the_map(browser, card, page_server)
    exif_line = card.find_element(By.CSS_SELECTOR, ".exif")
    assert "EXIF GPS says 48.85667, 2.35083" in exif_line.text
    assert "km away" in card.text and "the 90 % radius" in exif_line.text
    inside = "inside the 90 % radius" in exif_line.text
    assert ("exif-ok" if inside else "exif-bad") in exif_line.get_attribute("class")  # green only when inside
    assert "Uncalibrated index" in card.find_element(By.CSS_SELECTOR, ".radius").text
    assert "uncalibrated" in browser.find_element(By.ID, "server").text
    assert not card.find_elements(By.CSS_SELECTOR, ".banner")
    assert "No GPS position" in by_name["plain.png"].find_element(By.CSS_SELECTOR, ".exif").text

    link = card.find_element(By.CSS_SELECTOR, "a.geojson")
    assert link.get_attribute("download") == "paris.geojson"
    geojson = browser.execute_async_script(
        "fetch(arguments[0]).then(r => r.json()).then(arguments[1])", link.get_attribute("href"))
    kinds = {f["properties"]["kind"] for f in geojson["features"]}
    assert geojson["type"] == "FeatureCollection" and {"candidate", "prediction", "exif"} <= kinds

    _screenshot(browser, shots / "service-page-wide.png", 1280)
    _check_the_phone_layout(browser, card)
    _screenshot(browser, shots / "service-page-narrow.png", 390)
    assert foreign_requests(browser) == []


def _check_the_map(browser, card, base: str) -> None:
    """The card's Leaflet map: basemap tiles from this server, the candidates and the trace as layers."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    errors = card.find_elements(By.CSS_SELECTOR, ".map-error")
    assert not errors, errors[0].text
    box = card.find_element(By.CSS_SELECTOR, ".leaflet-box.leaflet-container")
    tiles = WebDriverWait(browser, 30).until(
        lambda b: box.find_elements(By.CSS_SELECTOR, "img.leaflet-tile.leaflet-tile-loaded"))
    assert all(t.get_attribute("src").startswith(f"{base}/tiles/") for t in tiles)
    assert browser.execute_script("return arguments[0].naturalWidth", tiles[0]) == 256
    assert len(box.find_elements(By.CSS_SELECTOR, "path.candidate")) == 5
    assert box.find_elements(By.CSS_SELECTOR, "path.answer") and box.find_elements(By.CSS_SELECTOR, "path.exif-point")
    assert len(box.find_elements(By.CSS_SELECTOR, "path.trace-z3")) == 8  # the finest level's k kept tiles, shown
    assert not box.find_elements(By.CSS_SELECTOR, "path.trace-z1")  # coarser levels start hidden

    # A candidate's popup gives its rank, probability and score.
    browser.execute_script("arguments[0].dispatchEvent(new MouseEvent('click', {bubbles: true}))",
                           box.find_elements(By.CSS_SELECTOR, "path.candidate")[0])
    # Read once it has faded in: selenium gives no text for a popup still at opacity 0.
    popup = WebDriverWait(browser, 10).until(
        lambda b: next((p.text for p in box.find_elements(By.CSS_SELECTOR, ".leaflet-popup-content") if p.text), ""))
    assert popup.startswith("#1: probability") and "score" in popup

    # The layer control switches a trace level on and off.
    labels = box.find_elements(By.CSS_SELECTOR, ".leaflet-control-layers-overlays label")
    names = [label.text.strip() for label in labels]
    assert names[:3] == ["zoom 1: 4 kept tiles", "zoom 2: 8 kept tiles", "zoom 3: 8 kept tiles"], names
    assert "top 5 candidates" in names
    zoom1 = labels[0].find_element(By.TAG_NAME, "input")
    assert not zoom1.is_selected()
    zoom1.click()
    WebDriverWait(browser, 10).until(lambda b: len(box.find_elements(By.CSS_SELECTOR, "path.trace-z1")) == 4)
    zoom1.click()
    WebDriverWait(browser, 10).until(lambda b: not box.find_elements(By.CSS_SELECTOR, "path.trace-z1"))
    legend = card.find_element(By.CSS_SELECTOR, ".legend")
    assert "least to most probable" in legend.text and "the EXIF position" in legend.text
    assert card.find_element(By.LINK_TEXT, "Download the map (PNG)").get_attribute("download") == "paris-map.png"


def _check_the_phone_layout(browser, card) -> None:
    """At 390 x 844 CSS pixels every column of the candidates shows, labelled, with no sideways scroll."""
    from selenium.webdriver.common.by import By

    browser.set_window_size(390, 844)
    width = browser.execute_script("return window.innerWidth")
    assert width <= 400, f"the window is {width} px wide, not a phone's"
    assert browser.execute_script("return document.documentElement.scrollWidth <= window.innerWidth")
    box = card.find_element(By.CSS_SELECTOR, "div.scroll")
    assert browser.execute_script("return arguments[0].scrollWidth <= arguments[0].clientWidth", box)
    columns = ["#", "latitude", "longitude", "tile z/x/y", "probability", "score"]
    for row in card.find_elements(By.CSS_SELECTOR, "table.candidates tbody tr"):
        browser.execute_script("arguments[0].scrollIntoView()", row)
        cells = row.find_elements(By.TAG_NAME, "td")
        assert len(cells) == len(columns)
        for cell, name in zip(cells, columns):
            assert cell.text and _in_viewport(browser, cell), f"{name} of {row.text!r} is cut off at 390 px"
            label = browser.execute_script("return getComputedStyle(arguments[0], '::before').content", cell)
            assert label == f'"{name}"', f"the {name} cell is labelled {label}"
    leaflet = card.find_element(By.CSS_SELECTOR, ".leaflet-box")
    assert _in_viewport(browser, leaflet)


@pytest.fixture(scope="module")
def strict_server(tmp_path_factory, small_index, rendered_source) -> Iterator[str]:
    """The small index calibrated, with a threshold no photo reaches and a coverage far from Paris."""
    import dataclasses

    from geoindex import open_index
    from geoindex.storage.manifest import Manifest
    from geoindex.training.calibrate import fit_calibration, save_calibration, view_queries

    path = tmp_path_factory.mktemp("strict") / "index"
    shutil.copytree(small_index, path)
    index = open_index(path, device="cpu")
    calibration, embeddings = fit_calibration(index, view_queries(index, rendered_source, count=32, seed=3), k=8)
    save_calibration(path, dataclasses.replace(calibration, ood_threshold=2.0), embeddings)
    manifest = Manifest.load(path)
    dataclasses.replace(manifest, coverage={"bboxes": [[100.0, -10.0, 120.0, 10.0]], "polygons": []}).save(path)
    app = create_app(path, max_upload_bytes=LIMIT, default_k=8, device="cpu", map_source=rendered_source)
    with serving(app) as base:
        yield base


def test_no_confident_match_and_coverage_in_the_answer(strict_server, tmp_path):
    photo = _photo_with_gps(tmp_path / "paris.jpg")
    r = httpx.post(f"{strict_server}/locate", files={"image": ("paris.jpg", photo.read_bytes())}, timeout=60)
    assert r.status_code == 200
    d = r.json()
    assert d["calibrated"] is True and d["confident"] is False and d["reason"].startswith("no confident match")
    assert d["candidates"] and d["exif"]["in_coverage"] is False
    assert httpx.get(f"{strict_server}/health", timeout=30).json()["calibration"]["kind"] == "views"


def test_page_shows_the_no_confident_match_banner(browser, strict_server, tmp_path, shots):
    from selenium.webdriver.common.by import By

    _open(browser, strict_server)
    assert "calibrated on 32 views" in browser.find_element(By.ID, "server").text
    assert "not ground photos" in browser.find_element(By.ID, "server").text  # what the encoders match
    _upload(browser, _photo_with_gps(tmp_path / "paris.jpg"))
    (card,) = _settled(browser, 1)
    banner = card.find_element(By.CSS_SELECTOR, ".banner")
    assert banner.get_attribute("role") == "alert"
    assert banner.text.startswith("No confident match")
    assert card.find_elements(By.CSS_SELECTOR, "table.candidates tbody tr")  # the candidates are still shown
    assert "with 90 %" in card.find_element(By.CSS_SELECTOR, ".radius").text
    assert banner.text.count("no confident match") == 0  # the reason is not repeated after the headline
    assert "outside the area this index covers" in card.find_element(By.CSS_SELECTOR, ".exif-coverage").text
    _screenshot(browser, shots / "service-page-no-match.png", 1280)


@pytest.mark.parametrize(
    ("name", "data", "settings", "message", "detail"),
    [
        ("notes.txt", b"this is not an image", {}, "notes.txt is not an image the server can read.",
         "not an image: 20 bytes of text"),
        ("huge.jpg", b"\xff" * (2 * LIMIT), {}, "huge.jpg is 391 kB; this server accepts photos up to 195 kB.",
         "--max-upload-mb"),
        ("photo.png", None, {"bbox": "10, 50, 5, 40"}, "The server refused the settings.", "must be less than north"),
    ],
    ids=["not-an-image", "too-large", "bad-region"],
)
def test_page_shows_errors_in_plain_words(browser, page_server, tmp_path, shots, name, data, settings, message,
                                          detail):
    from selenium.webdriver.common.by import By

    _open(browser, page_server)
    for field, value in settings.items():
        browser.find_element(By.ID, field).send_keys(value)
    path = tmp_path / name
    if data is None:
        render_tile(T(1, 6, 3), size=128).save(path)
    else:
        path.write_bytes(data)
    _upload(browser, path)
    (card,) = _settled(browser, 1)
    assert card.get_attribute("data-state") == "error"
    box = card.find_element(By.CSS_SELECTOR, ".error")
    assert box.get_attribute("role") == "alert"
    assert box.find_element(By.CSS_SELECTOR, ".message").text == message
    assert detail in box.text
    assert "Traceback" not in card.text and "BytesIO" not in card.text
    if name == "notes.txt":
        _screenshot(browser, shots / "service-page-error.png", 800)


def test_page_works_from_the_keyboard(browser, page_server):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    def tab() -> str:  # keys to the focused element, as a person types (send_keys on a file input is a path)
        ActionChains(browser).send_keys(Keys.TAB).perform()
        return str(browser.switch_to.active_element.get_attribute("id"))

    _open(browser, page_server)
    assert tab() == "files"  # the first stop is the photo picker (Enter or Space opens it), then the settings
    assert browser.execute_script("return document.getElementById('drop').matches(':focus-within')")
    assert tab() == "k"
    assert tab() == "bbox"

    # An invalid setting stops the upload and sends the focus to the field.
    k = browser.find_element(By.ID, "k")
    k.send_keys("0")
    before = len(browser.find_elements(By.CSS_SELECTOR, "#results > li"))
    _upload(browser, Path(__file__))
    assert len(browser.find_elements(By.CSS_SELECTOR, "#results > li")) == before
    assert browser.switch_to.active_element.get_attribute("id") == "k"
    assert "k must be a whole number" in browser.find_element(By.ID, "announce").text


def test_page_accepts_a_dropped_photo(browser, page_server):
    from selenium.webdriver.common.by import By

    _open(browser, page_server)
    # Selenium cannot drag a file from the desktop; dispatch the drop event a browser would.
    browser.execute_async_script("""
        const done = arguments[0], canvas = document.createElement("canvas");
        canvas.width = canvas.height = 64;
        const ctx = canvas.getContext("2d");
        ctx.fillStyle = "#3a7"; ctx.fillRect(0, 0, 64, 64); ctx.fillStyle = "#c33"; ctx.fillRect(8, 8, 24, 40);
        canvas.toBlob((blob) => {
            const files = new DataTransfer();
            files.items.add(new File([blob], "dropped.png", {type: "image/png"}));
            const drop = document.getElementById("drop");
            drop.dispatchEvent(new DragEvent("dragover", {dataTransfer: files, bubbles: true, cancelable: true}));
            drop.dispatchEvent(new DragEvent("drop", {dataTransfer: files, bubbles: true, cancelable: true}));
            done();
        }, "image/png");
    """)
    (card,) = _settled(browser, 1)
    assert card.find_element(By.TAG_NAME, "h2").text == "dropped.png"
    assert card.get_attribute("data-state") == "done"
    assert card.find_elements(By.CSS_SELECTOR, "table.candidates tbody tr")


def test_page_finds_its_favicon(browser, page_server):
    """Browsers ask every page's server for /favicon.ico; the page's must not answer 404."""
    _open(browser, page_server)
    status, ctype = browser.execute_async_script("""
        const done = arguments[0];
        fetch("/favicon.ico").then((r) => done([r.status, r.headers.get("content-type")]), (e) => done([0, String(e)]));
    """)
    assert (status, ctype) == (200, "image/png")


def test_page_shows_the_map_picture_when_the_map_library_fails(browser, page_server, tmp_path):
    """Without Leaflet (a script that did not load), the answer, a line saying why, and the PNG map."""
    from selenium.webdriver.common.by import By

    _open(browser, page_server)
    browser.execute_script("window.L = undefined")
    _upload(browser, _photo_with_gps(tmp_path / "paris.jpg"))
    (card,) = _settled(browser, 1)
    assert card.get_attribute("data-state") == "done"
    assert card.find_elements(By.CSS_SELECTOR, "table.candidates tbody tr")
    assert "could not be shown" in card.find_element(By.CSS_SELECTOR, ".map-error").text
    assert not card.find_elements(By.CSS_SELECTOR, ".leaflet-box")
    img = card.find_element(By.CSS_SELECTOR, "img.map-image")
    assert browser.execute_script("return arguments[0].complete && arguments[0].naturalWidth", img) > 300


@pytest.mark.parametrize(("page", "ready"), [("docs", ".swagger-ui .info .title"), ("redoc", "h1")])
def test_api_docs_render_offline(browser, page_server, page, ready):
    """/docs (Swagger UI) and /redoc draw the API from scripts this server serves; nothing comes from a CDN."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser.set_window_size(1280, 1000)
    browser.get(f"{page_server}/{page}")
    title = WebDriverWait(browser, 30).until(
        lambda b: next((e for e in b.find_elements(By.CSS_SELECTOR, ready) if "geoindex" in e.text), False))
    assert title.is_displayed()
    WebDriverWait(browser, 30).until(lambda b: "/locate" in b.find_element(By.TAG_NAME, "body").text)
    # ReDoc asks for its logo from its CDN whatever its options; the page's policy refuses it before it is sent.
    console = [str(m.get("message")) for m in browser.get_log("browser")]
    for url in foreign_requests(browser):
        refused = [m for m in console if f"image '{url}'" in m and "Content Security Policy" in m]
        assert refused, f"{page} requested {url}; the console says {console}"
