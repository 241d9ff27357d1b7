"""An HTTP service over one opened index (FastAPI): a web page at ``/``, ``POST /locate`` a photo, ``GET /health``.

``POST /locate`` answers in JSON and adds any file output format asked for (``include_map``, ``include_geojson``:
one field per file format of :mod:`geoindex.interfaces.outputs`); ``POST /locate/{format}`` answers in any registered
format, and ``GET /formats`` lists them for the page and other clients.

The index and the photo encoder are loaded once, when the app is created. Uploads are capped
(413 beyond ``max_upload_bytes``, checked on the declared length and again while reading), and
every problem with the request (unreadable image, bad bbox, k out of range) is a 4xx whose
``detail`` says what is wrong; a 500 would be a bug. Run it with ``geoindex serve`` or any ASGI
server: ``uvicorn --factory 'geoindex.interfaces.service:app_from_env'`` reads ``GEOINDEX_INDEX``. The page
(``geoindex/static/index.html``, no external resources) posts to ``/locate`` and asks for the map
picture and the GeoJSON in the same answer, and draws the answer on an interactive Leaflet map
(vendored under ``static/vendor``, served at ``/vendor``) over basemap tiles that ``GET
/tiles/{z}/{x}/{y}.jpg`` renders from the index's own imagery. API docs are at ``/docs`` (Swagger UI)
and ``/redoc``, their scripts served from the ``fastapi-offline`` package: nothing comes from a CDN.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import dataclasses
import functools
import inspect
import io
import json
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated, Any, TypeVar, cast

import mercantile
from fastapi import FastAPI, File, Form, HTTPException, Request, UploadFile
from fastapi.openapi.docs import get_redoc_html
from fastapi.responses import HTMLResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi_offline import FastAPIOffline
from PIL import Image, UnidentifiedImageError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from geoindex.api import DEFAULT_INDEX, INDEX_ENV, GeoIndex, open_index
from geoindex.errors import (
    ConfigError,
    GeoIndexError,
    ImageError,
    ImageTooLargeError,
    LazyLevelError,
    TileNotFoundError,
)
from geoindex.exif import read_gps
from geoindex.geometry.coverage import Coverage
from geoindex.imagery import load_image
from geoindex.interfaces.outputs import REGISTRY, FileInputs, OutputFormat, file_formats, result_to_dict
from geoindex.interfaces.render import basemap_tile
from geoindex.retrieval.beam import MAX_K, check_k
from geoindex.retrieval.results import SearchResult
from geoindex.sources import TileSource
from geoindex.storage.manifest import Manifest

__all__ = [
    "DEFAULT_MAX_CONCURRENT",
    "DEFAULT_MAX_PHOTOS",
    "DEFAULT_MAX_PIXELS",
    "DEFAULT_MAX_UPLOAD_BYTES",
    "MAX_TOP_N",
    "app_from_env",
    "competence",
    "create_app",
]

log = logging.getLogger(__name__)

DEFAULT_MAX_UPLOAD_BYTES = 20 * 1024 * 1024  # phone photos are 2-12 MB; leave room for RAW-ish JPEGs
# A 258 KB PNG can decode to 9,400 x 9,400 pixels (550 MB per request with the conversions). JPEGs are
# decoded at reduced size (DCT scaling) before this applies, so phone photos of any resolution pass.
DEFAULT_MAX_PIXELS = 25_000_000
DEFAULT_MAX_CONCURRENT = max(1, min(4, os.cpu_count() or 1))  # decodes + encodes at once; each is CPU-bound
DEFAULT_BUSY_TIMEOUT_S = 10.0  # how long a request waits for a decode slot before a 503
# A body must arrive within this time: 300 clients sending a byte every 10 s would otherwise hold
# 300 connections (and their threads' buffers) for as long as they like.
DEFAULT_BODY_TIMEOUT_S = 60.0
_DETAIL_CHARS = 500  # server-side errors are cut here in a response's detail
_TRIM_AFTER_PIXELS = 4_000_000  # give freed decode buffers back to the OS after images this large
MAX_TOP_N = 100
DEFAULT_MAX_PHOTOS = 16  # photos in one POST /locate; their bytes together stay under max_upload_bytes
# What a photo upload may be: the formats people send that Pillow reads (it reads a few more).
_ACCEPTED = "JPEG, PNG, WebP, TIFF, BMP or GIF"
_REGION_CACHE = 32  # regions whose per-level row masks are kept between requests
_BASEMAP_CACHE = 1024  # encoded basemap tiles kept in memory (about 10 kB each)
_BASEMAP_QUALITY = 85  # JPEG quality of basemap tiles: satellite imagery, no text to keep sharp
# Browsers may keep a basemap tile this long: the imagery of an index does not change while it is served.
_BASEMAP_MAX_AGE_S = 86_400
_VENDOR = Path(__file__).parents[1] / "static" / "vendor"
_DOCS_ASSETS = "/docs-assets"  # where fastapi-offline serves Swagger UI's and ReDoc's scripts


class _TooLarge(StarletteHTTPException):
    """Raised from inside the body stream; an HTTPException so that FastAPI passes it through as 413."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"upload exceeds the {limit} byte limit (--max-upload-mb)")


