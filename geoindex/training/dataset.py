"""Photos with known coordinates: the CSV (path, lat, lon), seeded splits, and a photo-embedding cache.

The CSV is the MP-16 / YFCC layout reduced to what training and evaluation need: one row per
photo with its path and true latitude/longitude in degrees. Column names are matched loosely
(``path``/``file``/``IMG_ID``, ``lat``/``LAT``/``latitude``, ``lon``/``LON``/``lng``/``longitude``),
and an optional ``split`` column (train/val/test) overrides the seeded split.
"""

from __future__ import annotations

import csv
import functools
import hashlib
import io
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from geoindex.errors import ConfigError, ImageError
from geoindex.files import atomic_write_bytes
from geoindex.geometry.tiles import tile_code_array, tile_of_array
from geoindex.models.encoders import ImageEncoder

__all__ = [
    "SPLITS",
    "table_splits",
    "PhotoTable",
    "photo_embeddings",
    "read_photo_csv",
    "split_photos",
    "tile_codes",
    "write_photo_csv",
]

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
_PATH_COLUMNS = ("path", "file", "filename", "image", "image_path", "img_id", "photo")
_LAT_COLUMNS = ("lat", "latitude")
_LON_COLUMNS = ("lon", "lng", "long", "longitude")
_CACHE_FORMAT = "geoindex-photo-embeddings/1"


@dataclass(frozen=True)
class PhotoTable:
    """Photos and their true coordinates.

    Attributes:
        paths: image file paths, resolved against the CSV's image root.
        lat, lon: float64 arrays of shape (n,), degrees.
        split: per photo ``train``/``val``/``test``, or None when the CSV has no split column.
    """

    paths: tuple[str, ...]
    lat: npt.NDArray[np.float64]
    lon: npt.NDArray[np.float64]
    split: tuple[str, ...] | None = None
    source: str = field(default="<memory>", compare=False)

    def __post_init__(self) -> None:
        lat = np.asarray(self.lat, dtype=np.float64)
        lon = np.asarray(self.lon, dtype=np.float64)
        object.__setattr__(self, "paths", tuple(str(p) for p in self.paths))
        object.__setattr__(self, "lat", lat)
        object.__setattr__(self, "lon", lon)
        if not (len(self.paths) == len(lat) == len(lon)):
            raise ConfigError(
                f"paths, lat and lon differ in length: {len(self.paths)}, {len(lat)}, {len(lon)}")
        bad = ~(np.isfinite(lat) & np.isfinite(lon) & (np.abs(lat) <= 90.0))
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise ConfigError(
                f"{self.source}: photo {self.paths[i]!r} has invalid coordinates "
                f"lat={lat[i]!r} lon={lon[i]!r}; "
                "latitude must be within [-90, 90] and both finite"
            )
        if self.split is not None:
            split = tuple(self.split)
            object.__setattr__(self, "split", split)
            if len(split) != len(lat):
                raise ConfigError(f"split has {len(split)} entries for {len(lat)} photos")
            unknown = set(split) - set(SPLITS)
            if unknown:
                raise ConfigError(
                    f"{self.source}: unknown split value(s) {sorted(unknown)}; use {list(SPLITS)}")

    def __len__(self) -> int:
        return len(self.paths)

    def subset(self, rows: npt.ArrayLike) -> PhotoTable:
        """The photos at integer positions ``rows``, in that order."""
        idx = np.asarray(rows, dtype=np.int64)
        return PhotoTable(
            tuple(self.paths[i] for i in idx.tolist()), self.lat[idx], self.lon[idx],
            tuple(self.split[i] for i in idx.tolist()) if self.split is not None else None,
            source=self.source,
        )

    def key(self) -> str:
        """sha256 over paths and coordinates: identifies this exact list of photos."""
        h = hashlib.sha256()
        for p in self.paths:
            h.update(p.encode())
            h.update(b"\0")
        h.update(np.ascontiguousarray(self.lat).tobytes())
        h.update(np.ascontiguousarray(self.lon).tobytes())
        return h.hexdigest()


def _find_column(header: Sequence[str], names: tuple[str, ...], what: str, path: Path) -> int:
    lowered = [h.strip().lower() for h in header]
    for name in names:
        if name in lowered:
            return lowered.index(name)
    raise ConfigError(
        f"{path}: no {what} column; the header is {list(header)}, expected one of {list(names)} "
        "(any case), e.g. `path,lat,lon` or MP-16's `IMG_ID,LAT,LON`"
    )


