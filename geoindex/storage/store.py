"""The on-disk index: per zoom level, parquet shards of tiles and one FAISS file holding their vectors.

Layout (README: "The index on disk")::

    <index>/manifest.json        written last, atomically; lists only complete levels and their files
    <index>/z04/part-00000.parquet  z, x, y, quadkey, parent_row (+ embedding while the level is built)
    <index>/z04/index.faiss      IndexFlatIP over all rows (first level)
    <index>/z06/index.faiss      IVF: inverted list p = children of previous-level row p
    <index>/z06/rerank.npy       pq levels: (rows, d) float16 vectors for re-ranking; pq_small levels:
    <index>/z06/rerank-codebook.npy  (rows, m) uint8 finer codes and their codebooks (m, K, d / m) float32

Rows of a level are sorted by (parent_row, quadkey) and row i is FAISS id i.

One home for the vectors: while a level is built, each shard holds its float16 embeddings (a
killed build resumes from finished shards). Once the FAISS file (and a pq level's re-rank code)
is written and recorded in the manifest, each shard is rewritten without its embedding column,
so a finished level keeps its vectors once, in the form search reads: the FAISS file (for pq
levels, the re-rank copy). The shard records where its rows start there and which FAISS file (by
sha256) it was slimmed against, so export, a resumed or repaired build and a change of codec
read the vectors back (:func:`shard_vectors`): exactly for the exact codecs (fp16, flat, pq's
float16 re-rank copy; the first level is float32), decoded for lossy ones (sq8; pq_small from its
re-rank code). Writes stay in that order (FAISS file, manifest, then the slimmer shard), so a
crash never leaves a shard whose vectors are nowhere.
Indexes of the earlier layout (embeddings in every shard, pq's ``exact.npy``) open as before.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import faiss
import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.parquet as pq
from faiss.contrib.inspect_tools import get_invlist
from faiss.contrib.ivf_tools import add_preassigned

from geoindex.errors import ConfigError, IndexFormatError
from geoindex.files import atomic_path, file_sha256
from geoindex.geometry.tiles import quadkey_int_array
from geoindex.storage.codecs import get_codec
from geoindex.storage.codecs.base import RerankRows, rerank_encode, train_rerank_codebook
from geoindex.storage.codecs.pq import subquantizers as pq_subquantizers
from geoindex.storage.manifest import FileInfo, LevelInfo, Manifest

__all__ = [
    "StoredLevel",
    "build_faiss_level",
    "drop_embeddings",
    "level_dir",
    "list_shards",
    "open_store",
    "pq_subquantizers",
    "level_embeddings",
    "read_embeddings",
    "read_level_columns",
    "shard_vectors",
    "shard_path",
    "write_shard",
]

log = logging.getLogger(__name__)

FAISS_FILE = "index.faiss"
EXACT_FILE = "exact.npy"  # earlier pq levels: (rows, d) float16 embeddings in row order, for re-ranking
RERANK_FILE = "rerank.npy"  # re-ranking copy in row order, memory-mapped: pq float16 (rows, d), pq_small uint8 codes
RERANK_CODEBOOK = "rerank-codebook.npy"  # pq_small: the codes' codebooks (m, K, d / m) float32
RERANK_TRAIN_SAMPLE = 65_536  # rows used to train the re-rank code's codebooks
# A shard without its embedding column names where its vectors are: the row of its first row in the
# level's FAISS file, the codec that encoded them there, and that file's sha256.
META_FIRST_ROW, META_CODEC, META_SHA256 = b"geoindex.first_row", b"geoindex.vectors_codec", b"geoindex.vectors_sha256"
FIRST_LEVEL_CODEC = "flat"  # the first level is IndexFlatIP: float32, exact like flat
VERIFY_AUTO_BYTES = 256 << 20  # checksum every file on open below this total size (about 1 s)
RESIDENT_AUTO_BYTES = 2 << 30  # resident="auto": at most this much FAISS data read into RAM (and 1/4 of free RAM)


def file_info(path: Path) -> FileInfo:
    return FileInfo(path.name, path.stat().st_size, file_sha256(path))


def level_dir(index_dir: Path, zoom: int) -> Path:
    return Path(index_dir) / f"z{zoom:02d}"


def shard_path(index_dir: Path, zoom: int, shard: int) -> Path:
    return level_dir(index_dir, zoom) / f"part-{shard:05d}.parquet"


def list_shards(index_dir: Path, zoom: int) -> list[Path]:
    """Finished shard files of a level, in shard order (temporary files are ignored)."""
    return sorted(level_dir(index_dir, zoom).glob("part-*.parquet"))


def _schema(dim: int) -> pa.Schema:
    return pa.schema(
        [
            ("z", pa.int8()),
            ("x", pa.int32()),
            ("y", pa.int32()),
            ("quadkey", pa.uint64()),
            ("parent_row", pa.int64()),
            ("embedding", pa.list_(pa.float16(), dim)),
        ]
    )


TILE_COLUMNS = ("z", "x", "y", "quadkey", "parent_row")


def write_shard(
    path: Path,
    *,
    zoom: int,
    x: npt.ArrayLike,
    y: npt.ArrayLike,
    parent_row: npt.ArrayLike,
    embeddings: npt.ArrayLike,
) -> None:
    """Write one parquet shard atomically. Rows must already be in (parent_row, quadkey) order.

    Args:
        x, y: int tile coordinates at ``zoom``, shape (n,).
        parent_row: row of the parent in the previous level, int64 (n,); -1 on the first level.
        embeddings: (n, d) float array; stored as float16.
    """
    xa = np.asarray(x, dtype=np.int32)
    ya = np.asarray(y, dtype=np.int32)
    pr = np.asarray(parent_row, dtype=np.int64)
    emb = np.ascontiguousarray(np.asarray(embeddings), dtype=np.float16)
    n = len(xa)
    if not (len(ya) == len(pr) == n and emb.ndim == 2 and emb.shape[0] == n):
        raise ConfigError(
            f"shard columns disagree in length: x {n}, y {len(ya)}, parent_row {len(pr)}, embeddings {emb.shape}"
        )
    dim = emb.shape[1]
    table = pa.table(
        [
            pa.array(np.full(n, zoom, dtype=np.int8)),
            pa.array(xa),
            pa.array(ya),
            pa.array(quadkey_int_array(xa, ya, zoom=zoom)),
            pa.array(pr),
            pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1)), dim),
        ],
        schema=_schema(dim),
    )
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def _damaged_shard(path: Path, reason: str) -> IndexFormatError:
    zoom = path.parent.name.lstrip("z0") or "0"
    return IndexFormatError(
        f"{path}: damaged parquet shard ({reason}); rerun `python -m pipelines.build_index --zoom {zoom}` with the "
        "arguments of the build: it re-encodes damaged shards only"
    )


def _read_shard(path: Path, columns: list[str]) -> pa.Table:
    """Columns of one shard, each of the type the build writes (integers; float16 embeddings of one size)."""
    try:
        # ParquetFile, not read_table: read_table imports pyarrow.dataset and pandas (0.5-0.7 s a process)
        table = pq.ParquetFile(path, memory_map=True).read(columns=columns)
    except (OSError, pa.ArrowException) as e:
        raise _damaged_shard(path, str(e)) from e
    for name in columns:
        t = table.schema.field(name).type
        if name == "embedding":
            if not (pa.types.is_fixed_size_list(t) and t.value_type == pa.float16()):
                raise _damaged_shard(path, f"column 'embedding' is {t}, not fixed_size_list<halffloat>")
        elif not pa.types.is_integer(t):
            raise _damaged_shard(path, f"column {name!r} is {t}, not an integer")
    return table


def column_to_numpy(column: pa.ChunkedArray) -> np.ndarray:
    """A column of numbers without nulls as one numpy array, read from its buffers: pyarrow's own
    ``to_numpy`` imports pandas on first use, half a second of every process that opens an index."""
    dtype = np.dtype(column.type.to_pandas_dtype())
    parts = []
    for chunk in column.chunks:
        if chunk.null_count:
            raise IndexFormatError(f"column of {column.type} holds {chunk.null_count} nulls; rebuild the level")
        parts.append(np.frombuffer(chunk.buffers()[1], dtype=dtype, count=len(chunk),
                                   offset=chunk.offset * dtype.itemsize))
    return np.concatenate(parts) if parts else np.empty(0, dtype=dtype)


def read_level_columns(
    index_dir: Path, zoom: int, columns: tuple[str, ...] = ("x", "y", "parent_row")
) -> dict[str, np.ndarray]:
    """Scalar columns of a whole level as numpy arrays, in row order."""
    shards = list_shards(index_dir, zoom)
    parts = [_read_shard(p, list(columns)) for p in shards]
    if not parts:
        return {c: np.empty(0, dtype=np.int64) for c in columns}
    try:
        table = pa.concat_tables(parts)
    except pa.ArrowException as e:
        raise IndexFormatError(f"{index_dir}: the shards of z{zoom} disagree on their columns ({e}); rerun "
                               f"`python -m pipelines.build_index --zoom {zoom}` with the build's arguments") from e
    return {c: column_to_numpy(table.column(c)) for c in columns}


def read_embeddings(shard: Path) -> npt.NDArray[np.float16]:
    """The (n, d) float16 embeddings of one shard's rows, wherever they are kept (see :func:`shard_vectors`):
    as encoded for the exact codecs, decoded from its codes for lossy ones."""
    if VectorHome.of(shard) is not None:
        return shard_vectors(shard).astype(np.float16)
    return _own_embeddings(shard)


def _own_embeddings(shard: Path) -> npt.NDArray[np.float16]:
    """The (n, d) float16 embeddings a shard holds itself (a shard of a level being built)."""
    col = _read_shard(shard, ["embedding"]).column("embedding").combine_chunks()
    dim = col.type.list_size
    return column_to_numpy(pa.chunked_array([col.flatten()])).reshape(-1, dim)


@dataclass(frozen=True)
class VectorHome:
    """Where a slim shard's vectors are: rows ``[first_row, first_row + n)`` of its level's FAISS file."""

    first_row: int
    codec: str
    sha256: str

    def metadata(self) -> dict[bytes, bytes]:
        return {META_FIRST_ROW: str(self.first_row).encode(), META_CODEC: self.codec.encode(),
                META_SHA256: self.sha256.encode()}

    @classmethod
    def of(cls, shard: Path) -> VectorHome | None:
        """The home a shard names, None for a shard holding its own embeddings."""
        try:
            schema = pq.read_schema(shard, memory_map=True)
        except (OSError, pa.ArrowException) as e:
            raise _damaged_shard(shard, str(e)) from e
        if "embedding" in schema.names:
            return None
        meta = schema.metadata or {}
        try:
            return cls(int(meta[META_FIRST_ROW]), meta[META_CODEC].decode(), meta[META_SHA256].decode())
        except (KeyError, ValueError, UnicodeDecodeError) as e:
            raise _damaged_shard(shard, f"no embedding column and no valid {e} record of where its vectors are") from e

    @property
    def exact(self) -> bool:
        """The FAISS file gives these vectors back unchanged, so a rebuild may read them from it."""
        return get_codec(self.codec).exact

    @property
    def not_exact(self) -> str | None:
        """Why these vectors cannot be read back as embeddings (a lossy codec's codes), or None when they can."""
        return None if self.exact else f"its vectors are kept only as {self.codec} codes, which do not give the " \
            "embeddings back"


def shard_vectors(shard: Path) -> npt.NDArray[np.float16] | npt.NDArray[np.float32]:
    """The (n, d) vectors of one shard's rows, wherever they are kept.

    From the shard's own embedding column while its level is built (float16); once finished, from
    the level's FAISS file: float32, equal to the float16 embeddings for the exact codecs (fp16,
    flat, the first level), decoded for lossy ones (a pq level from its finer re-rank code).

    Raises:
        IndexFormatError: the FAISS file the shard was slimmed against is gone or was replaced.
    """
    home = VectorHome.of(shard)
    if home is None:
        return _own_embeddings(shard)
    parents = column_to_numpy(_read_shard(shard, ["parent_row"]).column("parent_row"))
    return _open_level_vectors(shard.parent, home.sha256).rows(home.first_row, parents)


@dataclass
class _LevelVectors:
    """A finished level's vectors, read back from its FAISS file (or re-rank code)."""

    index: faiss.Index
    rerank: RerankRows | np.ndarray | None  # the re-rank copy, where a codec keeps one: read from it

    def rows(self, first: int, parents: npt.NDArray[np.int64]) -> npt.NDArray[np.float32]:
        """Vectors (n, d) of rows ``first .. first + n - 1``, whose parent rows (n,) are ``parents``."""
        n = len(parents)
        if first + n > self.index.ntotal:
            raise IndexFormatError(f"rows {first}..{first + n - 1} are not in a FAISS file of {self.index.ntotal}")
        if self.rerank is not None:
            return np.asarray(self.rerank[np.arange(first, first + n)], dtype=np.float32)
        if not n or not isinstance(self.index, (faiss.IndexIVFFlat, faiss.IndexIVFScalarQuantizer, faiss.IndexIVFPQ)) \
                or getattr(self.index, "by_residual", False):
            return self.index.reconstruct_n(first, n)
        # IndexIVF.reconstruct_n scans every list of the level per call; the rows of a shard lie in the
        # lists of its parents (row i is id i, lists in parent order), so read only those.
        ids, codes = [], []
        for p in range(int(parents.min()), int(parents.max()) + 1):
            list_ids, list_codes = get_invlist(self.index.invlists, p)
            keep = (list_ids >= first) & (list_ids < first + n)
            ids.append(list_ids[keep])
            codes.append(list_codes[keep])
        order = np.argsort(np.concatenate(ids), kind="stable")
        out = _decode(self.index, np.concatenate(codes)[order])
        if len(out) != n:
            raise IndexFormatError(f"the FAISS file holds {len(out)} of rows {first}..{first + n - 1} in the lists "
                                   "of their parents; rebuild the level")
        return out


def _decode(index: faiss.IndexIVF, codes: npt.NDArray[np.uint8]) -> npt.NDArray[np.float32]:
    """Vectors (n, d) float32 of the list codes (n, code_size) of a residual-free IVF flat, SQ or PQ index."""
    codes = np.ascontiguousarray(codes)
    if isinstance(index, faiss.IndexIVFFlat):
        return codes.view(np.float32).reshape(len(codes), index.d)
    if isinstance(index, faiss.IndexIVFScalarQuantizer):
        return index.sq.decode(codes)
    product_quantizer: Any = cast(faiss.IndexIVFPQ, index).pq  # the stubs miss the numpy wrapper of decode
    return np.asarray(product_quantizer.decode(codes), dtype=np.float32)


@functools.lru_cache(maxsize=4)
def _open_level_vectors(ldir: Path, sha256: str) -> _LevelVectors:
    """A level's vector home, checked against the sha256 its shards recorded; opened once per file version."""
    path = ldir / FAISS_FILE
    if not path.is_file() or file_sha256(path) != sha256:
        zoom = ldir.name.lstrip("z0") or "0"
        raise IndexFormatError(
            f"{ldir}: the shards' vectors are kept in {FAISS_FILE} with sha256 {sha256[:12]}, which is missing or "
            f"was replaced; re-encode the level (`python -m pipelines.build_index --zoom {zoom} --overwrite` "
            "with the arguments of the build)")
    index = faiss.read_index(str(path), faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY)
    rerank: RerankRows | np.ndarray | None = None
    if (ldir / RERANK_CODEBOOK).is_file():
        rerank = RerankRows(np.load(ldir / RERANK_FILE, mmap_mode="r"), np.load(ldir / RERANK_CODEBOOK))
    elif (ldir / RERANK_FILE).is_file():
        rerank = np.load(ldir / RERANK_FILE, mmap_mode="r")
    return _LevelVectors(index, rerank)


def level_embeddings(index_dir: Path, zoom: int, *, opened: StoredLevel | None = None,
                     ) -> tuple[npt.NDArray[np.float16], npt.NDArray[np.int64]]:
    """A whole level's float16 embeddings (rows, d) and parent rows (rows,), in row order (= FAISS ids).

    ``opened``: the level as :func:`open_store` opened it; its vectors are read from that FAISS index
    rather than from the file opened (and hashed) again.
    """
    vectors = _LevelVectors(opened.index, opened.exact) if opened is not None else None
    embs, parents = [], []
    for shard in list_shards(index_dir, zoom):
        parent_row = column_to_numpy(_read_shard(shard, ["parent_row"]).column("parent_row")).astype(np.int64)
        home = VectorHome.of(shard)
        if home is None:
            embs.append(_own_embeddings(shard))
        else:
            level = vectors if vectors is not None else _open_level_vectors(shard.parent, home.sha256)
            embs.append(level.rows(home.first_row, parent_row).astype(np.float16))
        parents.append(parent_row)
    if not embs:
        raise IndexFormatError(f"{level_dir(index_dir, zoom)}: no shards; rebuild level z{zoom}")
    return np.concatenate(embs), np.concatenate(parents)


def _iter_level(index_dir: Path, zoom: int) -> Iterator[tuple[npt.NDArray[np.float32], np.ndarray]]:
    for shard in list_shards(index_dir, zoom):
        home = VectorHome.of(shard)
        if home is not None and home.not_exact:
            raise IndexFormatError(f"{shard}: {home.not_exact}; re-encode level z{zoom} "
                                   f"(`python -m pipelines.build_index --zoom {zoom} --overwrite`)")
        emb = shard_vectors(shard).astype(np.float32)
        parents = column_to_numpy(_read_shard(shard, ["parent_row"]).column("parent_row"))
        yield emb, parents


def build_faiss_level(index_dir: Path, zoom: int, *, n_parents: int | None, codec: str, dim: int) -> faiss.Index:
    """Build a level's FAISS index from its shards' vectors, streaming one shard at a time.

    The first level (``n_parents`` None) is an ``IndexFlatIP``. Later levels are IVF indexes made by
    the codec's factory with ``nlist = n_parents``, whose list p holds the children of
    previous-level row p, added with precomputed assignments; the coarse quantizer stays empty
    because it is never used.
    """
    spec = get_codec(codec)
    if n_parents is None:
        index: faiss.Index = faiss.IndexFlatIP(dim)
        for emb, _ in _iter_level(index_dir, zoom):
            index.add(emb)
        return index
    quantizer = faiss.IndexFlatIP(dim)
    sample = _sample_rows(index_dir, zoom, spec.train_rows, codec) if spec.train_rows else None
    ivf = spec.make_ivf(quantizer, dim, max(n_parents, 1), sample)
    ivf.own_fields = True
    quantizer.this.disown()  # type: ignore[attr-defined]  # SWIG: the IVF index now owns it
    ivf.is_trained = True
    offset = 0
    for emb, parents in _iter_level(index_dir, zoom):
        if len(parents) and (parents.min() < 0 or parents.max() >= n_parents):
            raise IndexFormatError(f"level z{zoom}: parent_row out of range 0..{n_parents - 1}")
        ids = np.arange(offset, offset + len(emb), dtype=np.int64)
        add_preassigned(ivf, emb, parents.astype(np.int64), ids)
        offset += len(emb)
    return ivf


def _sample_rows(index_dir: Path, zoom: int, limit: int, codec: str) -> npt.NDArray[np.float32]:
    """Up to ``limit`` rows spread over the whole level (every shard contributes its share)."""
    shards = list_shards(index_dir, zoom)
    per_shard = -(-limit // max(len(shards), 1))
    rng = np.random.default_rng(0)
    out: list[np.ndarray] = []
    for emb, _ in _iter_level(index_dir, zoom):
        out.append(emb if len(emb) <= per_shard else emb[np.sort(rng.choice(len(emb), per_shard, replace=False))])
    if not sum(len(o) for o in out):
        raise IndexFormatError(f"level z{zoom} has no rows to train the {codec} codec on")
    return np.concatenate(out)[:limit]


def write_rerank(index_dir: Path, zoom: int, *, m: int, dim: int) -> tuple[Path, Path]:
    """Train a product quantizer of ``m`` one-byte sub-vectors on the level and write every row's codes
    (``rerank.npy``, (rows, m) uint8 in row order) and its codebooks (``rerank-codebook.npy``), atomically.

    Memory-mapped at search time: re-ranking reads a few thousand scattered rows per query.
    """
    codebook = train_rerank_codebook(_sample_rows(index_dir, zoom, RERANK_TRAIN_SAMPLE, "re-rank"), m)
    ldir = level_dir(index_dir, zoom)
    rows = sum(pq.ParquetFile(p).metadata.num_rows for p in list_shards(index_dir, zoom))
    with atomic_path(ldir / RERANK_FILE) as tmp:
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(rows, m))
        offset = 0
        for emb, _ in _iter_level(index_dir, zoom):
            out[offset : offset + len(emb)] = rerank_encode(emb, codebook)
            offset += len(emb)
        out.flush()
        del out
    with atomic_path(ldir / RERANK_CODEBOOK) as tmp, open(tmp, "wb") as f:
        np.save(f, codebook)
    return ldir / RERANK_FILE, ldir / RERANK_CODEBOOK


def write_rerank_fp16(index_dir: Path, zoom: int, *, dim: int) -> Path:
    """Write a level's float16 vectors in row order as ``rerank.npy`` (atomically), for re-ranking.

    Memory-mapped at search time: parquet pages cannot be read row by row, and re-ranking reads
    a few thousand scattered rows per query.
    """
    rows = sum(pq.ParquetFile(p).metadata.num_rows for p in list_shards(index_dir, zoom))
    path = level_dir(index_dir, zoom) / RERANK_FILE
    with atomic_path(path) as tmp:
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float16, shape=(rows, dim))
        offset = 0
        for emb, _ in _iter_level(index_dir, zoom):
            out[offset : offset + len(emb)] = emb
            offset += len(emb)
        out.flush()
        del out
    return path