class _SlowBody(StarletteHTTPException):
    """Raised from inside the body stream when the body does not arrive in time (408, connection closed)."""

    def __init__(self, seconds: float) -> None:
        super().__init__(408, f"the request body did not arrive within {seconds:g} s (--body-timeout)",
                         headers={"Connection": "close"})


class _BodyLimit:
    """ASGI middleware: refuse bodies over ``limit`` bytes (declared or streamed) or slower than ``timeout_s``."""

    def __init__(self, app: ASGIApp, limit: int, timeout_s: float = DEFAULT_BODY_TIMEOUT_S) -> None:
        self.app = app
        self.limit = limit
        self.timeout_s = timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.limit:
            body = json.dumps({"detail": _TooLarge(self.limit).detail}).encode()
            await send({"type": "http.response.start", "status": 413,
                        "headers": [(b"content-type", b"application/json"),
                                    (b"content-length", str(len(body)).encode()), (b"connection", b"close")]})
            await send({"type": "http.response.body", "body": body})
            return
        seen = 0
        complete = False
        deadline = asyncio.get_running_loop().time() + self.timeout_s

        async def counted() -> Message:
            nonlocal seen, complete
            if complete:  # after the body, receive() waits for a disconnect: no deadline
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - asyncio.get_running_loop().time()))
            except TimeoutError:
                raise _SlowBody(self.timeout_s) from None
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise _TooLarge(self.limit)
                complete = not message.get("more_body", False)
            return message

        await self.app(scope, counted, send)


def _parse_bbox(text: str) -> Coverage:
    try:
        values = [float(v) for v in text.replace(",", " ").split()]
    except ValueError:
        values = []
    if len(values) != 4:
        raise ConfigError(f"bbox must be 4 numbers 'W,S,E,N' in degrees, got {text!r}")
    return Coverage.from_bbox(*values)


