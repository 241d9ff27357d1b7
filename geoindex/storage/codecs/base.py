"""What a codec is: how an IVF level's vectors are encoded, and whether a second code re-ranks them."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from geoindex.errors import ConfigError

if TYPE_CHECKING:
    import faiss

__all__ = ["Codec", "IvfFactory", "RerankRows", "pq_bits", "rerank_encode", "train_pq", "train_rerank_codebook"]

IvfFactory = Callable[["faiss.Index", int, int, "npt.NDArray[np.float32] | None"], "faiss.IndexIVF"]
"""(empty coarse quantizer, d, nlist, training sample or None) -> an IVF index ready for ``add_preassigned``."""


@dataclass(frozen=True)
class Codec:
    """One codec of the levels after the first (the first level is always ``IndexFlatIP``).

    Attributes:
        name: what ``--codec`` and the manifest call it.
        summary: one line for help texts and benchmark notes.
        make_ivf: builds the level's empty, trained IVF index (see :data:`IvfFactory`); the
            quantizer it gets is never trained or searched (list p holds the children of row p).
        code_bytes: bytes one vector takes in an inverted list, from d (the 8-byte id not counted).
        train_rows: rows of the level ``make_ivf`` is given as a training sample; 0: none.
        exact: FAISS gives the stored float16 embeddings back unchanged (``reconstruct_n``), so the
            level's FAISS file can be the only copy of its vectors and a rebuild can read them from it.
        rerank_subquantizers: for a lossy code, the sub-vectors M of a finer product quantizer
            (8 bits each) whose codes re-rank each level's candidates, from d; None: no such code.
        rerank_exact: re-rank each level's candidates from a float16 copy of its vectors
            (``rerank.npy``, 2 d bytes a tile, memory-mapped): then the level's only copy of them,
            so the codec is ``exact``.
    """

    name: str
    summary: str
    make_ivf: IvfFactory
    code_bytes: Callable[[int], int]
    train_rows: int = 0
    exact: bool = False
    rerank_subquantizers: Callable[[int], int] | None = None
    rerank_exact: bool = False

    def __post_init__(self) -> None:
        if not self.name.isidentifier() or self.train_rows < 0:
            raise ConfigError(f"codec {self.name!r}: the name must be an identifier and train_rows >= 0")
        if self.rerank_exact and self.rerank_subquantizers is not None:
            raise ConfigError(f"codec {self.name!r}: re-rank from float16 vectors or from a product code, not both")

    @property
    def reranks(self) -> bool:
        """Each level's candidates are re-scored from a second copy of its vectors (``rerank.npy``)."""
        return self.rerank_exact or self.rerank_subquantizers is not None

    def rerank_bytes(self, dim: int) -> int:
        """Bytes per row of the re-rank copy (0 without one)."""
        if self.rerank_exact:
            return 2 * dim
        return self.rerank_subquantizers(dim) if self.rerank_subquantizers is not None else 0


def pq_bits(rows: int) -> int:
    """Bits per sub-vector of a product quantizer trained on ``rows`` rows: 8 (256 centroids) from 256 rows,
    fewer for tiny samples."""
    return int(min(8, max(1, np.floor(np.log2(max(rows, 2))))))


def train_pq(pq: Any, sample: npt.NDArray[np.float32]) -> None:
    """Train a FAISS ProductQuantizer on ``sample``: quietly on small samples (re-ranking makes up for
    coarse codebooks), and from a one-row sample too (two rows are needed for two centroids)."""
    pq.cp.min_points_per_centroid = 1
    if len(sample) < 2:
        sample = np.repeat(sample, 2, axis=0)
    pq.train(np.ascontiguousarray(sample, dtype=np.float32))


def train_rerank_codebook(sample: npt.NDArray[np.float32], m: int) -> npt.NDArray[np.float32]:
    """Codebooks (m, K, d / m) float32 of a product quantizer over ``sample`` (n, d); K = 256 (fewer: tiny samples)."""
    import faiss

    n, dim = sample.shape
    nbits = pq_bits(n)
    pq = faiss.ProductQuantizer(dim, m, nbits)
    train_pq(pq, sample)
    return faiss.vector_to_array(pq.centroids).reshape(m, 1 << nbits, dim // m).astype(np.float32)


def rerank_encode(x: npt.NDArray[np.float32], codebook: npt.NDArray[np.float32]) -> npt.NDArray[np.uint8]:
    """Codes (n, m) uint8 of rows ``x`` (n, d): per sub-vector the nearest centroid of ``codebook`` (m, K, d / m)."""
    m, k, dsub = codebook.shape
    sub = np.ascontiguousarray(x, dtype=np.float32).reshape(len(x), m, dsub)
    codes = np.empty((len(x), m), dtype=np.uint8)
    norms = np.einsum("mkd,mkd->mk", codebook, codebook)
    for j in range(m):  # one (n, d/m) x (d/m, K) product per sub-vector: BLAS, no (n, m, K) temporary
        codes[:, j] = np.argmin(norms[j] - 2.0 * (sub[:, j] @ codebook[j].T), axis=1)
    return codes


@dataclass(frozen=True)
class RerankRows:
    """A level's re-rank code, decoded row by row: ``rows[ids]`` is (len(ids), d) float32, as an array would be.

    Attributes:
        codes: (rows, m) uint8, usually memory-mapped. codebook: (m, K, d / m) float32.
    """

    codes: npt.NDArray[np.uint8]
    codebook: npt.NDArray[np.float32]

    @property
    def shape(self) -> tuple[int, int]:
        return (len(self.codes), self.codebook.shape[0] * self.codebook.shape[2])

    def __len__(self) -> int:
        return len(self.codes)

    def __getitem__(self, ids: npt.ArrayLike) -> npt.NDArray[np.float32]:
        codes = np.asarray(self.codes[np.asarray(ids)])
        m = self.codebook.shape[0]
        return self.codebook[np.arange(m), codes.reshape(-1, m)].reshape(*codes.shape[:-1], -1)
