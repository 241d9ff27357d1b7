"""Hierarchical beam search over zoom levels, shared by the indexed and the on-the-fly paths.

A level answers one question: given query embeddings ``xq`` (n, d) and, per query, the ids kept
at the level above (n, w; -1 pads), return the top-k (D, I) among their children. The indexed
level asks FAISS (the kept ids of level L are the inverted lists of level L+1); the on-the-fly
level encodes the children's tiles at query time, as the paper did. ``beam_search`` runs either.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, cast, get_args, runtime_checkable

import faiss
import numpy as np
import numpy.typing as npt

from geoindex.calibration import DEFAULT_TEMPERATURE  # an uncalibrated index's softmax temperature
from geoindex.encoders import ImageEncoder
from geoindex.errors import ConfigError, IndexFormatError
from geoindex.sources import TileSource
from geoindex.store import StoredLevel
from geoindex.tile_encoding import encode_tile_batches
from geoindex.tiles import children_array, tile_code_array, tile_of_code, tile_xy_of_code_array

__all__ = [
    "DEFAULT_TEMPERATURE",
    "MAX_K",
    "FaissLevel",
    "Level",
    "LevelHits",
    "OnTheFlyLevel",
    "PQ_RERANK",
    "PriorLevel",
    "PriorMode",
    "PriorOptions",
    "TilePrior",
    "TorchLevel",
    "beam_search",
    "BeamWidth",
    "beam_width",
    "check_k",
    "top_k",
]

MAX_K = 2048  # FAISS GPU's top-k limit; keeps CPU and GPU builds interchangeable
NEG = np.float32(-np.finfo(np.float32).max)  # what FAISS reports for an empty result slot
PQ_RERANK = 4  # pq levels: re-rank the top rerank * k PQ candidates of each level from its finer code (codecs.py)


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


class Level(Protocol):
    """One zoom level of the hierarchy, as the beam search sees it.

    ``tiles_encoded`` counts the tiles the level encoded while answering (on-the-fly and lazy
    levels; 0 for stored ones), and ``trace_note`` says how the last search was answered, for the
    result's trace (None when there is nothing to say).
    """

    zoom: int
    tiles_encoded: int

    def trace_note(self) -> str | None:
        """How the last search was answered (lazy: stored, encoded or on the fly), or None."""
        ...

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


@runtime_checkable
class PriorLevel(Level, Protocol):
    """A level that can take a prior's tile (``inject``): it finds a tile's row and scores one given row."""

    def ids_of(self, x: npt.NDArray[np.int64], y: npt.NDArray[np.int64]) -> npt.NDArray[np.int64]:
        """Id of each tile (x, y) at this level, same shape; -1 where the level lacks it."""
        ...

    def score_ids(
        self, xq: npt.NDArray[np.float32], ids: npt.NDArray[np.int64], parents: npt.NDArray[np.int64] | None
    ) -> npt.NDArray[np.float32]:
        """Score (n,) of one given id per query, as ``search`` would report it; NEG where it cannot be returned."""
        ...


@dataclass(frozen=True)
class LevelHits:
    """What one level kept for a batch of queries: scores D, ids I and tiles x, y, all (n, k)."""

    zoom: int
    D: npt.NDArray[np.float32]
    I: npt.NDArray[np.int64]  # noqa: E741 - FAISS's name
    x: npt.NDArray[np.int64]
    y: npt.NDArray[np.int64]
    note: str | None = field(default=None, kw_only=True)  # how the level answered (lazy levels: stored or encoded)


class TilePrior(Protocol):
    """A per-query belief about where each of n photos was taken (GeoCLIP's: ``geoindex.prior.GalleryBelief``)."""

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


class FaissLevel(PriorLevel):
    """An indexed level: exhaustive IndexFlatIP on the first level, restricted IVF search after it.

    Args:
        stored: the opened level.
        allowed: optional bool mask over the level's rows, shape (rows,): only rows where it is
            True can be returned (a region filter). FAISS skips the other ids while scanning
            (an ``IDSelectorBitmap``), so the result equals exact search over the allowed rows.
        rerank: on a level with re-rank vectors (``stored.exact``: the ``pq`` codec's finer code, or
            float16 embeddings in indexes of the earlier layout), FAISS returns the top
            ``rerank * k`` by approximate score and those are re-scored from those vectors; the
            scores reported are theirs.
    """

    def __init__(
        self, stored: StoredLevel, *, allowed: npt.NDArray[np.bool_] | None = None, rerank: int = PQ_RERANK
    ) -> None:
        if rerank < 1:
            raise ConfigError(f"rerank must be >= 1, got {rerank}")
        self.zoom = stored.zoom
        self.stored = stored
        self.rerank = rerank
        self._exact: npt.NDArray[np.float16] | None = getattr(stored, "exact", None)
        self._selector: faiss.IDSelector | None = None
        self._allowed: npt.NDArray[np.bool_] | None = None
        self._lookup: tuple[np.ndarray, np.ndarray] | None = None  # (sorted tile codes, their rows), for priors
        if allowed is not None:
            allowed = self._allowed = np.asarray(allowed, dtype=bool)
            if allowed.shape != (stored.rows,):
                raise ConfigError(f"level z{stored.zoom}: allowed mask has shape {allowed.shape}, "
                                  f"expected ({stored.rows},)")
            # The selector keeps a raw pointer into the bitmap: keep the array alive with it.
            self._bitmap = np.packbits(allowed, bitorder="little")
            self._selector = faiss.IDSelectorBitmap(stored.rows, faiss.swig_ptr(self._bitmap))

    def search(
        self, xq: npt.NDArray[np.float32], k: int, parents: npt.NDArray[np.int64] | None
    ) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
        index = self.stored.index
        if parents is None:
            if self._selector is None:
                return index.search(xq, k)
            flat_params = faiss.SearchParameters()
            flat_params.sel = self._selector
            return index.search(xq, k, params=flat_params)
        if self._exact is None:
            return _search_lists(cast(faiss.IndexIVF, index), xq, k, parents, self._selector)
        _, I = _search_lists(cast(faiss.IndexIVF, index), xq, k * self.rerank, parents, self._selector)  # noqa: E741
        return top_k(self._exact_scores(xq, I), I, k)

    def _exact_scores(self, xq: npt.NDArray[np.float32], I: npt.NDArray[np.int64]) -> npt.NDArray[np.float32]:  # noqa: E741
        """Inner products (n, m) of each query with its rows ``I`` (n, m) from the float16 embeddings."""
        assert self._exact is not None
        emb = np.asarray(self._exact[np.maximum(I, 0).ravel()], dtype=np.float32)
        return np.einsum("qmd,qd->qm", emb.reshape(*I.shape, -1), xq).astype(np.float32)

    tiles_encoded = 0  # a stored level encodes nothing

    def trace_note(self) -> str | None:
        return None

    def tiles(self, ids: npt.NDArray[np.int64]) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
        lo, hi = (int(ids.min()), int(ids.max())) if ids.size else (0, 0)
        if hi >= self.stored.rows or lo < -1:
            raise IndexFormatError(
                f"level z{self.zoom}: FAISS returned id {hi if hi >= self.stored.rows else lo} outside its "
                f"{self.stored.rows} rows; the index file changed after it was opened. Reopen it with --verify, "
                f"or rebuild level z{self.zoom}"
            )
        # id -1 reads the last row (numpy's negative index), then is masked back to -1
        x = self.stored.x.take(ids).astype(np.int64)
        y = self.stored.y.take(ids).astype(np.int64)
        if lo < 0:
            missing = ids < 0
            x[missing] = -1
            y[missing] = -1
        return x, y

    def ids_of(self, x: npt.NDArray[np.int64], y: npt.NDArray[np.int64]) -> npt.NDArray[np.int64]:
        """Row id of each tile (x, y) of this level, -1 where the index (or the region) lacks it."""
        if self._lookup is None:  # built on first use: two int64 arrays of the level's size
            codes = tile_code_array(self.stored.x, self.stored.y, zoom=self.zoom)
            order = np.argsort(codes, kind="stable")
            self._lookup = (codes[order], order)
        codes, rows = self._lookup
        x = np.asarray(x, dtype=np.int64)
        query = tile_code_array(x, y, zoom=self.zoom)
        pos = np.clip(np.searchsorted(codes, query), 0, max(len(codes) - 1, 0))
        found = (x >= 0) & (codes[pos] == query) if len(codes) else np.zeros(query.shape, bool)
        ids = np.where(found, rows[pos] if len(codes) else -1, -1).astype(np.int64)
        if self._allowed is not None:
            ids = np.where((ids >= 0) & self._allowed[np.maximum(ids, 0)], ids, -1)
        return ids

    def score_ids(
        self, xq: npt.NDArray[np.float32], ids: npt.NDArray[np.int64], parents: npt.NDArray[np.int64] | None
    ) -> npt.NDArray[np.float32]:
        """Score (n,) of one given row per query, as ``search`` would report it; NEG where the row is
        -1 or not among the children of that query's ``parents``."""
        index = self.stored.index
        out = np.full(len(xq), NEG, dtype=np.float32)
        for q in np.flatnonzero(ids >= 0).tolist():
            row = int(ids[q])
            sel = faiss.IDSelectorRange(row, row + 1)
            x1 = np.ascontiguousarray(xq[q : q + 1])
            if parents is None:
                flat_params = faiss.SearchParameters()
                flat_params.sel = sel
                D, I = index.search(x1, 1, params=flat_params)
            else:
                D, I = _search_lists(cast(faiss.IndexIVF, index), x1, 1, parents[q : q + 1], sel)
            if I[0, 0] == row:
                out[q] = D[0, 0] if self._exact is None or parents is None else self._exact_scores(x1, I)[0, 0]
        return out


class TorchLevel(FaissLevel):
    """An indexed level searched with torch on a device (a GPU): one batched matmul per level.

    Rows are sorted by parent row, so the children of parent row p are the contiguous rows
    ``starts[p] .. starts[p] + counts[p]``: the kept parents' children are gathered per query and
    scored with one batched matrix product, then the top k kept with ``torch.topk``. The same tiles
    and scores as :class:`FaissLevel` (tests/test_search.py compares them on CPU tensors); priors'
    single-tile scores still go through FAISS.

    Args:
        stored: the opened level (its FAISS index serves ``score_ids``).
        embeddings: float16 (rows, d) in row order, as the fp16 and flat codecs store them.
        parent_row: int64 (rows,), each row's parent row (unused on the first level).
        device: where the embeddings live and the products run.
        allowed: as for :class:`FaissLevel`.
        block: most candidate embeddings gathered at once (bounds the memory of a batch).
    """

    def __init__(
        self, stored: StoredLevel, embeddings: npt.NDArray[np.floating], parent_row: npt.NDArray[np.integer], *,
        device: str = "cpu", allowed: npt.NDArray[np.bool_] | None = None, block: int = 1 << 22,
    ) -> None:
        import torch

        super().__init__(stored, allowed=allowed)
        if stored.exact is not None or embeddings.shape[0] != stored.rows:
            raise ConfigError(f"level z{stored.zoom}: the torch search needs the fp16 or flat codec's embeddings of "
                              f"all {stored.rows} rows; use search_backend='faiss' for this index")
        self.device = torch.device(device)
        self.block = block
        self._emb = torch.from_numpy(np.ascontiguousarray(embeddings, dtype=np.float32)).to(self.device)
        parent_row = np.asarray(parent_row, dtype=np.int64)
        n_parents = int(parent_row.max()) + 1 if len(parent_row) else 0
        counts = np.bincount(parent_row[parent_row >= 0], minlength=n_parents) if n_parents else np.zeros(0, np.int64)
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]]) if n_parents else np.zeros(0, np.int64)
        self._starts = torch.from_numpy(starts.astype(np.int64)).to(self.device)
        self._counts = torch.from_numpy(counts.astype(np.int64)).to(self.device)
        self._width = int(counts.max()) if len(counts) else 0  # children of the fullest parent
        self._mask = torch.from_numpy(self._allowed).to(self.device) if self._allowed is not None else None

    def search(
        self, xq: npt.NDArray[np.float32], k: int, parents: npt.NDArray[np.int64] | None
    ) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
        import torch

        with torch.inference_mode():
            q = torch.from_numpy(np.ascontiguousarray(xq, dtype=np.float32)).to(self.device)
            if parents is None:
                scores = q @ self._emb.T
                ids = torch.arange(self.stored.rows, device=self.device).expand(len(q), -1)
                D, I = self._top(scores, ids, k)  # noqa: E741
            else:
                P = torch.from_numpy(np.ascontiguousarray(parents, dtype=np.int64)).to(self.device)
                per_query = max(1, P.shape[1] * max(self._width, 1))
                step = max(1, self.block // per_query)
                parts = [self._children_top(q[i : i + step], P[i : i + step], k) for i in range(0, len(q), step)]
                D = torch.cat([d for d, _ in parts]) if parts else torch.zeros((0, k), device=self.device)
                I = torch.cat([i for _, i in parts]) if parts else torch.zeros((0, k), dtype=torch.int64)  # noqa: E741
            return D.cpu().numpy().astype(np.float32), I.cpu().numpy().astype(np.int64)

    def _children_top(self, q: Any, parents: Any, k: int) -> tuple[Any, Any]:
        """Top k among the children of each query's ``parents`` (m, w; -1 pads), scored by one bmm."""
        import torch

        valid_parent = (parents >= 0) & (parents < len(self._counts))
        p = torch.where(valid_parent, parents, 0)
        offsets = torch.arange(self._width, device=self.device)
        ids = (self._starts[p][..., None] + offsets).reshape(len(q), -1)  # (m, w * width)
        valid = ((offsets < self._counts[p][..., None]) & valid_parent[..., None]).reshape(len(q), -1)
        ids = torch.where(valid, ids, 0)
        scores = torch.bmm(self._emb[ids], q[:, :, None])[..., 0]
        return self._top(scores, torch.where(valid, ids, -1), k)

    def _top(self, scores: Any, ids: Any, k: int) -> tuple[Any, Any]:
        """Per row, the k best (score, id), padded with (NEG, -1); ids < 0 and disallowed rows never chosen."""
        import torch

        keep = ids >= 0
        if self._mask is not None:
            keep &= self._mask[torch.clamp(ids, min=0)]
        scores = torch.where(keep, scores, torch.full_like(scores, float(NEG)))
        kk = min(k, scores.shape[1])
        D, order = torch.topk(scores, kk, dim=1)
        I = torch.where(D > float(NEG), torch.gather(ids, 1, order), -1)  # noqa: E741
        if kk < k:
            D = torch.nn.functional.pad(D, (0, k - kk), value=float(NEG))
            I = torch.nn.functional.pad(I, (0, k - kk), value=-1)  # noqa: E741
        return D, I


def _ivf_params(nprobe: int, selector: faiss.IDSelector | None = None) -> faiss.SearchParametersIVF:
    """Search parameters probing ``nprobe`` lists, skipping what ``selector`` excludes."""
    params = faiss.SearchParametersIVF()
    params.nprobe = nprobe
    if selector is not None:
        params.sel = selector
    return params


# Without a selector, one parameter object per nprobe serves every query: FAISS only reads it, so
# threads can share it (making one per call cost about 10 us per level).
_shared_ivf_params = functools.lru_cache(maxsize=64)(_ivf_params)


def _search_lists(
    index: faiss.IndexIVF,
    xq: npt.NDArray[np.float32],
    k: int,
    parents: npt.NDArray[np.int64],
    selector: faiss.IDSelector | None,
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
    """Top k of each query (n, d) among the inverted lists ``parents`` (n, w; -1 pads) of an IVF index."""
    n = len(xq)
    # Valid ids come first in each row (FAISS pads with -1 at the end), and a row cannot hold
    # more distinct lists than exist, so trimming to nlist loses nothing.
    lists = np.ascontiguousarray(parents[:, : min(parents.shape[1], index.nlist)], dtype=np.int64)
    # Per-call parameters instead of index.nprobe: one opened index is shared across threads
    # (the Python wrapper of search_preassigned rejects params=, so call the C++ entry point).
    params = _shared_ivf_params(lists.shape[1]) if selector is None else _ivf_params(lists.shape[1], selector)
    D = np.empty((n, k), dtype=np.float32)
    I = np.empty((n, k), dtype=np.int64)  # noqa: E741
    coarse = np.zeros(lists.shape, dtype=np.float32)  # unused: by_residual is off
    index.search_preassigned_c(  # type: ignore[attr-defined]  # the SWIG entry point, absent from stubs
        n, faiss.swig_ptr(xq), k, faiss.swig_ptr(lists), faiss.swig_ptr(coarse),
        faiss.swig_ptr(D), faiss.swig_ptr(I), False, params,
    )
    return D, I


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


class OnTheFlyLevel(PriorLevel):
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
        tiles = [tile_of_code(code, zoom=self.zoom) for code in codes.tolist()]
        emb = np.zeros((len(codes), self.encoder.dim), dtype=np.float32)
        found = np.zeros(len(codes), dtype=bool)
        for batch in encode_tile_batches(self.source, tiles, self.encoder, batch_size=self.batch_size):
            rows = batch.start + batch.ok
            emb[rows] = batch.emb
            found[rows] = True
        if self.round_to is not None:
            emb = emb.astype(self.round_to).astype(np.float32)
        self.tiles_encoded += int(found.sum())
        return emb, found

    def _candidates(self, parents: npt.NDArray[np.int64] | None, n_queries: int) -> npt.NDArray[np.int64]:
        """Candidate tile codes per query, (n, c), -1 where none."""
        if parents is None:
            if self.first_tiles is None:
                raise ConfigError(f"on-the-fly level z{self.zoom} is first but has no first_tiles")
            codes = tile_code_array(*self.first_tiles, zoom=self.zoom)
            return np.broadcast_to(codes, (n_queries, len(codes)))
        pz = self.zoom - self.step
        valid = parents >= 0
        px, py = tile_xy_of_code_array(np.where(valid, parents, 0), zoom=pz)
        cx, cy = children_array(px.ravel(), py.ravel(), zoom=pz, step=self.step)
        cx = cx.reshape(parents.shape[0], -1)
        cy = cy.reshape(parents.shape[0], -1)
        ok = np.repeat(valid, 4**self.step, axis=1)
        if self.keep is not None:
            ok &= self.keep(cx, cy)
        return np.where(ok, tile_code_array(cx, cy, zoom=self.zoom), -1)

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
        return top_k(scores.astype(np.float32), ids, k)

    def trace_note(self) -> str | None:
        return None

    def tiles(self, ids: npt.NDArray[np.int64]) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
        valid = ids >= 0
        x, y = tile_xy_of_code_array(ids, zoom=self.zoom)
        return np.where(valid, x, -1), np.where(valid, y, -1)

    def ids_of(self, x: npt.NDArray[np.int64], y: npt.NDArray[np.int64]) -> npt.NDArray[np.int64]:
        """Tile code of each tile (x, y), -1 where the coverage filter drops it."""
        x = np.asarray(x, dtype=np.int64)
        y = np.asarray(y, dtype=np.int64)
        ok = x >= 0
        if self.keep is not None:
            ok &= np.asarray(self.keep(x, y), dtype=bool)
        return np.where(ok, tile_code_array(x, y, zoom=self.zoom), -1)

    def score_ids(
        self, xq: npt.NDArray[np.float32], ids: npt.NDArray[np.int64], parents: npt.NDArray[np.int64] | None
    ) -> npt.NDArray[np.float32]:
        """Score (n,) of one given tile code per query; NEG where it is -1, not a candidate under
        ``parents``, or missing from the source."""
        out = np.full(len(xq), NEG, dtype=np.float32)
        cand = self._candidates(parents, len(xq))
        ok = (ids >= 0) & (cand == ids[:, None]).any(axis=1)
        if not ok.any():
            return out
        unique = np.unique(ids[ok])
        emb, found = self._encode(unique)
        pos = np.searchsorted(unique, ids[ok])
        rows = np.flatnonzero(ok)
        scores = np.einsum("qd,qd->q", emb[pos], xq[rows]).astype(np.float32)
        out[rows] = np.where(found[pos], scores, NEG)
        return out
