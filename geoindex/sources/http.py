"""XYZ tiles over HTTP: a URL template or an xyzservices provider, with retries, backoff and a rate limit.

``HttpSource`` downloads tiles with retries, backoff, Retry-After, a shared rate limit and full
image validation: a truncated body or an error page served with status 200 is never returned.
"""

from __future__ import annotations

import email.utils
import importlib.metadata
import logging
import random
import socket
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import mercantile
import requests
import urllib3.exceptions
import xyzservices.providers
from PIL import Image
from requests.adapters import HTTPAdapter
from xyzservices import TileProvider

from geoindex.errors import ConfigError, ImageError, TileNotFoundError, TileSourceError
from geoindex.imagery import decode_tile
from geoindex.sources.base import ClosingSource, Scheme, SourceKind, after_colon, check_tile

__all__ = ["KIND", "USER_AGENT", "HttpSource", "open_provider", "query_provider"]

log = logging.getLogger(__name__)

try:
    _VERSION = importlib.metadata.version("geoindex")
except importlib.metadata.PackageNotFoundError:  # running from a source tree that was never installed
    _VERSION = "0+unknown"
USER_AGENT = f"geoindex/{_VERSION} (+https://github.com/geoindex/geoindex)"

_DNS_FAILURE = "the host name does not resolve"
_RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})
_MISSING_STATUSES = frozenset({204, 404})
# Failures of the connection or of reading the body; a later attempt may well succeed.
_TRANSIENT_ERRORS = (
    requests.ConnectionError,
    requests.Timeout,
    requests.exceptions.ChunkedEncodingError,
    requests.exceptions.ContentDecodingError,
)


# urllib3 2.x names a failed DNS lookup; 1.x leaves only the socket.gaierror in the chain.
_NAME_ERRORS: tuple[type[BaseException], ...] = (
    socket.gaierror, *((urllib3.exceptions.NameResolutionError,)
                       if hasattr(urllib3.exceptions, "NameResolutionError") else ()))


def _is_dns_failure(error: BaseException) -> bool:
    """True when a failed request's cause, anywhere in its chain, is a host name that did not resolve."""
    pending, seen = [error], set()
    while pending:
        e = pending.pop()
        if id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, _NAME_ERRORS):
            return True
        pending += [x for x in (e.__cause__, e.__context__, getattr(e, "reason", None), *e.args)
                    if isinstance(x, BaseException)]
    return False


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


@dataclass
class _RetryDelays:
    """How long to wait before retry ``attempt``: the server's Retry-After (capped), else exponential
    backoff with "equal jitter" (half fixed, half random, capped)."""

    backoff: float
    max_backoff: float
    max_retry_after: float
    rng: random.Random

    def before_retry(self, attempt: int, retry_after: float | None) -> float:
        if retry_after is not None:
            return min(retry_after, self.max_retry_after)
        cap = min(self.max_backoff, self.backoff * 2.0**attempt)
        return cap / 2.0 + self.rng.uniform(0.0, cap / 2.0)


class HttpSource(ClosingSource):
    """XYZ tiles from an HTTP server, with retries, backoff, Retry-After, rate limit and validation.

    The URL template uses ``{z}``, ``{x}``, ``{y}`` (XYZ, y from the north), optionally ``{s}``
    (a subdomain, chosen deterministically per tile so that caches stay warm) and ``{q}`` (the
    tile's quadkey). Every response body is decoded completely before it is returned, so a
    truncated download or an HTML error page served with status 200 is retried, never stored.

    ``spec`` is the template itself, or ``xyz:PROVIDER?options`` for a provider's source. It
    names the tiles, not how they are fetched: timeouts, retries, rate limit and non-default
    subdomains are not part of it. It keeps API keys (``name`` hides them).
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
        self._spec = template
        self.timeout = timeout
        self.max_retries = max_retries
        self._delays = _RetryDelays(backoff, max_backoff, max_retry_after, random.Random(seed))
        self._sleep = sleep
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
        tp = query_provider(provider)
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
        source = cls(template, **kwargs)
        options = urlencode(sorted(dict(provider_options or {}).items()))
        source._spec = f"xyz:{tp.name}" + (f"?{options}" if options else "")
        return source

    @property
    def spec(self) -> str:
        """The URL template, or ``xyz:PROVIDER?options``: what ``open_source`` reopens this source from."""
        return self._spec

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
        unresolved = 0
        for attempt in range(self.max_retries + 1):
            if self._limiter is not None:
                self._limiter.acquire()
            data, reason, retry_after = self._attempt(url, shown)
            if data is not None:
                return data
            unresolved = unresolved + 1 if reason == _DNS_FAILURE else 0
            if unresolved == 2:  # once may be a resolver's hiccup; twice, more retries will not find the host
                host = urlsplit(url).hostname
                raise TileSourceError(
                    f"{shown}: cannot resolve the host name {host!r} (DNS lookup failed twice): check the host "
                    "in --source for a typo, and that this machine is online (a proxy or DNS server may be needed)"
                )
            if attempt < self.max_retries:
                delay = self._delays.before_retry(attempt, retry_after)
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
            return None, _DNS_FAILURE if _is_dns_failure(e) else f"{type(e).__name__}: {e}", None
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
            check_tile(resp.content, what=shown)
        except ImageError as e:
            return None, str(e), None
        return resp.content, "", None

    def get(self, tile: mercantile.Tile) -> Image.Image:
        """The tile as an RGB image (see :meth:`fetch_bytes` for errors)."""
        return decode_tile(self.fetch_bytes(tile), what=_redact(self.url(tile)))

    def close(self) -> None:
        """Close the HTTP connections."""
        self._session.close()


def query_provider(name: str) -> TileProvider | None:
    try:
        return xyzservices.providers.query_name(name)
    except ValueError:
        return None


def open_provider(spec: str, http_options: Mapping[str, Any]) -> HttpSource:
    """The source of ``PROVIDER`` or ``PROVIDER?option=value&...`` (the part after ``xyz:``)."""
    name, _, query = spec.partition("?")
    return HttpSource.from_provider(name, provider_options=dict(parse_qsl(query)), **http_options)


KIND = SourceKind(
    schemes={
        "http": Scheme(lambda spec, options: HttpSource(spec, **options), local=False),
        "https": Scheme(lambda spec, options: HttpSource(spec, **options), local=False),
        "xyz": Scheme(lambda spec, options: open_provider(after_colon(spec), options), local=False),
    },
    forms=("an http(s) URL template with {z}/{x}/{y} or {q} (e.g. 'https://tile.example.com/{z}/{x}/{y}.png'), "
           "'xyz:PROVIDER' or a bare xyzservices provider name (e.g. 'Esri.WorldImagery', options as "
           "'xyz:PROVIDER?apikey=KEY')"),
    guess=lambda spec, options: (open_provider(spec, options) if not Path(spec).exists()
                                 and query_provider(spec.partition("?")[0]) is not None else None),
    guess_rank=30,
)