def write_faiss(index: faiss.Index, path: Path) -> None:
    """Write a FAISS index atomically, streaming it to a temporary file.

    ``faiss.serialize_index(index).tobytes()`` would hold two more copies of the index in memory
    (a 10 GB level needs 30 GB); ``faiss.write_index`` writes straight to the file.
    """
    with atomic_path(path) as tmp:
        faiss.write_index(index, str(tmp))


def finish_level(index_dir: Path, zoom: int, *, n_parents: int | None, codec: str, dim: int) -> LevelInfo:
    """Build and write a level's FAISS file (and re-rank code) from its shards; return its manifest entry
    (encoder unset). The shards keep their embeddings until :func:`drop_embeddings`, once the manifest
    records these files."""
    index = build_faiss_level(index_dir, zoom, n_parents=n_parents, codec=codec, dim=dim)
    spec = get_codec(codec)
    ldir = level_dir(index_dir, zoom)
    rerank: tuple[Path, ...] = ()
    # before index.faiss: the shards may be slim, their vectors read from the files this replaces
    if spec.rerank_subquantizers is not None and n_parents is not None:
        rerank = write_rerank(index_dir, zoom, m=spec.rerank_subquantizers(dim), dim=dim)
    elif spec.rerank_exact and n_parents is not None:
        rerank = (write_rerank_fp16(index_dir, zoom, dim=dim),)
    for stale in {RERANK_FILE, RERANK_CODEBOOK} - {p.name for p in rerank}:  # a codec change leaves none behind
        (ldir / stale).unlink(missing_ok=True)
    write_faiss(index, ldir / FAISS_FILE)
    (ldir / EXACT_FILE).unlink(missing_ok=True)  # the earlier layout's re-ranking copy
    files = (tuple(file_info(p) for p in list_shards(index_dir, zoom)) + (file_info(ldir / FAISS_FILE),)
             + tuple(file_info(p) for p in rerank))
    return LevelInfo(zoom=zoom, rows=int(index.ntotal), encoder=None, files=files)


