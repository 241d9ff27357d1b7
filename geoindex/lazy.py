"""Lazy deep levels: a level's tiles are encoded the first time a query needs them, then kept in the index.

An index declares its deep levels lazy in ``<index>/lazy.json`` (which zooms, the tile source to
fetch from, the map-encoder checkpoint of each zoom). The levels above are built as usual. At search
time a :class:`LazyLevel` takes the surviving parents, lists their children (filtered by the index's
coverage), encodes the ones it has never seen, appends them to the index and scores all of them
exactly, so the answer equals that of a fully built index with the same encoders and imagery.

Layout, beside the regular levels::

    <index>/lazy.json                       which zooms are lazy, source spec, checkpoints
    <index>/lazy/z14/encoder.json           the map encoder's identity (an index never mixes encoders)
    <index>/lazy/z14/seg-<time>-<pid>-<rand>.parquet   appended rows, one file per append
    <index>/lazy/z14/part-g0001-00000.parquet           compacted rows (``compact``)
    <index>/lazy/z14/lock                   an advisory file lock (fcntl) for appends and compaction

Rows are keyed by tile code ``(y << zoom) | x``, not by row order, so they can grow in any order.
Columns: code (int64), x, y (int32), found (bool: False = the source has no such tile, recorded so
it is not fetched again), embedding (fixed_size_list<halffloat>[d]; zeros where not found).

Every file is written to ``*.tmp`` and renamed: a crash loses only the append in flight, never a
committed one, and readers ignore temporary files. Appends hold the level's lock (a threading lock
in the process, an ``flock`` across processes) from "what is missing?" to the rename, so a tile is
encoded once however many threads or processes ask for it at the same time.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.parquet as pq

from geoindex.beam import _top_k
from geoindex.build import encode_tiles
from geoindex.encoders import ImageEncoder, load_map_encoder
from geoindex.errors import (
    ConfigError,
    EncoderMismatchError,
    IndexFormatError,
    IndexNotFoundError,
    LazyLevelError,
)
from geoindex.files import atomic_path, atomic_write_bytes
from geoindex.manifest import Manifest, short_id
from geoindex.sources import TileSource
from geoindex.tiles import children_array, tile_code_array, tile_xy_of_code_array

__all__ = [
    "LAZY_FILE",
    "CompactSummary",
    "LazyConfig",
    "LazyLevel",
    "LazyStore",
    "compact",
    "declare_lazy",
    "open_lazy_levels",
]

log = logging.getLogger(__name__)

LAZY_FILE = "lazy.json"
LAZY_DIR = "lazy"
LAZY_FORMAT = 1
COMPACT_ROWS = 65_536  # rows per compacted shard


@dataclass(frozen=True)
class LazyConfig:
    """Which levels of an index are lazy and where their tiles come from (``<index>/lazy.json``).

    Attributes:
        zooms: the lazy zooms, the tail of the index's schedule after its last built level.
        source: tile source spec (``geoindex.sources.open_source``) to fetch from.
        checkpoints: zoom (as a string) -> map-encoder checkpoint path, or None for the untrained base.
        batch_size: tiles per encoder batch.
    """

    zooms: tuple[int, ...]
    source: str
    checkpoints: dict[str, str | None] = field(default_factory=dict)
    batch_size: int = 64
    format_version: int = LAZY_FORMAT

    def __post_init__(self) -> None:
        object.__setattr__(self, "zooms", tuple(int(z) for z in self.zooms))
        if not self.zooms:
            raise ConfigError("a lazy configuration needs at least one zoom")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {self.batch_size}")

    def save(self, index_dir: Path) -> None:
        atomic_write_bytes(Path(index_dir) / LAZY_FILE, json.dumps(dataclasses.asdict(self), indent=2).encode())

    @classmethod
    def load(cls, index_dir: Path) -> LazyConfig | None:
        """The index's lazy configuration, or None if it has no lazy levels."""
        path = Path(index_dir) / LAZY_FILE
        if not path.is_file():
            return None
        try:
            d = json.loads(path.read_text())
            if d.get("format_version", 0) > LAZY_FORMAT:
                raise IndexFormatError(f"{path}: format version {d['format_version']} is newer than this geoindex")
            return cls(zooms=tuple(d["zooms"]), source=str(d["source"]), checkpoints=dict(d.get("checkpoints", {})),
                       batch_size=int(d.get("batch_size", 64)), format_version=int(d.get("format_version", 1)))
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise IndexFormatError(f"{path}: unreadable lazy configuration ({e})") from e


