"""Thread counts for the query path (``locate``, ``serve``): chosen from the core count, overridable.

A query scores a few thousand children per level: too little work to split across threads, and
idle OpenMP threads that spin while other processes hold the cores make the tail slow (measured
with the demo index on 2 busy cores: p95 95 ms with FAISS's default threads, 8 ms with one).
The photo encoder's forward pass does gain from the cores, so torch keeps them.
"""

from __future__ import annotations

import os

__all__ = ["configure_query_threads"]


def configure_query_threads(
    *, torch_threads: int | None = None, faiss_threads: int | None = None, apply: bool = True
) -> tuple[int, int]:
    """Set (or, with ``apply=False``, only compute) torch's and FAISS's thread counts for queries.

    Args:
        torch_threads: intra-op threads of the photo encoder; default: the cores this process may use.
        faiss_threads: OpenMP threads of the FAISS searches; default 1.

    Returns:
        (torch_threads, faiss_threads) as set.
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    chosen = (max(1, torch_threads or cores), max(1, faiss_threads or 1))
    if apply:
        import faiss
        import torch

        torch.set_num_threads(chosen[0])
        faiss.omp_set_num_threads(chosen[1])
    return chosen
