"""Encode one zoom level of tiles into an index: planned rows, resumable shards, FAISS file, manifest.

The rows of level z are known before any tile is read: the first level is every covered tile in
quadkey order; a later level is, for each row of the level above in row order, its covered
children in quadkey order. That plan is cut into shards of ``shard_size`` planned tiles; each
shard is written atomically once all its tiles are encoded (tiles the source does not have are
left out), so a killed build resumes at the first missing shard and ends with the same rows.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from geoindex.errors import (
    BadTilesError,
    BuildIncompleteError,
    ConfigError,
    EncoderMismatchError,
    GeoIndexError,
    IndexMismatchError,
)
from geoindex.files import atomic_write_bytes, file_sha256, index_write_lock
from geoindex.geometry.tiles import LevelSchedule, children_array, quadkey_int_array, tile_code_array
from geoindex.models.encoders import ImageEncoder
from geoindex.models.threads import loader_threads
from geoindex.models.tile_encoding import EncodedBatch, TileProcessPool, embed_tiles, loader_pool
from geoindex.sources import ListableTileSource, TileSource, source_spec
from geoindex.storage.codecs import get_codec
from geoindex.storage.manifest import EncoderIdentity, LevelInfo, Manifest, short_id
from geoindex.storage.store import (
    FAISS_FILE,
    FIRST_LEVEL_CODEC,
    VectorHome,
    column_to_numpy,
    drop_embeddings,
    finish_level,
    level_dir,
    list_shards,
    read_level_columns,
    shard_path,
    write_shard,
)

__all__ = [
    "BuildSummary",
    "CoverageLike",
    "LevelJob",
    "LevelPlan",
    "build_level",
    "build_shard",
    "complete_level",
    "encode_tiles",
    "plan_level",
    "start_level",
]

log = logging.getLogger(__name__)
PLAN_FILE = "_build.json"
_FAILURES_SHOWN = 20  # shards whose errors a BuildIncompleteError spells out


class CoverageLike(Protocol):
    """What a build needs of the part of the world an index covers; ``geoindex.geometry.coverage.Coverage`` is one."""

    def tiles(self, *, zoom: int) -> tuple[np.ndarray, np.ndarray]: ...

    def intersects(self, x: np.ndarray, y: np.ndarray, *, zoom: int) -> np.ndarray: ...

    def to_json(self) -> dict[str, Any]: ...


@dataclass(frozen=True)
class BuildSummary:
    """What one ``build_level`` call did."""

    zoom: int
    rows: int
    planned: int
    missing: int
    shards_written: int
    shards_reused: int
    seconds: float
    bad_skipped: int = 0  # unreadable tiles left out with skip_bad_tiles (also counted in ``missing``)
    # Tiles the source holds at this zoom, inside the coverage, that were never planned because
    # their parent tile is not in the level above; None when the source cannot list its tiles.
    orphaned: int | None = None

    @property
    def tiles_per_s(self) -> float:
        return self.planned / self.seconds if self.seconds > 0 else float("inf")

    @property
    def rate_text(self) -> str:
        """``tiles_per_s`` for people: two significant digits below 10 (a build of a few tiles is not "0 tiles/s")."""
        rate = self.tiles_per_s
        return f"{rate:.0f} tiles/s" if rate >= 10 else f"{rate:.2g} tiles/s"


@dataclass(frozen=True)
class LevelPlan:
    """Planned rows of a level, in final order: tile (x, y) and parent row, each shape (n,)."""

    zoom: int
    x: npt.NDArray[np.int64]
    y: npt.NDArray[np.int64]
    parent_row: npt.NDArray[np.int64]
    n_parents: int | None


def plan_level(index_dir: Path, manifest: Manifest, zoom: int, coverage: CoverageLike) -> LevelPlan:
    """The candidate tiles of ``zoom`` in (parent_row, quadkey) order."""
    parent_zoom = manifest.schedule.parent_zoom(zoom)
    if parent_zoom is None:
        x, y = (np.asarray(a, dtype=np.int64) for a in coverage.tiles(zoom=zoom))
        order = np.argsort(quadkey_int_array(x, y, zoom=zoom), kind="stable")
        return LevelPlan(zoom, x[order], y[order], np.full(len(x), -1, dtype=np.int64), None)
    if manifest.level(parent_zoom) is None:
        raise ConfigError(
            f"level z{zoom} is built from the rows of z{parent_zoom}, which {index_dir} does not have yet; "
            f"build it first (`--zoom {parent_zoom}`) or build every level with `--all`"
        )
    cols = read_level_columns(index_dir, parent_zoom, ("x", "y"))
    n_parents = len(cols["x"])
    step = manifest.schedule.step
    cx, cy = (a.ravel() for a in children_array(cols["x"], cols["y"], zoom=parent_zoom, step=step))
    parents = np.repeat(np.arange(n_parents, dtype=np.int64), 4**step)
    keep = np.asarray(coverage.intersects(cx, cy, zoom=zoom), dtype=bool)
    return LevelPlan(zoom, cx[keep], cy[keep], parents[keep], n_parents)


def count_orphans(plan: LevelPlan, source: TileSource, coverage: CoverageLike) -> int | None:
    """Tiles ``source`` holds at the plan's zoom, inside ``coverage``, that the plan leaves out.

    A level plans only the children of the rows of the level above, so these are exactly the
    tiles whose parent tile is not in the index (the source lacked it). None for a first level,
    or a source that cannot list its tiles (``ListableTileSource``).
    """
    if plan.n_parents is None or not isinstance(source, ListableTileSource):
        return None
    x, y = source.tiles(zoom=plan.zoom)
    if not len(x):
        return 0
    inside = np.asarray(coverage.intersects(x, y, zoom=plan.zoom), dtype=bool)
    held = tile_code_array(x[inside], y[inside], zoom=plan.zoom)
    return int(np.count_nonzero(~np.isin(held, tile_code_array(plan.x, plan.y, zoom=plan.zoom))))


def _plan_identity(plan: LevelPlan, encoder: ImageEncoder, imagery: str, shard_size: int) -> dict[str, Any]:
    """Everything that decides a shard's content; shards from a different identity are stale."""
    digest = hashlib.sha256()
    for a in (plan.x, plan.y, plan.parent_row):
        digest.update(np.ascontiguousarray(a).tobytes())
    return {
        "zoom": plan.zoom,
        "encoder": encoder.identity,
        "imagery": imagery,
        "shard_size": shard_size,
        "plan_sha256": digest.hexdigest(),
    }