def _trim_heap() -> None:
    """Return freed heap pages to the OS (glibc keeps them otherwise: RSS would stay at its peak)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass


def _upload_kind(data: bytes, content_type: str | None) -> str:
    """What an upload that is not a readable image looks like, in words, from its first bytes."""
    head = data[:64]
    if head.startswith(b"%PDF"):
        kind = "a PDF document"
    elif head[4:12] in (b"ftypheic", b"ftypheix", b"ftypmif1", b"ftyphevc"):
        kind = "a HEIC/HEIF photo (iPhone), which is not supported: export it as JPEG"
    elif head[4:8] == b"ftyp":
        kind = "an MP4/QuickTime video"
    elif head.startswith(b"PK\x03\x04"):
        kind = "a ZIP archive (or an Office document)"
    elif head.lstrip().lower().startswith((b"<!doctype html", b"<html")):
        kind = "an HTML page"
    else:
        try:
            data[:4096].decode("utf-8")
            kind = "text"
        except UnicodeDecodeError:
            kind = "binary data of no image format Pillow knows"
    sent_as = f", sent as {content_type}" if content_type and content_type != "application/octet-stream" else ""
    return f"{len(data)} bytes of {kind}{sent_as}"


@functools.cache
def _favicon_png() -> bytes:
    """A 32 px icon (a blue disc with a red pin), so that browsers asking for /favicon.ico get one, not a 404."""
    from PIL import ImageDraw

    img = Image.new("RGBA", (32, 32), (0, 0, 0, 0))
    draw = ImageDraw.Draw(img)
    draw.ellipse((1, 1, 30, 30), fill=(38, 110, 180, 255))
    draw.ellipse((11, 8, 20, 17), fill=(228, 26, 28, 255))
    draw.polygon([(12, 15), (19, 15), (15.5, 24)], fill=(228, 26, 28, 255))
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def _declared_pixels(data: bytes) -> int:
    """Width x height from the image header (no pixels decoded); 0 when the header is unreadable."""
    try:
        with Image.open(io.BytesIO(data)) as probe:
            return int(probe.width * probe.height)
    except Exception:  # noqa: BLE001 - load_image reports what is wrong with the upload
        return 0


@dataclasses.dataclass(frozen=True)
class _Limits:
    """What one app accepts: checked once, when the app is created (ConfigError naming the option)."""

    max_upload_bytes: int
    default_k: int
    max_pixels: int
    max_concurrent: int
    busy_timeout_s: float
    max_photos: int
    body_timeout_s: float

    def __post_init__(self) -> None:
        check_k(self.default_k)
        if self.max_upload_bytes < 1:
            raise ConfigError(f"max_upload_bytes must be >= 1, got {self.max_upload_bytes} (--max-upload-mb)")
        if self.max_pixels < 1:
            raise ConfigError(f"max_pixels must be >= 1, got {self.max_pixels} (--max-megapixels)")
        if self.max_concurrent < 1:
            raise ConfigError(f"max_concurrent must be >= 1, got {self.max_concurrent} (--max-concurrent)")
        if self.max_photos < 1:
            raise ConfigError(f"max_photos must be >= 1, got {self.max_photos} (--max-photos)")
        if not self.busy_timeout_s >= 0:
            raise ConfigError(f"busy_timeout_s must be >= 0, got {self.busy_timeout_s}")
        if not 0 < self.body_timeout_s < float("inf"):
            raise ConfigError(f"body_timeout_s must be a positive number of seconds, got {self.body_timeout_s} "
                              "(--body-timeout)")


def create_app(
    index: GeoIndex | str | os.PathLike[str],
    *,
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES,
    default_k: int = 64,
    map_source: TileSource | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_concurrent: int = DEFAULT_MAX_CONCURRENT,
    busy_timeout_s: float = DEFAULT_BUSY_TIMEOUT_S,
    max_photos: int = DEFAULT_MAX_PHOTOS,
    body_timeout_s: float = DEFAULT_BODY_TIMEOUT_S,
    **open_kwargs: Any,
) -> FastAPI:
    """The FastAPI app serving one index.

    Args:
        index: an opened GeoIndex, or a directory to open now (with ``open_kwargs``: weights,
            download, device, verify).
        max_upload_bytes: largest accepted request body.
        default_k: beam width when a request does not give ``k``.
        map_source: imagery for the maps that ``include_map`` asks for (default: the index's own
            imagery when local, else the embedded Blue Marble; opened at the first map).
        max_pixels: largest decoded image (width x height, after JPEG's reduced-size decoding);
            larger ones are refused with 413 before their pixels are decoded.
        max_concurrent: requests decoding, encoding, searching and drawing maps at once; the rest
            wait for a slot.
        busy_timeout_s: how long a request waits for a slot before it gets 503 with Retry-After.
        max_photos: most ``image`` parts in one ``POST /locate`` (all of them together within
            ``max_upload_bytes``); more are refused with 413.
        body_timeout_s: how long a request's body may take to arrive before 408 (connection closed).

    Raises:
        ConfigError: an argument out of range.
        IndexNotFoundError, IndexFormatError, WeightsNotFoundError: the index cannot be opened.
    """
    limits = _Limits(max_upload_bytes, default_k, max_pixels, max_concurrent, busy_timeout_s, max_photos,
                     body_timeout_s)
    opened = index if isinstance(index, GeoIndex) else open_index(index, **open_kwargs)
    app = _new_app()
    app.state.index = opened
    app.add_middleware(_BodyLimit, limit=max_upload_bytes, timeout_s=body_timeout_s)
    served = _Served(opened, limits, map_source)
    _add_page_routes(app)
    _add_basemap_route(app, served)
    _add_health_routes(app, served)
    _add_locate_routes(app, _Locator(served))
    return app


def _new_app() -> FastAPI:
    """The app with its API docs: /docs with Swagger UI's script and style served from the fastapi-offline
    package, not a CDN, without the validator badge (an image from validator.swagger.io); /redoc likewise."""
    app = FastAPIOffline(
        static_url=_DOCS_ASSETS,
        favicon_url="/favicon.ico",
        redoc_url=None,
        swagger_ui_parameters={"validatorUrl": None},
        title="geoindex",
        summary="Photo geolocation by hierarchical retrieval over map-tile indexes",
        description=(
            "Upload a photo to `POST /locate`; the answer is the centre of the best map tile, the "
            "top candidates with probabilities, probability summed over touching tiles (areas), the "
            "per-level trace and timings. Geolocating other people's photos can expose where they live "
            "or go: locate only photos you have the right to."
        ),
        version=_version(),
    )

    @app.get("/redoc", include_in_schema=False)
    def redoc(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "")
        page = get_redoc_html(openapi_url=f"{root}{app.openapi_url}", title="geoindex - ReDoc",
                              redoc_js_url=f"{root}{_DOCS_ASSETS}/redoc.standalone.js", with_google_fonts=False,
                              redoc_favicon_url=f"{root}/favicon.ico")
        # ReDoc's sidebar shows a logo from cdn.redoc.ly, unconditionally: images from elsewhere are refused.
        page.headers["Content-Security-Policy"] = "img-src 'self' data:"
        return page

    return app


class _Served:
    """One opened index and what its requests share: a lock, the decode slots, the imagery (opened at
    the first map or basemap tile), the searchers of recent regions and the basemap tiles drawn."""

    def __init__(self, index: GeoIndex, limits: _Limits, map_source: TileSource | None) -> None:
        self.index, self.limits, self.map_source = index, limits, map_source
        self.lock = threading.Lock()
        self.slots = threading.BoundedSemaphore(limits.max_concurrent)
        self.coverage = Coverage.from_json(index.manifest.coverage)
        self.deepest = index.stored[-1].zoom
        # The basemap's zoom range: the index's levels (lazy ones included) are zooms its imagery has.
        self.basemap_zooms = (index.stored[0].zoom, max(lv.zoom for lv in index.levels))
        self._imagery: TileSource | None = None
        self._imagery_lock = threading.Lock()  # not self.lock: a basemap tile must not wait for a region's masks
        self._region_searcher = functools.lru_cache(maxsize=_REGION_CACHE)(index.within)
        self.basemap_jpeg = functools.lru_cache(maxsize=_BASEMAP_CACHE)(self._basemap_jpeg)

    def imagery(self) -> TileSource:
        """The tile source of maps and basemap tiles, opened once."""
        with self._imagery_lock:
            if self._imagery is None:
                if self.map_source is not None:
                    self._imagery = self.map_source
                else:
                    from geoindex.sources import map_source as index_imagery

                    manifest = self.index.manifest
                    self._imagery = index_imagery(manifest.imagery, imagery_spec=manifest.imagery_spec)
            return self._imagery

    def searcher_for(self, region: Coverage | None) -> Any:
        if region is None:
            return self.index
        with self.lock:  # lru_cache is thread-safe, but would compute the same masks twice under a race
            return self._region_searcher(region)

    def covers(self, position: tuple[float, float]) -> bool:
        """Whether the index's coverage holds a (lat, lon): a photo taken outside it cannot be found."""
        t = mercantile.tile(position[1], position[0], self.deepest)
        return bool(self.coverage.intersects([t.x], [t.y], zoom=self.deepest)[0])

    def _basemap_jpeg(self, tile: mercantile.Tile) -> bytes:
        img = basemap_tile(self.imagery(), tile)
        if img is None:  # raised, not returned: lru_cache keeps no answer, and a source that was down may recover
            raise TileNotFoundError(f"the imagery has no tile {tile.z}/{tile.x}/{tile.y} nor any of its ancestors")
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=_BASEMAP_QUALITY)
        return buf.getvalue()


