"""Tile sources beyond local files (HTTP servers, MBTiles), a ``--source`` factory, and a fetch loop.

``HttpSource`` downloads XYZ tiles from a URL template or an xyzservices provider with
retries, backoff, Retry-After, a shared rate limit and full image validation.
``MBTilesSource`` reads an MBTiles (sqlite) archive. ``open_source`` turns a user's
``--source`` string into a tile source. ``fetch_to_directory`` copies tiles from any source
into a ``{z}/{x}/{y}.{ext}`` store that ``geoindex.imagery.DirectorySource`` reads.
"""

from __future__ import annotations

import contextlib
import email.utils
import importlib.metadata
import io
import json
import logging
import os
import random
import sqlite3
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import mercantile
import requests
import xyzservices.providers
from PIL import Image, UnidentifiedImageError
from requests.adapters import HTTPAdapter
from tqdm import tqdm
from xyzservices import TileProvider

from geoindex.errors import ConfigError, GeoIndexError, ImageError, TileNotFoundError, TileSourceError
from geoindex.files import atomic_path, atomic_write_bytes
from geoindex.imagery import DirectorySource, RasterSource, TileSource, decode_tile

__all__ = [
    "TILE_EXTENSIONS",
    "ByteTileSource",
    "FetchSummary",
    "HttpSource",
    "MBTilesSource",
    "fetch_to_directory",
    "map_source",
    "open_source",
    "stored_tile_path",
    "write_mbtiles",
]

log = logging.getLogger(__name__)

try:
    _VERSION = importlib.metadata.version("geoindex")
except importlib.metadata.PackageNotFoundError:  # running from a source tree that was never installed
    _VERSION = "0+unknown"
USER_AGENT = f"geoindex/{_VERSION} (+https://github.com/geoindex/geoindex)"

# Pillow format name -> file extension. DirectorySource reads one extension per store.
_FORMAT_EXTENSIONS = {"JPEG": "jpeg", "PNG": "png", "WEBP": "webp"}
TILE_EXTENSIONS = tuple(_FORMAT_EXTENSIONS.values())
MISSING_FILE = "missing.json"

_RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})
_MISSING_STATUSES = frozenset({204, 404})
# Failures of the connection or of reading the body; a later attempt may well succeed.
_TRANSIENT_ERRORS = (
    requests.ConnectionError,
    requests.Timeout,
    requests.exceptions.ChunkedEncodingError,
    requests.exceptions.ContentDecodingError,
)


def _image_extension(data: bytes, *, what: str) -> str:
    """File extension for encoded tile bytes from their header alone (no full decode)."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            fmt = img.format or "?"
    except (UnidentifiedImageError, OSError) as e:
        raise ImageError(f"{what}: not a readable image ({e})") from e
    if fmt not in _FORMAT_EXTENSIONS:
        raise ImageError(f"{what}: unsupported tile format {fmt}; expected one of JPEG, PNG, WEBP")
    return _FORMAT_EXTENSIONS[fmt]


def _check_tile(data: bytes, *, what: str) -> str:
    """Decode ``data`` completely (catching truncation) and return its file extension; ImageError if bad."""
    ext = _image_extension(data, what=what)
    decode_tile(data, what=what)
    return ext


@runtime_checkable
class ByteTileSource(TileSource, Protocol):
    """A tile source that can also return a tile's original encoded bytes (validated)."""

    def fetch_bytes(self, tile: mercantile.Tile) -> bytes:
        """The tile's encoded image; TileNotFoundError if absent, TileSourceError on failure."""
        ...


class _TokenBucket:
    """Thread-safe rate limit: at most ``rate`` acquisitions per second, bursts of ``burst``.

    A caller reserves its slot under the lock and sleeps outside it, so concurrent callers
    queue up behind each other instead of all waking at once.
    """

    def __init__(
        self, rate: float, *, burst: int, clock: Callable[[], float], sleep: Callable[[float], None]
    ) -> None:
        self._rate = rate
        self._burst = float(burst)
        self._clock = clock
        self._sleep = sleep
        self._tokens = float(burst)
        self._last = clock()
        self._lock = threading.Lock()

    def acquire(self) -> None:
        with self._lock:
            now = self._clock()
            self._tokens = min(self._burst, self._tokens + (now - self._last) * self._rate)
            self._last = now
            self._tokens -= 1.0
            wait_s = -self._tokens / self._rate if self._tokens < 0 else 0.0
        if wait_s > 0:
            self._sleep(wait_s)