def _prepare_level_dir(ldir: Path, identity: dict[str, Any], *, overwrite: bool) -> None:
    """Keep finished shards of an interrupted build of the same plan; refuse or clear anything else."""
    plan_file = ldir / PLAN_FILE
    old: Any = None
    if plan_file.is_file():
        try:
            old = json.loads(plan_file.read_text())
        except (OSError, ValueError) as e:
            # Without the identity nothing says which encoder made the shards: never trust them.
            log.warning("%s is unreadable (%s); the level's shards cannot be trusted and are re-encoded",
                        plan_file, e)
        if not isinstance(old, dict):
            old = {}
    if old is not None:
        if old == identity:
            return
        if old and old.get("encoder") != identity["encoder"] and not overwrite:
            was = old.get("encoder") if isinstance(old.get("encoder"), dict) else {}
            raise EncoderMismatchError(
                f"{ldir} holds shards encoded with {was.get('name')!r} (weights {short_id(was)}), "
                "not with this map encoder; one index never mixes encoders. "
                "Use another --index, or --overwrite to re-encode this level"
            )
        if old:
            log.info("%s: the plan changed (new parent rows, imagery or shard size); re-encoding", ldir)
        shutil.rmtree(ldir)
    elif ldir.exists():
        shutil.rmtree(ldir)
    ldir.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(plan_file, json.dumps(identity, indent=2).encode())


