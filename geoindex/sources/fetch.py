"""Copy tiles from any source into a local ``{z}/{x}/{y}.{ext}`` folder: concurrent, resumable, validated.

Tiles a source does not have are listed in ``missing.json`` so that a rerun does not ask again.
"""

from __future__ import annotations

import io
import json
import logging
import os
import time
from collections import Counter
from collections.abc import Iterable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import mercantile

from geoindex.errors import ConfigError, GeoIndexError, ImageError, TileNotFoundError, TileSourceError
from geoindex.files import atomic_write_bytes
from geoindex.sources.base import ByteTileSource, TileSource, check_tile, image_extension
from geoindex.sources.folder import stored_tile_path

__all__ = ["MISSING_FILE", "FetchSummary", "ProgressBar", "fetch_to_directory"]

log = logging.getLogger(__name__)

MISSING_FILE = "missing.json"


class ProgressBar(Protocol):
    """The part of a ``tqdm`` bar that :func:`fetch_to_directory` uses; pipelines pass a tqdm bar."""

    def reset(self, total: float | None = None) -> None: ...

    def update(self, n: float | None = 1) -> bool | None: ...

    def set_postfix(self, ordered_dict: Any = None, refresh: bool | None = True, **kwargs: Any) -> None: ...


class _NoProgress:
    """A progress bar that shows nothing."""

    def reset(self, total: float | None = None) -> None:
        pass

    def update(self, n: float | None = 1) -> bool | None:
        return None

    def set_postfix(self, ordered_dict: Any = None, refresh: bool | None = True, **kwargs: Any) -> None:
        pass


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
        # two significant digits below 10/s: one slow tile is 0.033 tiles/s, not 0.0
        rate_text = f"{rate:.1f}" if rate >= 10 else f"{rate:.2g}"
        return (
            f"{self.total} tiles: {self.fetched} fetched, {self.skipped} already stored, "
            f"{self.missing} missing, {self.failed} failed in {self.seconds:.1f} s ({rate_text} tiles/s)"
        )


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
            check_tile(stored.read_bytes(), what=str(stored))
            return "skipped"
        except ImageError as e:
            log.warning("%s; fetching it again", e)
    data = _tile_bytes(source, tile)
    ext = image_extension(data, what=f"{source.name} tile {tuple(tile)}")
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


class _Tally:
    """The outcome of each fetched tile: counted, shown on the bar, and kept in the missing list."""

    def __init__(self, bar: ProgressBar, known_missing: set[mercantile.Tile]) -> None:
        self.bar, self.known_missing = bar, known_missing
        self.counts: Counter[str] = Counter()
        self.failures: list[tuple[mercantile.Tile, str]] = []

    def finish(self, fut: Future[str], tile: mercantile.Tile) -> None:
        try:
            self.counts[fut.result()] += 1
            self.known_missing.discard(tile)
        except TileNotFoundError:
            self.counts["missing"] += 1
            self.known_missing.add(tile)
        except GeoIndexError as e:
            self.counts["failed"] += 1
            self.failures.append((tile, str(e)))
            log.warning("tile %s failed: %s", tuple(tile), e)
        self.bar.update(1)
        self.bar.set_postfix(done=self.counts["fetched"] + self.counts["skipped"], missing=self.counts["missing"],
                             failed=self.counts["failed"], refresh=False)


def fetch_to_directory(
    source: TileSource,
    root: str | os.PathLike[str],
    tiles: Iterable[mercantile.Tile],
    *,
    total: int | None = None,
    workers: int = 8,
    retry_missing: bool = False,
    progress: ProgressBar | None = None,
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
        progress: a bar (tqdm) to advance per tile and annotate with done/missing/failed counts.

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
    start = time.monotonic()
    bar: ProgressBar = progress if progress is not None else _NoProgress()
    if total is not None:
        bar.reset(total=total)
    tally = _Tally(bar, known_missing)

    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="fetch")
    pending: dict[Future[str], mercantile.Tile] = {}
    try:
        for tile in tiles:
            if tile in known_missing and not retry_missing:
                tally.counts["missing"] += 1
                bar.update(1)
                continue
            pending[pool.submit(_fetch_one, source, root, tile)] = tile
            # Bound the queue: a world-wide level has millions of tiles.
            if len(pending) >= 4 * workers:
                done, _ = wait(pending, return_when=FIRST_COMPLETED)
                for fut in done:
                    tally.finish(fut, pending.pop(fut))
        for fut in list(pending):
            tally.finish(fut, pending.pop(fut))
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        if known_missing != missing_before:
            _write_missing(missing_path, known_missing)
    counts = tally.counts
    summary = FetchSummary(
        total=sum(counts.values()),
        fetched=counts["fetched"],
        skipped=counts["skipped"],
        missing=counts["missing"],
        failed=counts["failed"],
        seconds=time.monotonic() - start,
        failures=tuple(tally.failures),
    )
    log.debug("%s from %s -> %s", summary.line(), source.name, root)
    return summary
