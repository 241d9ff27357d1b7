"""Fit an index's calibration on queries with known positions and store it in its manifest.

The queries are views rendered from the index's own imagery (``geoindex.training.views``: off-grid
centres, other scales, rotations, colour changes; never the indexed tiles themselves) or a CSV of
photos with their positions (``file,lat,lon``). Every query is searched as a user's photo would
be; per level, the kept tiles' scores and the column of the true tile (or "not kept") fit a
temperature and a bias (:func:`geoindex.retrieval.calibration.fit_temperature`). The same queries then set
the masses the 50 % and 90 % radii hold and the "no confident match" threshold.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import mercantile
import numpy as np
import numpy.typing as npt

from geoindex.api import GeoIndex
from geoindex.errors import ConfigError
from geoindex.files import atomic_write_bytes
from geoindex.imagery import ImageInput
from geoindex.retrieval.calibration import (
    EMBEDDINGS_FILE,
    RADIUS_LEVELS,
    Calibration,
    FitInfo,
    LevelCalibration,
    fit_temperature,
    kept_probabilities,
    ood_scores,
    required_mass,
)
from geoindex.retrieval.results import SearchResult
from geoindex.sources import TileSource, is_local_spec, open_source, source_spec
from geoindex.storage.manifest import Manifest
from geoindex.training.views import random_views

__all__ = [
    "DEFAULT_COUNT",
    "DEFAULT_K",
    "DEFAULT_OOD_QUANTILE",
    "DEFAULT_SEED",
    "KnownQueries",
    "calibrate_index",
    "calibration_source",
    "fit_calibration",
    "photo_queries",
    "save_calibration",
    "view_queries",
]

log = logging.getLogger(__name__)

DEFAULT_COUNT = 256  # views: enough for two parameters per level and a 5 % quantile (about 13 below it)
DEFAULT_SEED = 24_000  # calibration views; evaluations (benchmarks/calibration.py) use other seeds
DEFAULT_K = 64  # the search's default beam width: the kept tiles the probabilities are spread over
DEFAULT_OOD_QUANTILE = 0.05  # the fraction of in-domain calibration queries the threshold flags
OOD_NEIGHBOURS = 10  # benchmarks/calibration.py: 1, 5 and 10 all separate photos from views; 10 is steadier


@dataclass(frozen=True)
class KnownQueries:
    """Query images with their true positions, and what they are (for ``FitInfo``)."""

    images: tuple[ImageInput, ...]
    lat: tuple[float, ...]
    lon: tuple[float, ...]
    kind: str
    source: str
    seed: int | None = None
    zoom: int | None = None

    def __post_init__(self) -> None:
        if not self.images or not len(self.images) == len(self.lat) == len(self.lon):
            raise ConfigError(f"calibration needs at least one query and a position for each, got "
                              f"{len(self.images)} images, {len(self.lat)} positions")


def view_queries(index: GeoIndex, source: TileSource, *, count: int = DEFAULT_COUNT,
                 seed: int = DEFAULT_SEED, zoom: int | None = None) -> KnownQueries:
    """``count`` views of random tiles of the index's ``zoom`` level (default: its deepest built one).

    The tiles are drawn from the level's rows with ``seed``, one view each (with replacement when
    the level has fewer rows than ``count``); the same seed gives the same views.
    """
    if count < 1:
        raise ConfigError(f"--calibrate-count must be >= 1, got {count}")
    stored = {s.zoom: s for s in index.stored}
    zoom = index.zooms[-1] if zoom is None else zoom
    if zoom not in stored:
        raise ConfigError(f"no built level z{zoom} in {index.path}; built: {list(stored)}")
    level = stored[zoom]
    rng = np.random.default_rng(seed)
    rows = rng.choice(level.rows, size=count, replace=count > level.rows)
    rows.sort()  # quadkey order: neighbouring views share the tiles they render from
    tiles = [mercantile.Tile(int(level.x[r]), int(level.y[r]), zoom) for r in rows]
    views = random_views(source, tiles, per_tile=1, seed=seed)
    return KnownQueries(tuple(v.image for v in views), tuple(v.lat for v in views), tuple(v.lon for v in views),
                        kind="views", source=source_spec(source) or source.name, seed=seed, zoom=zoom)


def photo_queries(csv_path: str | os.PathLike) -> KnownQueries:
    """Photos and positions from a CSV with columns ``file,lat,lon`` (files relative to the CSV's folder)."""
    path = Path(csv_path)
    try:
        with path.open(newline="") as f:
            rows = list(csv.DictReader(f))
    except OSError as e:
        raise ConfigError(f"--calibrate-photos {path}: cannot read it ({e})") from e
    images, lat, lon = [], [], []
    for i, row in enumerate(rows, start=2):
        try:
            file, la, lo = row["file"], float(row["lat"]), float(row["lon"])
        except (KeyError, TypeError, ValueError) as e:
            raise ConfigError(f"--calibrate-photos {path}, line {i}: needs columns file,lat,lon ({e!r})") from e
        if not (-90 <= la <= 90 and -180 <= lo <= 180):
            raise ConfigError(f"--calibrate-photos {path}, line {i}: position {la}, {lo} is not lat, lon in degrees")
        images.append(str(path.parent / file))
        lat.append(la)
        lon.append(lo)
    if not images:
        raise ConfigError(f"--calibrate-photos {path}: no rows")
    return KnownQueries(tuple(images), tuple(lat), tuple(lon), kind="photos", source=str(path))


def _labels(results: Sequence[SearchResult], lat: Sequence[float], lon: Sequence[float],
            ) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """Per zoom: kept scores (n, k) with NaN pads and the column of the true tile (-1: not kept)."""
    zooms = [lv.zoom for lv in results[0].trace]
    out = {}
    for i, zoom in enumerate(zooms):
        width = max(len(r.trace[i].scores) for r in results)
        D = np.full((len(results), width), np.nan)
        y = np.full(len(results), -1, dtype=np.int64)
        for q, r in enumerate(results):
            lv = r.trace[i]
            D[q, : len(lv.scores)] = lv.scores
            truth = mercantile.tile(lon[q], lat[q], zoom)
            y[q] = next((j for j, t in enumerate(lv.tiles) if t == truth), -1)
        if width:
            out[zoom] = (D, y)
    return out


def fit_calibration(index: GeoIndex, queries: KnownQueries, *, k: int = DEFAULT_K,
                    ood_quantile: float = DEFAULT_OOD_QUANTILE, batch_size: int = 64,
                    ) -> tuple[Calibration, npt.NDArray[np.float16]]:
    """Search ``queries`` in ``index`` and fit its calibration (nothing is written).

    Returns:
        The calibration and the queries' embeddings (m, d) float16 that its confidence test
        compares new queries with (:func:`save_calibration` writes both).

    Raises:
        ConfigError: ``ood_quantile`` is outside (0, 1), or fewer than 2 queries.
        ImageError: a photo cannot be read.
    """
    if not 0 < ood_quantile < 1:
        raise ConfigError(f"ood_quantile must be in (0, 1), got {ood_quantile}")
    if len(queries.images) < 2:
        raise ConfigError(f"calibration needs at least 2 queries ({queries.source} has {len(queries.images)}); "
                          "each is compared with the others to set the confidence threshold")
    results: list[SearchResult] = []
    lat: list[float] = []
    lon: list[float] = []
    embeddings = []
    for start in range(0, len(queries.images), batch_size):
        batch = list(queries.images[start : start + batch_size])
        xq = index.embed(batch, batch_size=batch_size)  # an unreadable photo raises ImageError naming it
        embeddings.append(xq)
        results += index.search_embeddings(xq, k, top_n=1)
        lat += queries.lat[start : start + batch_size]
        lon += queries.lon[start : start + batch_size]
    xs = np.concatenate(embeddings)
    levels = []
    for zoom, (D, y) in _labels(results, lat, lon).items():
        temperature, bias = fit_temperature(D, y)
        levels.append(LevelCalibration(zoom, temperature, bias))
        log.info("calibration z%02d: temperature %.4g, bias %.3g; true tile kept for %.0f %% of %d queries",
                 zoom, temperature, bias, 100 * float(np.mean(y >= 0)), len(y))
    by_zoom = {lv.zoom: lv for lv in levels}
    needed = []  # per query, the mass a radius must hold to reach the truth (split conformal)
    for r, la, lo in zip(results, lat, lon, strict=True):
        final = next(t for t in reversed(r.trace) if t.zoom == r.tile.z)
        fit = by_zoom[final.zoom]
        p = kept_probabilities(final.scores, temperature=fit.temperature, bias=fit.bias)
        needed.append(required_mass(r.lat, r.lon, final.tiles, p, (la, lo)))
    # the ceil((n + 1) q) / n empirical quantile: coverage >= q on exchangeable new queries
    masses = [float(np.quantile(needed, min(1.0, q * (1 + 1 / len(needed))), method="higher")) for q in RADIUS_LEVELS]
    stored = xs.astype(np.float16)  # as the index will read them back
    scores = ood_scores(stored, stored, neighbours=OOD_NEIGHBOURS, exclude_self=True)
    calibration = Calibration(tuple(levels), (masses[0], masses[1]), float(np.quantile(scores, ood_quantile)),
                              ood_quantile, OOD_NEIGHBOURS, _sha256(_npy_bytes(stored)),
                              FitInfo(queries.kind, len(results), queries.seed, k, queries.source, queries.zoom))
    return calibration, stored


def calibrate_index(path: str | os.PathLike, *, source: str | None = None, photos: str | os.PathLike | None = None,
                    count: int = DEFAULT_COUNT, seed: int = DEFAULT_SEED, k: int = DEFAULT_K,
                    **open_kwargs: object) -> Calibration:
    """Fit the calibration of the index at ``path`` and write it into its manifest.

    Args:
        source: imagery to render views from (a ``--source`` spec); default the index's own
            imagery when it is local.
        photos: a CSV of photos with positions; used instead of views when given.
        count, seed: how many views, and their seed. k: the beam width of the fit.
        open_kwargs: for :class:`GeoIndex` (weights, device, ...).

    Raises:
        ConfigError: the index's imagery is not local and neither ``source`` nor ``photos`` is given.
    """
    index = GeoIndex(path, **open_kwargs)  # type: ignore[arg-type]
    if photos is not None:
        queries = photo_queries(photos)
    else:
        queries = view_queries(index, calibration_source(index.manifest, source), count=count, seed=seed)
    calibration, embeddings = fit_calibration(index, queries, k=k)
    save_calibration(index.path, calibration, embeddings)
    return calibration


def save_calibration(index_dir: str | os.PathLike, calibration: Calibration,
                     embeddings: npt.NDArray[np.float16]) -> None:
    """Write the queries' embeddings, then the manifest with ``calibration`` (each atomically).

    Readers trust only what the manifest names: until it is replaced, they see the old calibration
    (whose sha256 the new embeddings file no longer matches, so an open in between fails loudly).
    """
    atomic_write_bytes(Path(index_dir) / EMBEDDINGS_FILE, _npy_bytes(embeddings))
    manifest = Manifest.load(Path(index_dir))  # the latest one: write back only the calibration
    dataclasses.replace(manifest, calibration=calibration).save(Path(index_dir))


def _npy_bytes(array: npt.NDArray[np.float16]) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def calibration_source(manifest: Manifest, spec: str | None = None) -> TileSource:
    """The imagery views are rendered from: ``spec``, else the index's own imagery when it is local.

    Raises:
        ConfigError: the index's imagery is remote or unrecorded; name ``--source`` or ``--calibrate-photos``.
    """
    if spec is not None:
        return open_source(spec)
    own = manifest.imagery_spec
    if own is None or not is_local_spec(own):
        raise ConfigError(
            f"the index's imagery {manifest.imagery!r} is not on this machine, so views cannot be rendered "
            "from it; pass --source with local imagery of the same area, or --calibrate-photos CSV"
        )
    return open_source(own)
