"""Hierarchical beam search over zoom levels: the beam loop, location priors, the checked beam width, ``top_k``.

The levels it searches are any kind of ``geoindex.retrieval.levels`` (stored, on a device, on the fly, lazy):
each returns the top-k children of the ids kept at the level above, and ``beam_search`` keeps the
top ``k`` of each level and descends into their children only.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, Protocol, get_args

import numpy as np
import numpy.typing as npt

from geoindex.errors import ConfigError
from geoindex.retrieval.calibration import DEFAULT_TEMPERATURE  # an uncalibrated index's softmax temperature
from geoindex.retrieval.levels import Level, LevelHits, PriorLevel

__all__ = [
    "DEFAULT_TEMPERATURE",
    "MAX_K",
    "NEG",
    "PriorMode",
    "PriorOptions",
    "TilePrior",
    "beam_search",
    "BeamWidth",
    "beam_width",
    "check_k",
    "top_k",
]

MAX_K = 2048  # FAISS GPU's top-k limit; keeps CPU and GPU builds interchangeable
NEG = np.float32(-np.finfo(np.float32).max)  # what FAISS reports for an empty result slot


class BeamWidth(int):
    """A beam width that :func:`check_k` accepted: the later steps of the same call (the API, the
    beam search) take it as it is, so one call checks its ``k`` once, where it enters."""


def check_k(k: int) -> BeamWidth:
    """Validate a beam width; ConfigError naming the valid range otherwise."""
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= MAX_K:
        raise ConfigError(f"k (the beam width) must be an integer in 1..{MAX_K}, got {k!r}")
    return BeamWidth(k)


def beam_width(k: int) -> BeamWidth:
    """``k`` as a checked beam width: a BeamWidth passes through, anything else is checked (``check_k``)."""
    return k if isinstance(k, BeamWidth) else check_k(k)


class TilePrior(Protocol):
    """A per-query belief about where each of n photos was taken (GeoCLIP's: ``retrieval.prior.GalleryBelief``)."""

    def __len__(self) -> int: ...

    def top_tile(self, *, zoom: int) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
        """Tile (x (n,), y (n,)) at ``zoom`` holding each query's most probable location."""
        ...

    def tile_mass(self, x: npt.NDArray[np.int64], y: npt.NDArray[np.int64], *, zoom: int) -> npt.NDArray[np.float64]:
        """Probability (n, m) that query i lies inside tile (x[i, j], y[i, j]); 0 where x is -1."""
        ...


PriorMode = Literal["inject", "rerank"]


@dataclass(frozen=True)
class PriorOptions:
    """How a location prior joins the beam search.

    Modes:
        ``inject`` (the paper's Table 3): at every level the tile holding the prior's top-1
            location joins the k kept tiles, so up to k + 1 tiles descend. It is appended, not
            swapped for the k-th tile: the paper says it "joins" the kept tiles, and appending
            never evicts a tile the retrieval chose (cost grows by 1/k). It carries its own
            similarity score and is sorted in by it; it is skipped where the index lacks it
            (coverage, region filter) or its parent did not descend.
        ``rerank``: every level fetches the top ``k * pool`` tiles by similarity ``s``, scores
            each ``s' = (1 - weight) * s + weight * temperature * log(mass + eps)``, where
            ``mass`` is the prior's probability of the tile's area, and keeps the top k by
            ``s'``. With the result's softmax at the same ``temperature`` the final
            probabilities are the log-linear pool ``p_tiles**(1 - weight) * p_prior**weight``.
            ``weight`` 0 is plain search; 1 ranks by the prior alone (ties by order of ``s``).
            ``pool`` 16 (= 4**step for the paper's step 2) reranks every child of every kept tile.

    Attributes:
        mode: ``inject`` or ``rerank``.
        weight: rerank weight in [0, 1]; unused by inject. Untuned: 0.5 trusts both equally.
        pool: rerank candidates per kept tile, >= 1.
        eps: probability floor for tiles that hold no prior mass, > 0.
        temperature: converts log-probabilities to score units; the results' softmax temperature.
    """

    mode: PriorMode = "inject"
    weight: float = 0.5
    pool: int = 16
    eps: float = 1e-6
    temperature: float = DEFAULT_TEMPERATURE

    def __post_init__(self) -> None:
        if self.mode not in get_args(PriorMode):
            raise ConfigError(f"prior mode must be one of {list(get_args(PriorMode))}, got {self.mode!r}")
        if not 0.0 <= self.weight <= 1.0:
            raise ConfigError(f"prior weight must be in [0, 1], got {self.weight!r}")
        if isinstance(self.pool, bool) or not isinstance(self.pool, (int, np.integer)) or self.pool < 1:
            raise ConfigError(f"prior pool must be an integer >= 1, got {self.pool!r}")
        if not self.eps > 0 or not self.temperature > 0:
            raise ConfigError(f"prior eps and temperature must be > 0, got {self.eps!r} and {self.temperature!r}")


def _inject(
    level: Level, xq: npt.NDArray[np.float32], k: int, parents: npt.NDArray[np.int64] | None, prior: TilePrior
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
    """The level's top k plus, where missing, the tile holding the prior's top-1 location: (n, k + 1)."""
    D, I = level.search(xq, k, parents)
    if not isinstance(level, PriorLevel):
        raise ConfigError(f"{type(level).__name__} cannot take an injected prior tile (needs ids_of and score_ids)")
    tx, ty = prior.top_tile(zoom=level.zoom)
    ids = np.asarray(level.ids_of(tx, ty), dtype=np.int64)
    ids = np.where((I == ids[:, None]).any(axis=1), -1, ids)  # already kept: nothing to add
    scores = np.asarray(level.score_ids(xq, ids, parents), dtype=np.float32)
    return top_k(np.concatenate([D, scores[:, None]], axis=1), np.concatenate([I, ids[:, None]], axis=1), k + 1)


def _rerank(
    level: Level,
    xq: npt.NDArray[np.float32],
    k: int,
    parents: npt.NDArray[np.int64] | None,
    prior: TilePrior,
    options: PriorOptions,
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
    """Top k of the level's top ``k * pool`` by the combined score of :class:`PriorOptions`."""
    D, I = level.search(xq, k * options.pool, parents)
    x, y = level.tiles(I)
    mass = prior.tile_mass(x, y, zoom=level.zoom)
    w = options.weight
    combined = (1.0 - w) * D.astype(np.float64) + w * options.temperature * np.log(mass + options.eps)
    return top_k(combined.astype(np.float32), I, k)


def beam_search(
    xq: npt.NDArray[np.float32],
    levels: Sequence[Level],
    k: int,
    *,
    prior: TilePrior | None = None,
    prior_options: PriorOptions | None = None,
) -> list[LevelHits]:
    """Coarse-to-fine search: keep the top ``k`` of each level, look only at their children next.

    Args:
        xq: query embeddings (n, d), float32, L2-normalised.
        levels: coarsest first.
        k: beam width (tiles kept per level and query).
        prior: optional per-query location belief (n queries) that joins the search.
        prior_options: how it joins (:class:`PriorOptions`; default ``inject``).

    Returns:
        One LevelHits per level, coarsest first; (n, k + 1) per level with ``inject``.

    Raises:
        ConfigError: k out of range (``check_k``), or a prior that does not fit the batch or the levels.
    """
    k = beam_width(k)
    xq = np.ascontiguousarray(xq, dtype=np.float32)
    options = prior_options or PriorOptions()
    if prior is not None and len(prior) != len(xq):
        raise ConfigError(f"the prior covers {len(prior)} queries, the batch has {len(xq)}")
    hits: list[LevelHits] = []
    parents: npt.NDArray[np.int64] | None = None
    for level in levels:
        if prior is None:
            D, I = level.search(xq, k, parents)
        elif options.mode == "inject":
            D, I = _inject(level, xq, k, parents, prior)
        else:
            D, I = _rerank(level, xq, k, parents, prior, options)
        x, y = level.tiles(I)
        hits.append(LevelHits(level.zoom, D, I, x, y, note=level.trace_note()))
        parents = I
    return hits


def top_k(scores: npt.NDArray[np.float32], ids: npt.NDArray[np.int64], k: int) -> tuple[np.ndarray, np.ndarray]:
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