def drop_embeddings(index_dir: Path, zoom: int, info: LevelInfo, *, codec: str) -> LevelInfo:
    """Rewrite each shard of a finished level without its embedding column; return ``info`` with their new sizes.

    Call once the manifest records ``info``: the vectors are then in the level's FAISS file
    (``codec``: the manifest's codec, ``flat`` for the first level), and each shard records where.
    A shard already slim against this FAISS file is left as it is (same bytes, same mtime).
    """
    ldir = level_dir(index_dir, zoom)
    sha = next((f.sha256 for f in info.files if f.name == FAISS_FILE), None)
    if sha is None:
        raise IndexFormatError(f"{ldir}: the level's manifest entry lists no {FAISS_FILE}; rebuild level z{zoom}")
    first = 0
    new: dict[str, FileInfo] = {}
    for shard in list_shards(index_dir, zoom):
        table = pq.ParquetFile(shard, memory_map=True).read(columns=list(TILE_COLUMNS))
        home = VectorHome(first, codec, sha)
        first += table.num_rows
        if VectorHome.of(shard) == home:
            continue
        slim = table.replace_schema_metadata(home.metadata())
        with atomic_path(shard) as tmp:
            pq.write_table(slim, tmp)
        new[shard.name] = file_info(shard)
    return dataclasses.replace(info, files=tuple(new.get(f.name, f) for f in info.files))