def _add_page_routes(app: FastAPI) -> None:
    """The web page at ``/``, its vendored map library at ``/vendor`` and its icon."""

    @app.get("/", include_in_schema=False)
    def page() -> HTMLResponse:
        return HTMLResponse(_page())

    app.mount("/vendor", StaticFiles(directory=_VENDOR), name="vendor")

    @app.get("/favicon.ico", include_in_schema=False)
    def favicon() -> Response:
        return Response(_favicon_png(), media_type="image/png", headers={"Cache-Control": "max-age=86400"})


def _add_basemap_route(app: FastAPI, served: _Served) -> None:
    """``GET /tiles/{z}/{x}/{y}.jpg``: the page's basemap, drawn from the index's own imagery."""
    top = served.basemap_zooms[1]

    @app.get(
        "/tiles/{z}/{x}/{y}.jpg",
        summary="A basemap tile rendered from the index's imagery",
        description=(
            "The 256 px JPEG of Web-Mercator tile z/x/y from the imagery the index was built from (where that "
            "imagery is not on this machine, the embedded Blue Marble); where the imagery lacks the tile, the "
            "matching part of an ancestor, upscaled. 404 outside the index's coverage, beyond its deepest "
            "zoom, or where the imagery has nothing. `GET /health` gives the zoom range as `basemap`."
        ),
        responses={200: {"content": {"image/jpeg": {}}, "description": "the tile"},
                   404: {"description": "no imagery for this tile"},
                   503: {"description": "the imagery could not be read"}},
        response_class=Response,
    )
    def basemap(z: int, x: int, y: int) -> Response:
        if not 0 <= z <= top:
            raise HTTPException(404, f"no basemap at zoom {z}: this index's imagery goes from zoom 0 to {top}")
        if not (0 <= x < 1 << z and 0 <= y < 1 << z):
            raise HTTPException(404, f"tile {z}/{x}/{y} is outside the zoom-{z} grid (0 to {(1 << z) - 1})")
        if not served.coverage.intersects([x], [y], zoom=z)[0]:
            raise HTTPException(404, f"tile {z}/{x}/{y} is outside the index's coverage")
        try:
            jpeg = served.basemap_jpeg(mercantile.Tile(x, y, z))
        except TileNotFoundError as e:
            raise HTTPException(404, str(e)) from e
        except GeoIndexError as e:  # an unreadable tile file, say
            log.warning("no basemap tile %d/%d/%d: %s", z, x, y, e)
            raise HTTPException(503, _bounded(str(e)), headers={"Retry-After": "30"}) from e
        return Response(jpeg, media_type="image/jpeg",
                        headers={"Cache-Control": f"public, max-age={_BASEMAP_MAX_AGE_S}"})


