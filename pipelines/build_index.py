"""Encode map tiles into an index, one zoom level at a time: `python -m pipelines.build_index --zoom 12`.

Level z holds the tiles of zoom z under the rows of the level above (every covered tile for the
first level), encoded with zoom z's map encoder. Interrupted builds resume at shard granularity;
an index never mixes encoders. `--engine ray` encodes the shards on a Ray cluster (an optional
extra: pip install -e '.[ray]' in the checkout) and writes the same shards as the default local engine.

`--calibrate` fits the index's calibrated probabilities, uncertainty radii and "no confident
match" threshold on views rendered from its own imagery (or on `--calibrate-photos CSV`) and
stores them in the manifest; `--all` does so at the end when the encoder is pretrained and the
imagery is on this machine (`--no-calibrate` skips it).

`--all --lazy-from 12` builds the levels above zoom 12 and declares 12 and deeper lazy: their tiles
are fetched from `--source` and encoded the first time a query needs them, then kept in the index
(geoindex.retrieval.levels.lazy, geoindex.storage.lazy_store). `--compact` folds a lazy index's appended rows
into sorted parts.
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from geoindex.errors import ConfigError, GeoIndexError, IndexWriteError
from geoindex.files import index_write_lock
from geoindex.geometry.coverage import Coverage
from geoindex.geometry.tiles import LevelSchedule
from geoindex.interfaces.cli import resolve_device
from geoindex.models.encoders import (
    AUTO_ENCODER,
    ENCODER_CHOICES,
    ENCODERS,
    PRECISIONS,
    choose_encoder,
    create_encoder,
    load_map_encoder,
)
from geoindex.models.precision import PRECISION_HELP
from geoindex.models.threads import build_threads, check_threads
from geoindex.sources import open_source
from geoindex.storage.build import BuildSummary, build_level
from geoindex.storage.lazy_store import compact, declare_lazy
from geoindex.storage.manifest import CODECS, MANIFEST, Manifest
from geoindex.training.calibrate import DEFAULT_COUNT, DEFAULT_SEED, calibrate_index
from pipelines._cli import pipeline_main, progress_bar

log = logging.getLogger("pipelines.build_index")
ENGINES = ("local", "ray")


@dataclass(frozen=True)
class Config:
    """Arguments of a build; see ``parse_args`` for their meaning."""

    zooms: tuple[int, ...]
    index: Path = Path("indexes/default")
    source: str = "bluemarble"
    encoder: str = AUTO_ENCODER  # resolved by ``run``: the index's encoder, else CLIP if found, else EfficientNet
    weights: str | None = None
    download: bool = False
    map_checkpoints: Path | None = None
    device: str = "cpu"
    precision: str = "auto"
    batch_size: int = 64
    codec: str = "fp16"
    shard_size: int = 8192
    workers: int | None = None  # None: geoindex.models.threads.loader_threads of the encoder threads
    threads: int | None = None  # None: every core (geoindex.models.threads.cpu_cores)
    schedule: LevelSchedule = LevelSchedule()
    bbox: tuple[float, float, float, float] | None = None
    geojson: Path | None = None
    overwrite: bool = False
    skip_bad_tiles: bool = False
    quiet: bool = False
    engine: str = "local"
    ray_address: str | None = None
    ray_actors: int | None = None
    ray_gpus_per_actor: float = 0.0
    ray_cpus_per_actor: float = 1.0
    lazy_from: int | None = None
    compact: bool = False
    calibrate: bool = False  # only calibrate the index (no level is built)
    auto_calibrate: bool = False  # --all sets it: calibrate at the end when the encoder and imagery allow
    calibrate_photos: Path | None = None
    calibrate_count: int = DEFAULT_COUNT
    calibrate_seed: int = DEFAULT_SEED

    def __post_init__(self) -> None:
        if self.lazy_from is not None:
            self.schedule.index_of(self.lazy_from)
            if self.lazy_from == self.schedule.start:
                raise ConfigError(f"--lazy-from {self.lazy_from}: the first level must be built; choose a deeper zoom")
        check_threads(self.threads)
        check_threads(self.workers, option="--workers")
        if self.calibrate_count < 2:
            raise ConfigError(f"--calibrate-count must be at least 2, got {self.calibrate_count}")
        if self.engine not in ENGINES:
            raise ConfigError(f"unknown --engine {self.engine!r}; choose one of {list(ENGINES)}")
        if self.engine == "ray" and self.skip_bad_tiles:
            raise ConfigError("--skip-bad-tiles applies to --engine local only; fix the bad tiles for a Ray build")
        if self.engine == "ray" and self.device != "cpu":
            raise ConfigError(
                f"--device {self.device} applies to --engine local only; Ray actors use GPUs when "
                "--ray-gpus-per-actor is above 0"
            )

    def coverage(self) -> Coverage:
        return Coverage.from_options(self.bbox, self.geojson)


def parse_args(argv: Sequence[str] | None = None) -> Config:
    p = argparse.ArgumentParser(prog="python -m pipelines.build_index", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--zoom", type=int, nargs="+", help="zoom level(s) to build, in order (e.g. 12)")
    which.add_argument("--all", action="store_true", help="build every level of the schedule, coarsest first")
    which.add_argument("--compact", action="store_true",
                       help="fold the rows that queries appended to the index's lazy levels into sorted parts")
    which.add_argument("--calibrate", action="store_true",
                       help="fit the index's calibrated probabilities, radii and confidence threshold (stored in its "
                            "manifest) on views of its own imagery, or on --calibrate-photos")
    p.add_argument("--lazy-from", type=int, metavar="ZOOM",
                   help="build only the levels above ZOOM; ZOOM and deeper are encoded from --source on first use")
    p.add_argument("--index", type=Path, default=Path(os.environ.get("GEOINDEX_INDEX", "indexes/default")),
                   help="index folder (default: $GEOINDEX_INDEX or indexes/default)")
    p.add_argument("--source", default="bluemarble",
                   help="tile source: bluemarble (embedded, offline), a tile folder, .mbtiles, "
                        "an XYZ URL template or an xyzservices name (default: bluemarble)")
    p.add_argument("--encoder", default=AUTO_ENCODER, choices=ENCODER_CHOICES,
                   help="base encoder of photos and maps (default: auto: the encoder of an index being extended, "
                        "else clip-vit-b-32, the paper's, when its weights are here, else efficientnet-lite0)")
    p.add_argument("--weights", help="local weights file for the encoder (else the local model caches)")
    p.add_argument("--download", action="store_true", help="download missing encoder weights")
    p.add_argument("--map-checkpoints", type=Path,
                   help="folder of fine-tuned map encoders zNN.pt (from pipelines.train); "
                        "a zoom without one uses the untrained base")
    p.add_argument("--device", default="cpu", help="torch device: cpu, cuda, cuda:1, auto (default: cpu)")
    p.add_argument("--precision", default="auto", choices=PRECISIONS,
                   help=f"encoder arithmetic: {PRECISION_HELP}; recorded per level")
    p.add_argument("--batch-size", type=int, default=64, help="tiles per encoder batch (default: 64)")
    p.add_argument("--codec", default="fp16", choices=CODECS, help="FAISS codec of levels after the first")
    p.add_argument("--shard-size", type=int, default=8192, help="tiles per parquet shard, the unit of resumption")
    p.add_argument("--threads", type=int,
                   help="encoder and FAISS threads (default: every CPU this process may use)")
    p.add_argument("--workers", type=int,
                   help="processes reading and preprocessing tiles (threads for http/xyz sources; default: one per "
                        "encoder thread, at least 2)")
    p.add_argument("--schedule", type=int, nargs=3, metavar=("START", "STOP", "STEP"), default=(4, 16, 2),
                   help="zoom levels of the hierarchy (default: 4 16 2, the paper's)")
    p.add_argument("--bbox", type=float, nargs=4, metavar=("W", "S", "E", "N"), help="index only this area")
    p.add_argument("--geojson", type=Path, help="index only the polygons of this GeoJSON file")
    p.add_argument("--overwrite", action="store_true", help="re-encode a level that holds another encoder's shards")
    p.add_argument("--skip-bad-tiles", action="store_true",
                   help="leave tiles that cannot be read out of the index, as if missing (counted in the summary), "
                        "instead of stopping the level")
    p.add_argument("--quiet", action="store_true", help="no progress bar, warnings only")
    cal = p.add_argument_group("calibration (--calibrate, and the end of --all)")
    cal.add_argument("--calibrate-photos", type=Path, metavar="CSV",
                     help="fit on these photos (columns file,lat,lon; files relative to the CSV) instead of views")
    cal.add_argument("--calibrate-count", type=int, default=DEFAULT_COUNT,
                     help=f"views to fit on (default: {DEFAULT_COUNT})")
    cal.add_argument("--calibrate-seed", type=int, default=DEFAULT_SEED,
                     help=f"seed of the views (default: {DEFAULT_SEED}; evaluate on other seeds)")
    cal.add_argument("--no-calibrate", action="store_true", help="--all: leave the index uncalibrated")
    ray = p.add_argument_group("distributed builds (--engine ray; --batch-size and --workers apply per actor)")
    ray.add_argument("--engine", choices=ENGINES, default="local",
                     help="local: this process (default); ray: an actor pool on a Ray cluster (pip install -e "
                          "'.[ray]' in the checkout); the index folder must be on a filesystem every node mounts")
    ray.add_argument("--ray-address", help="Ray cluster address, e.g. auto or ray://head:10001 "
                                           "(default: $RAY_ADDRESS, else a local Ray instance)")
    ray.add_argument("--ray-actors", type=int, help="encoder actors (default: as many as the cluster's GPUs "
                                                    "or CPUs allow)")
    ray.add_argument("--ray-gpus-per-actor", type=float, default=0.0,
                     help="GPUs per actor; fractions share a GPU (default: 0, encode on CPU)")
    ray.add_argument("--ray-cpus-per-actor", type=float, default=1.0,
                     help="CPUs per actor, also its torch threads on CPU (default: 1)")
    a = p.parse_args(argv)
    try:
        schedule = LevelSchedule(*a.schedule)
    except ConfigError as e:
        raise ConfigError(f"--schedule {' '.join(map(str, a.schedule))}: {e}") from e
    device = a.device
    if device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    return Config(
        zooms=() if a.compact or a.calibrate else schedule.zooms if a.all else tuple(a.zoom), lazy_from=a.lazy_from,
        compact=a.compact, calibrate=a.calibrate, auto_calibrate=a.all and not a.no_calibrate,
        calibrate_photos=a.calibrate_photos, calibrate_count=a.calibrate_count, calibrate_seed=a.calibrate_seed,
        index=a.index, source=a.source, encoder=a.encoder,
        weights=a.weights, download=a.download, map_checkpoints=a.map_checkpoints, device=device,
        precision=a.precision,
        batch_size=a.batch_size, codec=a.codec, shard_size=a.shard_size, workers=a.workers, threads=a.threads,
        schedule=schedule, bbox=tuple(a.bbox) if a.bbox else None, geojson=a.geojson,
        overwrite=a.overwrite, skip_bad_tiles=a.skip_bad_tiles, quiet=a.quiet, engine=a.engine,
        ray_address=a.ray_address, ray_actors=a.ray_actors,
        ray_gpus_per_actor=a.ray_gpus_per_actor, ray_cpus_per_actor=a.ray_cpus_per_actor,
    )


def _checkpoint(cfg: Config, zoom: int) -> str | None:
    """The map-encoder checkpoint of ``zoom``, or None (the untrained base) if there is none."""
    if cfg.map_checkpoints is None:
        return None
    path = cfg.map_checkpoints / f"z{zoom:02d}.pt"
    if not path.is_file():
        log.warning("no map encoder %s: zoom %d uses the untrained base encoder", path, zoom)
        return None
    return str(path.resolve())


_OS_HINTS = {
    errno.EROFS: "the file system is read-only: give an --index on a writable one",
    errno.ENOSPC: "the disk is full: free space (or give an --index on another disk)",
    errno.EDQUOT: "the disk quota is exhausted: free space (or give an --index on another disk)",
    errno.EFBIG: "a file exceeds the file-size limit (ulimit -f): raise the limit or use a smaller --shard-size",
    errno.EACCES: "permission denied: make the --index folder writable for this user",
    errno.EPERM: "permission denied: make the --index folder writable for this user",
}


def run(cfg: Config) -> list[BuildSummary]:
    """Build the requested levels in order (or compact) under the index's write lock; one summary per level built.

    Raises:
        IndexBusyError: another build or compaction of this index is running.
        IndexWriteError: the operating system refused a write (read-only, full, file too large); the
            shards already finished are kept, and rerunning resumes.
    """
    what = ("build_index --compact" if cfg.compact else "build_index --calibrate" if cfg.calibrate
            else f"build_index --zoom {' '.join(map(str, cfg.zooms))}")
    try:
        if cfg.compact:  # compact takes the lock itself, once it knows the index is a lazy one
            for c in compact(cfg.index):
                log.info("lazy z%02d: %d files folded into %d parts, %d rows", c.zoom, c.files_before, c.parts,
                         c.rows)
            return []
        cfg = _choose_encoder(cfg)
        with index_write_lock(cfg.index, what=what):
            return _run_locked(cfg)
    except GeoIndexError:
        raise
    except OSError as e:
        hint = _OS_HINTS.get(e.errno or 0, "fix the cause and rerun")
        where = f" ({e.filename})" if e.filename else ""
        raise IndexWriteError(
            f"{what}: cannot write {cfg.index}{where}: {e.strerror or e}; {hint}. Nothing finished was lost: "
            "rerun the same command to resume"
        ) from e


def _run_locked(cfg: Config) -> list[BuildSummary]:
    if cfg.calibrate:
        _calibrate(cfg)
        return []
    if cfg.lazy_from is not None:
        cfg = dataclasses.replace(cfg, zooms=tuple(z for z in cfg.zooms if z < cfg.lazy_from))
    summaries = _run(cfg)
    if cfg.lazy_from is not None:
        lazy = declare_lazy(cfg.index, from_zoom=cfg.lazy_from, source=cfg.source, batch_size=cfg.batch_size,
                            checkpoints={z: _checkpoint(cfg, z) for z in cfg.schedule.zooms if z >= cfg.lazy_from})
        log.info("levels %s of %s are lazy: encoded from %s on first use", list(lazy.zooms), cfg.index, cfg.source)
    if cfg.auto_calibrate:
        if not ENCODERS[cfg.encoder].meaningful:
            log.info("%s is left uncalibrated: the %s encoder is random-init", cfg.index, cfg.encoder)
        elif cfg.lazy_from is not None:
            log.info("%s is left uncalibrated: calibrating would encode lazy areas; run --calibrate when wanted",
                     cfg.index)
        else:
            try:
                _calibrate(cfg)
            except ConfigError as e:  # e.g. remote imagery: the build stands, uncalibrated
                log.warning("%s is left uncalibrated: %s", cfg.index, e)
    return summaries


def _calibrate(cfg: Config) -> None:
    calibration = calibrate_index(cfg.index, photos=cfg.calibrate_photos, count=cfg.calibrate_count,
                                  seed=cfg.calibrate_seed, weights=cfg.weights, download=cfg.download,
                                  device=resolve_device(cfg.device))
    f = calibration.fitted_on
    temps = ", ".join(f"z{lv.zoom} T={lv.temperature:.3g}" for lv in calibration.levels)
    log.info("calibrated %s on %d %s (seed %s, k=%d): %s; radii hold %.2f / %.2f of the probability; "
             "no confident match below %.3f", cfg.index, f.count, f.kind, f.seed, f.k, temps,
             *calibration.radius_mass, calibration.ood_threshold)


def _choose_encoder(cfg: Config) -> Config:
    """``--encoder auto`` made concrete, saying which encoder and why: an index being extended keeps its
    encoder; a new one gets CLIP ViT-B/32 when its weights are here, else EfficientNet-Lite0."""
    if cfg.encoder != AUTO_ENCODER:
        return cfg
    if (cfg.index / MANIFEST).is_file():
        name, why = Manifest.load(cfg.index).photo_encoder.name, f"the encoder of the levels already in {cfg.index}"
    else:
        name, why = choose_encoder(cfg.weights, download=cfg.download)
    log.info("encoder %s (--encoder auto: %s)", name, why)
    return dataclasses.replace(cfg, encoder=name)


def _run(cfg: Config) -> list[BuildSummary]:
    for zoom in cfg.zooms:
        cfg.schedule.index_of(zoom)
    coverage = cfg.coverage()
    if cfg.engine == "ray":
        return _run_levels(cfg, _ray_engine(cfg, coverage))
    source = open_source(cfg.source)
    resolve_device(cfg.device)  # a one-line error for a device this machine lacks, not a torch traceback
    base = create_encoder(cfg.encoder, weights=cfg.weights, download=cfg.download, device=cfg.device,
                          precision=cfg.precision)

    def local(zoom: int, **kw: Any) -> BuildSummary:
        checkpoint = _checkpoint(cfg, zoom)
        return build_level(cfg.index, zoom, source=source, encoder=load_map_encoder(base, checkpoint),
                           coverage=coverage, schedule=cfg.schedule, codec=cfg.codec, checkpoint=checkpoint,
                           shard_size=cfg.shard_size, batch_size=cfg.batch_size, workers=cfg.workers,
                           overwrite=cfg.overwrite, skip_bad_tiles=cfg.skip_bad_tiles, **kw)

    with build_threads(cfg.threads):  # build_level sizes its loaders from these threads unless --workers
        return _run_levels(cfg, local)


def _ray_engine(cfg: Config, coverage: Coverage) -> Callable[..., BuildSummary]:
    from geoindex.storage.distributed import EncoderRecipe, RayOptions, build_level_ray

    options = RayOptions(cfg.ray_address, cfg.ray_actors, cfg.ray_gpus_per_actor, cfg.ray_cpus_per_actor)

    def ray(zoom: int, **kw: Any) -> BuildSummary:
        recipe = EncoderRecipe(cfg.encoder, cfg.weights, cfg.download, _checkpoint(cfg, zoom), cfg.precision)
        return build_level_ray(cfg.index, zoom, source=cfg.source, encoder=recipe, coverage=coverage,
                               schedule=cfg.schedule, codec=cfg.codec, shard_size=cfg.shard_size,
                               batch_size=cfg.batch_size, workers=cfg.workers, overwrite=cfg.overwrite,
                               options=options, **kw)

    return ray


def _run_levels(cfg: Config, build: Callable[..., BuildSummary]) -> list[BuildSummary]:
    started_ray = False
    if cfg.engine == "ray":
        from geoindex.storage.distributed import init_ray, shutdown_ray

        started_ray = init_ray(cfg.ray_address, quiet=cfg.quiet)
    try:
        return _build_levels(cfg, build)
    finally:
        if started_ray:
            shutdown_ray()


def _build_levels(cfg: Config, build: Callable[..., BuildSummary]) -> list[BuildSummary]:
    summaries = []
    args = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()
            if k not in ("zooms", "lazy_from", "compact")}
    args["schedule"] = list(cfg.schedule.zooms)
    for zoom in cfg.zooms:
        with progress_bar(f"z{zoom:02d}", quiet=cfg.quiet) as bar:
            def on_plan(total: int, done: int, bar=bar) -> None:  # noqa: B023 - bound per level
                bar.reset(total=total)
                bar.update(done)

            summary = build(zoom, build_args=args, progress=bar.update, on_plan=on_plan)
        log.info(
            "z%02d: %d rows (%d of %d planned tiles missing from the source%s%s) in %.1f s, %s; "
            "%d shards written, %d reused -> %s",
            zoom, summary.rows, summary.missing, summary.planned,
            f", {summary.bad_skipped} of them unreadable and skipped" if summary.bad_skipped else "",
            f"; {summary.orphaned} more tiles of the source skipped: parent tile missing" if summary.orphaned else "",
            summary.seconds, summary.rate_text, summary.shards_written, summary.shards_reused, cfg.index,
        )
        summaries.append(summary)
    manifest = Manifest.load(cfg.index)
    log.info("index %s now holds levels %s", cfg.index, [lv.zoom for lv in manifest.levels])
    return summaries


def main(argv: Sequence[str] | None = None) -> int:
    return pipeline_main(argv, parse_args, run)


if __name__ == "__main__":
    raise SystemExit(main())
