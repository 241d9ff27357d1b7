"""``fp16``: IVF over float16 vectors (``QT_fp16``); exact for the embeddings a build stores, the default."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from geoindex.storage.codecs.base import Codec

if TYPE_CHECKING:
    import faiss


def _make(quantizer: faiss.Index, dim: int, nlist: int, sample: npt.NDArray[np.float32] | None) -> faiss.IndexIVF:
    import faiss

    return faiss.IndexIVFScalarQuantizer(quantizer, dim, nlist, faiss.ScalarQuantizer.QT_fp16,
                                         faiss.METRIC_INNER_PRODUCT, False)


CODEC = Codec("fp16", "float16 vectors, exact (2 d bytes per tile)", _make, lambda d: 2 * d, exact=True)