def _add_health_routes(app: FastAPI, served: _Served) -> None:
    """``GET /health``: what is served and its limits; ``GET /formats``: the output formats."""
    opened, limits = served.index, served.limits

    @app.get("/health", summary="Liveness and what is being served")
    def health() -> dict[str, Any]:
        calibration = opened.calibration
        return {
            "status": "ok",
            "index": str(opened.path),
            "encoder": opened.manifest.photo_encoder.name,
            "device": str(opened.photo_encoder.device),
            "levels": [{"zoom": s.zoom, "tiles": s.rows} for s in opened.stored],
            "imagery": opened.manifest.imagery,
            "basemap": {"url": "tiles/{z}/{x}/{y}.jpg", "min_native_zoom": served.basemap_zooms[0],
                        "max_native_zoom": served.basemap_zooms[1]},
            "calibrated": calibration is not None,
            "calibration": dataclasses.asdict(calibration.fitted_on) if calibration is not None else None,
            "matches": competence(opened.manifest),
            "max_upload_bytes": limits.max_upload_bytes,
            "default_k": limits.default_k,
            "max_pixels": limits.max_pixels,
            "max_concurrent": limits.max_concurrent,
            "max_photos": limits.max_photos,
        }

    @app.get(
        "/formats",
        summary="The output formats of POST /locate/{format}",
        description=(
            "Each registered output format: `name`, `label`, `media_type`, `extension`, and whether it `streams` "
            "(one result at a time, several photos in one answer) or writes a file; a file format's `field` "
            "is where `POST /locate` with `include_<name>` carries it, and `per_result` says it draws one "
            "photo per file."
        ),
    )
    def formats() -> list[dict[str, Any]]:
        return [f.describe() for f in REGISTRY.values()]


@dataclasses.dataclass(frozen=True)
class _Options:
    """The search options of one ``POST /locate``, the same for each of its photos."""

    k: int
    top_n: int
    ignore_exif: bool
    include: tuple[OutputFormat, ...] = ()  # file formats added to the JSON answer


@dataclasses.dataclass(frozen=True)
class _Found:
    """One photo's result (its EXIF GPS position in ``result.exif``), and when its reading, encoding and search
    ended."""

    result: SearchResult
    marks: tuple[float, float, float]


