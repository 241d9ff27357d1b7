"""Tiles of a source -> embeddings: read and preprocess each tile, leave out the missing, encode in batches.

Loaders are worker processes for local sources (``TileProcessPool``: decoding, rendering and
resizing hold the GIL, so threads would share one core) and threads for remote ones
(``loader_pool`` chooses). Loaders hand back uint8 pixels; the encoder makes them its input on its
own device (``ImageEncoder.encode_pixels``).

``embed_tiles`` is the one place tiles become embeddings: building an index (``build.encode_tiles``),
on-the-fly and lazy levels (``levels.onthefly``, ``levels.lazy``) and training's validation call it.
Batches are runs of ``batch_size`` consecutive tiles of the request; a tile the source lacks is
left out of its batch, so what a batch holds depends only on the tiles asked for, and every
caller gets the same embeddings for the same tiles.
"""

from __future__ import annotations

import collections
import itertools
import math
import multiprocessing
import pickle
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import Any, Literal

import mercantile
import numpy as np
import numpy.typing as npt
import torch
from PIL import Image

from geoindex.errors import GeoIndexError, ImageError, TileNotFoundError, TileSourceError
from geoindex.geometry.tiles import tile_xy_of_code_array
from geoindex.imagery import MAX_IMAGE_PIXELS, TILE_MAX_SIDE, check_image_path, decode_tile, to_rgb
from geoindex.models.device_jpeg import KeepJpeg, decode_jpegs, read_header
from geoindex.models.encoders import ImageEncoder
from geoindex.sources import ByteTileSource, DirectorySource, TileSource, is_local_spec, source_spec

__all__ = ["PREFETCH_BATCHES", "EncodedBatch", "TileLoad", "TileProcessPool", "embed_tiles", "encode_tile_batches",
           "load_tile", "loader_pool", "read_tile", "read_tile_batches"]

PREFETCH_BATCHES = 3  # batches read and preprocessed ahead of the encoder

OnError = Literal["raise", "skip", "collect"]


class TileLoad:
    """What reading one tile gave: its pixels or tensor, neither (the source lacks it) or the error; the image size.

    :func:`read_tile` gives uint8 RGB ``pixels`` (H, W, 3) where the encoder's ``loader_step`` stops
    there (the S x S crop for ``pil`` preprocessing, the whole tile for ``torch``), else the float
    ``tensor`` (3, S, S) of a custom preprocessing; :func:`load_tile` always the ``tensor``. For an
    encoder that decodes JPEGs on its device (``device_jpeg.KeepJpeg``), a JPEG tile's loader gives its
    encoded ``data``, which :func:`read_tile_batches` turns into ``pixels``: a uint8 tensor on that device.
    """

    __slots__ = ("data", "error", "pixels", "size", "tensor")

    def __init__(self, tensor: torch.Tensor | None, size: tuple[int, int] | None = None,
                 error: GeoIndexError | None = None, pixels: npt.NDArray[np.uint8] | torch.Tensor | None = None,
                 data: bytes | None = None) -> None:
        self.tensor, self.size, self.error, self.pixels, self.data = tensor, size, error, pixels, data

    @property
    def found(self) -> bool:
        return self.tensor is not None or self.pixels is not None or self.data is not None


def _encoded(source: TileSource, tile: mercantile.Tile) -> bytes | None:
    """The tile's encoded bytes where the source keeps them (a folder's file, MBTiles, a server), else None.

    Raises what ``source.get`` raises for a missing or unreadable tile.
    """
    if isinstance(source, DirectorySource):
        path = source.path(tile)
        if path is None:
            return None  # get() names the missing tile
        try:
            check_image_path(path)
            return path.read_bytes()
        except (ImageError, OSError) as e:
            raise TileSourceError(f"{path}: stored tile is damaged ({e}); delete it and fetch again") from e
    if isinstance(source, ByteTileSource):
        return source.fetch_bytes(tile)
    return None


