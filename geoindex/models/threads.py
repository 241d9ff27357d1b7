"""Thread counts: the query path (``locate``, ``serve``) runs on one thread, a build on every core.

Both are overridable (``--threads``; a build's tile loaders with ``--workers``).

A query is one photo's forward pass and a few thousand children scored per level: too little work
to gain from a second thread on a quiet machine, while threads that wait for cores that other
processes hold make queries slow on a busy one (benchmarks/latency_under_load.py measures both;
figures in RESULTS.md). A service answers concurrent requests on concurrent threads, which is
where the cores go. torch and FAISS share one OpenMP runtime here
(setting either's count sets the other's), so there is one knob for both.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

__all__ = ["MAX_THREADS", "build_threads", "check_threads", "configure_query_threads", "cpu_cores", "loader_threads"]

# More threads than this only oversubscribes; 20000 aborts inside libgomp and 100000 fails to allocate.
MAX_THREADS = 1024


def check_threads(threads: int | None, *, option: str = "--threads") -> int | None:
    """``threads`` if it is None or in 1..MAX_THREADS.

    Raises:
        ConfigError: out of range; the message names ``option``.
    """
    from geoindex.errors import ConfigError

    if threads is not None and not 1 <= threads <= MAX_THREADS:
        raise ConfigError(f"{option} {threads}: must be in 1..{MAX_THREADS} (this machine has {cpu_cores()} "
                          f"CPUs); leave it out to choose from the CPU count")
    return threads


def configure_query_threads(threads: int | None = None, *, apply: bool = True) -> int:
    """Set (or, with ``apply=False``, only compute) the threads of the photo encoder and of FAISS.

    Args:
        threads: threads for torch (intra-op, including MKL/oneDNN) and FAISS's OpenMP; default 1.

    Returns:
        The count set.
    """
    count = max(1, check_threads(threads) or 1)
    if apply:
        _set_threads(count)
    return count


def cpu_cores() -> int:
    """CPUs this process may run on: its affinity mask where the OS has one, else the machine's count."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


@contextlib.contextmanager
def build_threads(threads: int | None = None) -> Iterator[int]:
    """Run a build on ``threads`` threads of the encoder (torch, and ONNX Runtime, which takes
    torch's count) and of FAISS: every core this process may use (``cpu_cores``) unless given.
    Yields the count; the previous counts are restored on exit (builds also run inside other programs)."""
    import faiss
    import torch

    before = torch.get_num_threads(), faiss.omp_get_max_threads()
    count = max(1, check_threads(threads) or cpu_cores())
    _set_threads(count)
    try:
        yield count
    finally:
        torch.set_num_threads(before[0])
        faiss.omp_set_num_threads(before[1])


def loader_threads(encoder_threads: int) -> int:
    """Tile loaders (processes for local sources, threads for remote ones: ``tile_encoding.loader_pool``)
    that keep an encoder on ``encoder_threads`` threads fed.

    Reading and preprocessing a tile takes a fifth to a quarter of the CPU time of encoding it
    (EfficientNet-Lite0 under ONNX Runtime; much less for a ViT), and loaders also wait on disks and
    tile servers, so one loader per encoder thread, and at least two, keeps a batch ready without
    a crowd of threads contending for the GIL. On 2 cores the count hardly matters: 1, 2 and 4
    loaders built 101, 103 and 106 tiles/s (benchmarks/build_throughput.py --workers, RESULTS.md).
    """
    return max(2, encoder_threads)


def _set_threads(count: int) -> None:
    import faiss
    import torch

    faiss.omp_set_num_threads(count)
    torch.set_num_threads(count)
