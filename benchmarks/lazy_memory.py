"""Peak memory of a lazy level's scoring step: one gather of every candidate's embedding vs blocks.

A lazy level scores each photo against the float16 embeddings of up to 16k candidate tiles. It used
to gather them all at once as float32 (photos x 16k x d: 16 photos at k=2048, d=1280 is 2.7 GB, and
the float16 gather and einsum add to it); ``geoindex.retrieval.levels.lazy.score_rows`` gathers ``SCORE_BLOCK`` values
at a time. Each variant runs in a fresh process over the same synthetic rows (float16, sorted codes,
as a lazy level holds them); the figure is the process's VmHWM growth over the scoring call, read
from /proc. Run: ``.venv/bin/python benchmarks/lazy_memory.py``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import REPO, BenchRun, Report, benchmark_parser, markdown_table, run_benchmark

NAME = "lazy_memory"

# Runs in a fresh process: builds the rows, then scores with one variant and reports VmHWM growth.
_CHILD = """
import json, sys, time
from pathlib import Path
import numpy as np
from geoindex.storage.lazy_store import Rows
from geoindex.retrieval.levels import lazy

def hwm():
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024.0

variant, n, k, d = sys.argv[1], *map(int, sys.argv[2:5])
c = 16 * k
rng = np.random.default_rng(0)
emb = np.empty((n * c, d), dtype=np.float16)
for lo in range(0, n * c, 1024):  # filled in small blocks, so that making the rows sets no high-water mark
    emb[lo : lo + 1024] = rng.standard_normal((min(1024, n * c - lo), d), dtype=np.float32)
table = Rows(np.arange(n * c, dtype=np.int64), np.ones(n * c, bool), emb, np.zeros(n * c, np.int64))
rows = rng.permutation(n * c).reshape(n, c)
xq = rng.standard_normal((n, d), dtype=np.float32)
before = hwm()
started = time.perf_counter()
if variant == "gather":  # the scoring before blocks (geoindex.lazy before issue 28)
    emb = table.emb[np.maximum(rows, 0).ravel()].astype(np.float32).reshape(*rows.shape, -1)
    scores = np.einsum("qcd,qd->qc", emb, xq)
else:
    scores = lazy.score_rows(table, rows, xq)
seconds = time.perf_counter() - started
print(json.dumps({"base_mb": before, "peak_mb": hwm(), "seconds": seconds, "checksum": float(scores.sum())}))
"""


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = benchmark_parser(NAME, __doc__)
    p.add_argument("--photos", type=int, default=16, help="photos scored at once (default: 16)")
    p.add_argument("-k", type=int, nargs="+", default=[256, 512], help="beam widths: 16k candidates per photo")
    p.add_argument("--dim", type=int, default=1280, help="embedding dimension (default: 1280, EfficientNet-Lite0)")
    a = p.parse_args(argv)
    if a.smoke:
        a.photos, a.k, a.dim = 2, [4], 16
    return a


def run(a: argparse.Namespace, argv: Sequence[str] | None) -> Report:
    bench = BenchRun.start(NAME, argv)
    rows = []
    for k in a.k:
        for variant in ("gather", "blocks"):
            out = subprocess.run([sys.executable, "-c", _CHILD, variant, str(a.photos), str(k), str(a.dim)],
                                 cwd=REPO, capture_output=True, text=True, check=True)
            r = json.loads(out.stdout)
            rows.append({"variant": variant, "k": k, "photos": a.photos, "dim": a.dim,
                         "growth_mb": r["peak_mb"] - r["base_mb"], "seconds": r["seconds"], "checksum": r["checksum"]})
            print(f"k={k} {variant}: +{rows[-1]['growth_mb']:.0f} MiB, {r['seconds']:.2f} s", file=sys.stderr)
    table = markdown_table(
        ["scoring", "photos", "k", "candidates", "d", "peak growth MiB", "s"],
        [[r["variant"], r["photos"], r["k"], 16 * r["k"] * r["photos"], r["dim"], r["growth_mb"], r["seconds"]]
         for r in rows],
    )
    notes = ("gather = geoindex.lazy before issue 28 (one float32 gather of every candidate, then einsum); "
             "blocks = geoindex.retrieval.levels.lazy.score_rows (SCORE_BLOCK values at a time). Same rows and "
             "queries; the "
             "scores agree (checksums in the JSON). The rows themselves (n x 16k x d float16) are held by both "
             "and not counted.",)
    return bench.report("lazy_memory: peak memory of lazy-level scoring", "synthetic", rows, (table,), notes)


def main(argv: Sequence[str] | None = None) -> int:
    return run_benchmark(parse_args, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
