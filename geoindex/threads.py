"""Thread count for the query path (``locate``, ``serve``): one by default, overridable with ``--threads``.

A query is one photo's forward pass and a few thousand children scored per level: on this 2-core
CPU neither gains from a second thread when the machine is quiet (EfficientNet-Lite0: 20.2 ms p50
with 2 threads, 21.3 ms with 1), while threads that spin waiting for cores other processes hold
make the tail slow when it is busy (demo index, tiny encoder, 2 busy processes: p95 41.8 ms with
2 threads against 6.4 ms with 1; benchmarks/latency_under_load.py). A service answers concurrent
requests on concurrent threads, which is where the cores go. torch and FAISS share one OpenMP
runtime here (setting either's count sets the other's), so there is one knob for both.
"""

from __future__ import annotations

__all__ = ["configure_query_threads"]


def configure_query_threads(threads: int | None = None, *, apply: bool = True) -> int:
    """Set (or, with ``apply=False``, only compute) the threads of the photo encoder and of FAISS.

    Args:
        threads: threads for torch (intra-op, including MKL/oneDNN) and FAISS's OpenMP; default 1.

    Returns:
        The count set.
    """
    count = max(1, threads or 1)
    if apply:
        import faiss
        import torch

        faiss.omp_set_num_threads(count)
        torch.set_num_threads(count)
    return count
