"""Query latency p50/p95 on a quiet and on a busy machine, under each threading policy, in one run.

The index is the demo's (zoom 2, 4, 6 of the world from the embedded Blue Marble) built with the
chosen encoder; queries are rendered views, one photo per call, k = 64. "Loaded" runs as many busy
background processes as there are cores (pure-Python loops, started and stopped by this script,
each bounded by --load-seconds). Policies:

* ``default``: torch's and FAISS's own thread count (one per core; they share one OpenMP runtime);
* ``tuned``: what ``geoindex.models.threads.configure_query_threads()`` sets for ``locate`` and ``serve``.

Writes benchmarks/results/latency_under_load.json:
``{"results": {"quiet": {"p50_ms", "p95_ms"}, "loaded": {"p50_ms", "p95_ms"}, "by_policy": {...}}}``
(the top-level quiet/loaded figures are the tuned policy's).

Run: ``.venv/bin/python benchmarks/latency_under_load.py`` (``--quick``: fewer queries).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np

from benchmarks._common import BenchRun, Report, benchmark_parser, markdown_table, resolve_encoder, run_benchmark

NAME = "latency_under_load"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = benchmark_parser(NAME, __doc__, raw=True, default_encoder="tiny")
    p.add_argument("--queries", type=int, help="timed queries per condition and policy (default 60; 20 --quick)")
    p.add_argument("--k", type=int, default=64)
    p.add_argument("--busy", type=int, default=os.cpu_count() or 2, help="busy processes when loaded (default: cores)")
    p.add_argument("--load-seconds", type=float, default=300.0, help="upper bound on each busy process's life")
    a = p.parse_args(argv)
    a.queries = a.queries or (6 if a.smoke else 20 if a.quick else 60)
    a.encoder = a.encoder or "tiny"
    return a


def _busy(seconds: float) -> None:
    end = time.monotonic() + seconds
    x = 0
    while time.monotonic() < end:
        x = (x * 1103515245 + 12345) % 2**31


def _timed(index, photos, k: int) -> list[float]:  # type: ignore[no-untyped-def]
    out = []
    for photo in photos:
        t = time.perf_counter()
        index.search(photo, k=k)
        out.append(time.perf_counter() - t)
    return out


def run(a: argparse.Namespace, argv: Sequence[str] | None) -> Report:
    import torch

    import geoindex
    from benchmarks.latency import make_photos, region_coverage
    from geoindex.geometry.coverage import Coverage
    from geoindex.geometry.tiles import LevelSchedule
    from geoindex.models.encoders import create_encoder
    from geoindex.models.threads import configure_query_threads
    from geoindex.sources import RasterSource
    from geoindex.storage.build import build_level

    bench = BenchRun.start(NAME, argv)
    enc_name = resolve_encoder(a, "tiny")
    work = Path(tempfile.mkdtemp(prefix="geoindex-bench-load-"))
    source = RasterSource()
    schedule = LevelSchedule(2, 4 if a.smoke else 6, 2)
    encoder = create_encoder(enc_name)
    for zoom in schedule.zooms:
        build_level(work, zoom, source=source, encoder=encoder, coverage=Coverage.world(), schedule=schedule)
    index = geoindex.open_index(work)
    _, bounds = region_coverage(2)
    photos = make_photos(source, bounds, a.queries, a.seed)
    policies = {"default": torch.get_num_threads(), "tuned": configure_query_threads(apply=False)}
    raw: dict[str, dict[str, list[float]]] = {p: {} for p in policies}
    try:
        for condition in ("quiet", "loaded"):
            busy = []
            if condition == "loaded":
                ctx = mp.get_context("spawn")
                busy = [ctx.Process(target=_busy, args=(a.load_seconds,), daemon=True) for _ in range(a.busy)]
                for proc in busy:
                    proc.start()
                time.sleep(1.0)
            try:
                for policy, threads in policies.items():
                    configure_query_threads(threads)
                    _timed(index, photos[:3], a.k)  # warm-up under this policy
                    raw[policy][condition] = _timed(index, photos, a.k)
            finally:
                for proc in busy:
                    proc.terminate()
                    proc.join(timeout=10)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    def stats(samples: list[float]) -> dict[str, float]:
        ms = np.asarray(samples) * 1e3
        return {"p50_ms": float(np.percentile(ms, 50)), "p95_ms": float(np.percentile(ms, 95))}

    by_policy = {p: {c: stats(s) for c, s in by_c.items()} for p, by_c in raw.items()}
    results = {**by_policy["tuned"], "by_policy": by_policy,
               "policies": {p: {"threads": t} for p, t in policies.items()}}
    rows = [[p, c, by_policy[p][c]["p50_ms"], by_policy[p][c]["p95_ms"],
             f"{by_policy[p][c]['p95_ms'] / by_policy[p][c]['p50_ms']:.1f}x"]
            for p in policies for c in ("quiet", "loaded")]
    table = markdown_table(["policy (threads)", "condition", "p50 ms", "p95 ms", "p95 / p50"],
                           [[f"{r[0]} {policies[r[0]]}", *r[1:]] for r in rows])
    loaded = by_policy["tuned"]["loaded"]
    targets = (("tuned, loaded: p95 within 3x of p50", f"{loaded['p95_ms'] / loaded['p50_ms']:.1f}x",
                loaded["p95_ms"] <= 3 * loaded["p50_ms"]),)
    notes = [f"Index: world at zoom {list(schedule.zooms)} from the embedded Blue Marble, encoder `{enc_name}`; "
             f"{a.queries} rendered views per cell, one per call, k={a.k}. Loaded: {a.busy} busy Python processes "
             "on the machine's cores, started and stopped by the script."]
    return bench.report("query latency on a quiet and a busy machine", enc_name, results, (table,), notes, targets)


def main(argv: Sequence[str] | None = None) -> int:
    return run_benchmark(parse_args, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