def encode_tiles(
    x: npt.NDArray[np.integer], y: npt.NDArray[np.integer], *, zoom: int, source: TileSource, encoder: ImageEncoder,
    pool: Executor | TileProcessPool, batch_size: int, progress: Callable[[int], None] | None = None,
    skip_bad: bool = False, on_bad: Callable[[str], None] | None = None,
) -> tuple[npt.NDArray[np.bool_], npt.NDArray[np.float32]]:
    """Encode tiles (x, y) of one shard, shape (n,) each, in batches of ``batch_size`` from the first.

    Tiles are read and preprocessed in ``pool``'s processes or threads ahead of the model. Tiles the source does
    not have are left out of their batch, so a batch's content depends only on the shard's tiles:
    every engine that calls this gets the same embeddings for the same shard. Tiles whose size
    differs from the shard's first tile (a placeholder, a tile of another server) are logged.

    Args:
        skip_bad: treat tiles that cannot be read as missing (each is passed to ``on_bad``)
            instead of failing the shard.

    Returns:
        found: bool (n,), False where the source has no such tile. emb: float32 (n, d), zero where not found.

    Raises:
        BadTilesError: some tiles could not be read (without ``skip_bad``); names every one.
    """
    progress = progress or _ignore
    bad: list[str] = []
    sizes: dict[tuple[int, int], list[str]] = {}

    def record(batch: EncodedBatch) -> None:
        for i, load in enumerate(batch.loads):
            if load.error is not None:
                bad.append(str(load.error))
                if skip_bad and on_bad is not None:
                    on_bad(str(load.error))
            elif load.size is not None:
                sizes.setdefault(load.size, []).append(f"{zoom}/{int(x[batch.start + i])}/{int(y[batch.start + i])}")
        progress(len(batch.loads))

    found, emb = embed_tiles(source, encoder, tile_code_array(x, y, zoom=zoom), zoom=zoom, batch_size=batch_size,
                             pool=pool, on_error="skip" if skip_bad else "collect", on_batch=record)
    if len(sizes) > 1:
        usual = max(sizes, key=lambda s: len(sizes[s]))
        odd = [(size, tile) for size, tiles in sizes.items() if size != usual for tile in tiles]
        log.warning("%d tiles of zoom %d are not %dx%d like the other %d, e.g. %s is %dx%d (a placeholder?); "
                    "they are encoded stretched. Check the tile source", len(odd), zoom, *usual, len(sizes[usual]),
                    odd[0][1], *odd[0][0])
    if bad and not skip_bad:
        raise BadTilesError(f"{len(bad)} tile(s) could not be read: " + "; ".join(bad))
    return found, emb


def build_shard(
    index_dir: Path, zoom: int, shard: int, x: npt.NDArray[np.integer], y: npt.NDArray[np.integer],
    parent_row: npt.NDArray[np.integer], *, source: TileSource, encoder: ImageEncoder, pool: Executor | TileProcessPool,
    batch_size: int, progress: Callable[[int], None] | None = None, skip_bad: bool = False,
    on_bad: Callable[[str], None] | None = None,
) -> int:
    """Encode the planned tiles of one shard and write ``part-<shard>.parquet`` atomically; returns its rows.

    Both build engines (local and Ray) write every shard through this function.

    Raises:
        GeoIndexError: a tile failed to load; nothing is written and a rerun retries the shard.
    """
    found, emb = encode_tiles(x, y, zoom=zoom, source=source, encoder=encoder, pool=pool,
                              batch_size=batch_size, progress=progress, skip_bad=skip_bad, on_bad=on_bad)
    write_shard(shard_path(index_dir, zoom, shard), zoom=zoom, x=np.asarray(x)[found], y=np.asarray(y)[found],
                parent_row=np.asarray(parent_row)[found], embeddings=emb[found])
    return int(found.sum())


@dataclass(frozen=True)
class LevelJob:
    """A level build after planning: the plan, the shards still to encode, and what finishing needs.

    Shard s holds planned rows ``[s * shard_size, (s + 1) * shard_size)`` less the tiles the source lacks.
    """

    index_dir: Path
    manifest: Manifest
    plan: LevelPlan
    identity: dict[str, Any]
    codec: str
    dim: int
    shard_size: int
    n_shards: int
    todo: tuple[int, ...]
    started: float

    @property
    def zoom(self) -> int:
        return self.plan.zoom

    @property
    def planned(self) -> int:
        return len(self.plan.x)

    def rows(self, shard: int) -> slice:
        """The planned rows of ``shard``."""
        return slice(shard * self.shard_size, min((shard + 1) * self.shard_size, self.planned))

    @property
    def reused_tiles(self) -> int:
        """Planned tiles covered by shards finished before this run."""
        todo = set(self.todo)
        return sum(self.rows(s).stop - self.rows(s).start for s in range(self.n_shards) if s not in todo)


