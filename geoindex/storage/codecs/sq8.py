"""``sq8``: IVF over 8-bit scalar-quantised vectors, one byte per dimension, ranges fitted on a sample."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from geoindex.storage.codecs.base import Codec

if TYPE_CHECKING:
    import faiss

TRAIN_SAMPLE = 65_536  # rows used to fit the quantizer's per-dimension ranges


def _make(quantizer: faiss.Index, dim: int, nlist: int, sample: npt.NDArray[np.float32] | None) -> faiss.IndexIVF:
    import faiss

    index = faiss.IndexIVFScalarQuantizer(quantizer, dim, nlist, faiss.ScalarQuantizer.QT_8bit,
                                          faiss.METRIC_INNER_PRODUCT, False)
    assert sample is not None
    index.sq.train(np.ascontiguousarray(sample, dtype=np.float32))  # not index.train: no k-means of lists
    return index


CODEC = Codec("sq8", "8-bit scalar quantiser (d bytes per tile)", _make, lambda d: d, train_rows=TRAIN_SAMPLE)
