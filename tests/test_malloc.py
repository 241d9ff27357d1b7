"""keep_freed_memory: glibc keeps large freed blocks for the next batch instead of unmapping them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

# Allocate and free a 64 MiB buffer 20 times; count the minor page faults it took.
_PROBE = """
import resource, sys
sys.path.insert(0, {repo!r})
from geoindex.models.malloc import keep_freed_memory
if {keep} and not keep_freed_memory():
    print(-1)  # not glibc: nothing to tune
    raise SystemExit
buf = bytearray(64 << 20); del buf  # the first one faults in either way
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    buf = bytearray(64 << 20)
    del buf
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(keep: bool) -> int:
    code = _PROBE.format(repo=str(Path(__file__).resolve().parents[1]), keep=keep)
    return int(subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout)


def test_freed_blocks_are_reused_instead_of_faulted_in_again():
    kept = _faults(True)  # in a child process: the setting is process-wide
    if kept < 0:
        pytest.skip("not glibc: keep_freed_memory has nothing to tune here")
    default = _faults(False)
    # 20 x 64 MiB = 327,680 pages faulted in with glibc's defaults; reused pages fault once
    assert default > 100_000, default
    assert kept < default / 20, (kept, default)