def start_level(
    index_dir: str | os.PathLike, zoom: int, *, encoder: ImageEncoder, imagery: str, coverage: CoverageLike,
    schedule: LevelSchedule = LevelSchedule(), codec: str = "fp16", shard_size: int = 8192, batch_size: int = 64,
    overwrite: bool = False, imagery_spec: str | None = None,
) -> LevelJob:
    """Check the index, plan level ``zoom``, prepare its folder and list the shards still to encode.

    ``imagery`` is the source's name; ``imagery_spec`` its spec, recorded in the manifest (and
    added to one that lacks it) so that maps can reopen the imagery.

    Raises:
        ConfigError: bad arguments, or the level above is not built yet.
        EncoderMismatchError, IndexMismatchError: see ``build_level``.
    """
    started = time.perf_counter()
    index_dir = Path(index_dir)
    get_codec(codec)
    if shard_size < 1 or batch_size < 1:
        raise ConfigError(f"shard_size and batch_size must be >= 1, got {shard_size} and {batch_size}")
    schedule.index_of(zoom)
    photo = EncoderIdentity(encoder.spec.name, encoder.base_fingerprint)
    fresh = Manifest(schedule=schedule, dim=encoder.dim, codec=codec, photo_encoder=photo,
                     imagery=imagery, coverage=coverage.to_json(), imagery_spec=imagery_spec)
    manifest = Manifest.load(index_dir) if (index_dir / "manifest.json").is_file() else fresh
    _check_compatible(index_dir, manifest, fresh)
    if manifest.imagery_spec is None and imagery_spec is not None:
        manifest = dataclasses.replace(manifest, imagery_spec=imagery_spec)

    plan = plan_level(index_dir, manifest, zoom, coverage)
    identity = _plan_identity(plan, encoder, imagery, shard_size)
    _prepare_level_dir(level_dir(index_dir, zoom), identity, overwrite=overwrite)
    n_shards = max(1, -(-len(plan.x) // shard_size))
    done = set()
    faiss_sha = functools.cache(lambda: _file_sha(level_dir(index_dir, zoom) / FAISS_FILE))
    for path in list_shards(index_dir, zoom):
        shard = _shard_number(path)
        problem = "not in the plan" if shard is None or shard >= n_shards else None
        if shard is not None and problem is None:
            sl = slice(shard * shard_size, min((shard + 1) * shard_size, len(plan.x)))
            problem = _shard_problem(path, plan.x[sl], plan.y[sl], plan.parent_row[sl], zoom=zoom, dim=encoder.dim,
                                     faiss_sha=faiss_sha)
        if problem is None:
            done.add(path.name)
            continue
        log.warning("%s: %s; re-encoding this shard", path, problem)
        path.unlink()
    todo = tuple(s for s in range(n_shards) if shard_path(index_dir, zoom, s).name not in done)
    return LevelJob(index_dir, manifest, plan, identity, codec, encoder.dim, shard_size, n_shards, todo, started)


def _shard_number(path: Path) -> int | None:
    number = path.stem.partition("-")[2]
    return int(number) if number.isdigit() else None


def _file_sha(path: Path) -> str | None:
    return file_sha256(path) if path.is_file() else None


def _shard_problem(
    path: Path, x: npt.NDArray[np.int64], y: npt.NDArray[np.int64], parent_row: npt.NDArray[np.int64], *,
    zoom: int, dim: int, faiss_sha: Callable[[], str | None],
) -> str | None:
    """Why a finished shard cannot be reused (unreadable, or not the planned rows of its slice), or None.

    Reads the whole shard once: a truncated or damaged file must be re-encoded now, not found
    when the FAISS file is built from it. A shard of a finished level (no embedding column) is
    reused only while the level's FAISS file is the one it was slimmed against (``faiss_sha``
    gives that file's sha256) and gives its vectors back exactly.
    """
    try:
        table = pq.read_table(path, memory_map=True)
    except (OSError, pa.ArrowException) as e:
        return f"damaged ({e})"
    names = {"x", "y", "parent_row"}
    if not names <= set(table.column_names):
        return f"columns {sorted(table.column_names)} lack {sorted(names - set(table.column_names))}"
    if "embedding" in table.column_names:
        emb_type = table.schema.field("embedding").type
        if getattr(emb_type, "list_size", None) != dim:
            return f"embedding type {emb_type}, expected {dim} values per row"
    else:
        try:
            home = VectorHome.of(path)
        except GeoIndexError as e:
            return str(e)
        assert home is not None
        if home.not_exact:
            return home.not_exact
        if faiss_sha() != home.sha256:
            return f"its vectors were in a {FAISS_FILE} that is missing or was replaced since"
    sx = column_to_numpy(table.column("x")).astype(np.int64)
    sy = column_to_numpy(table.column("y")).astype(np.int64)
    sp = column_to_numpy(table.column("parent_row")).astype(np.int64)
    # The shard must hold planned rows of its slice, in plan order (tiles the source lacks left out).
    planned = tile_code_array(x, y, zoom=zoom)
    order = np.argsort(planned, kind="stable")
    codes = tile_code_array(sx, sy, zoom=zoom)
    pos = np.clip(np.searchsorted(planned[order], codes), 0, max(len(planned) - 1, 0))
    if not len(planned) and len(codes):
        return f"{len(codes)} rows, but its slice of the plan is empty"
    rows = order[pos] if len(planned) else pos
    if len(codes) and (np.any(planned[rows] != codes) or np.any(np.diff(rows) <= 0)
                       or np.any(np.asarray(parent_row)[rows] != sp)):
        return "rows that are not the planned tiles of this shard"
    return None


def complete_level(
    job: LevelJob, *, encoder: dict[str, Any], checkpoint: str | None = None,
    build_args: dict[str, Any] | None = None, failures: list[str] | None = None, bad_skipped: int = 0,
) -> BuildSummary:
    """Build the FAISS file from the level's parquet shards and record the level in the manifest.

    Args:
        encoder: the map encoder's identity (``ImageEncoder.identity``), recorded in the manifest.
        failures: one line per shard that could not be encoded; if any, nothing is finished.

    Raises:
        BuildIncompleteError: ``failures`` is not empty (finished shards are kept for a rerun).
    """
    zoom = job.zoom
    if failures:
        shown = failures[:_FAILURES_SHOWN]
        more = f"; and {len(failures) - len(shown)} more shards" if len(failures) > len(shown) else ""
        raise BuildIncompleteError(
            f"level z{zoom}: {len(failures)} of {job.n_shards} shards could not be encoded "
            f"({'; '.join(shown)}{more}). Finished shards are kept: fix or delete the bad tiles and rerun the same "
            "command to resume, or add --skip-bad-tiles to leave them out as missing"
        )
    info = finish_level(job.index_dir, zoom, n_parents=job.plan.n_parents, codec=job.codec, dim=job.dim)
    info = dataclasses.replace(info, encoder=EncoderIdentity.from_dict({**encoder, "checkpoint": checkpoint}))
    manifest = job.manifest.with_level(info)
    before = job.manifest.level(zoom)
    if before is not None and before.rows == info.rows:
        # A repair (damaged shards re-encoded) that kept every row keeps the levels below valid: their
        # parent rows still point at the same tiles. open_store checks every child against its parent
        # tile, so a level whose rows did move is refused rather than searched.
        deeper = tuple(lv for lv in job.manifest.levels if lv.zoom > zoom)
        manifest = dataclasses.replace(manifest, levels=manifest.levels + deeper)
    if build_args:
        manifest = dataclasses.replace(manifest, build_args={**manifest.build_args, f"z{zoom}": build_args})
    manifest.save(job.index_dir)
    # The manifest now records the FAISS file: drop the shards' copy of the vectors, then record the slimmer shards.
    slim = drop_embeddings(job.index_dir, zoom, info,
                           codec=job.codec if job.plan.n_parents is not None else FIRST_LEVEL_CODEC)
    if slim != info:
        manifest = dataclasses.replace(manifest, levels=_replace_level(manifest.levels, slim))
        manifest.save(job.index_dir)
    return BuildSummary(zoom, info.rows, job.planned, job.planned - info.rows, len(job.todo),
                        job.n_shards - len(job.todo), time.perf_counter() - job.started, bad_skipped)


def build_level(
    index_dir: str | os.PathLike,
    zoom: int,
    *,
    source: TileSource,
    encoder: ImageEncoder,
    coverage: CoverageLike,
    schedule: LevelSchedule = LevelSchedule(),
    codec: str = "fp16",
    checkpoint: str | None = None,
    shard_size: int = 8192,
    batch_size: int = 64,
    workers: int | None = None,
    overwrite: bool = False,
    build_args: dict[str, Any] | None = None,
    progress: Callable[[int], None] | None = None,
    on_plan: Callable[[int, int], None] | None = None,
    skip_bad_tiles: bool = False,
) -> BuildSummary:
    """Encode level ``zoom`` of an index with its map encoder; resume where a killed run stopped.

    Args:
        index_dir: the index folder (created if needed).
        source: tile images. encoder: this zoom's map encoder (its base is the photo encoder).
        coverage: which tiles to index. schedule, codec: fixed by the first level built.
        checkpoint: path of the map-encoder checkpoint, recorded in the manifest.
        shard_size: planned tiles per parquet shard (the unit of resumption).
        workers: processes reading and preprocessing tiles (threads for a remote source, see
            ``tile_encoding.loader_pool``); default ``threads.loader_threads`` of torch's thread count.
        progress: called with the number of tiles handled after each batch.
        on_plan: called once with (planned tiles, tiles already done in reused shards).
        skip_bad_tiles: leave tiles that cannot be read out of the level, as if the source lacked
            them (counted in the summary), instead of failing their shards.

    Raises:
        EncoderMismatchError: the index was built with another photo encoder, or this level holds
            shards of another map encoder (without ``overwrite``).
        IndexMismatchError: the index was built with another codec, schedule, imagery or coverage.
        BuildIncompleteError: some tiles failed to load (not just missing); rerun to resume.
    """
    with index_write_lock(index_dir, what=f"a build of z{zoom}"):
        job = start_level(index_dir, zoom, encoder=encoder, imagery=source.name, coverage=coverage, schedule=schedule,
                          codec=codec, shard_size=shard_size, batch_size=batch_size, overwrite=overwrite,
                          imagery_spec=source_spec(source))
        if on_plan:
            on_plan(job.planned, job.reused_tiles)

        failures: list[str] = []
        bad: list[str] = []
        plan = job.plan
        workers = workers or loader_threads(torch.get_num_threads())
        with loader_pool(source, encoder, max(1, workers)) as pool:
            for s in job.todo:
                sl = job.rows(s)
                try:
                    build_shard(job.index_dir, zoom, s, plan.x[sl], plan.y[sl], plan.parent_row[sl], source=source,
                                encoder=encoder, pool=pool, batch_size=batch_size, progress=progress,
                                skip_bad=skip_bad_tiles, on_bad=bad.append)
                except GeoIndexError as e:
                    failures.append(f"shard {s}: {e}")
                    log.warning("level z%d shard %d not written: %s", zoom, s, e)
        for reason in bad[:_FAILURES_SHOWN]:
            log.warning("level z%d: left out an unreadable tile (--skip-bad-tiles): %s", zoom, reason)
        summary = complete_level(job, encoder=encoder.identity, checkpoint=checkpoint, build_args=build_args,
                                 failures=failures, bad_skipped=len(bad))
    orphaned = count_orphans(plan, source, coverage)
    if orphaned:
        parent_zoom = schedule.parent_zoom(zoom)
        log.warning(
            "level z%d: %d tiles of %s at zoom %d were left out because their zoom-%d parent tile is not in "
            "the index (the source lacks it at zoom %d). To index them, add those parent tiles to the source "
            "(e.g. python -m pipelines.fetch_tiles --zoom %d) and rebuild from --zoom %d, or make zoom %d the "
            "first level (--schedule %d STOP STEP)",
            zoom, orphaned, source.name, zoom, parent_zoom, parent_zoom, parent_zoom, parent_zoom, zoom, zoom,
        )
    return dataclasses.replace(summary, orphaned=orphaned)


def _replace_level(levels: tuple[LevelInfo, ...], info: LevelInfo) -> tuple[LevelInfo, ...]:
    return tuple(info if lv.zoom == info.zoom else lv for lv in levels)


def _ignore(_: int) -> None:
    pass


def _check_compatible(index_dir: Path, have: Manifest, want: Manifest) -> None:
    problems = []
    if have.photo_encoder != want.photo_encoder:
        problems.append(f"photo encoder {have.photo_encoder.name!r} ({have.photo_encoder.short}) "
                        f"vs {want.photo_encoder.name!r} ({want.photo_encoder.short})")
    if have.codec != want.codec:
        problems.append(f"codec {have.codec!r} vs {want.codec!r}")
    if have.schedule != want.schedule:
        problems.append(f"schedule {list(have.schedule.zooms)} vs {list(want.schedule.zooms)}")
    if have.imagery != want.imagery:
        problems.append(f"imagery {have.imagery!r} vs {want.imagery!r}")
    if have.coverage != want.coverage:
        problems.append("coverage differs")
    if problems:
        # An encoder difference keeps its own, narrower type; the message lists every difference either way.
        error = EncoderMismatchError if have.photo_encoder != want.photo_encoder else IndexMismatchError
        raise error(
            f"{index_dir} was built with different settings: {'; '.join(problems)}. "
            "One index never mixes them: build into another --index folder"
        )