@dataclass
class StoredLevel:
    """A level opened for search: its FAISS index (in RAM or memory-mapped) and tile coordinates per row."""

    zoom: int
    index: faiss.Index
    x: npt.NDArray[np.int32]
    y: npt.NDArray[np.int32]
    info: LevelInfo
    # pq levels: rows by id -> (n, d) vectors that re-rank candidates: the re-rank code (RerankRows), or in
    # indexes of the earlier layout the float16 embeddings of exact.npy
    exact: npt.NDArray[np.float16] | RerankRows | None = None
    resident: bool = False  # the FAISS file was read into RAM (else it is memory-mapped)

    @property
    def rows(self) -> int:
        return len(self.x)

    @property
    def is_ivf(self) -> bool:
        return isinstance(self.index, faiss.IndexIVF)


def _rebuild_hint(zoom: int) -> str:
    return (f"rerun `python -m pipelines.build_index --zoom {zoom}` with the arguments of the build: it re-encodes "
            "damaged shards only and rebuilds the FAISS file")


def _check_files(index_dir: Path, info: LevelInfo, *, verify: bool) -> None:
    ldir = level_dir(index_dir, info.zoom)
    listed = {f.name for f in info.files}
    on_disk = {p.name for p in list_shards(index_dir, info.zoom)}
    if FAISS_FILE not in listed or not on_disk <= listed:
        unlisted = sorted(on_disk - listed) + ([] if FAISS_FILE in listed else [FAISS_FILE])
        raise IndexFormatError(
            f"{ldir}: the manifest does not list {', '.join(unlisted)}, so their sizes and checksums cannot be "
            f"checked; the manifest was edited or the level changed after it was built: {_rebuild_hint(info.zoom)}"
        )
    for f in info.files:
        path = ldir / f.name
        if not path.is_file():
            raise IndexFormatError(f"{path}: listed in the manifest but missing; rebuild level z{info.zoom}")
        size = path.stat().st_size
        if size != f.size:
            raise IndexFormatError(
                f"{path}: {size} bytes, the manifest says {f.size}; the file is partial or was changed: "
                f"{_rebuild_hint(info.zoom)}"
            )
        if verify and file_info(path).sha256 != f.sha256:
            raise IndexFormatError(f"{path}: checksum differs from the manifest; rebuild level z{info.zoom}")