def _read(source: TileSource, tile: mercantile.Tile, prepare: Callable[[Any], Any]) -> TileLoad:
    img: Image.Image | None = None
    try:
        if isinstance(prepare, KeepJpeg):
            data = _encoded(source, tile)
            header = read_header(data, max_side=TILE_MAX_SIDE) if data is not None else None
            if data is not None and header is not None:  # decoded on the device by read_tile_batches
                return TileLoad(None, (header.width, header.height), data=data)
            if data is not None and isinstance(source, ByteTileSource):  # not a JPEG: decoded here, not fetched again
                img = decode_tile(data, what=f"{source.name} tile {tuple(tile)}")
        if img is None:
            img = source.get(tile)
        out = prepare(to_rgb(img))
        return TileLoad(None, img.size, pixels=out) if isinstance(out, np.ndarray) else TileLoad(out, img.size)
    except TileNotFoundError:
        return TileLoad(None)
    except GeoIndexError as e:  # kept, so that a caller can name every bad tile of a shard
        return TileLoad(None, error=e)


def load_tile(source: TileSource, preprocess: Callable[[Any], torch.Tensor], tile: mercantile.Tile) -> TileLoad:
    """Read one tile and preprocess it into ``tensor``; a missing tile gives no tensor, an unreadable one its error.

    The image is made RGB as a photo is (``imagery.to_rgb``: transparency over white, 16-bit
    scaled), so a source returning RGBA or 16-bit tiles is encoded the same in every caller.
    """
    return _read(source, tile, preprocess)


def read_tile(source: TileSource, step: Callable[[Any], Any], tile: mercantile.Tile) -> TileLoad:
    """Like :func:`load_tile` with a loader's step (``ImageEncoder.loader_step``): uint8 ``pixels`` where
    the step gives an array (for ``ImageEncoder.encode_pixels``), else the float ``tensor``."""
    return _read(source, tile, step)


@dataclass(frozen=True)
class EncodedBatch:
    """One batch: the tiles ``start .. start + len(loads)`` of the request and the embeddings of those found.

    Attributes:
        start: position of the batch's first tile in the request.
        loads: what reading each tile of the batch gave.
        ok: int64 (m,), positions within the batch of the tiles encoded.
        emb: float32 (m, d), their L2-normalised embeddings, in the order of ``ok``.
    """

    start: int
    loads: list[TileLoad]
    ok: npt.NDArray[np.int64]
    emb: npt.NDArray[np.float32]


# ------------------------------------------------------------------ loading in worker processes

_WORKER: tuple[TileSource, Callable[[Any], Any]] | None = None


def _start_worker(source: TileSource, step: Callable[[Any], Any]) -> None:
    global _WORKER
    # A source holding an OS handle that must not be shared across fork (an sqlite connection) says
    # so; a pickle round trip reopens it. Others (the rendered raster's pixels) are inherited as they are.
    if getattr(source, "reopen_in_workers", False):
        source = pickle.loads(pickle.dumps(source))
    torch.set_num_threads(1)  # a loader's own torch work (other preprocessing) must not take every core
    _WORKER = (source, step)


def _read_in_worker(tiles: list[mercantile.Tile]) -> list[TileLoad]:
    assert _WORKER is not None, "a TileProcessPool worker runs _start_worker first"
    source, step = _WORKER
    return [read_tile(source, step, t) for t in tiles]