def read_photo_csv(path: str | os.PathLike, *, image_root: str | os.PathLike | None = None) -> PhotoTable:
    """Read a photo CSV (path, lat, lon[, split]); relative paths resolve against ``image_root``.

    Args:
        path: the CSV file.
        image_root: folder relative photo paths are taken from; default the CSV's folder.

    Raises:
        ConfigError: missing file or column, unparsable or out-of-range coordinates (the message
            names the line).
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(
            f"photo CSV {path} does not exist; make one with `python -m pipelines.make_dataset`")
    root = Path(image_root) if image_root is not None else path.parent
    with open(path, "rb") as fb:
        bom = fb.read(2)
    # Spreadsheet programs export UTF-8 with a byte-order mark, or UTF-16 ("Unicode text").
    encoding = "utf-16" if bom in (b"\xff\xfe", b"\xfe\xff") else "utf-8-sig"
    reader: Any = None  # a csv reader once the file is open: its line_num names the line
    try:
        with open(path, newline="", encoding=encoding) as f:
            reader = csv.reader(f)
            table = _read_rows(reader, path, root)
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text ({e}); save the CSV as UTF-8 (\"CSV UTF-8\" in spreadsheet "
                          "programs) and rerun") from e
    except csv.Error as e:  # e.g. a field larger than csv's limit (128 KB): not a photo CSV
        line = reader.line_num if reader is not None else 1
        raise ConfigError(f"{path}:{line}: not a photo CSV ({e})") from e
    return table


def _read_rows(reader: Iterator[list[str]], path: Path, root: Path) -> PhotoTable:
    """The rows of an open photo CSV (``read_photo_csv``)."""
    header = next(reader, None)
    if header is None:
        raise ConfigError(f"{path}: empty file; expected a header such as `path,lat,lon`")
    ip = _find_column(header, _PATH_COLUMNS, "photo path", path)
    ila = _find_column(header, _LAT_COLUMNS, "latitude", path)
    ilo = _find_column(header, _LON_COLUMNS, "longitude", path)
    lowered = [h.strip().lower() for h in header]
    isp = lowered.index("split") if "split" in lowered else None
    paths: list[str] = []
    lats: list[float] = []
    lons: list[float] = []
    splits: list[str] = []
    for line, row in enumerate(reader, start=2):
        if not row or all(not c.strip() for c in row):
            continue
        try:
            name = row[ip].strip()
            lats.append(float(row[ila]))
            lons.append(float(row[ilo]))
        except (IndexError, ValueError) as e:
            raise ConfigError(f"{path}:{line}: cannot read path/lat/lon from {row!r} ({e})") from e
        p = Path(name)
        paths.append(os.path.normpath(p if p.is_absolute() else root / p))
        if isp is not None:
            splits.append(row[isp].strip().lower() if isp < len(row) else "")
    return PhotoTable(tuple(paths), np.asarray(lats), np.asarray(lons),
                      tuple(splits) if isp is not None else None, source=str(path))


def write_photo_csv(
    path: str | os.PathLike, table: PhotoTable, *, relative_to: str | os.PathLike | None = None
) -> None:
    """Write ``table`` as ``path,lat,lon[,split]`` atomically; paths relative to ``relative_to`` if given."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["path", "lat", "lon"] + (["split"] if table.split is not None else []))
    base = Path(relative_to).resolve() if relative_to is not None else None
    for i, p in enumerate(table.paths):
        shown = os.path.relpath(Path(p).resolve(), base) if base is not None else p
        row = [shown, f"{table.lat[i]:.7f}", f"{table.lon[i]:.7f}"]
        if table.split is not None:
            row.append(table.split[i])
        w.writerow(row)
    atomic_write_bytes(Path(path), buf.getvalue().encode())


def split_photos(
    n: int, *, ratios: tuple[float, float, float] = (10, 1, 1), seed: int = 0
) -> dict[str, npt.NDArray[np.int64]]:
    """A seeded split of ``n`` photos into train/val/test rows in proportion ``ratios`` (paper: 10:1:1).

    Returns:
        ``{"train": rows, "val": rows, "test": rows}``, each sorted int64, disjoint, covering 0..n-1.
    """
    if len(ratios) != 3 or any(r < 0 for r in ratios) or sum(ratios) <= 0 or ratios[0] <= 0:
        raise ConfigError(f"split ratios must be three non-negative numbers with train > 0, got {ratios}")
    total = float(sum(ratios))
    n_val = int(round(n * ratios[1] / total))
    n_test = int(round(n * ratios[2] / total))
    perm = np.random.default_rng(seed).permutation(n)
    return {
        "val": np.sort(perm[:n_val]),
        "test": np.sort(perm[n_val : n_val + n_test]),
        "train": np.sort(perm[n_val + n_test :]),
    }


def table_splits(
    table: PhotoTable, *, ratios: tuple[float, float, float] = (10, 1, 1), seed: int = 0
) -> dict[str, npt.NDArray[np.int64]]:
    """The CSV's own split column when it has one, else :func:`split_photos`."""
    if table.split is None:
        return split_photos(len(table), ratios=ratios, seed=seed)
    s = np.asarray(table.split)
    return {name: np.flatnonzero(s == name).astype(np.int64) for name in SPLITS}


def tile_codes(lat: npt.ArrayLike, lon: npt.ArrayLike, *, zoom: int) -> npt.NDArray[np.int64]:
    """Code ``y * 2**zoom + x`` of the tile containing each point (the id on-the-fly search uses)."""
    x, y = tile_of_array(lat, lon, zoom=zoom)
    return tile_code_array(x, y, zoom=zoom)