def _check_tiles(
    ldir: Path, zoom: int, cols: dict[str, np.ndarray], parent: StoredLevel | None, step: int
) -> None:
    """Tile coordinates inside the zoom's grid, and each row a child of its parent row (O(rows), vectorised)."""
    x, y, parent_row = cols["x"], cols["y"], cols["parent_row"]
    side = 1 << zoom
    bad = np.flatnonzero((x < 0) | (x >= side) | (y < 0) | (y >= side))
    if len(bad):
        r = int(bad[0])
        raise IndexFormatError(
            f"{ldir}: row {r} holds tile {zoom}/{int(x[r])}/{int(y[r])}, outside the zoom-{zoom} grid "
            f"(0..{side - 1}); {len(bad)} rows are out of range. The parquet was damaged or edited: "
            f"{_rebuild_hint(zoom)}"
        )
    if parent is None:
        bad = np.flatnonzero(parent_row != -1)
        if len(bad):
            raise IndexFormatError(
                f"{ldir}: row {int(bad[0])} of the first level has parent_row {int(parent_row[bad[0]])}, "
                f"expected -1; {_rebuild_hint(zoom)}"
            )
        return
    if len(parent_row) and (parent_row.min() < 0 or parent_row.max() >= parent.rows
                            or np.any(np.diff(parent_row) < 0)):
        raise IndexFormatError(
            f"{ldir}: parent_row is out of the range 0..{parent.rows - 1} of z{parent.zoom} or not sorted; "
            f"{_rebuild_hint(zoom)}"
        )
    bad = np.flatnonzero(((x >> step) != parent.x[parent_row]) | ((y >> step) != parent.y[parent_row]))
    if len(bad):
        r = int(bad[0])
        p = int(parent_row[r])
        raise IndexFormatError(
            f"{ldir}: row {r} holds tile {zoom}/{int(x[r])}/{int(y[r])}, which is not a child of its parent row {p} "
            f"(z{parent.zoom} tile {parent.zoom}/{int(parent.x[p])}/{int(parent.y[p])}); {len(bad)} rows disagree. "
            f"{_rebuild_hint(zoom)}"
        )