def declare_lazy(
    index_dir: str | os.PathLike, *, from_zoom: int, source: str,
    checkpoints: dict[int, str | None] | None = None, batch_size: int = 64,
) -> LazyConfig:
    """Declare every level of the schedule from ``from_zoom`` down lazy; the levels above must be built.

    Raises:
        IndexNotFoundError: no manifest. ConfigError: ``from_zoom`` is not a later level of the
            schedule, or the levels above it are not all built (or some below it are).
    """
    index_dir = Path(index_dir)
    manifest = Manifest.load(index_dir)
    schedule = manifest.schedule
    schedule.index_of(from_zoom)
    if from_zoom == schedule.start:
        raise ConfigError(f"--lazy-from {from_zoom}: the first level ({schedule.start}) must be built; "
                          "choose a deeper zoom")
    built = tuple(lv.zoom for lv in manifest.levels)
    above = tuple(z for z in schedule.zooms if z < from_zoom)
    if built != above:
        raise ConfigError(f"--lazy-from {from_zoom} needs exactly the levels {list(above)} built; {index_dir} has "
                          f"{list(built)}. Build them first (`--zoom ...`) or choose another --lazy-from")
    zooms = tuple(z for z in schedule.zooms if z >= from_zoom)
    cfg = LazyConfig(zooms, source, {str(z): (checkpoints or {}).get(z) for z in zooms}, batch_size)
    cfg.save(index_dir)
    return cfg


def _schema(dim: int) -> pa.Schema:
    return pa.schema([("code", pa.int64()), ("x", pa.int32()), ("y", pa.int32()), ("found", pa.bool_()),
                      ("embedding", pa.list_(pa.float16(), dim))])


@dataclass(frozen=True)
class _Rows:
    """Rows of a lazy level held in memory, sorted by tile code: codes (n,), found (n,), emb (n, d) float16."""

    codes: npt.NDArray[np.int64]
    found: npt.NDArray[np.bool_]
    emb: npt.NDArray[np.float16]

    @classmethod
    def empty(cls, dim: int) -> _Rows:
        return cls(np.empty(0, np.int64), np.empty(0, bool), np.empty((0, dim), np.float16))

    def merged(self, other: _Rows) -> _Rows:
        """These rows plus those of ``other`` whose codes are new (duplicates keep the first)."""
        new = ~np.isin(other.codes, self.codes)
        codes = np.concatenate([self.codes, other.codes[new]])
        order = np.argsort(codes, kind="stable")
        return _Rows(codes[order], np.concatenate([self.found, other.found[new]])[order],
                     np.concatenate([self.emb, other.emb[new]])[order])

    def lookup(self, codes: npt.NDArray[np.int64]) -> npt.NDArray[np.int64]:
        """Row of each code (any shape); -1 where absent (or the code is -1)."""
        if not len(self.codes):
            return np.full(codes.shape, -1, dtype=np.int64)
        pos = np.clip(np.searchsorted(self.codes, codes), 0, len(self.codes) - 1)
        return np.where((codes >= 0) & (self.codes[pos] == codes), pos, -1).astype(np.int64)


