"""One level of an index as a single parquet file of tiles and embeddings, for users' own tools.

The index keeps a level's tiles in parquet shards and its vectors once, in its FAISS file. An
export is one file a dataframe library, DuckDB or a vector database reads directly (as
clip-retrieval's embeddings are): ``row`` (the FAISS id in the index), ``z``, ``x``, ``y`` (XYZ,
y from the north), ``lat``, ``lon`` (the tile's centre, degrees) and ``embedding`` (a fixed-size
list of float32, or float16 as stored; decoded from their codes for the lossy codecs sq8 and
pq). Rows keep the index's order. Lazy levels (``geoindex.retrieval.levels.lazy``) are not exported: their
rows depend on past queries.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from geoindex.errors import ConfigError
from geoindex.files import atomic_path
from geoindex.geometry.tiles import tile_center_array
from geoindex.storage.manifest import Manifest
from geoindex.storage.store import list_shards, read_embeddings

__all__ = ["EXPORT_DTYPES", "ExportSummary", "export_level"]

EXPORT_DTYPES = {"float32": pa.float32(), "float16": pa.float16()}


@dataclass(frozen=True)
class ExportSummary:
    """What :func:`export_level` wrote."""

    path: Path
    zoom: int
    rows: int
    dim: int
    dtype: str
    bytes: int


def _schema(dim: int, dtype: str) -> pa.Schema:
    return pa.schema([
        ("row", pa.int64()), ("z", pa.int8()), ("x", pa.int64()), ("y", pa.int64()),
        ("lat", pa.float64()), ("lon", pa.float64()),
        ("embedding", pa.list_(EXPORT_DTYPES[dtype], dim)),
    ])


def export_level(
    index_dir: str | os.PathLike[str], zoom: int, out: str | os.PathLike[str], *, dtype: str = "float32"
) -> ExportSummary:
    """Write level ``zoom`` of the index at ``index_dir`` to the parquet file ``out`` (atomically).

    Args:
        dtype: ``float32`` (what most tools expect) or ``float16`` (as stored; half the size).

    Returns:
        What was written; ``rows`` equals the level's rows in the manifest.

    Raises:
        IndexNotFoundError: no index at ``index_dir``. ConfigError: no built level ``zoom`` (the
            message lists those there are), or an unknown ``dtype``.
    """
    index_dir, out = Path(index_dir), Path(out)
    if dtype not in EXPORT_DTYPES:
        raise ConfigError(f"unknown export dtype {dtype!r}; choose one of {', '.join(EXPORT_DTYPES)} (--dtype)")
    manifest = Manifest.load(index_dir)
    level = manifest.level(zoom)
    if level is None:
        raise ConfigError(f"{index_dir} has no built level z{zoom}; it has {[lv.zoom for lv in manifest.levels]} "
                          "(--zoom)")
    if out.is_dir():
        raise ConfigError(f"--out {out}: is a directory; give a file name, e.g. {out / f'z{zoom:02d}.parquet'}")
    schema = _schema(manifest.dim, dtype).with_metadata({
        "geoindex.index": str(index_dir), "geoindex.zoom": str(zoom),
        "geoindex.encoder": manifest.photo_encoder.name, "geoindex.imagery": manifest.imagery,
    })
    rows = 0
    with atomic_path(out) as tmp, pq.ParquetWriter(tmp, schema) as writer:
        for shard in list_shards(index_dir, zoom):
            cols = pq.read_table(shard, columns=["x", "y"])
            x = cols.column("x").to_numpy().astype(np.int64)
            y = cols.column("y").to_numpy().astype(np.int64)
            lat, lon = tile_center_array(x, y, zoom=zoom)
            emb = read_embeddings(shard).astype(np.float32 if dtype == "float32" else np.float16)
            values = pa.array(emb.reshape(-1), type=EXPORT_DTYPES[dtype])
            writer.write_table(pa.table({
                "row": np.arange(rows, rows + len(x), dtype=np.int64), "z": np.full(len(x), zoom, dtype=np.int8),
                "x": x, "y": y, "lat": lat, "lon": lon,
                "embedding": pa.FixedSizeListArray.from_arrays(values, manifest.dim),
            }, schema=schema))
            rows += len(x)
    return ExportSummary(out, zoom, rows, manifest.dim, dtype, out.stat().st_size)