def _parse_retry_after(value: str | None, *, now: float) -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds or HTTP date); None if absent/invalid."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - now)


def _redact(url: str) -> str:
    """The URL with the values of key/token query parameters hidden, for names and messages."""
    parts = urlsplit(url)
    if not parts.query:
        return url
    query = [
        (k, "***" if any(word in k.lower() for word in ("key", "token")) else v)
        for k, v in parse_qsl(parts.query, keep_blank_values=True)
    ]
    # safe="{}" keeps template placeholders such as {z} readable.
    return urlunsplit(parts._replace(query=urlencode(query, safe="{}*")))


class HttpSource:
    """XYZ tiles from an HTTP server, with retries, backoff, Retry-After, rate limit and validation.

    The URL template uses ``{z}``, ``{x}``, ``{y}`` (XYZ, y from the north), optionally ``{s}``
    (a subdomain, chosen deterministically per tile so that caches stay warm) and ``{q}`` (the
    tile's quadkey). Every response body is decoded completely before it is returned, so a
    truncated download or an HTML error page served with status 200 is retried, never stored.
    """

    def __init__(
        self,
        template: str,
        *,
        subdomains: Iterable[str] = "abc",
        name: str | None = None,
        timeout: float = 10.0,
        max_retries: int = 5,
        backoff: float = 0.5,
        max_backoff: float = 60.0,
        max_retry_after: float = 120.0,
        max_rps: float | None = None,
        pool_size: int = 16,
        session: requests.Session | None = None,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
        seed: int | None = None,
    ) -> None:
        """Create a source; nothing is requested until the first tile.

        Args:
            template: URL with ``{z}``, ``{x}``, ``{y}`` or ``{q}``, optionally ``{s}``.
            subdomains: values for ``{s}``; a string means one subdomain per character.
            name: label recorded in manifests; by default the template with keys hidden.
            timeout: seconds to wait for the server to connect and to send data.
            max_retries: further attempts after the first for retryable failures.
            backoff: base delay in seconds; attempt i waits about ``backoff * 2**i`` (jittered).
            max_backoff: cap on one backoff delay in seconds.
            max_retry_after: cap on a server's Retry-After in seconds.
            max_rps: requests per second across all threads using this source; None = unlimited.
            pool_size: HTTP connections kept open; at least the number of fetching threads.
            session: a ``requests.Session`` to use instead of a new one (tests, proxies, auth).
            sleep: the sleep function used for backoff and rate limiting (tests pass a fake).
            clock: monotonic clock in seconds used by the rate limiter (tests pass a fake).
            seed: seed of the backoff jitter, for reproducible delays.
        """
        if not (all(p in template for p in ("{z}", "{x}", "{y}")) or "{q}" in template):
            raise ConfigError(
                f"tile URL template {_redact(template)!r} needs {{z}}, {{x}} and {{y}} "
                "(or {q} for a quadkey); e.g. --source 'https://tile.example.com/{z}/{x}/{y}.png'"
            )
        self.subdomains = tuple(subdomains)
        if "{s}" in template and not self.subdomains:
            raise ConfigError(
                f"tile URL template {_redact(template)!r} uses {{s}} but no subdomains were given"
            )
        if timeout <= 0 or max_retries < 0 or backoff < 0:
            raise ConfigError(
                f"need timeout > 0, max_retries >= 0 and backoff >= 0; got timeout={timeout}, "
                f"max_retries={max_retries}, backoff={backoff} (--timeout, --retries)"
            )
        if max_rps is not None and max_rps <= 0:
            raise ConfigError(f"max_rps must be > 0 or None for unlimited, got {max_rps} (--max-rps)")
        self.template = template
        self.name = name or _redact(template)
        self.timeout = timeout
        self.max_retries = max_retries
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.max_retry_after = max_retry_after
        self._sleep = sleep
        self._rng = random.Random(seed)
        self._limiter = (
            _TokenBucket(max_rps, burst=max(1, int(max_rps)), clock=clock, sleep=sleep) if max_rps else None
        )
        if session is None:
            session = requests.Session()
            # requests' own retries stay off (the default): fetch_bytes decides what to retry.
            adapter = HTTPAdapter(pool_connections=4, pool_maxsize=pool_size)
            session.mount("http://", adapter)
            session.mount("https://", adapter)
        session.headers["User-Agent"] = USER_AGENT
        self._session = session

    @classmethod
    def from_provider(
        cls, provider: str, *, provider_options: Mapping[str, str] | None = None, **kwargs: Any
    ) -> HttpSource:
        """A source for an xyzservices provider such as ``"Esri.WorldImagery"``.

        Args:
            provider: the provider's dotted name (case-insensitive).
            provider_options: values for the provider's placeholders, e.g. ``{"apikey": ...}``.
            **kwargs: passed to :class:`HttpSource` (timeout, max_retries, max_rps, ...).

        Raises:
            ConfigError: unknown provider, or it needs an API key that was not given.
        """
        tp = _query_provider(provider)
        if tp is None:
            raise ConfigError(
                f"unknown xyzservices provider {provider!r}; list them with "
                "`python -c 'import xyzservices.providers as p; print(list(p.flatten()))'`"
            )
        tp = tp(**dict(provider_options or {}))
        if tp.requires_token():
            keys = [k for k, v in tp.items() if isinstance(v, str) and "<insert your" in v]
            example = "&".join(f"{k}=YOUR_{k.upper()}" for k in keys)
            raise ConfigError(
                f"provider {tp.name} needs {', '.join(repr(k) for k in keys)}; pass it as "
                f"--source 'xyz:{tp.name}?{example}' (or provider_options={{{keys[0]!r}: ...}})"
            )
        template = tp.build_url(fill_subdomain=False)
        kwargs.setdefault("subdomains", tp.get("subdomains", "abc"))
        kwargs.setdefault("name", f"xyz:{tp.name}")
        return cls(template, **kwargs)

    def url(self, tile: mercantile.Tile) -> str:
        """The URL of one tile (no request is made)."""
        url = self.template
        for key, value in (("{z}", tile.z), ("{x}", tile.x), ("{y}", tile.y)):
            url = url.replace(key, str(value))
        if "{q}" in url:
            url = url.replace("{q}", mercantile.quadkey(tile))
        if "{s}" in url:
            url = url.replace("{s}", self.subdomains[(tile.x + tile.y) % len(self.subdomains)])
        return url

    def _backoff_delay(self, attempt: int) -> float:
        """Exponential backoff with "equal jitter": half fixed, half random, capped."""
        cap = min(self.max_backoff, self.backoff * 2.0**attempt)
        return cap / 2.0 + self._rng.uniform(0.0, cap / 2.0)

    def fetch_bytes(self, tile: mercantile.Tile) -> bytes:
        """Download one tile's encoded image, retrying transient failures.

        Retried (up to ``max_retries`` times, with backoff or the server's Retry-After):
        HTTP 429/500/502/503/504, timeouts, connection errors, truncated bodies, non-image
        content types and bodies that do not decode completely.

        Returns:
            The encoded image (JPEG, PNG or WebP) exactly as served, decoded once to validate it.

        Raises:
            TileNotFoundError: HTTP 404 or 204 (not retried).
            TileSourceError: any other HTTP error, or retries exhausted; names the URL.
        """
        url = self.url(tile)
        shown = _redact(url)
        reason = ""
        for attempt in range(self.max_retries + 1):
            if self._limiter is not None:
                self._limiter.acquire()
            data, reason, retry_after = self._attempt(url, shown)
            if data is not None:
                return data
            if attempt < self.max_retries:
                if retry_after is None:
                    delay = self._backoff_delay(attempt)
                else:
                    delay = min(retry_after, self.max_retry_after)
                log.debug(
                    "%s: %s; retry %d/%d in %.2f s", shown, reason, attempt + 1, self.max_retries, delay
                )
                self._sleep(delay)
        raise TileSourceError(
            f"{shown}: gave up after {self.max_retries + 1} attempts, last: {reason}; "
            "raise --retries, or lower --max-rps if the server is throttling"
        )

    def _attempt(self, url: str, shown: str) -> tuple[bytes | None, str, float | None]:
        """One request: (body, "", None) on success, else (None, reason, Retry-After seconds or None)."""
        try:
            resp = self._session.get(url, timeout=self.timeout)
        except _TRANSIENT_ERRORS as e:
            return None, f"{type(e).__name__}: {e}", None
        except requests.RequestException as e:
            raise TileSourceError(f"{shown}: request failed ({e})") from e
        status = resp.status_code
        if status in _MISSING_STATUSES:
            raise TileNotFoundError(f"{shown}: HTTP {status}, the server has no such tile")
        if status in _RETRY_STATUSES:
            retry_after = _parse_retry_after(resp.headers.get("Retry-After"), now=time.time())
            return None, f"HTTP {status}", retry_after
        if status != 200:
            hint = "; check the API key or access rights" if status in (401, 403) else ""
            raise TileSourceError(f"{shown}: HTTP {status} {resp.reason}{hint}")
        # An error page served with status 200 is a failure of this attempt, not a tile.
        ctype = resp.headers.get("Content-Type", "").split(";")[0].strip().lower()
        if ctype and not (ctype.startswith("image/") or ctype.endswith("octet-stream")):
            return None, f"unexpected Content-Type {ctype!r}", None
        try:
            _check_tile(resp.content, what=shown)
        except ImageError as e:
            return None, str(e), None
        return resp.content, "", None

    def get(self, tile: mercantile.Tile) -> Image.Image:
        """The tile as an RGB image (see :meth:`fetch_bytes` for errors)."""
        return decode_tile(self.fetch_bytes(tile), what=_redact(self.url(tile)))

    def close(self) -> None:
        """Close the HTTP connections."""
        self._session.close()

    def __enter__(self) -> HttpSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