class _Locator:
    """Answers photos: each is decoded, encoded, searched and drawn inside one of the decode slots."""

    def __init__(self, served: _Served) -> None:
        self.served = served

    def answer(self, upload: UploadFile, data: bytes, searcher: Any, options: _Options,
               started: float) -> dict[str, Any]:
        """One photo's JSON answer; HTTPException (400, 413, 422, 503) with the reason when it has none."""
        out, found = self.find(upload, data, searcher, options, lambda found: self._record(found, data, options))
        read_s, encoded_s, searched_s = found.marks
        out["timings"] = {
            "read_ms": (read_s - started) * 1e3,
            "encode_ms": (encoded_s - read_s) * 1e3,
            "search_ms": (searched_s - encoded_s) * 1e3,
            **out.pop("_drawn_ms"),
            "total_ms": (time.perf_counter() - started) * 1e3,
        }
        log.info("located %s in %.0f ms", found.result.image, out["timings"]["total_ms"])
        return out

    def find(self, upload: UploadFile, data: bytes, searcher: Any, options: _Options,
             then: Callable[[_Found], _T]) -> tuple[_T, _Found]:
        """Decode, encode and search one photo, then ``then`` of what was found, all in a decode slot."""
        name = upload.filename or "upload"
        if not data:
            raise HTTPException(400, f"{name}: the uploaded file is empty")
        read_s = time.perf_counter()
        # Decoding, encoding, searching (lazy levels score up to 16k candidates per photo) and the map
        # (which decodes the upload again) all run in the slot, so that --max-concurrent bounds memory.
        with self._slot(data):
            xq, gps = self._embed(upload, name, data, searcher, options.ignore_exif)
            encoded_s = time.perf_counter()
            result = self._search(name, searcher, xq, options)
            found = _Found(dataclasses.replace(result, exif=gps), (read_s, encoded_s, time.perf_counter()))
            return then(found), found

    @contextlib.contextmanager
    def _slot(self, data: bytes) -> Iterator[None]:
        if not self.served.slots.acquire(timeout=self.served.limits.busy_timeout_s):
            raise HTTPException(503, f"busy: {self.served.limits.max_concurrent} photos are being decoded and encoded; "
                                     "retry shortly", headers={"Retry-After": "1"})
        pixels = _declared_pixels(data)
        try:
            yield
        finally:
            if _TRIM_AFTER_PIXELS <= pixels <= self.served.limits.max_pixels:
                # Each request thread frees its decode buffers into its own malloc arena, where they stay:
                # without this, 8 threads each keep their largest image's memory after the burst.
                _trim_heap()
            self.served.slots.release()

    def _embed(self, upload: UploadFile, name: str, data: bytes, searcher: Any,
               ignore_exif: bool) -> tuple[Any, tuple[float, float] | None]:
        """The photo's embedding and EXIF GPS position; HTTPException 400 or 413 when it cannot be read."""
        gps = None
        try:
            photo = load_image(data, max_pixels=self.served.limits.max_pixels)
            xq = searcher.embed([photo])
            del photo
            if not ignore_exif:
                try:  # in the slot: reading metadata can decode the image again
                    gps = read_gps(data)
                except GeoIndexError:  # the image decoded above; a second failure only loses the GPS
                    gps = None
        except ImageError as e:
            if isinstance(e.__cause__, UnidentifiedImageError):
                raise HTTPException(400, f"{name}: not an image: {_upload_kind(data, upload.content_type)}; "
                                         f"send a {_ACCEPTED} photo") from e
            # Pillow names the in-memory buffer by its address; that says nothing to the client.
            reason = re.sub(r"<_io\.BytesIO object at 0x[0-9a-fA-F]+>", "the upload", str(e))
            status = 413 if isinstance(e, ImageTooLargeError) else 400
            raise HTTPException(status, f"{name}: {reason}") from e
        return xq, gps

    @staticmethod
    def _search(name: str, searcher: Any, xq: Any, options: _Options) -> SearchResult:
        try:
            return cast(SearchResult, searcher.search_embeddings(xq, options.k, top_n=options.top_n, names=[name])[0])
        except ConfigError as e:  # e.g. the region holds tiles at no level for this query
            raise HTTPException(422, str(e)) from e
        except GeoIndexError as e:  # a lazy level's tile source failed, or the index on disk is damaged
            log.error("search failed for %s: %s", name, e)
            retry = {"Retry-After": "30"} if isinstance(e, LazyLevelError) else None
            raise HTTPException(503, _bounded(str(e)), headers=retry) from e

    def _record(self, found: _Found, data: bytes, options: _Options) -> dict[str, Any]:
        """The JSON answer of one photo, with the file formats it asked for (their times in ``_drawn_ms``)."""
        out = result_to_dict(found.result, top_n=options.top_n, trace=True)
        if found.result.exif is not None:
            out["exif"]["in_coverage"] = self.served.covers(found.result.exif)
        out["k"] = options.k
        inputs = FileInputs(photos=[data], imagery=self.served.imagery)
        drawn: dict[str, float] = {}
        for fmt in options.include:
            began = time.perf_counter()
            try:
                out[fmt.answer_field] = fmt.json_value(found.result, inputs)
            except GeoIndexError as e:  # the answer stands without this file
                log.warning("no %s for %s: %s", fmt.name, found.result.image, e)
                out[f"{fmt.name}_error"] = str(e)
            drawn[f"{fmt.name}_ms"] = (time.perf_counter() - began) * 1e3
        out["_drawn_ms"] = drawn
        return out

    def file(self, fmt: OutputFormat, uploads: list[tuple[UploadFile, bytes]], searcher: Any,
             options: _Options) -> bytes:
        """The bytes of ``fmt`` for the photos: a stream format writes each answer or failure in turn; a file
        format holds every photo (a photo without an answer is the response's error)."""
        if fmt.writer is not None:
            out = io.StringIO()
            writer = fmt.writer(out, top_n=options.top_n, trace=True)
            for upload, data in uploads:
                try:
                    found = self.find(upload, data, searcher, options, lambda found: found)[1]
                except HTTPException as e:
                    if len(uploads) == 1:
                        raise
                    writer.failure(upload.filename or "upload", str(e.detail))
                    continue
                writer.result(found.result)
            writer.close()
            return out.getvalue().encode()
        if fmt.per_result:  # one photo, drawn inside its decode slot (a map decodes the upload again)
            if len(uploads) > 1:
                raise HTTPException(422, f"format {fmt.name!r} draws one photo per file: send one photo per request")
            ((upload, data),) = uploads
            return self.find(upload, data, searcher, options, lambda found: self._encoded(fmt, [found], [data]))[0]
        found_all = [self.find(upload, data, searcher, options, lambda found: found)[1] for upload, data in uploads]
        return self._encoded(fmt, found_all, [data for _, data in uploads])

    def _encoded(self, fmt: OutputFormat, found_all: list[_Found], photos: list[bytes]) -> bytes:
        """The file of ``fmt`` for the photos found; 503 when its imagery cannot be read."""
        inputs = FileInputs(photos=photos, imagery=self.served.imagery)
        assert fmt.encode is not None
        try:
            return fmt.encode([f.result for f in found_all], inputs).data
        except GeoIndexError as e:  # the imagery of a map could not be read
            log.warning("no %s: %s", fmt.name, e)
            raise HTTPException(503, _bounded(str(e)), headers={"Retry-After": "30"}) from e


