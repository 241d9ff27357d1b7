"""A stored level searched with FAISS on the CPU: exhaustive on the first level, restricted IVF search after it.

The kept ids of level L are the inverted lists of level L+1 (rows are grouped by parent row), so
"the children of the kept tiles" is one ``search_preassigned`` call with the kept ids as lists.
"""

from __future__ import annotations

import functools
from typing import cast

import faiss
import numpy as np
import numpy.typing as npt

from geoindex.errors import ConfigError, IndexFormatError
from geoindex.geometry.tiles import tile_code_array
from geoindex.retrieval.beam import NEG, top_k
from geoindex.retrieval.levels import PriorLevel, gathered_scores
from geoindex.storage.codecs.base import RerankRows
from geoindex.storage.store import StoredLevel

__all__ = ["PQ_RERANK", "FaissLevel"]

PQ_RERANK = 4  # pq levels: re-rank the top rerank * k PQ candidates of each level from its finer code (codecs.py)


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
        self._exact: npt.NDArray[np.float16] | RerankRows | None = stored.exact
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
        return gathered_scores(self._exact, I, xq)  # in blocks: k x rerank rows per photo can be large

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
