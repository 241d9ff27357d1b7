"""Tiles of a source -> embeddings: read and preprocess each tile, leave out the missing, encode in batches.

The one reader -> encoder step of building an index (``build.encode_tiles``), of on-the-fly and
lazy levels (``beam.OnTheFlyLevel``) and of training (``train``'s validation and batches).
Batches are runs of ``batch_size`` consecutive tiles of the request; a tile the source lacks is
left out of its batch, so what a batch holds depends only on the tiles asked for, and every
caller gets the same embeddings for the same tiles.
"""

from __future__ import annotations

import collections
import itertools
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Literal

import mercantile
import numpy as np
import numpy.typing as npt
import torch

from geoindex.encoders import ImageEncoder
from geoindex.errors import GeoIndexError, TileNotFoundError
from geoindex.imagery import to_rgb
from geoindex.sources import TileSource

__all__ = ["PREFETCH_BATCHES", "EncodedBatch", "TileLoad", "encode_tile_batches", "load_tile"]

PREFETCH_BATCHES = 3  # batches read and preprocessed ahead of the encoder

OnError = Literal["raise", "skip", "collect"]


class TileLoad:
    """What reading one tile gave: a tensor, None (the source lacks it) or the error; and the image size."""

    __slots__ = ("error", "size", "tensor")

    def __init__(self, tensor: torch.Tensor | None, size: tuple[int, int] | None = None,
                 error: GeoIndexError | None = None) -> None:
        self.tensor, self.size, self.error = tensor, size, error


def load_tile(source: TileSource, preprocess: Callable[[Any], torch.Tensor], tile: mercantile.Tile) -> TileLoad:
    """Read one tile and preprocess it; a missing tile gives no tensor, an unreadable one its error.

    The image is made RGB as a photo is (``imagery.to_rgb``: transparency over white, 16-bit
    scaled), so a source returning RGBA or 16-bit tiles is encoded the same in every caller.
    """
    try:
        img = source.get(tile)
        return TileLoad(preprocess(to_rgb(img)), img.size)
    except TileNotFoundError:
        return TileLoad(None)
    except GeoIndexError as e:  # kept, so that a caller can name every bad tile of a shard
        return TileLoad(None, error=e)


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


def _read_batches(
    source: TileSource, tiles: Sequence[mercantile.Tile], preprocess: Callable[[Any], torch.Tensor], *,
    batch_size: int, pool: ThreadPoolExecutor | None,
) -> Iterator[tuple[int, list[TileLoad]]]:
    n = len(tiles)
    if pool is None:
        for start in range(0, n, batch_size):
            yield start, [load_tile(source, preprocess, t) for t in tiles[start : start + batch_size]]
        return

    def submit(start: int) -> tuple[int, list[Future[TileLoad]]]:
        return start, [pool.submit(load_tile, source, preprocess, t) for t in tiles[start : start + batch_size]]

    # Read ahead a bounded number of batches: enough to keep the model busy, while a whole shard
    # of preprocessed tiles (8,192 x 600 KB at 224 px) would not fit in memory.
    starts = iter(range(0, n, batch_size))
    ahead = collections.deque(submit(s) for s in itertools.islice(starts, PREFETCH_BATCHES))
    while ahead:
        start, futures = ahead.popleft()
        nxt = next(starts, None)
        if nxt is not None:
            ahead.append(submit(nxt))
        yield start, [f.result() for f in futures]


def encode_tile_batches(
    source: TileSource,
    tiles: Sequence[mercantile.Tile],
    encoder: ImageEncoder,
    *,
    batch_size: int,
    pool: ThreadPoolExecutor | None = None,
    on_error: OnError = "raise",
) -> Iterator[EncodedBatch]:
    """Encode ``tiles`` in batches of ``batch_size`` consecutive tiles, leaving out those the source lacks.

    Args:
        pool: threads that read and preprocess tiles ahead of the model (None: read here, in order).
        on_error: a tile that cannot be read (not merely missing): ``raise`` its error at once;
            ``skip`` it like a missing tile; ``collect``: keep reading, so that the caller can name
            every bad tile from ``loads``, but encode nothing from the first bad batch on.

    Yields:
        One :class:`EncodedBatch` per batch, in order.
    """
    failed = False
    for start, loads in _read_batches(source, tiles, encoder.preprocess, batch_size=batch_size, pool=pool):
        errors = [load.error for load in loads if load.error is not None]
        if errors and on_error == "raise":
            raise errors[0]
        failed = failed or bool(errors)
        ok = np.asarray([i for i, t in enumerate(loads) if t.tensor is not None], dtype=np.int64)
        if on_error == "collect" and failed:
            ok = ok[:0]
        if len(ok):
            emb = encoder.encode_tensor(torch.stack([loads[i].tensor for i in ok.tolist()]))
        else:
            emb = np.zeros((0, encoder.dim), dtype=np.float32)
        yield EncodedBatch(start, loads, ok, emb)
