"""Keep freed memory for reuse in batch programs: the page faults of glibc's large allocations.

glibc serves every allocation above its mmap threshold with a fresh ``mmap`` and returns it to the
OS on ``free``. A forward pass over a batch of tiles allocates large activations, so every batch
faults all of them in again, page by page, which costs a CPU build much of its throughput
(measured by benchmarks/build_throughput.py). Kept memory is reused by the next batch, so a build's
memory stays at its peak instead of shrinking between batches: right for batch programs (the
pipelines call :func:`keep_freed_memory`), not for a long-lived service, whose RSS should fall
after a burst of requests.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

__all__ = ["keep_freed_memory"]

log = logging.getLogger(__name__)

_M_TRIM_THRESHOLD = -1  # glibc's mallopt parameters (malloc.h)
_M_MMAP_THRESHOLD = -3
_LARGEST = 1 << 30  # blocks up to 1 GiB come from the heap; larger ones are still mapped and unmapped


def keep_freed_memory() -> bool:
    """Make glibc keep large freed blocks in the heap for reuse (process-wide; a no-op elsewhere).

    Allocations up to 1 GiB come from the heap instead of their own mapping, and the heap is not
    trimmed when its top is freed. Returns True where it applied (glibc), False otherwise.
    """
    name = ctypes.util.find_library("c")
    try:
        mallopt = ctypes.CDLL(name).mallopt if name else None
    except (OSError, AttributeError):
        mallopt = None
    if mallopt is None:  # musl, macOS, Windows: nothing to tune
        return False
    applied = bool(mallopt(_M_MMAP_THRESHOLD, _LARGEST)) and bool(mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))
    if not applied:
        log.debug("glibc refused the malloc thresholds; freed memory is returned to the OS as before")
    return applied
