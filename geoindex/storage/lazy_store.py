"""The storage of lazy deep levels: ``lazy.json``, append-only segments, compaction (the search side: ``levels.lazy``).

An index declares its deep levels lazy in ``<index>/lazy.json`` (which zooms, the tile source to
fetch from, the map-encoder checkpoint of each zoom). The levels above are built as usual. At search
time ``geoindex.retrieval.levels.lazy.LazyLevel`` encodes the tiles a query needs and never saw, and appends
them here (:class:`LazyStore`); ``compact`` folds the appended segments into sorted parts.

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
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.parquet as pq

from geoindex.errors import (
    ConfigError,
    EncoderMismatchError,
    IndexFormatError,
    IndexMismatchError,
    IndexNotFoundError,
)
from geoindex.files import atomic_path, atomic_write_bytes, index_write_lock
from geoindex.geometry.tiles import tile_xy_of_code_array
from geoindex.storage.manifest import Manifest, short_id

__all__ = [
    "LAZY_FILE",
    "RETRY_MISSING_AFTER_S",
    "CompactSummary",
    "LazyConfig",
    "LazyStore",
    "Rows",
    "compact",
    "declare_lazy",
]

log = logging.getLogger(__name__)

LAZY_FILE = "lazy.json"
LAZY_DIR = "lazy"
LAZY_FORMAT = 1
COMPACT_ROWS = 65_536  # rows per compacted shard
RETRY_MISSING_AFTER_S = 86_400.0  # a tile the source lacked is asked for again after a day
_SEGMENT = re.compile(r"seg-\d+-\d+-[0-9a-f]+\.parquet")
_PART = re.compile(r"part-g(\d+)-(\d+)\.parquet")


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
class Rows:
    """Rows of a lazy level held in memory, sorted by tile code, one per code.

    codes (n,) int64, found (n,) bool, emb (n, d) float16, checked (n,) int64 (ns since the epoch).
    """

    codes: npt.NDArray[np.int64]
    found: npt.NDArray[np.bool_]
    emb: npt.NDArray[np.float16]
    checked: npt.NDArray[np.int64]

    @classmethod
    def empty(cls, dim: int) -> Rows:
        return cls(np.empty(0, np.int64), np.empty(0, bool), np.empty((0, dim), np.float16), np.empty(0, np.int64))

    def merged(self, other: Rows) -> Rows:
        """These rows and ``other``'s; of two rows of one code a found one wins, then the newer."""
        codes = np.concatenate([self.codes, other.codes])
        found = np.concatenate([self.found, other.found])
        checked = np.concatenate([self.checked, other.checked])
        order = np.lexsort((-checked, ~found, codes))
        first = np.ones(len(order), dtype=bool)
        first[1:] = codes[order][1:] != codes[order][:-1]
        keep = order[first]
        return Rows(codes[keep], found[keep], np.concatenate([self.emb, other.emb])[keep], checked[keep])

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

    def read(self, path: Path) -> Rows:
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
        return Rows(table.column("code").to_numpy().astype(np.int64),
                     table.column("found").to_numpy(zero_copy_only=False).astype(bool),
                     emb.flatten().to_numpy(zero_copy_only=False).reshape(-1, self.dim), checked)

    def write(self, path: Path, rows: Rows) -> None:
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

    def append(self, rows: Rows) -> Path:
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
                rows = Rows.empty(dim)
                for path in old:
                    rows = rows.merged(store.read(path))
                gens = [int(m.group(1)) for p in store.dir.glob("part-g*.parquet") if (m := _PART.fullmatch(p.name))]
                gen = max(gens, default=0) + 1
                parts = 0
                for lo in range(0, len(rows.codes), rows_per_part):
                    sl = slice(lo, lo + rows_per_part)
                    store.write(store.dir / f"part-g{gen:04d}-{parts:05d}.parquet",
                                Rows(rows.codes[sl], rows.found[sl], rows.emb[sl], rows.checked[sl]))
                    parts += 1
                for path in old:
                    path.unlink(missing_ok=True)
            out.append(CompactSummary(zoom, len(old), len(rows.codes), parts))
            log.info("lazy level z%d: %d files -> %d parts, %d rows", zoom, len(old), parts, len(rows.codes))
        return out