class LazyStore:
    """The files of one lazy level: append-only segments and compacted parts, with an advisory lock."""

    def __init__(self, index_dir: Path, zoom: int, dim: int) -> None:
        self.zoom = zoom
        self.dim = dim
        self.dir = Path(index_dir) / LAZY_DIR / f"z{zoom:02d}"

    def files(self) -> list[Path]:
        """Committed files, compacted parts first (temporary files are never listed)."""
        if not self.dir.is_dir():
            return []
        return sorted(self.dir.glob("part-*.parquet")) + sorted(self.dir.glob("seg-*.parquet"))

    def read(self, path: Path) -> _Rows:
        try:
            table = pq.read_table(path, columns=["code", "found", "embedding"])
        except (OSError, pa.ArrowException) as e:
            raise IndexFormatError(f"{path}: damaged lazy segment ({e}); delete it and its tiles are re-encoded") from e
        emb = table.column("embedding").combine_chunks()
        if emb.type.list_size != self.dim:
            raise IndexFormatError(f"{path}: embeddings of dimension {emb.type.list_size}, the index has {self.dim}")
        return _Rows(table.column("code").to_numpy().astype(np.int64),
                     table.column("found").to_numpy(zero_copy_only=False).astype(bool),
                     emb.values.to_numpy(zero_copy_only=False).reshape(-1, self.dim))

    def write(self, path: Path, rows: _Rows) -> None:
        """Write ``rows`` to ``path`` atomically (``*.tmp``, fsync, rename)."""
        x, y = tile_xy_of_code_array(rows.codes, zoom=self.zoom)
        table = pa.table(
            [pa.array(rows.codes), pa.array(x.astype(np.int32)), pa.array(y.astype(np.int32)), pa.array(rows.found),
             pa.FixedSizeListArray.from_arrays(pa.array(np.ascontiguousarray(rows.emb).reshape(-1)), self.dim)],
            schema=_schema(self.dim),
        )
        with atomic_path(path) as tmp:
            pq.write_table(table, tmp)

    def append(self, rows: _Rows) -> Path:
        """Commit ``rows`` as a new segment; returns its path."""
        self.dir.mkdir(parents=True, exist_ok=True)
        path = self.dir / f"seg-{time.time_ns():020d}-{os.getpid()}-{uuid.uuid4().hex[:8]}.parquet"
        self.write(path, rows)
        return path

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Exclusive across processes (``flock``); blocks until the holder releases it."""
        self.dir.mkdir(parents=True, exist_ok=True)
        with open(self.dir / "lock", "a+b") as f:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f.fileno(), fcntl.LOCK_UN)

    def check_encoder(self, identity: dict[str, Any], *, writable: bool) -> None:
        """Record the level's map-encoder identity on first use; refuse a different one later."""
        path = self.dir / "encoder.json"
        if path.is_file():
            have = json.loads(path.read_text())
            if have != identity:
                raise EncoderMismatchError(
                    f"{self.dir} holds tiles encoded with {have.get('name')!r} "
                    f"({short_id(have)}), not with this "
                    f"zoom-{self.zoom} map encoder; fix the checkpoints in {LAZY_FILE} or delete {self.dir}"
                )
        elif writable:
            atomic_write_bytes(path, json.dumps(identity, indent=2).encode())


ParentTiles = Callable[[npt.NDArray[np.int64]], tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]]
KeepFn = Callable[[np.ndarray, np.ndarray], np.ndarray]