_MBTILES_QUERY = "SELECT tile_data FROM tiles WHERE zoom_level = ? AND tile_column = ? AND tile_row = ?"


def _tms_row(tile: mercantile.Tile) -> int:
    """MBTiles store rows in TMS order (y from the south)."""
    return (1 << tile.z) - 1 - tile.y


class MBTilesSource:
    """Tiles from an MBTiles archive (sqlite, read-only); safe to share between threads."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.name = f"mbtiles:{self.path}"
        if not self.path.is_file():
            raise ConfigError(f"MBTiles file {self.path} does not exist; check --source")
        try:
            self._db = sqlite3.connect(
                f"{self.path.resolve().as_uri()}?mode=ro", uri=True, check_same_thread=False
            )
            self._db.execute(_MBTILES_QUERY, (0, 0, 0)).fetchall()
        except sqlite3.Error as e:
            raise ConfigError(f"{self.path} is not an MBTiles file ({e}); it needs a 'tiles' table") from e
        self._lock = threading.Lock()  # one sqlite connection; serialise its use across threads

    @property
    def metadata(self) -> dict[str, str]:
        """The archive's ``metadata`` table as a dict (empty if it has none)."""
        with self._lock:
            try:
                return dict(self._db.execute("SELECT name, value FROM metadata").fetchall())
            except sqlite3.Error:
                return {}

    def fetch_bytes(self, tile: mercantile.Tile) -> bytes:
        """The stored encoded image of a tile, validated; TileNotFoundError if absent."""
        with self._lock:
            row = self._db.execute(_MBTILES_QUERY, (tile.z, tile.x, _tms_row(tile))).fetchone()
        if row is None:
            raise TileNotFoundError(f"{self.path}: no tile {tuple(tile)}")
        data = bytes(row[0])
        try:
            _check_tile(data, what=f"{self.path} tile {tuple(tile)}")
        except ImageError as e:
            raise TileSourceError(f"{e}; the archive is damaged") from e
        return data

    def get(self, tile: mercantile.Tile) -> Image.Image:
        """The tile as an RGB image."""
        return decode_tile(self.fetch_bytes(tile), what=f"{self.path} tile {tuple(tile)}")

    def close(self) -> None:
        """Close the database."""
        self._db.close()

    def __enter__(self) -> MBTilesSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def write_mbtiles(
    path: str | os.PathLike[str],
    tiles: Mapping[mercantile.Tile, bytes],
    metadata: Mapping[str, str] | None = None,
) -> Path:
    """Write encoded tiles to a new MBTiles archive atomically (``*.tmp``, then rename).

    Args:
        path: the archive to create; an existing file is replaced.
        tiles: XYZ tile -> encoded image bytes (rows are flipped to TMS on write).
        metadata: the ``metadata`` table; ``name`` and ``format`` default from the path and tiles.

    Returns:
        The archive's path.
    """
    path = Path(path)
    meta = {"name": path.stem, **dict(metadata or {})}
    if "format" not in meta and tiles:
        ext = _image_extension(next(iter(tiles.values())), what=str(path))
        meta["format"] = "jpg" if ext == "jpeg" else ext  # the MBTiles spec's spelling
    with atomic_path(path) as tmp, contextlib.closing(sqlite3.connect(tmp)) as db, db:  # one transaction
        db.execute("CREATE TABLE metadata (name TEXT, value TEXT)")
        db.execute(
            "CREATE TABLE tiles "
            "(zoom_level INTEGER, tile_column INTEGER, tile_row INTEGER, tile_data BLOB)"
        )
        db.execute("CREATE UNIQUE INDEX tile_index ON tiles (zoom_level, tile_column, tile_row)")
        db.executemany("INSERT INTO metadata VALUES (?, ?)", sorted(meta.items()))
        db.executemany(
            "INSERT INTO tiles VALUES (?, ?, ?, ?)",
            ((t.z, t.x, _tms_row(t), sqlite3.Binary(data)) for t, data in tiles.items()),
        )
    return path


