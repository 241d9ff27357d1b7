"""Level kinds of the hierarchy: what the beam search asks one zoom level, and the helper every kind shares.

A level answers one question: given query embeddings ``xq`` (n, d) and, per query, the ids kept at
the level above (n, w; -1 pads), return the top-k (D, I) among their children. The kinds:

- ``levels.stored.FaissLevel``: a stored level searched with FAISS on the CPU (restricted IVF search);
- ``levels.device.TorchLevel``: a stored level searched on a device (torch, or faiss-gpu where installed);
- ``levels.onthefly.OnTheFlyLevel``: tiles encoded at query time from a tile source (the paper's inference);
- ``levels.lazy.LazyLevel``: tiles encoded on first use and appended to the index.

This module holds only the protocols and ``children_codes``: it imports no level kind, so the beam
search (``geoindex.retrieval.beam``) and every kind can import it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt

from geoindex.geometry.tiles import children_array, tile_code_array, tile_xy_of_code_array

__all__ = [
    "GATHER_BLOCK", "KeepFn", "Level", "LevelHits", "PriorLevel", "children_codes", "code_tiles", "gathered_scores",
]

KeepFn = Callable[[np.ndarray, np.ndarray], np.ndarray]  # coverage filter: tiles (x, y) -> bool array

# Scoring gathers candidates' embeddings in blocks of this many float32 values (16 MB), not all of
# them at once: 16 photos at k=2048 with 1280-d embeddings would otherwise need 6 GB.
GATHER_BLOCK = 1 << 22


def gathered_scores(emb: Any, rows: npt.NDArray[np.int64], xq: npt.NDArray[np.float32], *,
                    block: int = GATHER_BLOCK) -> npt.NDArray[np.float32]:
    """Inner products (n, c) float32 of query i with the embeddings ``emb[rows[i]]`` (n, c).

    ``emb`` is anything indexed by an array of rows with a ``shape`` (an array, a memory map, a
    re-rank code's rows). Gathers at most ``block`` values at a time. Rows < 0 score as row 0
    (callers mask them).
    """
    n, c = rows.shape
    scores = np.zeros((n, c), dtype=np.float32)
    if not c:
        return scores
    d = emb.shape[1]
    if c * d <= block:  # several queries per block
        qstep = block // (c * d)
        for lo in range(0, n, qstep):
            gathered = np.asarray(emb[np.maximum(rows[lo : lo + qstep], 0)], dtype=np.float32)
            scores[lo : lo + qstep] = np.einsum("qcd,qd->qc", gathered, xq[lo : lo + qstep])
        return scores
    step = max(1, block // d)  # part of one query's candidates per block
    for q in range(n):
        for lo in range(0, c, step):
            gathered = np.asarray(emb[np.maximum(rows[q, lo : lo + step], 0)], dtype=np.float32)
            scores[q, lo : lo + step] = gathered @ xq[q]
    return scores


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


def children_codes(
    px: npt.NDArray[np.int64], py: npt.NDArray[np.int64], *, zoom: int, step: int, keep: KeepFn | None = None
) -> npt.NDArray[np.int64]:
    """Tile codes at ``zoom`` of the children of parent tiles (px, py) at ``zoom - step``.

    Args:
        px, py: (n, w) int64 parent tiles per query; -1 pads.
        zoom: the children's zoom.
        step: zooms between parent and children (each parent has ``4**step`` children).
        keep: optional coverage filter, called once on the 1-d (x, y) of the children of valid parents.

    Returns:
        (n, w * 4**step) int64 codes ``(y << zoom) | x``, a parent's children contiguous in
        ``children_array``'s order; -1 under a padding parent and where ``keep`` drops the tile.
    """
    px = np.asarray(px, dtype=np.int64)
    py = np.asarray(py, dtype=np.int64)
    valid = px >= 0
    n = px.shape[0]
    cx, cy = children_array(np.where(valid, px, 0).ravel(), np.where(valid, py, 0).ravel(),
                            zoom=zoom - step, step=step)
    cx = cx.reshape(n, -1)
    cy = cy.reshape(n, -1)
    ok = np.repeat(valid, 4**step, axis=1)
    if keep is not None and ok.any():
        ok[ok] = np.asarray(keep(cx[ok], cy[ok]), dtype=bool)
    return np.where(ok, tile_code_array(cx, cy, zoom=zoom), -1)


def code_tiles(ids: npt.NDArray[np.int64], *, zoom: int) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """Tile (x, y) of each id of a level whose ids are tile codes (on-the-fly, lazy); -1 where the id is -1."""
    valid = ids >= 0
    x, y = tile_xy_of_code_array(ids, zoom=zoom)
    return np.where(valid, x, -1), np.where(valid, y, -1)
