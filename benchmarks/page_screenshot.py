"""The README's picture of the web page: one Blue Marble view located in headless Chromium, screenshot.

    python benchmarks/page_screenshot.py --index indexes/demo --out benchmarks/results/service-page.png

Serves the index on 127.0.0.1 (as tests/test_service_page.py does), uploads a rotated Blue Marble
view centred on ``--lat``/``--lon``, waits for the answer and the map's basemap tiles, and saves the
whole page at 1280 px. Prints the card's text and every request that went to another host (there
should be none). Needs Chromium, chromedriver and selenium, as the browser test does.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

WAIT_S = 180.0  # one photo on a busy 2-core machine, with the encoder loaded cold


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--index", default="indexes/demo")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/service-page.png"))
    p.add_argument("--lat", type=float, default=46.5, help="centre of the uploaded view (default: the Alps)")
    p.add_argument("--lon", type=float, default=9.0)
    p.add_argument("--zoom", type=float, default=6.3, help="the view spans a tile of this zoom")
    args = p.parse_args(argv)

    import pytest
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from geoindex.interfaces.service import create_app
    from geoindex.sources import RasterSource
    from tests.conftest import serving
    from tests.test_service_page import chromium, foreign_requests

    with tempfile.TemporaryDirectory() as tmp:
        photo = Path(tmp) / "alps-view.jpg"
        RasterSource().render_view(args.lat, args.lon, zoom=args.zoom, size=384, rotation_deg=20).save(photo,
                                                                                                    quality=92)
        with serving(create_app(args.index, device="cpu")) as base:
            try:
                chrome = chromium(Path(tmp) / "profile")
            except pytest.skip.Exception as e:
                print(f"cannot take the screenshot: {e}", file=sys.stderr)
                return 1
            try:
                chrome.set_window_size(1280, 1000)
                chrome.get(f"{base}/")
                WebDriverWait(chrome, 60).until(lambda b: "Index" in b.find_element(By.ID, "server").text)
                chrome.find_element(By.ID, "files").send_keys(str(photo))
                WebDriverWait(chrome, WAIT_S).until(lambda b: b.find_elements(By.CSS_SELECTOR, "li.card[data-state]")
                                                    and b.find_element(By.CSS_SELECTOR, "li.card")
                                                    .get_attribute("data-state") in ("done", "error"))
                WebDriverWait(chrome, 60).until(lambda b: b.find_elements(By.CSS_SELECTOR, "img.leaflet-tile-loaded"))
                time.sleep(1.0)  # the remaining tiles and the layers' fade-in
                height = chrome.execute_script("return document.documentElement.scrollHeight")
                chrome.set_window_size(1280, min(int(height) + 140, 4000))
                time.sleep(0.5)
                args.out.parent.mkdir(parents=True, exist_ok=True)
                chrome.save_screenshot(str(args.out))
                print(chrome.find_element(By.CSS_SELECTOR, "li.card").text)
                print(f"requests to other hosts: {foreign_requests(chrome)}")
                print(f"screenshot: {args.out}")
            finally:
                chrome.quit()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
