"""Build index levels on Ray Data: the local engine's plan, shards and finish, encoded by a pool of Ray actors.

The driver plans the level exactly as the local engine does (``geoindex.storage.build.start_level``) and
writes the planned tiles next to the shards (``z12/_plan-<sha>.npy``). A Ray dataset of the
unfinished shard numbers then goes through ``map_batches`` with an actor pool: each actor rebuilds
the map encoder (registry name, weights, checkpoint) and the tile source (the ``--source`` string)
once, reads its shard's tiles from the plan file, and encodes and writes whole shards with
``geoindex.storage.build.build_shard``, the function the local engine uses, so both engines write the same
``part-NNNNN.parquet`` files. The driver finally builds the FAISS file from the parquet shards and
records the level in the manifest (``geoindex.storage.build.complete_level``).

Every node must see the index folder at the same path (NFS or another shared filesystem); actors
check that before encoding. Ray is an optional extra (``pip install -e '.[ray]'`` in the checkout): it is
imported only when a Ray build starts.
"""

from __future__ import annotations

import json
import logging
import math
import os
import socket
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import numpy.typing as npt

from geoindex.errors import (
    ConfigError,
    EncoderMismatchError,
    GeoIndexError,
    TileSourceError,
    WeightsNotFoundError,
)
from geoindex.files import atomic_path, index_write_lock
from geoindex.geometry.tiles import LevelSchedule
from geoindex.models.encoders import ImageEncoder, create_encoder, load_map_encoder
from geoindex.models.threads import loader_threads
from geoindex.storage.build import (
    PLAN_FILE,
    BuildSummary,
    CoverageLike,
    LevelJob,
    build_shard,
    complete_level,
    start_level,
)
from geoindex.storage.store import level_dir

__all__ = ["EncoderRecipe", "RayOptions", "build_level_ray", "init_ray", "shutdown_ray"]

log = logging.getLogger(__name__)

INSTALL_HINT = "pip install -e '.[ray]' in the geoindex checkout"
_ERROR_TYPES: dict[str, type[GeoIndexError]] = {
    t.__name__: t for t in (ConfigError, EncoderMismatchError, WeightsNotFoundError, TileSourceError)
}
_PLAN_DTYPE = np.dtype([("x", "<i4"), ("y", "<i4"), ("parent_row", "<i8")])


def _import_ray() -> ModuleType:
    try:
        import ray
        import ray.data  # noqa: F401 - the Data library is a separate extra of ray
    except ImportError as e:
        raise ConfigError(
            f"--engine ray needs Ray Data, which is not installed ({e}); install the optional extra: "
            f"{INSTALL_HINT} (or pip install 'ray[data]'), or build with --engine local"
        ) from e
    return ray


@dataclass(frozen=True)
class EncoderRecipe:
    """How to rebuild a map encoder on a worker: registry name, base weights, map-encoder checkpoint.

    Paths must exist at the same place on every node; workers check that the encoder they build
    has the identity (weights fingerprint, checkpoint sha256) of the driver's.
    """

    name: str
    weights: str | None = None
    download: bool = False
    checkpoint: str | None = None
    precision: str = "auto"

    def create(self, device: str = "cpu") -> ImageEncoder:
        base = create_encoder(self.name, weights=self.weights, download=self.download, device=device,
                              precision=self.precision)
        return load_map_encoder(base, self.checkpoint)


