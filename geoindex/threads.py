"""Thread counts for the query path (``locate``, ``serve``): one thread each, overridable.

A query is one photo's forward pass and a few thousand children scored per level: on this 2-core
CPU neither gains from a second thread when the machine is quiet (EfficientNet-Lite0: 20.2 ms p50
with 2 torch threads, 21.3 ms with 1), while threads that spin waiting for cores other processes
hold make the tail slow when it is busy (demo index, tiny encoder, 2 busy processes: p95 50-71 ms
with 2 threads against 7 ms with 1; benchmarks/latency_under_load.py). A service answers
concurrent requests on concurrent threads, which is where the cores go.
"""

from __future__ import annotations

__all__ = ["configure_query_threads"]


def configure_query_threads(
    *, torch_threads: int | None = None, faiss_threads: int | None = None, apply: bool = True
) -> tuple[int, int]:
    """Set (or, with ``apply=False``, only compute) torch's and FAISS's thread counts for queries.

    Args:
        torch_threads: intra-op threads of the photo encoder (default 1; more helps large batches).
        faiss_threads: OpenMP threads of the FAISS searches (default 1).

    Returns:
        (torch_threads, faiss_threads) as set.
    """
    chosen = (max(1, torch_threads or 1), max(1, faiss_threads or 1))
    if apply:
        import faiss
        import torch

        torch.set_num_threads(chosen[0])
        faiss.omp_set_num_threads(chosen[1])
    return chosen