class LazyLevel:
    """A level whose tiles are encoded on first use and appended to the index (see the module docstring).

    Ids are tile codes ``(y << zoom) | x``. Scores are exact inner products with the float16
    embeddings, as an fp16 index computes them.

    Args:
        zoom: this level's zoom, ``step`` below the previous level.
        store: the level's files.
        encoder: this zoom's map encoder. source: the tile source to fetch from.
        parent_tiles: the previous level's ``tiles``: ids -> (x, y), -1 where the id is -1.
        keep: coverage filter (x, y) -> bool array, as the build plans the level's tiles.
        writable: False opens the level read-only: missing tiles are encoded on the fly and kept
            in memory only. True falls back to that too if a write fails; the trace says so.
    """

    def __init__(
        self, zoom: int, store: LazyStore, encoder: ImageEncoder, source: TileSource, *, parent_tiles: ParentTiles,
        step: int = 2, keep: KeepFn | None = None, writable: bool = True, batch_size: int = 64, workers: int = 4,
    ) -> None:
        if encoder.dim != store.dim:
            raise ConfigError(f"lazy level z{zoom}: encoder dimension {encoder.dim}, the index has {store.dim}")
        self.zoom = zoom
        self.step = step
        self.store = store
        self.encoder = encoder
        self.source = source
        self.parent_tiles = parent_tiles
        self.keep = keep
        self.batch_size = batch_size
        self.workers = workers
        self._rows = _Rows.empty(store.dim)
        self._loaded: set[str] = set()
        self._lock = threading.Lock()
        self._local = threading.local()
        self.read_only_reason: str | None = None if writable else "opened read-only"
        self.tiles_encoded = 0  # running counts, for benchmarks and tests
        self.tiles_stored = 0
        try:
            store.check_encoder(encoder.identity, writable=writable)
        except OSError as e:  # cannot record the encoder: the index is not writable here
            self.read_only_reason = f"cannot write {store.dir} ({type(e).__name__}: {e})"
        with self._lock:
            self._refresh()

    @property
    def rows(self) -> int:
        """Tiles this process knows (found or recorded as missing from the source)."""
        return len(self._rows.codes)

    def _refresh(self) -> None:
        """Read committed files this process has not seen yet (caller holds ``_lock``)."""
        rows = self._rows
        for path in self.store.files():
            if path.name in self._loaded:
                continue
            try:
                rows = rows.merged(self.store.read(path))
            except IndexFormatError:
                if path.exists():
                    raise
                continue  # compacted away between listing and reading: its rows are in a new part
            self._loaded.add(path.name)
        self._rows = rows

    def trace_note(self) -> str | None:
        """What the last ``search`` of this thread did, for the result's trace."""
        return getattr(self._local, "note", None)

    def _candidates(self, parents: npt.NDArray[np.int64]) -> npt.NDArray[np.int64]:
        """Children codes of each query's parents (n, w * 4**step); -1 for padding and tiles outside coverage."""
        px, py = self.parent_tiles(parents)
        valid = px >= 0
        cx, cy = children_array(np.where(valid, px, 0).ravel(), np.where(valid, py, 0).ravel(),
                                zoom=self.zoom - self.step, step=self.step)
        cx = cx.reshape(parents.shape[0], -1)
        cy = cy.reshape(parents.shape[0], -1)
        ok = np.repeat(valid, 4**self.step, axis=1)
        if self.keep is not None and ok.any():
            ok[ok] = np.asarray(self.keep(cx[ok], cy[ok]), dtype=bool)
        return np.where(ok, tile_code_array(cx, cy, zoom=self.zoom), -1)

    def _encode(self, codes: npt.NDArray[np.int64]) -> _Rows:
        x, y = tile_xy_of_code_array(codes, zoom=self.zoom)
        try:
            with ThreadPoolExecutor(max_workers=self.workers) as pool:
                found, emb = encode_tiles(x, y, zoom=self.zoom, source=self.source,
                                          encoder=self.encoder, pool=pool, batch_size=self.batch_size)
        except Exception as e:  # noqa: BLE001 - any source failure becomes one typed, actionable error
            raise LazyLevelError(
                f"lazy level z{self.zoom}: the tile source {getattr(self.source, 'name', self.source)!r} failed "
                f"while encoding {len(codes)} missing tiles ({type(e).__name__}: {e}); nothing was stored. "
                "Fix the source (--source / lazy.json) and search again"
            ) from e
        self.tiles_encoded += int(found.sum())
        return _Rows(codes, found, emb.astype(np.float16))

    def _fill(self, missing: npt.NDArray[np.int64]) -> str:
        """Make every code of ``missing`` (sorted, unique) known; returns the trace note."""
        with self._lock:
            missing = missing[self._rows.lookup(missing) < 0]  # another thread may have filled them
            if not len(missing):
                return "lazy: every tile from the index (filled by a concurrent query)"
            if self.read_only_reason is None:
                try:
                    with self.store.lock():
                        self._refresh()  # another process may have appended them
                        missing = missing[self._rows.lookup(missing) < 0]
                        if not len(missing):
                            return "lazy: every tile from the index (appended by another process)"
                        new = self._encode(missing)
                        self.store.append(new)
                        self._rows = self._rows.merged(new)
                        self.tiles_stored += len(new.codes)
                        return f"lazy: encoded {int(new.found.sum())} new tiles and appended them to the index"
                except OSError as e:
                    self.read_only_reason = f"cannot write {self.store.dir} ({type(e).__name__}: {e})"
                    log.warning("lazy level z%d falls back to on-the-fly encoding: %s", self.zoom,
                                self.read_only_reason)
            new = self._encode(missing)
            self._rows = self._rows.merged(new)
            return (f"on-the-fly: {self.read_only_reason}; encoded {int(new.found.sum())} tiles at query time, "
                    "kept in memory only")

    def search(
        self, xq: npt.NDArray[np.float32], k: int, parents: npt.NDArray[np.int64] | None
    ) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
        if parents is None:
            raise ConfigError(f"lazy level z{self.zoom} cannot be the first level of a search")
        cand = self._candidates(parents)
        table = self._rows  # one snapshot: other threads replace self._rows, never change it
        rows = table.lookup(cand)
        missing = np.unique(cand[(rows < 0) & (cand >= 0)])
        if len(missing):
            note = self._fill(missing)
            table = self._rows
            rows = table.lookup(cand)
        elif self.read_only_reason is not None and self.tiles_encoded:
            note = f"on-the-fly: {self.read_only_reason}; every tile already encoded in memory"
        else:
            note = "lazy: every tile from the index"
        self._local.note = note
        ok = rows >= 0
        ok[ok] = table.found[rows[ok]]
        emb = table.emb[np.maximum(rows, 0).ravel()].astype(np.float32).reshape(*rows.shape, -1)
        scores = np.einsum("qcd,qd->qc", emb, xq) if cand.size else np.zeros(cand.shape, np.float32)
        return _top_k(scores.astype(np.float32), np.where(ok, cand, -1), k)

    def tiles(self, ids: npt.NDArray[np.int64]) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
        valid = ids >= 0
        x, y = tile_xy_of_code_array(ids, zoom=self.zoom)
        return np.where(valid, x, -1), np.where(valid, y, -1)