_SPEC_FORMS = (
    "an http(s) URL template with {z}/{x}/{y} or {q} (e.g. 'https://tile.example.com/{z}/{x}/{y}.png'), "
    "'xyz:PROVIDER' or a bare xyzservices provider name (e.g. 'Esri.WorldImagery', options as "
    "'xyz:PROVIDER?apikey=KEY'), a path ending in .mbtiles, an existing {z}/{x}/{y}.{ext} directory, "
    "'raster:PATH' (an equirectangular world image) or 'bluemarble' (the embedded Blue Marble)"
)


def _query_provider(name: str) -> TileProvider | None:
    try:
        return xyzservices.providers.query_name(name)
    except ValueError:
        return None


def _provider_source(spec: str, http_options: dict[str, Any]) -> HttpSource:
    name, _, query = spec.partition("?")
    return HttpSource.from_provider(name, provider_options=dict(parse_qsl(query)), **http_options)


def _directory_extension(root: Path) -> str:
    """The tile extension used in a ``{z}/{x}/{y}.{ext}`` store: the first tile file found decides."""
    for z_dir in sorted(p for p in root.iterdir() if p.is_dir() and p.name.isdigit()):
        for x_dir in (p for p in z_dir.iterdir() if p.is_dir()):
            for f in x_dir.iterdir():
                if f.suffix[1:] in TILE_EXTENSIONS:
                    return f.suffix[1:]
    raise ConfigError(f"directory {root} holds no {{z}}/{{x}}/{{y}}.{{ext}} tiles; fetch tiles into it first")


