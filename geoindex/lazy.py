"""Lazy deep levels: a level's tiles are encoded the first time a query needs them, then kept in the index.

An index declares its deep levels lazy in ``<index>/lazy.json`` (which zooms, the tile source to
fetch from, the map-encoder checkpoint of each zoom). The levels above are built as usual. At search
time a :class:`LazyLevel` takes the surviving parents, lists their children (filtered by the index's
coverage), encodes the ones it has never seen, appends them to the index and scores all of them
exactly, so the answer equals that of a fully built index with the same encoders and imagery.

Layout, beside the regular levels::

    <index>/lazy.json                       which zooms are lazy, source spec, checkpoints
    <index>/lazy/z14/encoder.json           the map encoder's identity (an index never mixes encoders)
    <index>/lazy/z14/imagery.json           the tile source's name (an index never mixes imagery)
    <index>/lazy/z14/seg-<time>-<pid>-<rand>.parquet   appended rows, one file per append
    <index>/lazy/z14/part-g0001-00000.parquet           compacted rows (``compact``)
    <index>/lazy/z14/lock                   an advisory file lock (fcntl) for appends and compaction

Rows are keyed by tile code ``(y << zoom) | x``, not by row order, so they can grow in any order.
Columns: code (int64), x, y (int32), found (bool: False = the source has no such tile, recorded so
it is not fetched again), embedding (fixed_size_list<halffloat>[d]; zeros where not found), checked
(int64, ns since the epoch: when the row was recorded; segments written before it existed take the
file's mtime). A tile recorded missing is asked for again once ``retry_missing_after_s`` (lazy.json)
has passed, or on ``--retry-missing``: a source that was away (a folder not mounted, a burst of 404s)
does not degrade the index for ever. Of two rows of one code, a found one wins, then the newest.

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
import re
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

from geoindex.beam import top_k
from geoindex.build import encode_tiles
from geoindex.encoders import ImageEncoder, load_map_encoder
from geoindex.errors import (
    ConfigError,
    EncoderMismatchError,
    GeoIndexError,
    IndexFormatError,
    IndexMismatchError,
    IndexNotFoundError,
    LazyLevelError,
)
from geoindex.files import atomic_path, atomic_write_bytes, index_write_lock
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
RETRY_MISSING_AFTER_S = 86_400.0  # a tile the source lacked is asked for again after a day
# Scoring gathers candidates' embeddings in blocks of this many float32 values (16 MB), not all of
# them at once: 16 photos at k=2048 with 1280-d embeddings would otherwise need 6 GB.
SCORE_BLOCK = 1 << 22
_SEGMENT = re.compile(r"seg-\d+-\d+-[0-9a-f]+\.parquet")
_PART = re.compile(r"part-g(\d+)-(\d+)\.parquet")
_REASON_CHARS = 400  # a failing source's message (every bad tile) is cut here in LazyLevelError


@dataclass(frozen=True)
class LazyConfig:
    """Which levels of an index are lazy and where their tiles come from (``<index>/lazy.json``).

    Attributes:
        zooms: the lazy zooms, the tail of the index's schedule after its last built level.
        source: tile source spec (``geoindex.sources.open_source``) to fetch from.
        checkpoints: zoom (as a string) -> map-encoder checkpoint path, or None for the untrained base.
        batch_size: tiles per encoder batch.
        retry_missing_after_s: seconds after which a tile the source lacked is asked for again.
    """

    zooms: tuple[int, ...]
    source: str
    checkpoints: dict[str, str | None] = field(default_factory=dict)
    batch_size: int = 64
    format_version: int = LAZY_FORMAT
    retry_missing_after_s: float = RETRY_MISSING_AFTER_S

    def __post_init__(self) -> None:
        object.__setattr__(self, "zooms", tuple(int(z) for z in self.zooms))
        if not self.zooms:
            raise ConfigError("a lazy configuration needs at least one zoom")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {self.batch_size}")
        if not self.retry_missing_after_s >= 0:  # refuses nan too
            raise ConfigError(f"retry_missing_after_s must be >= 0 seconds, got {self.retry_missing_after_s}")

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
        except (OSError, ValueError, RecursionError) as e:
            raise IndexFormatError(f"{path}: unreadable lazy configuration ({e}); rerun build_index with "
                                   "--lazy-from to write it again") from e
        if not isinstance(d, dict):
            raise IndexFormatError(f"{path}: a lazy configuration is a JSON object with 'zooms' and 'source', "
                                   f"not {type(d).__name__}; rerun build_index with --lazy-from to write it again")
        if isinstance(d.get("format_version"), int) and d["format_version"] > LAZY_FORMAT:
            raise IndexFormatError(f"{path}: format version {d['format_version']} is newer than this geoindex")
        try:
            if not isinstance(d["source"], str) or not isinstance(d.get("checkpoints", {}), dict):
                raise TypeError("'source' must be a string and 'checkpoints' an object")
            return cls(zooms=tuple(d["zooms"]), source=d["source"], checkpoints=dict(d.get("checkpoints", {})),
                       batch_size=int(d.get("batch_size", 64)), format_version=int(d.get("format_version", 1)),
                       retry_missing_after_s=float(d.get("retry_missing_after_s", RETRY_MISSING_AFTER_S)))
        except (ValueError, KeyError, TypeError) as e:
            raise IndexFormatError(f"{path}: malformed lazy configuration ({type(e).__name__}: {e}); rerun "
                                   "build_index with --lazy-from to write it again") from e


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
                      ("embedding", pa.list_(pa.float16(), dim)), ("checked", pa.int64())])


@dataclass(frozen=True)
class _Rows:
    """Rows of a lazy level held in memory, sorted by tile code, one per code.

    codes (n,) int64, found (n,) bool, emb (n, d) float16, checked (n,) int64 (ns since the epoch).
    """

    codes: npt.NDArray[np.int64]
    found: npt.NDArray[np.bool_]
    emb: npt.NDArray[np.float16]
    checked: npt.NDArray[np.int64]

    @classmethod
    def empty(cls, dim: int) -> _Rows:
        return cls(np.empty(0, np.int64), np.empty(0, bool), np.empty((0, dim), np.float16), np.empty(0, np.int64))

    def merged(self, other: _Rows) -> _Rows:
        """These rows and ``other``'s; of two rows of one code a found one wins, then the newer."""
        codes = np.concatenate([self.codes, other.codes])
        found = np.concatenate([self.found, other.found])
        checked = np.concatenate([self.checked, other.checked])
        order = np.lexsort((-checked, ~found, codes))
        first = np.ones(len(order), dtype=bool)
        first[1:] = codes[order][1:] != codes[order][:-1]
        keep = order[first]
        return _Rows(codes[keep], found[keep], np.concatenate([self.emb, other.emb])[keep], checked[keep])

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
        """Committed files, compacted parts first (temporary files and other names are never listed)."""
        if not self.dir.is_dir():
            return []
        parts = sorted(p for p in self.dir.glob("part-*.parquet") if _PART.fullmatch(p.name))
        return parts + sorted(p for p in self.dir.glob("seg-*.parquet") if _SEGMENT.fullmatch(p.name))

    def read(self, path: Path) -> _Rows:
        """The rows of one committed file, its columns' types and shapes checked.

        Raises:
            IndexFormatError: unreadable, or a column of the wrong type or dimension.
        """
        try:
            table = pq.read_table(path)
            mtime_ns = path.stat().st_mtime_ns
        except (OSError, pa.ArrowException) as e:
            raise IndexFormatError(f"{path}: damaged lazy segment ({e}); delete it and its tiles are re-encoded") from e
        want = {"code": pa.int64(), "found": pa.bool_()}
        emb_type = table.schema.field("embedding").type if "embedding" in table.schema.names else None
        problems = [f"column {name!r} is not {t}" for name, t in want.items()
                    if name not in table.schema.names or table.schema.field(name).type != t]
        if emb_type is None or not pa.types.is_fixed_size_list(emb_type) or emb_type.value_type != pa.float16():
            problems.append(f"column 'embedding' is {emb_type}, not fixed_size_list<halffloat>[{self.dim}]")
        elif emb_type.list_size != self.dim:
            problems.append(f"embeddings of dimension {emb_type.list_size}, the index has {self.dim}")
        if problems:
            raise IndexFormatError(f"{path}: not a lazy segment of this index ({'; '.join(problems)}); delete it "
                                   "and its tiles are re-encoded")
        emb = table.column("embedding").combine_chunks()
        n = table.num_rows
        checked = (table.column("checked").to_numpy(zero_copy_only=False).astype(np.int64)
                   if "checked" in table.schema.names else np.full(n, mtime_ns, dtype=np.int64))
        return _Rows(table.column("code").to_numpy().astype(np.int64),
                     table.column("found").to_numpy(zero_copy_only=False).astype(bool),
                     emb.flatten().to_numpy(zero_copy_only=False).reshape(-1, self.dim), checked)

    def write(self, path: Path, rows: _Rows) -> None:
        """Write ``rows`` to ``path`` atomically (``*.tmp``, fsync, rename)."""
        x, y = tile_xy_of_code_array(rows.codes, zoom=self.zoom)
        table = pa.table(
            [pa.array(rows.codes), pa.array(x.astype(np.int32)), pa.array(y.astype(np.int32)), pa.array(rows.found),
             pa.FixedSizeListArray.from_arrays(pa.array(np.ascontiguousarray(rows.emb).reshape(-1)), self.dim),
             pa.array(rows.checked)],
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

    def _recorded(self, name: str) -> dict[str, Any] | None:
        """A JSON object the level recorded (``encoder.json``, ``imagery.json``), or None if absent.

        Raises:
            IndexFormatError: the file is not a JSON object.
        """
        path = self.dir / name
        if not path.is_file():
            return None
        try:
            have = json.loads(path.read_text())
        except (OSError, ValueError, RecursionError) as e:
            have = e
        if not isinstance(have, dict):
            reason = f"{type(have).__name__}: {have}" if isinstance(have, Exception) else f"a {type(have).__name__}"
            raise IndexFormatError(f"{path}: damaged ({reason}), not a JSON object; delete {self.dir} and its "
                                   "tiles are encoded again on first use")
        return have

    def check_imagery(self, name: str, *, writable: bool) -> None:
        """Record the name of the imagery the level is filled from on first use; refuse another later.

        Raises:
            IndexMismatchError: the level holds tiles of other imagery.
        """
        have = self._recorded("imagery.json")
        if have is not None and have.get("imagery") != name:
            raise IndexMismatchError(
                f"{self.dir} holds tiles from the imagery {have.get('imagery')!r}, not from {name!r}; point "
                f"'source' in {LAZY_FILE} (or lazy_source=) back at that imagery, or delete {self.dir} to "
                "encode its tiles again from the new one"
            )
        if have is None and writable:
            atomic_write_bytes(self.dir / "imagery.json", json.dumps({"imagery": name}, indent=2).encode())

    def check_encoder(self, identity: dict[str, Any], *, writable: bool) -> None:
        """Record the level's map-encoder identity on first use; refuse a different one later."""
        path = self.dir / "encoder.json"
        have = self._recorded("encoder.json")
        if have is not None:
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
SourceOpener = Callable[[], TileSource]


class _SpecSource:
    """The tile source named in ``lazy.json``, opened at the first tile a query needs (thread-safe).

    Opening at query time, not when the index opens, lets queries that need no lazy tile (``--bbox``
    over built levels, repeats) answer while the source is away.
    """

    def __init__(self, spec: str, config_path: Path) -> None:
        self.spec = spec
        self.config_path = config_path
        self._source: TileSource | None = None
        self._lock = threading.Lock()

    def __call__(self) -> TileSource:
        from geoindex.sources import open_source

        with self._lock:
            if self._source is None:
                try:
                    self._source = open_source(self.spec, option=f"'source' in {self.config_path}")
                except GeoIndexError as e:
                    raise LazyLevelError(
                        f"{self.config_path}: the lazy levels' tile source {self.spec!r} cannot be opened ({e}); "
                        "bring it back, or set 'source' there to the same imagery elsewhere; nothing was stored"
                    ) from e
            return self._source


def _scores(
    table: _Rows, rows: npt.NDArray[np.int64], xq: npt.NDArray[np.float32]
) -> npt.NDArray[np.float32]:
    """Inner products (n, c) float32 of query i with the float16 embeddings of its rows ``rows[i]`` (n, c).

    Gathers at most SCORE_BLOCK values at a time. Rows < 0 score 0 (callers mask them).
    """
    n, c = rows.shape
    scores = np.zeros((n, c), dtype=np.float32)
    if not len(table.codes) or not c:
        return scores
    d = table.emb.shape[1]
    if c * d <= SCORE_BLOCK:  # several queries per block
        qstep = SCORE_BLOCK // (c * d)
        for lo in range(0, n, qstep):
            emb = table.emb[np.maximum(rows[lo : lo + qstep], 0)].astype(np.float32)
            scores[lo : lo + qstep] = np.einsum("qcd,qd->qc", emb, xq[lo : lo + qstep])
        return scores
    step = max(1, SCORE_BLOCK // d)  # part of one query's candidates per block
    for q in range(n):
        for lo in range(0, c, step):
            scores[q, lo : lo + step] = table.emb[np.maximum(rows[q, lo : lo + step], 0)].astype(np.float32) @ xq[q]
    return scores


class LazyLevel:
    """A level whose tiles are encoded on first use and appended to the index (see the module docstring).

    Ids are tile codes ``(y << zoom) | x``. Scores are exact inner products with the float16
    embeddings, as an fp16 index computes them.

    Args:
        zoom: this level's zoom, ``step`` below the previous level.
        store: the level's files.
        encoder: this zoom's map encoder.
        source: the tile source to fetch from, or a function that opens it (called at the first
            tile a query needs; its errors are LazyLevelErrors).
        parent_tiles: the previous level's ``tiles``: ids -> (x, y), -1 where the id is -1.
        keep: coverage filter (x, y) -> bool array, as the build plans the level's tiles.
        writable: False opens the level read-only: missing tiles are encoded on the fly and kept
            in memory only. True falls back to that too if a write fails; the trace says so.
        retry_missing_after_s: tiles recorded as missing from the source longer ago than this
            are asked for again. retry_missing: also ask again for every tile recorded missing
            before this level was opened (``--retry-missing``).
    """

    def __init__(
        self, zoom: int, store: LazyStore, encoder: ImageEncoder, source: TileSource | SourceOpener, *,
        parent_tiles: ParentTiles, step: int = 2, keep: KeepFn | None = None, writable: bool = True,
        batch_size: int = 64, workers: int = 4, retry_missing_after_s: float = RETRY_MISSING_AFTER_S,
        retry_missing: bool = False,
    ) -> None:
        if encoder.dim != store.dim:
            raise ConfigError(f"lazy level z{zoom}: encoder dimension {encoder.dim}, the index has {store.dim}")
        self.zoom = zoom
        self.step = step
        self.store = store
        self.encoder = encoder
        self._open_source: SourceOpener = source if not isinstance(source, TileSource) else (lambda: source)
        self.retry_missing_after_s = retry_missing_after_s
        self.opened_ns = time.time_ns()
        self.retry_missing = retry_missing
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
    def source(self) -> TileSource:
        """The tile source (opened now if it was given as a spec; LazyLevelError if it cannot be)."""
        return self._open_source()

    def _retry_before_ns(self) -> int:
        """Rows recorded as missing before this time (ns) are asked for again."""
        cutoff = time.time_ns() - int(min(self.retry_missing_after_s, 1e11) * 1e9)
        return max(cutoff, self.opened_ns) if self.retry_missing else cutoff

    def _unknown(self, table: _Rows, rows: npt.NDArray[np.int64]) -> npt.NDArray[np.bool_]:
        """Where ``rows`` (from ``table.lookup``) is absent, or a tile recorded missing long enough ago to retry."""
        unknown = rows < 0
        known = ~unknown
        if known.any():
            r = rows[known]
            unknown[known] = ~table.found[r] & (table.checked[r] < self._retry_before_ns())
        return unknown

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

    def _encode(self, codes: npt.NDArray[np.int64], source: TileSource) -> _Rows:
        x, y = tile_xy_of_code_array(codes, zoom=self.zoom)
        try:
            with ThreadPoolExecutor(max_workers=self.workers) as pool:
                found, emb = encode_tiles(x, y, zoom=self.zoom, source=source,
                                          encoder=self.encoder, pool=pool, batch_size=self.batch_size)
        except Exception as e:  # noqa: BLE001 - any source failure becomes one typed, actionable error
            reason = str(e)
            if len(reason) > _REASON_CHARS:  # e.g. every bad tile of 64: the first ones say enough
                reason = reason[:_REASON_CHARS] + f"... ({len(reason)} characters)"
            raise LazyLevelError(
                f"lazy level z{self.zoom}: the tile source {getattr(source, 'name', source)!r} failed "
                f"while encoding {len(codes)} missing tiles ({type(e).__name__}: {reason}); nothing was stored. "
                f"Fix the source ('source' in {self.store.dir.parent.parent / LAZY_FILE}) and search again"
            ) from e
        self.tiles_encoded += int(found.sum())
        return _Rows(codes, found, emb.astype(np.float16), np.full(len(codes), time.time_ns(), dtype=np.int64))

    def _checked_source(self, *, writable: bool) -> TileSource:
        """The source, once its imagery is the level's (recorded on first use when ``writable``)."""
        source = self.source
        self.store.check_imagery(source.name, writable=writable)
        return source

    def _fill(self, missing: npt.NDArray[np.int64]) -> str:
        """Make every code of ``missing`` (sorted, unique) known; returns the trace note."""
        with self._lock:
            # another thread may have filled them
            missing = missing[self._unknown(self._rows, self._rows.lookup(missing))]
            if not len(missing):
                return "lazy: every tile from the index (filled by a concurrent query)"
            if self.read_only_reason is None:
                try:
                    with self.store.lock():
                        self._refresh()  # another process may have appended them
                        missing = missing[self._unknown(self._rows, self._rows.lookup(missing))]
                        if not len(missing):
                            return "lazy: every tile from the index (appended by another process)"
                        new = self._encode(missing, self._checked_source(writable=True))
                        self.store.append(new)
                        self._rows = self._rows.merged(new)
                        self.tiles_stored += len(new.codes)
                        return f"lazy: encoded {int(new.found.sum())} new tiles and appended them to the index"
                except OSError as e:
                    self.read_only_reason = f"cannot write {self.store.dir} ({type(e).__name__}: {e})"
                    log.warning("lazy level z%d falls back to on-the-fly encoding: %s", self.zoom,
                                self.read_only_reason)
            new = self._encode(missing, self._checked_source(writable=False))
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
        missing = np.unique(cand[self._unknown(table, rows) & (cand >= 0)])
        if len(missing):
            note = self._fill(missing)
            table = self._rows
            rows = table.lookup(cand)
        elif self.read_only_reason is not None and self.tiles_encoded:
            note = f"on-the-fly: {self.read_only_reason}; every tile already encoded in memory"
        else:
            note = "lazy: every tile from the index"
        ok = rows >= 0
        ok[ok] = table.found[rows[ok]]
        absent = int(((cand >= 0) & ~ok).sum())
        if absent:  # say so: an answer that ends above this level would otherwise look complete
            stopped = int(((cand >= 0).any(axis=1) & ~ok.any(axis=1)).sum())
            note += (f"; {absent} of {int((cand >= 0).sum())} candidate tiles are missing from the source "
                     f"(asked again after {self.retry_missing_after_s:g} s or with --retry-missing)")
            if stopped:
                note += f"; {stopped} of {len(cand)} answers stopped early above z{self.zoom}: no tile found here"
        self._local.note = note
        return top_k(_scores(table, rows, xq), np.where(ok, cand, -1), k)

    def tiles(self, ids: npt.NDArray[np.int64]) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
        valid = ids >= 0
        x, y = tile_xy_of_code_array(ids, zoom=self.zoom)
        return np.where(valid, x, -1), np.where(valid, y, -1)


def open_lazy_levels(
    index_dir: str | os.PathLike, manifest: Manifest, photo_encoder: ImageEncoder, parent_tiles: ParentTiles, *,
    source: TileSource | None = None, writable: bool = True, retry_missing: bool = False,
) -> list[LazyLevel]:
    """The lazy levels an index declares (none without ``lazy.json``), coarsest first.

    Args:
        parent_tiles: the ``tiles`` of the index's last built level.
        source: overrides the spec in ``lazy.json`` (e.g. an in-memory source). The spec's source
            is opened at the first tile a query needs, not here.
        writable: False: never write; missing tiles are encoded on the fly (see :class:`LazyLevel`).
        retry_missing: ask again for tiles recorded as missing from the source (``--retry-missing``).
    """
    from geoindex.coverage import Coverage

    index_dir = Path(index_dir)
    cfg = LazyConfig.load(index_dir)
    if cfg is None:
        return []
    built = tuple(lv.zoom for lv in manifest.levels)
    expected = tuple(z for z in manifest.schedule.zooms if z not in built)
    if cfg.zooms != expected or not built:
        raise IndexFormatError(f"{index_dir / LAZY_FILE}: lazy zooms {list(cfg.zooms)}, but the levels not built "
                               f"are {list(expected)}; rerun build_index with --lazy-from")
    src: TileSource | SourceOpener = source if source is not None else _SpecSource(cfg.source, index_dir / LAZY_FILE)
    coverage = Coverage.from_json(manifest.coverage) if manifest.coverage else None
    levels: list[LazyLevel] = []
    for zoom in cfg.zooms:
        encoder = load_map_encoder(photo_encoder, cfg.checkpoints.get(str(zoom)))
        keep = (lambda x, y, z=zoom: coverage.intersects(x, y, zoom=z)) if coverage is not None else None
        level = LazyLevel(zoom, LazyStore(index_dir, zoom, manifest.dim), encoder, src,
                          parent_tiles=levels[-1].tiles if levels else parent_tiles,
                          step=manifest.schedule.step, keep=keep, writable=writable, batch_size=cfg.batch_size,
                          retry_missing_after_s=cfg.retry_missing_after_s, retry_missing=retry_missing)
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
    with index_write_lock(index_dir, what="build_index --compact"):
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
                gens = [int(m.group(1)) for p in store.dir.glob("part-g*.parquet") if (m := _PART.fullmatch(p.name))]
                gen = max(gens, default=0) + 1
                parts = 0
                for lo in range(0, len(rows.codes), rows_per_part):
                    sl = slice(lo, lo + rows_per_part)
                    store.write(store.dir / f"part-g{gen:04d}-{parts:05d}.parquet",
                                _Rows(rows.codes[sl], rows.found[sl], rows.emb[sl], rows.checked[sl]))
                    parts += 1
                for path in old:
                    path.unlink(missing_ok=True)
            out.append(CompactSummary(zoom, len(old), len(rows.codes), parts))
            log.info("lazy level z%d: %d files -> %d parts, %d rows", zoom, len(old), parts, len(rows.codes))
        return out
