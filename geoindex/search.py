"""Hierarchical beam search over zoom levels, shared by the indexed and the on-the-fly paths.

A level answers one question: given query embeddings ``xq`` (n, d) and, per query, the ids kept
at the level above (n, w; -1 pads), return the top-k (D, I) among their children. The indexed
level asks FAISS (the kept ids of level L are the inverted lists of level L+1); the on-the-fly
level encodes the children's tiles at query time, as the paper did. ``beam_search`` runs either.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import faiss
import mercantile
import numpy as np
import numpy.typing as npt

from geoindex.encoders import ImageEncoder
from geoindex.errors import ConfigError, TileNotFoundError
from geoindex.imagery import TileSource
from geoindex.store import StoredLevel
from geoindex.tiles import children_array, tile_center

__all__ = [
    "MAX_K",
    "Candidate",
    "FaissLevel",
    "Level",
    "LevelHits",
    "LevelTrace",
    "OnTheFlyLevel",
    "SearchResult",
    "beam_search",
    "check_k",
    "make_results",
]

MAX_K = 2048  # FAISS GPU's top-k limit; keeps CPU and GPU builds interchangeable
NEG = np.float32(-np.finfo(np.float32).max)  # what FAISS reports for an empty result slot


def check_k(k: int) -> int:
    """Validate a beam width; ConfigError naming the valid range otherwise."""
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= MAX_K:
        raise ConfigError(f"k (the beam width) must be an integer in 1..{MAX_K}, got {k!r}")
    return int(k)


class Level(Protocol):
    """One zoom level of the hierarchy, as the beam search sees it."""

    zoom: int

    def search(
        self, xq: npt.NDArray[np.float32], k: int, parents: npt.NDArray[np.int64] | None
    ) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
        """Top-k children of ``parents`` (n, w) for each query (n, d); None = the whole level.

        Returns D (n, k) float32 scores, best first, and I (n, k) int64 ids, -1 where fewer exist.
        """
        ...

    def tiles(self, ids: npt.NDArray[np.int64]) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
        """Tile (x, y) of each id, same shape as ids; -1 where the id is -1."""
        ...


@dataclass(frozen=True)
class LevelHits:
    """What one level kept for a batch of queries: scores D, ids I and tiles x, y, all (n, k)."""

    zoom: int
    D: npt.NDArray[np.float32]
    I: npt.NDArray[np.int64]  # noqa: E741 - FAISS's name
    x: npt.NDArray[np.int64]
    y: npt.NDArray[np.int64]


def beam_search(xq: npt.NDArray[np.float32], levels: Sequence[Level], k: int) -> list[LevelHits]:
    """Coarse-to-fine search: keep the top ``k`` of each level, look only at their children next.

    Args:
        xq: query embeddings (n, d), float32, L2-normalised.
        levels: coarsest first.
        k: beam width (tiles kept per level and query).

    Returns:
        One LevelHits per level, coarsest first.
    """
    k = check_k(k)
    xq = np.ascontiguousarray(xq, dtype=np.float32)
    hits: list[LevelHits] = []
    parents: npt.NDArray[np.int64] | None = None
    for level in levels:
        D, I = level.search(xq, k, parents)
        x, y = level.tiles(I)
        hits.append(LevelHits(level.zoom, D, I, x, y))
        parents = I
    return hits


class FaissLevel:
    """An indexed level: exhaustive IndexFlatIP on the first level, restricted IVF search after it."""

    def __init__(self, stored: StoredLevel) -> None:
        self.zoom = stored.zoom
        self.stored = stored

    def search(
        self, xq: npt.NDArray[np.float32], k: int, parents: npt.NDArray[np.int64] | None
    ) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
        index = self.stored.index
        n = len(xq)
        if parents is None:
            return index.search(xq, k)
        # Valid ids come first in each row (FAISS pads with -1 at the end), and a row cannot hold
        # more distinct lists than exist, so trimming to nlist loses nothing.
        lists = np.ascontiguousarray(parents[:, : min(parents.shape[1], index.nlist)], dtype=np.int64)
        # Per-call parameters instead of index.nprobe: one opened index is shared across threads.
        params = faiss.SearchParametersIVF()
        params.nprobe = lists.shape[1]
        D = np.empty((n, k), dtype=np.float32)
        I = np.empty((n, k), dtype=np.int64)  # noqa: E741
        coarse = np.zeros(lists.shape, dtype=np.float32)  # unused: by_residual is off
        index.search_preassigned_c(
            n, faiss.swig_ptr(xq), k, faiss.swig_ptr(lists), faiss.swig_ptr(coarse),
            faiss.swig_ptr(D), faiss.swig_ptr(I), False, params,
        )
        return D, I

    def tiles(self, ids: npt.NDArray[np.int64]) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
        valid = ids >= 0
        safe = np.where(valid, ids, 0)
        x = np.where(valid, self.stored.x[safe], -1).astype(np.int64)
        y = np.where(valid, self.stored.y[safe], -1).astype(np.int64)
        return x, y


def _top_k(scores: npt.NDArray[np.float32], ids: npt.NDArray[np.int64], k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per row, the k best (score, id); rows padded with (NEG, -1). Ids < 0 are never chosen."""
    scores = np.where(ids >= 0, scores, NEG)
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    D = np.take_along_axis(scores, order, axis=1)
    I = np.take_along_axis(ids, order, axis=1)  # noqa: E741
    pad = k - D.shape[1]
    if pad > 0:
        D = np.pad(D, ((0, 0), (0, pad)), constant_values=NEG)
        I = np.pad(I, ((0, 0), (0, pad)), constant_values=-1)  # noqa: E741
    I = np.where(D > NEG, I, -1)  # noqa: E741
    return D.astype(np.float32), I.astype(np.int64)