def open_source(spec: str, *, option: str = "--source", **http_options: Any) -> TileSource:
    """Turn a ``--source`` string into a tile source.

    Args:
        spec: one of the forms listed in the ConfigError below (URL template, ``xyz:NAME``,
            provider name, ``*.mbtiles``, tile directory, ``raster:PATH``, ``bluemarble``).
        option: the command-line option that gave ``spec``, named in error messages.
        **http_options: keyword arguments for :class:`HttpSource` (timeout, max_retries,
            max_rps, ...); local sources do not use them.

    Raises:
        ConfigError: the spec matches none of the accepted forms, or its target is invalid or
            cannot be read.
    """
    try:
        return _open_source(spec.strip(), http_options)
    except ConfigError as e:
        if option == "--source":
            raise
        raise ConfigError(str(e).replace("--source", option)) from e
    except (OSError, ImageError) as e:
        reason = f"{e.strerror} ({e.filename})" if isinstance(e, OSError) and e.strerror else str(e)
        raise ConfigError(f"cannot use {option} {spec!r}: {reason}") from e


def _open_source(spec: str, http_options: dict[str, Any]) -> TileSource:
    if spec.startswith(("http://", "https://")):
        return HttpSource(spec, **http_options)
    if spec.startswith("xyz:"):
        return _provider_source(spec[len("xyz:") :], http_options)
    if spec == "bluemarble":
        return RasterSource()
    if spec.startswith("raster:"):
        return RasterSource(spec[len("raster:") :])
    if spec.endswith(".mbtiles"):
        return MBTilesSource(spec)
    path = Path(spec)
    if path.is_dir():
        _directory_extension(path)  # fails clearly on a folder that holds no tiles
        return DirectorySource(path)
    if not path.exists() and _query_provider(spec.partition("?")[0]) is not None:
        return _provider_source(spec, http_options)
    raise ConfigError(f"cannot use --source {spec!r}: expected {_SPEC_FORMS}")