# ------------------------------------------------------------------------------ embedding cache


def _cache_key(table: PhotoTable, encoder: ImageEncoder) -> str:
    h = hashlib.sha256()
    h.update(_CACHE_FORMAT.encode())
    h.update(encoder.spec.name.encode())
    h.update(encoder.base_fingerprint.encode())
    h.update(str(encoder.checkpoint_sha256).encode())
    h.update(repr(encoder.preprocess).encode())
    h.update(table.key().encode())
    return h.hexdigest()


def _load_pixels(encoder: ImageEncoder, path: str) -> torch.Tensor | None:
    try:
        return encoder.preprocess_images([path])[0]
    except ImageError as e:
        log.warning("skipping unreadable photo: %s", e)
        return None


def embed_photos(
    encoder: ImageEncoder,
    paths: Sequence[str],
    *,
    batch_size: int = 64,
    pool: Executor | None = None,
    progress: Callable[[int], None] | None = None,
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.bool_]]:
    """Embed photos in batches of ``batch_size`` consecutive paths; unreadable photos are logged and left out.

    The one place photos become embeddings for evaluation and training data (``photo_embeddings``).

    Args:
        pool: threads that read and preprocess a batch's photos (None: read here, in order).
        progress: called with the number of photos of each batch once it is encoded.

    Returns:
        embeddings (n, d) float32, L2-normalised, zero rows where unreadable; ok (n,) bool, False there.
    """
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    emb = np.zeros((len(paths), encoder.dim), dtype=np.float32)
    ok = np.zeros(len(paths), dtype=bool)
    for s in range(0, len(paths), batch_size):
        batch = paths[s : s + batch_size]
        load = functools.partial(_load_pixels, encoder)
        pixels = list(pool.map(load, batch) if pool is not None else map(load, batch))
        good = [i for i, t in enumerate(pixels) if t is not None]
        if good:
            rows = np.asarray(good) + s
            emb[rows] = encoder.encode_tensor(torch.stack([pixels[i] for i in good]))  # type: ignore[misc]
            ok[rows] = True
        if progress:
            progress(len(batch))
    return emb, ok


def photo_embeddings(
    table: PhotoTable,
    encoder: ImageEncoder,
    cache_dir: str | os.PathLike,
    *,
    batch_size: int = 64,
    chunk_size: int = 4096,
    workers: int = 4,
    progress: Callable[[int], None] | None = None,
    on_plan: Callable[[int, int], None] | None = None,
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.bool_]]:
    """Embed every photo with the frozen photo encoder, once: chunks are cached on disk and reused.

    The cache folder is keyed by the encoder's weights and preprocessing and by the exact photo
    list, so a changed CSV or encoder never reads stale vectors. Chunks are written atomically;
    an interrupted run resumes at the first missing chunk. Embeddings are stored as float16 and
    always returned from that rounding, so a cached and a fresh run give identical values.

    Returns:
        embeddings (n, d) float32 (L2-normalised up to fp16 rounding; zero rows where unreadable)
        and ok (n,) bool, False for photos that could not be read.
    """
    if chunk_size < 1 or batch_size < 1:
        raise ConfigError(f"chunk_size and batch_size must be >= 1, got {chunk_size} and {batch_size}")
    folder = Path(cache_dir) / f"photos-{_cache_key(table, encoder)[:20]}"
    folder.mkdir(parents=True, exist_ok=True)
    n = len(table)
    emb = np.zeros((n, encoder.dim), dtype=np.float32)
    ok = np.zeros(n, dtype=bool)
    chunks = range(0, n, chunk_size)
    todo = []
    for c, lo in enumerate(chunks):
        path = folder / f"chunk-{c:05d}.npz"
        if path.is_file():
            with np.load(path) as data:
                emb[lo : lo + chunk_size] = data["emb"].astype(np.float32)
                ok[lo : lo + chunk_size] = data["ok"]
        else:
            todo.append((c, lo))
    if on_plan:
        on_plan(n, n - sum(min(chunk_size, n - lo) for _, lo in todo))
    if todo:
        log.info("embedding %d photos with %s (cache %s)", sum(min(chunk_size, n - lo) for _, lo in todo),
                 encoder.spec.name, folder)
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for c, lo in todo:
            hi = min(lo + chunk_size, n)
            part_emb, part_ok = embed_photos(encoder, table.paths[lo:hi], batch_size=batch_size, pool=pool,
                                             progress=progress)
            part = part_emb.astype(np.float16)
            buf = io.BytesIO()
            np.savez(buf, emb=part, ok=part_ok)
            atomic_write_bytes(folder / f"chunk-{c:05d}.npz", buf.getvalue())
            emb[lo:hi] = part.astype(np.float32)
            ok[lo:hi] = part_ok
    if not ok.all():
        log.warning("%d of %d photos could not be read and are left out", int((~ok).sum()), n)
    return emb, ok
