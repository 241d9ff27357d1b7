"""A stored level searched on a device: faiss-gpu where installed and asked for, else one torch matmul per level.

Rows of a level are sorted by parent row, so the children of the kept tiles are contiguous row
ranges that can be gathered and scored directly, without the IVF structure FAISS's CPU search uses.
"""

from __future__ import annotations

from typing import Any

import faiss
import numpy as np
import numpy.typing as npt

from geoindex.errors import ConfigError
from geoindex.retrieval.beam import NEG
from geoindex.retrieval.levels.stored import FaissLevel
from geoindex.storage.store import StoredLevel

__all__ = ["TorchLevel", "faiss_gpu_available"]


def faiss_gpu_available() -> bool:
    """True where the installed faiss has GPU support (the ``gpu`` extra) and sees a GPU."""
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


class TorchLevel(FaissLevel):
    """An indexed level searched on a device (a GPU): one batched torch matmul per level, or faiss-gpu.

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
        faiss_gpu: search the gathered children with ``faiss.knn_gpu`` where faiss has GPU support
            (:func:`faiss_gpu_available`): one call per query (the whole level in one call on the first
            level), the embeddings kept in host memory and copied by faiss. Where it has none, the
            torch matmul runs instead. Either way ``trace_note`` says which ran.
    """

    def __init__(
        self, stored: StoredLevel, embeddings: npt.NDArray[np.floating], parent_row: npt.NDArray[np.integer], *,
        device: str = "cpu", allowed: npt.NDArray[np.bool_] | None = None, block: int = 1 << 22,
        faiss_gpu: bool = False,
    ) -> None:
        import torch

        super().__init__(stored, allowed=allowed)
        if stored.exact is not None or embeddings.shape[0] != stored.rows:
            raise ConfigError(f"level z{stored.zoom}: the torch search needs the fp16 or flat codec's embeddings of "
                              f"all {stored.rows} rows; use search_backend='faiss' for this index")
        self.device = torch.device(device)
        self.block = block
        parent_row = np.asarray(parent_row, dtype=np.int64)
        n_parents = int(parent_row.max()) + 1 if len(parent_row) else 0
        counts = np.bincount(parent_row[parent_row >= 0], minlength=n_parents) if n_parents else np.zeros(0, np.int64)
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]]) if n_parents else np.zeros(0, np.int64)
        self._width = int(counts.max()) if len(counts) else 0  # children of the fullest parent
        self._gpu_res: Any = None
        self._note: str | None = None
        if faiss_gpu and faiss_gpu_available():
            self._gpu_res = faiss.StandardGpuResources()
            self._host_emb = np.ascontiguousarray(embeddings, dtype=np.float32)
            self._host_starts, self._host_counts = starts.astype(np.int64), counts.astype(np.int64)
            self._note = "faiss-gpu: knn_gpu over the kept tiles' children"
            return
        if faiss_gpu:
            self._note = (f"torch on {self.device}: faiss-gpu was asked for, but this faiss has no GPU support or "
                          "sees no GPU (install the gpu extra); one batched matmul per level")
        self._emb = torch.from_numpy(np.ascontiguousarray(embeddings, dtype=np.float32)).to(self.device)
        self._starts = torch.from_numpy(starts.astype(np.int64)).to(self.device)
        self._counts = torch.from_numpy(counts.astype(np.int64)).to(self.device)
        self._mask = torch.from_numpy(self._allowed).to(self.device) if self._allowed is not None else None

    def trace_note(self) -> str | None:
        """Which search ran where faiss-gpu was asked for (faiss-gpu, or torch and why); None otherwise."""
        return self._note

    def search(
        self, xq: npt.NDArray[np.float32], k: int, parents: npt.NDArray[np.int64] | None
    ) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
        import torch

        if self._gpu_res is not None:
            return self._faiss_gpu_search(np.ascontiguousarray(xq, dtype=np.float32), k, parents)
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

    def _faiss_gpu_search(
        self, xq: npt.NDArray[np.float32], k: int, parents: npt.NDArray[np.int64] | None
    ) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
        """Top k by ``faiss.knn_gpu``: the allowed rows of the level for all queries at once on the first
        level, else each query's allowed children (gathered from the contiguous row ranges of its parents)."""
        D = np.full((len(xq), k), NEG, dtype=np.float32)
        I = np.full((len(xq), k), -1, dtype=np.int64)  # noqa: E741
        if parents is None:
            rows = np.arange(self.stored.rows, dtype=np.int64)
            if self._allowed is not None:
                rows = rows[self._allowed]
            self._knn_into(D, I, slice(None), xq, rows, k)
            return D, I
        counts = self._host_counts
        for q in range(len(xq)):
            p = parents[q]
            p = p[(p >= 0) & (p < len(counts))]
            lens = counts[p]
            # row ranges starts[p] .. starts[p] + counts[p], concatenated in the order of the parents
            first = np.cumsum(lens) - lens  # where each parent's children start in ``rows``
            rows = np.arange(int(lens.sum()), dtype=np.int64) + np.repeat(self._host_starts[p] - first, lens)
            if self._allowed is not None:
                rows = rows[self._allowed[rows]]
            self._knn_into(D, I, slice(q, q + 1), xq[q : q + 1], rows, k)
        return D, I

    def _knn_into(
        self, D: npt.NDArray[np.float32], I: npt.NDArray[np.int64], at: slice,  # noqa: E741
        xq: npt.NDArray[np.float32], rows: npt.NDArray[np.int64], k: int,
    ) -> None:
        """Write the top min(k, len(rows)) of ``rows`` for queries ``xq`` into ``D[at]``, ``I[at]`` (row ids)."""
        kk = min(k, len(rows))
        if not kk:
            return
        d, j = faiss.knn_gpu(self._gpu_res, xq, np.ascontiguousarray(self._host_emb[rows]), kk,
                             metric=faiss.METRIC_INNER_PRODUCT)
        D[at, :kk] = d
        I[at, :kk] = rows[np.asarray(j, dtype=np.int64)]
