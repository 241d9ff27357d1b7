"""``flat``: IVF over float32 vectors (``IndexIVFFlat``); holds the float16 embeddings exactly, at twice fp16's size."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from geoindex.storage.codecs.base import Codec

if TYPE_CHECKING:
    import faiss


def _make(quantizer: faiss.Index, dim: int, nlist: int, sample: npt.NDArray[np.float32] | None) -> faiss.IndexIVF:
    import faiss

    return faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)


CODEC = Codec("flat", "float32 vectors, exact (4 d bytes per tile)", _make, lambda d: 4 * d, exact=True)