_T = TypeVar("_T")
_LOCATE_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: {"description": "unreadable image"},
    413: {"description": "upload too large, too many pixels, or too many photos"},
    422: {"description": "invalid parameter (k, top_n, bbox)"},
    408: {"description": "the request body did not arrive in time"},
    503: {"description": "busy: every slot is taken, or the lazy levels' tile source failed; "
                         "retry after Retry-After seconds"},
}


def _add_locate_routes(app: FastAPI, locator: _Locator) -> None:
    """``POST /locate`` (the JSON answer, with ``include_<format>`` for each file format) and
    ``POST /locate/{format}`` (the answer in any registered format)."""
    served = locator.served
    limits = served.limits
    includes = {f"include_{f.name}": f for f in file_formats()}

    def prepare(image: list[UploadFile], bbox: str | None) -> Any:
        if len(image) > limits.max_photos:
            raise HTTPException(413, f"{len(image)} photos in one request; at most {limits.max_photos} "
                                     "(--max-photos): send the rest in another request")
        try:
            return served.searcher_for(_parse_bbox(bbox) if bbox else None)
        except ConfigError as e:
            raise HTTPException(422, str(e)) from e

    def read(upload: UploadFile) -> bytes:
        return upload.file.read(limits.max_upload_bytes + 1)

    def locate(
        image: Annotated[list[UploadFile], File(description="the photo (JPEG, PNG, WebP, TIFF, ...); "
                                                            "repeat the part for several")],
        k: Annotated[int, Form(ge=1, le=MAX_K, description="beam width: tiles kept per level")] = limits.default_k,
        top_n: Annotated[int, Form(ge=1, le=MAX_TOP_N, description="candidates and areas returned")] = 5,
        bbox: Annotated[str | None, Form(description="restrict to this area: 'W,S,E,N' in degrees")] = None,
        ignore_exif: Annotated[bool, Form(description="do not read or report the photo's EXIF GPS")] = False,
        **include: bool,
    ) -> dict[str, Any]:
        started = time.perf_counter()
        searcher = prepare(image, bbox)
        options = _Options(k, top_n, ignore_exif, tuple(f for key, f in includes.items() if include.get(key)))
        if len(image) == 1:
            return locator.answer(image[0], read(image[0]), searcher, options, started)
        results: list[dict[str, Any]] = []
        for upload in image:
            try:
                results.append(locator.answer(upload, read(upload), searcher, options, time.perf_counter()))
            except HTTPException as e:  # this photo's failure is its own; the others are answered
                results.append({"image": upload.filename or "upload", "error": e.detail, "status": e.status_code})
        log.info("located %d of %d photos in %.0f ms", sum("error" not in r for r in results), len(results),
                 (time.perf_counter() - started) * 1e3)
        return {"results": results, "k": k}

    _with_include_fields(locate, includes)  # before FastAPI reads the signature
    app.post("/locate", summary="Geolocate one photo, or several in one request", description=(
        "One `image` part: the answer for that photo (an error is the response's status). Several `image` "
        f"parts (at most {limits.max_photos}, all together within the upload limit): `{{\"results\": [...]}}`, "
        "one item per photo in order, each the answer or `{\"image\", \"error\", \"status\"}` for a photo "
        "that has none; the others are still answered and the response is 200."
    ), responses=_LOCATE_RESPONSES)(locate)

    @app.post("/locate/{format}", summary="Geolocate photos, the answer in one output format (GET /formats)",
              responses={**_LOCATE_RESPONSES, 404: {"description": "no such format"}}, response_class=Response)
    def locate_as(
        format: str,
        image: Annotated[list[UploadFile], File(description="the photo; repeat the part for several")],
        k: Annotated[int, Form(ge=1, le=MAX_K, description="beam width: tiles kept per level")] = limits.default_k,
        top_n: Annotated[int, Form(ge=1, le=MAX_TOP_N, description="candidates and areas returned")] = 5,
        bbox: Annotated[str | None, Form(description="restrict to this area: 'W,S,E,N' in degrees")] = None,
        ignore_exif: Annotated[bool, Form(description="do not read or report the photo's EXIF GPS")] = False,
    ) -> Response:
        fmt = REGISTRY.get(format)
        if fmt is None:
            raise HTTPException(404, f"no output format {format!r}; GET /formats lists them: {', '.join(REGISTRY)}")
        searcher = prepare(image, bbox)
        data = locator.file(fmt, [(u, read(u)) for u in image], searcher, _Options(k, top_n, ignore_exif))
        return Response(data, media_type=fmt.media_type)


