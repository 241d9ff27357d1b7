"""A level encoded at query time from a tile source: the paper's inference, and the indexed search's baseline."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from geoindex.errors import ConfigError
from geoindex.geometry.tiles import tile_code_array, tile_xy_of_code_array
from geoindex.models.encoders import ImageEncoder
from geoindex.models.tile_encoding import embed_tiles
from geoindex.retrieval.beam import NEG, top_k
from geoindex.retrieval.levels import KeepFn, PriorLevel, children_codes, code_tiles
from geoindex.sources import TileSource

__all__ = ["OnTheFlyLevel"]


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
        keep: KeepFn | None = None,
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
        """Embed the tiles of ``codes`` (``embed_tiles``); returns (embeddings (m, d), found mask (m,))."""
        found, emb = embed_tiles(self.source, self.encoder, codes, zoom=self.zoom, batch_size=self.batch_size)
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
        valid = parents >= 0
        px, py = tile_xy_of_code_array(np.where(valid, parents, 0), zoom=self.zoom - self.step)
        return children_codes(np.where(valid, px, -1), np.where(valid, py, -1), zoom=self.zoom, step=self.step,
                              keep=self.keep)

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
        return code_tiles(ids, zoom=self.zoom)

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