# Maps ask for ~17 tiles after the answer is known: a dead server must cost seconds, not minutes.
MAP_HTTP_OPTIONS: dict[str, Any] = {"timeout": 5.0, "max_retries": 1}


def map_source(imagery: str, spec: str | None = None) -> TileSource:
    """The imagery to draw maps over: ``spec`` if given, else an index's own imagery when local.

    Args:
        imagery: the index manifest's ``imagery`` (a source name such as ``dir:PATH``).
        spec: a ``--map-source`` string for :func:`open_source`, overriding the index's imagery.

    Returns:
        The tile source; the embedded Blue Marble where the index's imagery is remote, gone or unreadable.

    Raises:
        ConfigError: ``spec`` cannot be opened (the message names ``--map-source``).
    """
    if spec:
        return open_source(spec, option="--map-source", **MAP_HTTP_OPTIONS)
    kind, _, where = imagery.partition(":")
    if kind in ("dir", "mbtiles") and Path(where).exists():
        try:
            return open_source(where, option="--map-source")
        except ConfigError as e:
            log.warning("the index's imagery %s cannot be used (%s); drawing over the embedded Blue Marble "
                        "(choose another with --map-source)", where, e)
            return RasterSource()
    if imagery != "raster:bmng.jpg":
        log.info("the index's imagery %r is not local; drawing over the embedded Blue Marble "
                 "(choose another with --map-source)", imagery)
    return RasterSource()


@dataclass(frozen=True)
class FetchSummary:
    """Outcome of :func:`fetch_to_directory`; every requested tile is counted exactly once."""

    total: int
    fetched: int
    skipped: int
    missing: int
    failed: int
    seconds: float
    failures: tuple[tuple[mercantile.Tile, str], ...] = ()

    @property
    def ok(self) -> bool:
        """True when no tile failed (missing tiles are not failures)."""
        return self.failed == 0

    def line(self) -> str:
        """One-line human summary."""
        rate = (self.fetched + self.skipped + self.missing + self.failed) / max(self.seconds, 1e-9)
        return (
            f"{self.total} tiles: {self.fetched} fetched, {self.skipped} already stored, "
            f"{self.missing} missing, {self.failed} failed in {self.seconds:.1f} s ({rate:.1f} tiles/s)"
        )


def stored_tile_path(root: Path, tile: mercantile.Tile) -> Path | None:
    """The stored file of a tile under ``root/{z}/{x}/{y}.{ext}``, whatever its extension; None if absent."""
    base = root / str(tile.z) / str(tile.x)
    for ext in TILE_EXTENSIONS:
        path = base / f"{tile.y}.{ext}"
        if path.is_file():
            return path
    return None


def _write_atomic(path: Path, data: bytes) -> None:
    """Readers see the old file or the complete new one; not fsynced: a tile lost in a crash is fetched again."""
    atomic_write_bytes(path, data, durable=False)


def _tile_bytes(source: TileSource, tile: mercantile.Tile) -> bytes:
    if isinstance(source, ByteTileSource):
        return source.fetch_bytes(tile)
    # Rendered sources (rasters, memory) have no original encoding; PNG keeps their pixels exactly.
    buf = io.BytesIO()
    source.get(tile).save(buf, format="PNG")
    return buf.getvalue()


def _fetch_one(source: TileSource, root: Path, tile: mercantile.Tile) -> str:
    """Store one tile unless a valid copy exists; returns "fetched" or "skipped"."""
    stored = stored_tile_path(root, tile)
    if stored is not None:
        try:
            _check_tile(stored.read_bytes(), what=str(stored))
            return "skipped"
        except ImageError as e:
            log.warning("%s; fetching it again", e)
    data = _tile_bytes(source, tile)
    ext = _image_extension(data, what=f"{source.name} tile {tuple(tile)}")
    path = root / str(tile.z) / str(tile.x) / f"{tile.y}.{ext}"
    _write_atomic(path, data)
    if stored is not None and stored != path:
        stored.unlink(missing_ok=True)  # the damaged copy had another format
    return "fetched"