class TileProcessPool:
    """Worker processes that read, decode or render, and resize the tiles of one source.

    Reading and resizing a tile hold the GIL, so loader threads work like one core; processes
    scale with the cores. Each worker gets the source once (inherited through ``fork`` where the
    OS has it, else pickled) and hands back uint8 pixels; results come back in request order,
    so what is encoded does not depend on the number of workers.

    Args:
        source: the tiles.
        step: what the workers do to each RGB tile (``ImageEncoder.loader_step``). A pool is bound
            to its source and step (``encode_tile_batches`` checks).
        processes: worker processes, at least 1.
    """

    def __init__(self, source: TileSource, step: Callable[[Any], Any], processes: int) -> None:
        self.source = source
        self.step = step
        self.processes = max(1, int(processes))
        methods = multiprocessing.get_all_start_methods()
        context = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
        self._executor = ProcessPoolExecutor(self.processes, mp_context=context, initializer=_start_worker,
                                             initargs=(source, self.step))

    def submit(self, tiles: list[mercantile.Tile]) -> Future[list[TileLoad]]:
        return self._executor.submit(_read_in_worker, tiles)

    def shutdown(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> TileProcessPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()


def loader_pool(source: TileSource, encoder: ImageEncoder, workers: int) -> Executor | TileProcessPool:
    """The loaders for ``source``: worker processes where reading a tile is CPU work (a local folder,
    MBTiles, a raster, tiles in memory), threads where it is mostly waiting on a server (http, xyz).

    Use it as a context manager; pass it as ``pool`` to :func:`encode_tile_batches`.
    """
    spec = source_spec(source)
    if spec is not None and (is_local_spec(spec) or spec.startswith("memory:")):
        return TileProcessPool(source, encoder.loader_step, workers)
    return ThreadPoolExecutor(max_workers=max(1, workers))


def _read_one(source: TileSource, step: Callable[[Any], Any], tile: mercantile.Tile) -> list[TileLoad]:
    return [read_tile(source, step, tile)]


def _result(future: Future[list[TileLoad]]) -> list[TileLoad]:
    try:
        return future.result()
    except BrokenProcessPool as e:
        raise TileSourceError(
            f"a tile-loading worker process died ({e}), e.g. killed for memory; rerun to resume, with fewer "
            "--workers") from e


def read_tile_batches(
    source: TileSource, tiles: Sequence[mercantile.Tile], step: Callable[[Any], Any], *,
    batch_size: int, pool: Executor | TileProcessPool | None,
) -> Iterator[tuple[int, list[TileLoad]]]:
    """Read ``tiles`` in runs of ``batch_size`` with ``step`` (:func:`read_tile`), ahead of the caller
    when given a ``pool``; yields (position of the batch's first tile, its loads), in request order."""
    n = len(tiles)
    if pool is None:
        for start in range(0, n, batch_size):
            batch = [read_tile(source, step, t) for t in tiles[start : start + batch_size]]
            yield start, _decode_on_device(batch, step)
        return
    if isinstance(pool, TileProcessPool) and (pool.source is not source or pool.step != step):
        raise GeoIndexError(f"this TileProcessPool reads {pool.source.name!r} for another encoder or preprocessing, "
                            f"not {source.name!r} for this one: make one per source and encoder "
                            "(tile_encoding.loader_pool)")

    def submit(start: int) -> tuple[int, list[Future[list[TileLoad]]]]:
        batch = list(tiles[start : start + batch_size])
        if isinstance(pool, TileProcessPool):  # a batch in one chunk per worker: few, large messages
            chunk = max(1, math.ceil(len(batch) / pool.processes))
            return start, [pool.submit(batch[i : i + chunk]) for i in range(0, len(batch), chunk)]
        assert pool is not None
        return start, [pool.submit(_read_one, source, step, t) for t in batch]

    # Read ahead a bounded number of batches: enough to keep the model busy, while a whole shard
    # of preprocessed tiles (8,192 x 150 KB at 224 px) need not be in memory.
    starts = iter(range(0, n, batch_size))
    ahead = collections.deque(submit(s) for s in itertools.islice(starts, PREFETCH_BATCHES))
    while ahead:
        start, futures = ahead.popleft()
        nxt = next(starts, None)
        if nxt is not None:
            ahead.append(submit(nxt))
        yield start, _decode_on_device([load for f in futures for load in _result(f)], step)


def _decode_on_device(loads: list[TileLoad], step: Callable[[Any], Any]) -> list[TileLoad]:
    """The JPEG tiles the loaders handed back encoded (``data``), decoded in one batch on the step's
    device into ``pixels``; one the device cannot decode is decoded on the host (or gets its error)."""
    todo = [load for load in loads if load.data is not None]
    if not todo or not isinstance(step, KeepJpeg):
        return loads
    decoded = decode_jpegs([load.data for load in todo if load.data is not None], step.device,
                           max_side=TILE_MAX_SIDE, max_pixels=MAX_IMAGE_PIXELS)
    for load, pixels in zip(todo, decoded):
        assert load.data is not None
        load.pixels, data, load.data = pixels, load.data, None
        if pixels is None:
            try:
                load.pixels = step(to_rgb(decode_tile(data, what="tile")))
            except ImageError as e:
                load.error = TileSourceError(f"{e}; the stored tile is damaged: delete it and fetch again")
    return loads


def encode_tile_batches(
    source: TileSource,
    tiles: Sequence[mercantile.Tile],
    encoder: ImageEncoder,
    *,
    batch_size: int,
    pool: Executor | TileProcessPool | None = None,
    on_error: OnError = "raise",
) -> Iterator[EncodedBatch]:
    """Encode ``tiles`` in batches of ``batch_size`` consecutive tiles, leaving out those the source lacks.

    Args:
        pool: processes (:class:`TileProcessPool`) or threads that read and preprocess tiles ahead of
            the model (None: read here, in order); :func:`loader_pool` chooses for a source.
        on_error: a tile that cannot be read (not merely missing): ``raise`` its error at once;
            ``skip`` it like a missing tile; ``collect``: keep reading, so that the caller can name
            every bad tile from ``loads``, but encode nothing from the first bad batch on.

    Yields:
        One :class:`EncodedBatch` per batch, in order.
    """
    failed = False
    for start, loads in read_tile_batches(source, tiles, encoder.loader_step, batch_size=batch_size, pool=pool):
        errors = [load.error for load in loads if load.error is not None]
        if errors and on_error == "raise":
            raise errors[0]
        failed = failed or bool(errors)
        ok = np.asarray([i for i, t in enumerate(loads) if t.found], dtype=np.int64)
        if on_error == "collect" and failed:
            ok = ok[:0]
        if len(ok):
            emb = _encode(encoder, [loads[i] for i in ok.tolist()])
        else:
            emb = np.zeros((0, encoder.dim), dtype=np.float32)
        yield EncodedBatch(start, loads, ok, emb)


def embed_tiles(
    source: TileSource,
    encoder: ImageEncoder,
    codes: npt.ArrayLike,
    *,
    zoom: int,
    batch_size: int,
    pool: Executor | TileProcessPool | None = None,
    on_error: OnError = "raise",
    on_batch: Callable[[EncodedBatch], None] | None = None,
) -> tuple[npt.NDArray[np.bool_], npt.NDArray[np.float32]]:
    """Embed the tiles ``codes`` (tile codes ``(y << zoom) | x``) in request order; leave out those the source lacks.

    Batches are runs of ``batch_size`` consecutive codes (:func:`encode_tile_batches`), so the
    embeddings depend only on the codes asked for, not on ``pool`` or its number of workers.

    Args:
        codes: (n,) int64 tile codes at ``zoom``.
        pool, on_error: as for :func:`encode_tile_batches`.
        on_batch: called with each :class:`EncodedBatch` once it is stored (progress, bad-tile reports).

    Returns:
        found: bool (n,), False where the source has no such tile (or it was skipped or not encoded
        for ``on_error``). emb: float32 (n, d), L2-normalised; zero where not found.
    """
    x, y = tile_xy_of_code_array(np.asarray(codes, dtype=np.int64).ravel(), zoom=zoom)
    tiles = [mercantile.Tile(tx, ty, zoom) for tx, ty in zip(x.tolist(), y.tolist())]
    found = np.zeros(len(tiles), dtype=bool)
    emb = np.zeros((len(tiles), encoder.dim), dtype=np.float32)
    for batch in encode_tile_batches(source, tiles, encoder, batch_size=batch_size, pool=pool, on_error=on_error):
        rows = batch.start + batch.ok
        emb[rows] = batch.emb
        found[rows] = True
        if on_batch is not None:
            on_batch(batch)
    return found, emb


def _encode(encoder: ImageEncoder, loads: list[TileLoad]) -> npt.NDArray[np.float32]:
    """Embeddings of found tiles: uint8 pixels become the network's input on the encoder's device."""
    if all(load.pixels is not None for load in loads):
        return encoder.encode_pixels([load.pixels for load in loads])  # type: ignore[misc]
    return encoder.encode_tensor(torch.stack([load.tensor for load in loads]))  # type: ignore[misc]