@dataclass(frozen=True)
class RayOptions:
    """Where and how wide a Ray build runs.

    Attributes:
        address: Ray cluster address (``auto``, ``ray://head:10001``, ``host:6379``); None connects
            to ``$RAY_ADDRESS`` or starts a local Ray instance.
        actors: encoder actors; None: as many as the cluster's GPUs (or CPUs) allow, at most one per shard.
        gpus_per_actor: GPUs each actor reserves (fractions share a GPU); 0 encodes on CPU.
        cpus_per_actor: CPUs each actor reserves; also its torch threads on CPU.
    """

    address: str | None = None
    actors: int | None = None
    gpus_per_actor: float = 0.0
    cpus_per_actor: float = 1.0

    def __post_init__(self) -> None:
        if self.actors is not None and self.actors < 1:
            raise ConfigError(f"--ray-actors must be >= 1, got {self.actors}")
        if self.gpus_per_actor < 0 or self.cpus_per_actor <= 0:
            raise ConfigError(
                f"need --ray-gpus-per-actor >= 0 and --ray-cpus-per-actor > 0, "
                f"got {self.gpus_per_actor} and {self.cpus_per_actor}"
            )

    @property
    def device(self) -> str:
        return "cuda" if self.gpus_per_actor > 0 else "cpu"

    def pool_size(self, cluster: dict[str, float], shards: int) -> int:
        """Actors to start for ``shards`` shards on a cluster with these total resources."""
        if self.actors is not None:
            return max(1, min(self.actors, shards))
        if self.gpus_per_actor > 0:
            fits = math.floor(cluster.get("GPU", 0.0) / self.gpus_per_actor + 1e-9)
            if fits < 1:
                raise ConfigError(
                    f"the Ray cluster has {cluster.get('GPU', 0.0):g} GPUs, fewer than --ray-gpus-per-actor "
                    f"{self.gpus_per_actor:g}; use --ray-gpus-per-actor 0 to encode on CPUs"
                )
        else:
            fits = math.floor(cluster.get("CPU", 1.0) / self.cpus_per_actor + 1e-9)
        return max(1, min(fits, shards))


def init_ray(address: str | None = None, *, quiet: bool = False) -> bool:
    """Connect to a Ray cluster (or start a local instance); True if this call did it.

    Raises:
        ConfigError: Ray is not installed, or the cluster cannot be reached.
    """
    ray = _import_ray()
    _quiet_ray_data(quiet)
    if ray.is_initialized():
        return False
    try:
        ray.init(address=address, log_to_driver=not quiet,
                 logging_level=logging.WARNING if quiet else logging.INFO)
    except (ConnectionError, RuntimeError, ValueError) as e:
        raise ConfigError(f"cannot connect to the Ray cluster at {address or '$RAY_ADDRESS/local'}: {e}; "
                          "check --ray-address") from e
    return True


def shutdown_ray() -> None:
    """Disconnect from Ray (stopping a local instance this process started)."""
    _import_ray().shutdown()


def _quiet_ray_data(quiet: bool) -> None:
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # the build shows its own bar in tiles/s
    if quiet:
        for name in ("ray.data", "ray.data._internal"):
            logging.getLogger(name).setLevel(logging.ERROR)


def _plan_file(job: LevelJob) -> Path:
    """Write the planned tiles (x, y, parent_row per row) for the workers, once per plan."""
    path = level_dir(job.index_dir, job.zoom) / f"_plan-{job.identity['plan_sha256'][:16]}.npy"
    if not path.is_file():
        rows = np.empty(job.planned, dtype=_PLAN_DTYPE)
        rows["x"], rows["y"], rows["parent_row"] = job.plan.x, job.plan.y, job.plan.parent_row
        # Streamed to a temporary file, then renamed: a zoom-14 plan is gigabytes. Workers memory-map
        # it and read only their shards' rows.
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            np.save(f, rows, allow_pickle=False)
    return path