def _read_missing(path: Path) -> set[mercantile.Tile]:
    if not path.is_file():
        return set()
    try:
        return {mercantile.Tile(x, y, z) for z, x, y in json.loads(path.read_text())["tiles"]}
    except (ValueError, KeyError, TypeError) as e:
        raise TileSourceError(
            f"{path}: unreadable list of missing tiles ({e}); delete it to retry all"
        ) from e


def _write_missing(path: Path, missing: set[mercantile.Tile]) -> None:
    tiles = sorted([t.z, t.x, t.y] for t in missing)
    _write_atomic(path, (json.dumps({"tiles": tiles}) + "\n").encode())


def fetch_to_directory(
    source: TileSource,
    root: str | os.PathLike[str],
    tiles: Iterable[mercantile.Tile],
    *,
    total: int | None = None,
    workers: int = 8,
    retry_missing: bool = False,
    progress: tqdm | None = None,
) -> FetchSummary:
    """Copy tiles from ``source`` into ``root/{z}/{x}/{y}.{ext}``, concurrently and resumably.

    Each tile is validated before it is written (``*.tmp`` then rename). Tiles already stored
    and decodable are skipped; damaged ones are fetched again. Tiles the source does not have
    are listed in ``root/missing.json`` and not requested again unless ``retry_missing``.

    Args:
        source: any tile source; byte sources (HTTP, MBTiles) keep their original encoding,
            others are stored as PNG.
        root: the store's directory (created if needed).
        tiles: the tiles to store, any zooms, in the order to fetch them.
        total: number of tiles, for the progress bar.
        workers: concurrent fetching threads.
        retry_missing: request tiles recorded as missing by an earlier run.
        progress: a tqdm bar to advance per tile and annotate with done/missing/failed counts.

    Returns:
        Counts of fetched, skipped, missing and failed tiles; failures hold (tile, reason).
    """
    if workers < 1:
        raise ConfigError(f"workers must be >= 1, got {workers} (--workers)")
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    missing_path = root / MISSING_FILE
    known_missing = _read_missing(missing_path)
    missing_before = set(known_missing)
    counts: Counter[str] = Counter()
    failures: list[tuple[mercantile.Tile, str]] = []
    start = time.monotonic()
    bar = progress if progress is not None else tqdm(disable=True)
    if total is not None:
        bar.reset(total=total)

    def finish(fut: Future[str], tile: mercantile.Tile) -> None:
        try:
            counts[fut.result()] += 1
            known_missing.discard(tile)
        except TileNotFoundError:
            counts["missing"] += 1
            known_missing.add(tile)
        except GeoIndexError as e:
            counts["failed"] += 1
            failures.append((tile, str(e)))
            log.warning("tile %s failed: %s", tuple(tile), e)
        bar.update(1)
        bar.set_postfix(
            done=counts["fetched"] + counts["skipped"],
            missing=counts["missing"],
            failed=counts["failed"],
            refresh=False,
        )

    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="fetch")
    pending: dict[Future[str], mercantile.Tile] = {}
    try:
        for tile in tiles:
            if tile in known_missing and not retry_missing:
                counts["missing"] += 1
                bar.update(1)
                continue
            pending[pool.submit(_fetch_one, source, root, tile)] = tile
            # Bound the queue: a world-wide level has millions of tiles.
            if len(pending) >= 4 * workers:
                done, _ = wait(pending, return_when=FIRST_COMPLETED)
                for fut in done:
                    finish(fut, pending.pop(fut))
        for fut in list(pending):
            finish(fut, pending.pop(fut))
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        if known_missing != missing_before:
            _write_missing(missing_path, known_missing)
    summary = FetchSummary(
        total=sum(counts.values()),
        fetched=counts["fetched"],
        skipped=counts["skipped"],
        missing=counts["missing"],
        failed=counts["failed"],
        seconds=time.monotonic() - start,
        failures=tuple(failures),
    )
    log.debug("%s from %s -> %s", summary.line(), source.name, root)
    return summary
