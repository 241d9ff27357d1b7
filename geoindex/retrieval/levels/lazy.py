"""Lazy deep levels: a level's tiles are encoded the first time a query needs them, then kept in the index.

An index declares its deep levels lazy in ``<index>/lazy.json`` (``geoindex.storage.lazy_store``, which
also holds the files and their compaction). At search time a :class:`LazyLevel` takes the surviving
parents, lists their children (filtered by the index's coverage), encodes the ones it has never
seen (``tile_encoding.embed_tiles``), appends them to the index and scores all of them exactly, so
the answer equals that of a fully built index with the same encoders and imagery.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import numpy.typing as npt

from geoindex.errors import ConfigError, GeoIndexError, IndexFormatError, LazyLevelError
from geoindex.models.encoders import ImageEncoder, load_map_encoder
from geoindex.models.tile_encoding import embed_tiles
from geoindex.retrieval.beam import top_k
from geoindex.retrieval.levels import GATHER_BLOCK, KeepFn, children_codes, code_tiles, gathered_scores
from geoindex.sources import TileSource
from geoindex.storage.lazy_store import LAZY_FILE, RETRY_MISSING_AFTER_S, LazyConfig, LazyStore, Rows
from geoindex.storage.manifest import Manifest

__all__ = ["SCORE_BLOCK", "LazyLevel", "open_lazy_levels", "score_rows"]

log = logging.getLogger(__name__)

SCORE_BLOCK = GATHER_BLOCK  # how many float32 values the lazy level's scoring gathers at a time
_REASON_CHARS = 400  # a failing source's message (every bad tile) is cut here in LazyLevelError


ParentTiles = Callable[[npt.NDArray[np.int64]], tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]]
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


def score_rows(
    table: Rows, rows: npt.NDArray[np.int64], xq: npt.NDArray[np.float32]
) -> npt.NDArray[np.float32]:
    """Inner products (n, c) float32 of query i with the float16 embeddings of its rows ``rows[i]`` (n, c).

    Gathers at most SCORE_BLOCK values at a time. Rows < 0 score 0 (callers mask them).
    """
    if not len(table.codes):
        return np.zeros(rows.shape, dtype=np.float32)
    return gathered_scores(table.emb, rows, xq, block=SCORE_BLOCK)


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
        self._rows = Rows.empty(store.dim)
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

    def _unknown(self, table: Rows, rows: npt.NDArray[np.int64]) -> npt.NDArray[np.bool_]:
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
        return children_codes(px, py, zoom=self.zoom, step=self.step, keep=self.keep)

    def _encode(self, codes: npt.NDArray[np.int64], source: TileSource) -> Rows:
        try:
            with ThreadPoolExecutor(max_workers=self.workers) as pool:
                found, emb = embed_tiles(source, self.encoder, codes, zoom=self.zoom, pool=pool,
                                         batch_size=self.batch_size)
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
        return Rows(codes, found, emb.astype(np.float16), np.full(len(codes), time.time_ns(), dtype=np.int64))

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
        return top_k(score_rows(table, rows, xq), np.where(ok, cand, -1), k)

    def tiles(self, ids: npt.NDArray[np.int64]) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
        return code_tiles(ids, zoom=self.zoom)


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
    from geoindex.geometry.coverage import Coverage

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