class ShardEncoder:
    """A Ray Data actor: builds the encoder and tile source once, then encodes and writes whole shards.

    A setup error (index folder not shared, other weights, unknown source) does not kill the actor,
    which Ray would restart and report as its own error type: every shard sent to it comes back
    with the error, and the driver raises it with its geoindex type.
    """

    def __init__(
        self, *, index_dir: str, zoom: int, plan_file: str, identity: dict[str, Any], shard_size: int,
        source: str, encoder: EncoderRecipe, device: str, threads: int, batch_size: int, workers: int | None,
    ) -> None:
        import torch

        torch.set_num_threads(max(1, threads))
        self.node = socket.gethostname()
        self.index_dir = Path(index_dir)
        self.zoom = zoom
        self.plan_path = level_dir(self.index_dir, zoom) / plan_file
        self.plan: np.ndarray | None = None  # opened on the first shard: a spare actor may start after the end
        self.shard_size = shard_size
        self.batch_size = batch_size
        self.pool = ThreadPoolExecutor(max_workers=max(1, workers or loader_threads(threads)))
        self.setup_error: GeoIndexError | None = None
        try:
            self._setup(identity, source, encoder, device)
        except GeoIndexError as e:
            self.setup_error = e if self.node in str(e) else type(e)(f"Ray worker on {self.node}: {e}")

    def _setup(self, identity: dict[str, Any], source: str, encoder: EncoderRecipe, device: str) -> None:
        from geoindex.sources import open_source

        ldir = self.plan_path.parent
        try:
            seen = json.loads((ldir / PLAN_FILE).read_text())
        except (OSError, ValueError):
            seen = None
        if seen != identity:
            raise ConfigError(
                f"Ray worker on {self.node} does not see the build of {ldir} ({PLAN_FILE} missing or different): "
                "put --index on a filesystem that every Ray node mounts at the same path"
            )
        self.encoder = encoder.create(device)
        if self.encoder.identity != identity["encoder"]:
            raise EncoderMismatchError(
                f"Ray worker on {self.node} built encoder {self.encoder.identity} from {encoder}, but the driver "
                f"planned with {identity['encoder']}: give every node the same weights (--weights) and checkpoints"
            )
        self.source = open_source(source)  # the driver's spec of its opened source: the same tiles

    def __call__(self, batch: dict[str, npt.NDArray[Any]]) -> dict[str, npt.NDArray[Any]]:
        keys = ("shard", "planned", "rows", "seconds", "error", "fatal", "node")
        out: dict[str, list[Any]] = {k: [] for k in keys}
        for shard in (int(s) for s in batch["shard"]):
            started = time.perf_counter()
            planned, written, error, fatal = 0, 0, "", ""
            if self.setup_error is not None:
                error, fatal = str(self.setup_error), type(self.setup_error).__name__
            else:
                if self.plan is None:
                    self.plan = np.load(self.plan_path, mmap_mode="r")
                lo = shard * self.shard_size
                rows = np.asarray(self.plan[lo : lo + self.shard_size])
                planned = len(rows)
                try:
                    written = build_shard(self.index_dir, self.zoom, shard, rows["x"], rows["y"], rows["parent_row"],
                                          source=self.source, encoder=self.encoder, pool=self.pool,
                                          batch_size=self.batch_size)
                except GeoIndexError as e:  # as the local engine: report, go on, fail the level at the end
                    error = f"shard {shard} on {self.node}: {e}"
            for key, value in zip(keys, (shard, planned, written, time.perf_counter() - started, error, fatal,
                                         self.node)):
                out[key].append(value)
        return {k: np.asarray(v) for k, v in out.items()}


