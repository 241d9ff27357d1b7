"""``pq``: IVF-PQ (one byte per sub-vector, no residuals) whose candidates are re-ranked from float16 vectors.

The IVF scan reads 64-byte codes (the FAISS file, small enough to hold in RAM); each level's top
``rerank * k`` candidates are then re-scored from the level's float16 vectors (``rerank.npy``,
memory-mapped, a few thousand rows read per query), its only copy of them: on disk a tile takes
about what fp16 takes, in RAM 72 bytes. ``pq_small`` re-ranks from a finer product code instead.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from geoindex.storage.codecs.base import Codec, pq_bits, train_pq

if TYPE_CHECKING:
    import faiss

__all__ = ["CODEC", "MAX_M", "TRAIN_SAMPLE", "make_ivf_pq", "rerank_subquantizers", "subquantizers"]

TRAIN_SAMPLE = 16_384  # rows used to train the codebooks (64 per centroid)
MAX_M = 64  # at most 64 one-byte sub-vector codes per tile (+ an 8-byte id per IVF entry)
RERANK_DSUB = 5  # the re-rank code: sub-vectors of at least 5 dimensions, one byte each


def subquantizers(dim: int) -> int:
    """Sub-vectors M of the IVF code: the largest divisor of ``dim`` up to 64 (one byte each).

    512-d (CLIP ViT-B/32) and 1280-d (EfficientNet-Lite0): 64, so an IVF entry is 64 code bytes +
    an 8-byte id = 72 bytes. Each level also stores its codebooks once (256 x d float32).
    """
    return max(m for m in range(1, min(dim, MAX_M) + 1) if dim % m == 0)


def rerank_subquantizers(dim: int) -> int:  # pq_small's re-rank code
    """Sub-vectors of the re-rank code: the largest divisor of ``dim`` up to ``dim / 5`` (1280-d: 256 bytes)."""
    return max(m for m in range(1, max(dim // RERANK_DSUB, 1) + 1) if dim % m == 0)


def make_ivf_pq(quantizer: faiss.Index, dim: int, nlist: int, sample: npt.NDArray[np.float32] | None) -> faiss.IndexIVF:
    """IVF-PQ without residuals, codebooks trained on ``sample``; the coarse quantizer stays empty."""
    import faiss

    assert sample is not None
    index = faiss.IndexIVFPQ(quantizer, dim, nlist, subquantizers(dim), pq_bits(len(sample)),
                             faiss.METRIC_INNER_PRODUCT)
    index.by_residual = False
    train_pq(index.pq, sample)  # not index.train: no k-means of lists
    return index


CODEC = Codec("pq", "product quantiser, 64 bytes per tile in FAISS, re-ranked from float16 vectors on disk",
              make_ivf_pq, subquantizers, train_rows=TRAIN_SAMPLE, exact=True, rerank_exact=True)
