"""Time to open an index (``open_store``, no checksums) before and after the open-time content checks.

Issue 14 added checks that read every row at open: tile coordinates in range and under their
parent row, and every FAISS id in place. This writes a synthetic index
(``_common.build_synthetic_index``) per size, then opens it in fresh processes with two copies
of ``geoindex``: this tree ("after") and the tree at ``--before`` (a git revision, exported with
``git archive``; "before"). Each process opens the index ``--repeats`` times (the page cache is
warm from the build) and reports every time. Run:
``.venv/bin/python benchmarks/open_time.py --sizes 1e6 --dim 512``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import (
    REPO,
    BenchRun,
    Report,
    benchmark_parser,
    build_synthetic_index,
    level_sizes,
    markdown_table,
    run_benchmark,
)

NAME = "open_time"
WORKER = """
import json, os, sys, time
if os.path.isdir("geoindex/storage"):  # the tree's own layout: subpackages, or the flat one before them
    from geoindex.storage.store import open_store
else:
    from geoindex.store import open_store
times = []
for _ in range(int(sys.argv[2])):
    t = time.perf_counter()
    open_store(sys.argv[1], verify=False)
    times.append(time.perf_counter() - t)
print(json.dumps(times))
"""


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = benchmark_parser(NAME, __doc__)
    p.add_argument("--sizes", type=float, nargs="+", help="deepest-level tiles (default 1e6)")
    p.add_argument("--dim", type=int, default=512, help="embedding dimension (default 512)")
    p.add_argument("--before", default="6402bf0", help="git revision without the checks (default: 6402bf0)")
    p.add_argument("--repeats", type=int, default=3, help="opens per process (default 3)")
    p.add_argument("--workdir", type=Path, default=Path("/tmp/geoindex-bench-open"))
    a = p.parse_args(argv)
    if a.smoke:
        a.sizes, a.dim, a.repeats = [2000], 16, 1
    a.sizes = [int(s) for s in (a.sizes or [1e6])]
    return a


def _open_times(tree: Path, index: Path, repeats: int) -> list[float]:
    proc = subprocess.run([sys.executable, "-c", WORKER, str(index), str(repeats)], cwd=tree,
                          env={"PYTHONPATH": str(tree), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True, timeout=3600)
    if proc.returncode != 0:
        raise RuntimeError(f"open worker in {tree} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return [float(t) for t in json.loads(proc.stdout.strip().splitlines()[-1])]


def run(a: argparse.Namespace, argv: Sequence[str] | None) -> Report:
    bench = BenchRun.start(NAME, argv)
    rows = []
    a.workdir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=a.workdir) as before_dir:
        before = Path(before_dir)
        archive = subprocess.run(["git", "archive", a.before, "geoindex"], cwd=REPO, capture_output=True, check=True)
        subprocess.run(["tar", "-x", "-C", str(before)], input=archive.stdout, check=True)
        for size in a.sizes:
            path = a.workdir / f"n{size}"
            shutil.rmtree(path, ignore_errors=True)
            total = sum(level_sizes(size, 7, 16))
            print(f"building {size:,} tiles ({total:,} rows, d={a.dim})...", file=sys.stderr)
            started = time.perf_counter()
            built = build_synthetic_index(path, size, dim=a.dim, n_queries=1, seed=a.seed)
            build_s = time.perf_counter() - started
            old = _open_times(before, path, a.repeats)
            new = _open_times(REPO, path, a.repeats)
            rows.append({"tiles": size, "total_rows": total, "dim": a.dim, "index_bytes": built.index_bytes,
                         "build_s": build_s, "before_s": old, "after_s": new})
            shutil.rmtree(path, ignore_errors=True)
    table = markdown_table(
        ["tiles (deepest)", "rows, 7 levels", "d", "index on disk MiB", "open before s (min)", "open after s (min)",
         "added s", "all opens before / after s"],
        [[r["tiles"], r["total_rows"], r["dim"], r["index_bytes"] / 2**20, min(r["before_s"]), min(r["after_s"]),
          min(r["after_s"]) - min(r["before_s"]),
          " ".join(f"{t:.3f}" for t in r["before_s"]) + " / " + " ".join(f"{t:.3f}" for t in r["after_s"])]
         for r in rows],
    )
    notes = (
        f"open_store(verify=False) in a fresh process per tree (OMP_NUM_THREADS=1), {a.repeats} opens each, page "
        f"cache warm from the build. before = `geoindex` at {a.before}; after = this tree (adds the tile-coordinate, "
        "parent and FAISS-id checks). Indexes above 256 MB skip sha256 by default, so these checks are what stands "
        "between a damaged large index and a wrong answer.",
    )
    return bench.report("open_time: opening an index before and after the open-time checks", f"synthetic d={a.dim}",
                        rows, (table,), notes)


def main(argv: Sequence[str] | None = None) -> int:
    return run_benchmark(parse_args, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