def build_level_ray(
    index_dir: str | os.PathLike,
    zoom: int,
    *,
    source: str,
    encoder: EncoderRecipe,
    coverage: CoverageLike,
    schedule: LevelSchedule = LevelSchedule(),
    codec: str = "fp16",
    shard_size: int = 8192,
    batch_size: int = 64,
    workers: int | None = None,
    overwrite: bool = False,
    options: RayOptions = RayOptions(),
    build_args: dict[str, Any] | None = None,
    progress: Callable[[int], None] | None = None,
    on_plan: Callable[[int, int], None] | None = None,
) -> BuildSummary:
    """``geoindex.storage.build.build_level`` on Ray Data: the same shards, FAISS file and manifest.

    Args:
        source: a ``--source`` string (see ``geoindex.sources.open_source``); actors open the spec of the
            driver's opened source, so every node reads the same tiles.
        encoder: how actors (and the driver, for the manifest) build this zoom's map encoder.
        batch_size, workers: per actor, as in the local engine (tiles per forward pass, loading threads;
            default ``threads.loader_threads`` of the actor's CPUs).
        options: cluster address and actor pool shape. Connects with ``init_ray`` if not connected yet.
        Other arguments: as ``build_level``; ``progress`` is called once per finished shard.

    Raises:
        ConfigError: Ray missing, bad options, or a worker that does not see the index folder.
        EncoderMismatchError, IndexMismatchError: as ``build_level``, or a worker built a different encoder.
        BuildIncompleteError: some tiles failed to load; finished shards are kept, rerun to resume.
    """
    ray = _import_ray()
    from geoindex.sources import open_source, source_spec

    local_source = open_source(source)
    spec = source_spec(local_source) or source  # workers reopen what the driver opened, not the user's string
    driver_encoder = encoder.create("cpu")
    with index_write_lock(index_dir, what=f"a Ray build of z{zoom}"):
        job = start_level(index_dir, zoom, encoder=driver_encoder, imagery=local_source.name, coverage=coverage,
                          schedule=schedule, codec=codec, shard_size=shard_size, batch_size=batch_size,
                          overwrite=overwrite, imagery_spec=spec)
        del driver_encoder, local_source
        if on_plan:
            on_plan(job.planned, job.reused_tiles)
        failures: list[str] = []
        if job.todo:
            plan_path = _plan_file(job)
            init_ray(options.address, quiet=not log.isEnabledFor(logging.INFO))
            failures = _run_pool(ray, job, plan_path, source=spec, encoder=encoder, batch_size=batch_size,
                                 workers=workers, options=options, progress=progress)
        summary = complete_level(job, encoder=job.identity["encoder"], checkpoint=encoder.checkpoint,
                                 build_args=build_args, failures=failures)
        for plan_file in level_dir(job.index_dir, zoom).glob("_plan-*.npy"):  # kept until the level is complete
            plan_file.unlink(missing_ok=True)
        return summary


def _run_pool(
    ray: ModuleType, job: LevelJob, plan_path: Path, *, source: str, encoder: EncoderRecipe, batch_size: int,
    workers: int | None, options: RayOptions, progress: Callable[[int], None] | None,
) -> list[str]:
    """Encode and write the unfinished shards of ``job`` on the cluster; returns one line per failed shard."""
    size = options.pool_size(ray.cluster_resources(), len(job.todo))
    log.info("z%02d: %d shards on %d Ray actors (%g CPU, %g GPU each)", job.zoom, len(job.todo), size,
             options.cpus_per_actor, options.gpus_per_actor)
    items = [{"shard": s} for s in job.todo]
    try:
        shards = ray.data.from_items(items, override_num_blocks=len(items))  # one block per shard
    except TypeError:  # Ray < 2.10 names it parallelism
        shards = ray.data.from_items(items, parallelism=len(items))
    encoded = shards.map_batches(
        ShardEncoder,
        batch_size=1,
        compute=ray.data.ActorPoolStrategy(size=size, max_tasks_in_flight_per_actor=2),
        num_cpus=options.cpus_per_actor,
        num_gpus=options.gpus_per_actor or None,
        fn_constructor_kwargs={
            "index_dir": str(Path(job.index_dir).resolve()), "zoom": job.zoom, "plan_file": plan_path.name,
            "identity": job.identity, "shard_size": job.shard_size, "source": source, "encoder": encoder,
            "device": options.device, "threads": max(1, int(options.cpus_per_actor)),
            "batch_size": batch_size, "workers": workers,
        },
    )
    failures: list[str] = []
    fatal: list[tuple[str, str]] = []
    per_node: dict[str, list[float]] = {}
    for out in encoded.iter_batches(batch_size=None, batch_format="numpy"):
        for planned, seconds, error, kind, node in zip(out["planned"], out["seconds"], out["error"], out["fatal"],
                                                      out["node"]):
            if kind:
                fatal.append((str(kind), str(error)))
            elif error:
                failures.append(str(error))
                log.warning("level z%d: %s", job.zoom, error)
            stats = per_node.setdefault(str(node), [0.0, 0.0])
            stats[0] += int(planned)
            stats[1] += float(seconds)
            if progress and not kind:
                progress(int(planned))
    if fatal:
        kind, message = fatal[0]
        raise _ERROR_TYPES.get(kind, GeoIndexError)(message)
    for node, (tiles, seconds) in sorted(per_node.items()):
        log.info("z%02d: node %s encoded %d tiles at %.0f tiles/s per actor", job.zoom, node, tiles,
                 tiles / seconds if seconds else float("inf"))
    return failures

