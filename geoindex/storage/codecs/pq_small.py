"""``pq_small``: ``pq``'s IVF-PQ, its candidates re-ranked from a finer product code rather than float16 vectors.

The re-rank code (``rerank.npy``, one byte per sub-vector of at least 5 dimensions: 256 bytes at
1280-d) and its codebooks are the level's only copy of its vectors: a tile takes about d / 5 + 80
bytes on disk, but neither code gives the embeddings back, so the answers can differ from flat's
where tiles score close together (benchmarks/codecs.py measures how often), and a pq_small level
cannot be rebuilt from its own files: repairing one re-encodes it.
"""

from __future__ import annotations

from geoindex.storage.codecs.base import Codec
from geoindex.storage.codecs.pq import TRAIN_SAMPLE, make_ivf_pq, rerank_subquantizers, subquantizers

CODEC = Codec("pq_small", "product quantiser, 64 bytes per tile, re-ranked from a d/5-byte finer code", make_ivf_pq,
              subquantizers, train_rows=TRAIN_SAMPLE, rerank_subquantizers=rerank_subquantizers)
