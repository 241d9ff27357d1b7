"""What a search returns: per query, the final tiles with probabilities and the trace of every level.

``make_results`` turns the per-level hits of :func:`geoindex.beam.beam_search` (arrays) into
``SearchResult`` values (tiles, centres, scores); output formats (``geoindex.formats``) and the
API build on these.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import mercantile
import numpy as np

from geoindex.beam import DEFAULT_TEMPERATURE, LevelHits
from geoindex.errors import ConfigError
from geoindex.tiles import tile_center

__all__ = ["Candidate", "LevelTrace", "SearchResult", "make_results"]


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
    """The tiles one level kept (best first) with their scores, and how the level answered (``note``)."""

    zoom: int
    tiles: tuple[mercantile.Tile, ...]
    scores: tuple[float, ...]
    note: str | None = None  # e.g. a lazy level: "lazy: encoded 16 new tiles ...", or "on-the-fly: ..."


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


# tuple.__new__ for tiles the index holds (valid by construction), mapped in C: numpy scalars and
# mercantile's validating Tile() were most of a query's search time
_new_tile = functools.partial(tuple.__new__, mercantile.Tile)


def _level_trace(h: LevelHits, q: int) -> LevelTrace:
    ok = h.I[q] >= 0
    xs, ys, scores = (h.x[q], h.y[q], h.D[q]) if ok.all() else (h.x[q][ok], h.y[q][ok], h.D[q][ok])
    tiles = tuple(map(_new_tile, zip(xs.tolist(), ys.tolist(), itertools.repeat(h.zoom))))
    return LevelTrace(h.zoom, tiles, tuple(scores.tolist()), h.note)


def make_results(
    hits: Sequence[LevelHits],
    *,
    top_n: int = 5,
    temperature: float = DEFAULT_TEMPERATURE,
    names: Sequence[str | None] | None = None,
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
        trace = tuple(_level_trace(h, q) for h in hits)
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