class OnTheFlyLevel:
    """A level encoded at query time from a tile source: the paper's inference, and the baseline.

    Ids are tile codes ``y * 2**zoom + x``, so the next level can find the children of any id.
    Tiles the source does not have are skipped, as an index would not contain them.

    Args:
        zoom: this level's zoom; ``step`` zooms below the previous level.
        encoder: this zoom's map encoder.
        source: where tile images come from.
        first_tiles: (x, y) arrays of all candidate tiles when this is the first level.
        keep: optional filter (x, y) -> bool array restricting candidates (an index's coverage).
        round_to: dtype the tile embeddings are rounded through before scoring; float16 matches
            what an fp16 index stores, so both paths rank identically. None keeps float32.
    """

    def __init__(
        self,
        zoom: int,
        encoder: ImageEncoder,
        source: TileSource,
        *,
        step: int = 2,
        first_tiles: tuple[np.ndarray, np.ndarray] | None = None,
        keep: Callable[[np.ndarray, np.ndarray], np.ndarray] | None = None,
        round_to: type[np.floating] | None = np.float16,
        batch_size: int = 64,
    ) -> None:
        self.zoom = zoom
        self.encoder = encoder
        self.source = source
        self.step = step
        self.first_tiles = first_tiles
        self.keep = keep
        self.round_to = round_to
        self.batch_size = batch_size
        self.tiles_encoded = 0  # a running count, for benchmarks

    def _encode(self, codes: npt.NDArray[np.int64]) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.bool_]]:
        """Embed the tiles of ``codes``; returns (embeddings (m, d), found mask (m,))."""
        n = 1 << self.zoom
        images, found = [], np.zeros(len(codes), dtype=bool)
        for i, code in enumerate(codes.tolist()):
            try:
                images.append(self.source.get(mercantile.Tile(code % n, code // n, self.zoom)))
                found[i] = True
            except TileNotFoundError:
                continue
        emb = np.zeros((len(codes), self.encoder.dim), dtype=np.float32)
        if images:
            emb[found] = self.encoder.encode(images, batch_size=self.batch_size)
        if self.round_to is not None:
            emb = emb.astype(self.round_to).astype(np.float32)
        self.tiles_encoded += len(images)
        return emb, found

    def _candidates(self, parents: npt.NDArray[np.int64] | None, n_queries: int) -> npt.NDArray[np.int64]:
        """Candidate tile codes per query, (n, c), -1 where none."""
        if parents is None:
            if self.first_tiles is None:
                raise ConfigError(f"on-the-fly level z{self.zoom} is first but has no first_tiles")
            x, y = (np.asarray(a, dtype=np.int64) for a in self.first_tiles)
            codes = (y << self.zoom) + x
            return np.broadcast_to(codes, (n_queries, len(codes)))
        pz = self.zoom - self.step
        valid = parents >= 0
        px = np.where(valid, parents % (1 << pz), 0)
        py = np.where(valid, parents // (1 << pz), 0)
        cx, cy = children_array(px.ravel(), py.ravel(), zoom=pz, step=self.step)
        cx = cx.reshape(parents.shape[0], -1)
        cy = cy.reshape(parents.shape[0], -1)
        ok = np.repeat(valid, 4**self.step, axis=1)
        if self.keep is not None:
            ok &= self.keep(cx, cy)
        return np.where(ok, (cy << self.zoom) + cx, -1)

    def search(
        self, xq: npt.NDArray[np.float32], k: int, parents: npt.NDArray[np.int64] | None
    ) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
        cand = self._candidates(parents, len(xq))
        unique, inverse = np.unique(cand, return_inverse=True)
        inverse = inverse.reshape(cand.shape)
        has_neg = len(unique) > 0 and unique[0] < 0
        emb, found = self._encode(unique[1:] if has_neg else unique)
        if has_neg:  # code -1 sorts first: give it a zero row that is never chosen
            emb = np.vstack([np.zeros((1, emb.shape[1]), np.float32), emb])
            found = np.concatenate([[False], found])
        scores = np.einsum("qcd,qd->qc", emb[inverse], xq) if cand.size else np.zeros(cand.shape, np.float32)
        ids = np.where(found[inverse], cand, -1)
        return _top_k(scores.astype(np.float32), ids, k)

    def tiles(self, ids: npt.NDArray[np.int64]) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
        valid = ids >= 0
        n = 1 << self.zoom
        return np.where(valid, ids % n, -1), np.where(valid, ids // n, -1)


@dataclass(frozen=True)
class Candidate:
    """One final-level tile: its centre, similarity score and probability (softmax over the beam)."""

    tile: mercantile.Tile
    lat: float
    lon: float
    score: float
    probability: float


@dataclass(frozen=True)
class LevelTrace:
    """The tiles one level kept (best first) with their scores."""

    zoom: int
    tiles: tuple[mercantile.Tile, ...]
    scores: tuple[float, ...]


@dataclass(frozen=True)
class SearchResult:
    """Where a photo was taken, by hierarchical retrieval.

    Attributes:
        lat, lon: centre of the best tile of the deepest level that found any tile (degrees).
        tile: that tile, ``mercantile.Tile(x, y, z)``.
        bbox: its bounds, ``mercantile.LngLatBbox(west, south, east, north)``.
        score: its cosine similarity with the photo.
        candidates: the top-n tiles of that level with probabilities (softmax over the scores
            of all k kept tiles at ``temperature``), best first.
        trace: per level, coarsest first, the k tiles kept and their scores.
        image: a name for the query image (its path where it had one), or None.
    """

    lat: float
    lon: float
    tile: mercantile.Tile
    bbox: mercantile.LngLatBbox
    score: float
    candidates: tuple[Candidate, ...]
    trace: tuple[LevelTrace, ...]
    image: str | None = None


def make_results(
    hits: Sequence[LevelHits], *, top_n: int = 5, temperature: float = 0.01, names: Sequence[str | None] | None = None
) -> list[SearchResult]:
    """Turn per-level hits for a batch into one SearchResult per query.

    ``temperature`` 0.01 equals CLIP's logit scale of 100.
    """
    if top_n < 1:
        raise ConfigError(f"top_n must be >= 1, got {top_n}")
    if temperature <= 0:
        raise ConfigError(f"temperature must be > 0, got {temperature}")
    n = hits[0].D.shape[0]
    results = []
    for q in range(n):
        trace = tuple(
            LevelTrace(
                h.zoom,
                tuple(mercantile.Tile(int(a), int(b), h.zoom) for a, b, i in zip(h.x[q], h.y[q], h.I[q]) if i >= 0),
                tuple(float(d) for d, i in zip(h.D[q], h.I[q]) if i >= 0),
            )
            for h in hits
        )
        final = next((t for t in reversed(trace) if t.tiles), None)
        if final is None:
            raise ConfigError("the search found no tile at any level: the index is empty for this query")
        scores = np.asarray(final.scores, dtype=np.float64)
        logits = (scores - scores.max()) / temperature
        probs = np.exp(logits) / np.exp(logits).sum()
        candidates = tuple(
            Candidate(t, *tile_center(t), float(s), float(p))
            for t, s, p in zip(final.tiles[:top_n], final.scores[:top_n], probs[:top_n])
        )
        best = candidates[0]
        results.append(
            SearchResult(
                lat=best.lat, lon=best.lon, tile=best.tile, bbox=mercantile.bounds(best.tile),
                score=best.score, candidates=candidates, trace=trace,
                image=names[q] if names is not None else None,
            )
        )
    return results