def _with_include_fields(handler: Callable[..., Any], includes: dict[str, OutputFormat]) -> None:
    """Give ``handler``'s ``**include`` one boolean form field per file format, as FastAPI reads its signature."""
    signature = inspect.signature(handler)
    fixed = [p for p in signature.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
    extra = [
        inspect.Parameter(key, inspect.Parameter.KEYWORD_ONLY, default=False, annotation=Annotated[
            bool, Form(description=f"add `{fmt.answer_field}`: {fmt.label}")])
        for key, fmt in includes.items()
    ]
    handler.__signature__ = signature.replace(parameters=fixed + extra)  # type: ignore[attr-defined]


def competence(manifest: Manifest) -> str:
    """What the index's encoders were trained to match, in words, for the page."""
    name = manifest.photo_encoder.name
    tuned = [lv.zoom for lv in manifest.levels if lv.encoder is not None and lv.encoder.checkpoint_sha256]
    if not tuned:
        return (f"The map encoders are the untrained {name} network, the same as the photo encoder: it matches "
                "pictures that look like the map tiles (satellite views), not ground photos.")
    return (f"The map encoders of zoom {', '.join(map(str, tuned))} are fine-tuned {name} checkpoints; they match "
            "what they were trained on: ground photos to tiles when trained on photo/tile pairs (pipelines.train), "
            "satellite views to tiles when trained on views (pipelines.experiment).")


def app_from_env() -> FastAPI:
    """An app over ``$GEOINDEX_INDEX`` (else ``indexes/default``), for ``uvicorn --factory``."""
    return create_app(os.environ.get(INDEX_ENV) or DEFAULT_INDEX)


def _version() -> str:
    from geoindex import __version__

    return __version__


@functools.cache
def _page() -> str:
    """The web page: one static file shipped in the package."""
    from importlib.resources import files

    return files("geoindex").joinpath("static/index.html").read_text(encoding="utf-8")


def _bounded(text: str) -> str:
    """``text`` cut to _DETAIL_CHARS characters (an error listing every bad tile runs to 10 KB)."""
    return text if len(text) <= _DETAIL_CHARS else text[:_DETAIL_CHARS] + f"... ({len(text)} characters)"