def open_lazy_levels(
    index_dir: str | os.PathLike, manifest: Manifest, photo_encoder: ImageEncoder, parent_tiles: ParentTiles, *,
    source: TileSource | None = None, writable: bool = True,
) -> list[LazyLevel]:
    """The lazy levels an index declares (none without ``lazy.json``), coarsest first.

    Args:
        parent_tiles: the ``tiles`` of the index's last built level.
        source: overrides the spec in ``lazy.json`` (e.g. an in-memory source).
        writable: False: never write; missing tiles are encoded on the fly (see :class:`LazyLevel`).
    """
    from geoindex.coverage import Coverage
    from geoindex.sources import open_source

    index_dir = Path(index_dir)
    cfg = LazyConfig.load(index_dir)
    if cfg is None:
        return []
    built = tuple(lv.zoom for lv in manifest.levels)
    expected = tuple(z for z in manifest.schedule.zooms if z not in built)
    if cfg.zooms != expected or not built:
        raise IndexFormatError(f"{index_dir / LAZY_FILE}: lazy zooms {list(cfg.zooms)}, but the levels not built "
                               f"are {list(expected)}; rerun build_index with --lazy-from")
    src = source if source is not None else open_source(cfg.source)
    coverage = Coverage.from_json(manifest.coverage) if manifest.coverage else None
    levels: list[LazyLevel] = []
    for zoom in cfg.zooms:
        encoder = load_map_encoder(photo_encoder, cfg.checkpoints.get(str(zoom)))
        keep = (lambda x, y, z=zoom: coverage.intersects(x, y, zoom=z)) if coverage is not None else None
        level = LazyLevel(zoom, LazyStore(index_dir, zoom, manifest.dim), encoder, src,
                          parent_tiles=levels[-1].tiles if levels else parent_tiles,
                          step=manifest.schedule.step, keep=keep, writable=writable, batch_size=cfg.batch_size)
        levels.append(level)
    return levels


@dataclass(frozen=True)
class CompactSummary:
    """What ``compact`` did to one lazy level: files before, rows kept, parts written."""

    zoom: int
    files_before: int
    rows: int
    parts: int


def compact(index_dir: str | os.PathLike, *, rows_per_part: int = COMPACT_ROWS) -> list[CompactSummary]:
    """Fold each lazy level's appended segments into sorted parts of a new generation.

    Holds the level's lock, so appends wait; readers never see a row vanish (new parts are renamed
    into place before old files are removed, and duplicates are ignored on load). A compaction killed
    half-way leaves both generations, which is still correct; rerunning finishes it.

    Raises:
        IndexNotFoundError: the index declares no lazy levels.
    """
    index_dir = Path(index_dir)
    cfg = LazyConfig.load(index_dir)
    if cfg is None:
        raise IndexNotFoundError(f"{index_dir} has no lazy levels ({LAZY_FILE} missing): nothing to compact")
    if rows_per_part < 1:
        raise ConfigError(f"rows_per_part must be >= 1, got {rows_per_part}")
    dim = Manifest.load(index_dir).dim
    out = []
    for zoom in cfg.zooms:
        store = LazyStore(index_dir, zoom, dim)
        if not store.dir.is_dir():
            out.append(CompactSummary(zoom, 0, 0, 0))
            continue
        with store.lock():
            old = store.files()
            rows = _Rows.empty(dim)
            for path in old:
                rows = rows.merged(store.read(path))
            gens = [int(p.name.split("-")[1][1:]) for p in store.dir.glob("part-g*-*.parquet")]
            gen = max(gens, default=0) + 1
            parts = 0
            for lo in range(0, len(rows.codes), rows_per_part):
                sl = slice(lo, lo + rows_per_part)
                store.write(store.dir / f"part-g{gen:04d}-{parts:05d}.parquet",
                            _Rows(rows.codes[sl], rows.found[sl], rows.emb[sl]))
                parts += 1
            for path in old:
                path.unlink(missing_ok=True)
        out.append(CompactSummary(zoom, len(old), len(rows.codes), parts))
        log.info("lazy level z%d: %d files -> %d parts, %d rows", zoom, len(old), parts, len(rows.codes))
    return out