def ivf_ids_fast(path: Path, index: faiss.IndexIVF, sizes: npt.NDArray[np.int64]) -> npt.NDArray[np.int64] | None:
    """The ids of every inverted list, concatenated in list order, read straight from the file.

    ``write_index`` ends an IVF file with its ArrayInvertedLists: ``ilar``, nlist, code_size, the
    list sizes (``full``: one per list; ``sprs``: (list, size) pairs of the non-empty lists), then
    per non-empty list its codes followed by its ids. The expected sizes place every field; None
    when the bytes there are not what this layout predicts (another FAISS version, or damage), and
    the caller falls back to asking FAISS list by list.
    """
    nlist, cs, ntotal = int(index.nlist), int(index.code_size), int(index.ntotal)
    file_size = path.stat().st_size
    data_start = file_size - ntotal * (cs + 8)
    nonzero = np.flatnonzero(sizes)
    full = len(nonzero) > nlist // 2
    table = sizes if full else np.stack([nonzero, sizes[nonzero]], axis=1).ravel()
    header_at = data_start - 8 * len(table) - 8 - 4 - 16 - 4
    if header_at < 0:
        return None
    with open(path, "rb") as f:
        f.seek(header_at)
        head = f.read(data_start - header_at)
    expected_head = (b"ilar" + np.array([nlist, cs], dtype="<u8").tobytes() + (b"full" if full else b"sprs")
                     + np.array([len(table)], dtype="<u8").tobytes())
    if head[: len(expected_head)] != expected_head:
        return None
    stored_table = np.frombuffer(head[len(expected_head):], dtype="<u8")
    if not np.array_equal(stored_table, table.astype(np.uint64)):
        return None
    if ntotal == 0:
        return np.empty(0, dtype=np.int64)
    # Row r of list p (at position j in it) has its id at: rows before p * (cs + 8) + size_p * cs + 8 j.
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    lists = np.repeat(np.arange(nlist, dtype=np.int64), sizes)
    rows = np.arange(ntotal, dtype=np.int64)
    j = rows - starts[lists]
    offsets = (rows - j) * (cs + 8) + sizes[lists] * cs + 8 * j
    if cs % 8 == 0:
        words = np.memmap(path, dtype="<i8", mode="r", offset=data_start, shape=(ntotal * (cs + 8) // 8,))
        return np.asarray(words[offsets // 8], dtype=np.int64)
    raw = np.memmap(path, dtype=np.uint8, mode="r", offset=data_start, shape=(ntotal * (cs + 8),))
    out = np.empty(ntotal, dtype=np.int64)
    for lo in range(0, ntotal, 1 << 20):
        chunk = offsets[lo : lo + (1 << 20)]
        out[lo : lo + len(chunk)] = raw[chunk[:, None] + np.arange(8)].copy().view("<i8").ravel()
    return out


def ivf_ids_slow(index: faiss.IndexIVF) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """(list sizes, ids concatenated in list order) asked of FAISS one list at a time."""
    invlists = cast(faiss.InvertedLists, index.invlists)
    sizes = np.array([invlists.list_size(p) for p in range(index.nlist)], dtype=np.int64)
    ids = [faiss.rev_swig_ptr(invlists.get_ids(p), int(n)).copy() for p, n in enumerate(sizes.tolist()) if n]
    return sizes, (np.concatenate(ids).astype(np.int64) if ids else np.empty(0, dtype=np.int64))


def _check_ivf_ids(path: Path, zoom: int, index: faiss.IndexIVF, parent_row: npt.NDArray[np.int64]) -> None:
    """Inverted list p must hold exactly the rows whose parent is p, as ids in row order.

    Row i is FAISS id i, and rows are sorted by parent, so the ids of all lists read in list order
    are 0..n-1. An id outside that range would crash the search; a negative, repeated or swapped
    id would silently drop, repeat or mislabel a tile. The sha256 check catches these too, but is
    skipped on large indexes; this check reads only the ids (8 bytes per row).
    """
    sizes = np.bincount(parent_row, minlength=index.nlist).astype(np.int64) if len(parent_row) else \
        np.zeros(index.nlist, dtype=np.int64)
    ids = ivf_ids_fast(path, index, sizes) if len(sizes) == index.nlist else None
    if ids is None:
        log.info("%s: list layout not recognised; checking the ids list by list", path)
        stored_sizes, ids = ivf_ids_slow(index)
        if not np.array_equal(stored_sizes, sizes):
            p = int(np.flatnonzero(stored_sizes != sizes)[0]) if len(stored_sizes) == len(sizes) else 0
            raise IndexFormatError(
                f"{path}: inverted list {p} holds {int(stored_sizes[p]) if len(stored_sizes) > p else '?'} "
                f"rows, the parquet says {int(sizes[p]) if len(sizes) > p else '?'}; the FAISS file does not "
                f"match the level's parquet: {_rebuild_hint(zoom)}"
            )
    bad = np.flatnonzero(ids != np.arange(len(ids), dtype=np.int64))
    if len(bad):
        r = int(bad[0])
        raise IndexFormatError(
            f"{path}: FAISS id {int(ids[r])} is stored where row {r} belongs ({len(bad)} ids out of place; "
            f"the level has {len(ids)} rows); the file was damaged or edited: {_rebuild_hint(zoom)}"
        )


def mem_available_bytes() -> int:
    """MemAvailable from /proc/meminfo in bytes; 0 where it cannot be read."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def resident_levels(sizes: list[int], resident: bool | str) -> list[bool]:
    """Which levels' FAISS files to read into RAM, from the top: every query reads the upper levels,
    and only a few children per kept tile of the deepest, so RAM goes to the upper ones first.

    Args:
        sizes: each level's FAISS file size in bytes, top level first.
        resident: True (all), False (none, all memory-mapped) or ``auto``: from the top while the
            total stays within ``RESIDENT_AUTO_BYTES`` and a quarter of the free memory.
    """
    if resident is True or resident is False:
        return [resident] * len(sizes)
    if resident != "auto":
        raise ConfigError(f"resident={resident!r}: use True, False or 'auto' (--resident yes|no|auto)")
    budget = min(RESIDENT_AUTO_BYTES, mem_available_bytes() // 4)
    fits = int(np.searchsorted(np.cumsum(sizes), budget, side="right"))  # levels from the top within budget
    return [i < fits for i in range(len(sizes))]


def _open_npy(path: Path, dtype: str, shape: tuple[int, ...] | None, *, ndim: int = 2, mmap: bool = True) -> np.ndarray:
    """A ``.npy`` file (memory-mapped), its header checked: C-order ``dtype`` of ``shape`` (None: any ``ndim``).

    Checksums are skipped on large indexes, so the header is the only guard: an ``<i2`` or
    Fortran-order header would otherwise be read as other numbers and give wrong answers.
    """
    fix = f"rebuild this level (`python -m pipelines.build_index --zoom {path.parent.name.lstrip('z0') or '0'}` " \
          "with the arguments of the build)"
    try:
        array = np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except Exception as e:  # noqa: BLE001 - numpy's header parser raises ValueError, SyntaxError, TokenError...
        raise IndexFormatError(f"{path}: unreadable .npy header ({type(e).__name__}: {e}); {fix}") from e
    if array.dtype.str != dtype or array.ndim != ndim or not array.flags.c_contiguous:
        order = "Fortran" if array.flags.f_contiguous and not array.flags.c_contiguous else "C"
        raise IndexFormatError(f"{path}: holds {array.dtype.str} in {order} order with {array.ndim} dimensions, "
                               f"expected C-order {dtype} with {ndim}; {fix}")
    if shape is not None and array.shape != shape:
        raise IndexFormatError(f"{path}: has shape {array.shape}, expected {shape}; {fix}")
    return array


def _open_rerank(ldir: Path, rows: int, dim: int) -> RerankRows:
    """``rerank.npy`` memory-mapped and its codebooks, their headers checked against each other and the level."""
    codebook = _open_npy(ldir / RERANK_CODEBOOK, "<f4", None, ndim=3, mmap=False)
    m, k, dsub = codebook.shape
    if m * dsub != dim or not 1 <= k <= 256:
        raise IndexFormatError(f"{ldir / RERANK_CODEBOOK}: codebooks of shape {codebook.shape} do not make "
                               f"{dim}-d vectors from one-byte codes; rebuild this level")
    return RerankRows(_open_npy(ldir / RERANK_FILE, "|u1", (rows, m)), codebook)


def open_store(
    index_dir: str | os.PathLike, *, verify: bool | None = None, resident: bool | str = "auto",
) -> tuple[Manifest, list[StoredLevel]]:
    """Open an index for search: check the manifest and files, read or memory-map every level's FAISS file.

    Besides file sizes (and sha256 with ``verify``), every open checks what a wrong byte could
    turn into a wrong answer, in O(rows) vectorised work: tile coordinates inside the grid and
    under their parent row, and the FAISS ids of every inverted list (see benchmarks/RESULTS.md
    for the cost on large indexes).

    Args:
        verify: also compare every file's sha256 with the manifest (reads all data once).
            None (default) verifies indexes up to ``VERIFY_AUTO_BYTES`` and checks only sizes above.
        resident: which FAISS files are read into RAM rather than memory-mapped (see
            :func:`resident_levels`); ``auto`` holds the upper levels, which every query reads.

    Raises:
        IndexNotFoundError: no manifest. IndexFormatError: missing, partial or damaged files,
            a newer format version, or row counts, tile coordinates or FAISS ids that disagree.
    """
    index_dir = Path(index_dir)
    manifest = Manifest.load(index_dir)
    if not manifest.levels:
        raise IndexFormatError(f"{index_dir}: the manifest lists no complete level yet; finish the build")
    if verify is None:
        verify = sum(f.size for lv in manifest.levels for f in lv.files) <= VERIFY_AUTO_BYTES
    levels: list[StoredLevel] = []
    faiss_sizes = [next((f.size for f in lv.files if f.name == FAISS_FILE), 0) for lv in manifest.levels]
    in_ram = resident_levels(faiss_sizes, resident)
    for info, ram in zip(manifest.levels, in_ram):
        _check_files(index_dir, info, verify=verify)
        ldir = level_dir(index_dir, info.zoom)
        path = ldir / FAISS_FILE
        try:
            index = faiss.read_index(str(path), 0 if ram else faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY)
        except RuntimeError as e:
            raise IndexFormatError(f"{path}: damaged FAISS file ({e}); rebuild it from parquet") from e
        cols = read_level_columns(index_dir, info.zoom, ("x", "y", "parent_row"))
        if index.ntotal != info.rows or len(cols["x"]) != info.rows:
            raise IndexFormatError(
                f"level z{info.zoom}: manifest says {info.rows} rows, FAISS has {index.ntotal}, "
                f"parquet has {len(cols['x'])}; rebuild this level"
            )
        if index.d != manifest.dim:
            raise IndexFormatError(f"{path}: dimension {index.d}, the manifest says {manifest.dim}")
        parent = levels[-1] if levels else None
        cols = {c: a.astype(np.int64) for c, a in cols.items()}
        _check_tiles(ldir, info.zoom, cols, parent, manifest.schedule.step)
        if parent is not None:
            if not isinstance(index, faiss.IndexIVF) or index.nlist != max(parent.rows, 1):
                raise IndexFormatError(
                    f"level z{info.zoom}: expected an IVF index with {parent.rows} lists (rows of z{parent.zoom})"
                )
            _check_ivf_ids(path, info.zoom, index, cols["parent_row"])
        exact: npt.NDArray[np.float16] | RerankRows | None = None
        listed = {f.name for f in info.files}
        if EXACT_FILE in listed:
            exact = _open_npy(ldir / EXACT_FILE, "<f2", (info.rows, manifest.dim))
        elif RERANK_CODEBOOK in listed:
            exact = _open_rerank(ldir, info.rows, manifest.dim)
        elif RERANK_FILE in listed:
            exact = _open_npy(ldir / RERANK_FILE, "<f2", (info.rows, manifest.dim))
        levels.append(StoredLevel(info.zoom, index, cols["x"].astype(np.int32), cols["y"].astype(np.int32), info,
                                  exact, resident=ram))
    return manifest, levels
