"""Search latency, index size and resident memory as the index grows from 10^4 to 10^7 deepest-level tiles.

For each size: write a real index (parquet shards, FAISS files, manifest) with synthetic,
tree-structured embeddings (``_common.build_synthetic_index``: a compact region, 16 children per
parent, children near their parent), then open it in a fresh subprocess (FAISS files
memory-mapped, as ``geoindex.storage.store.open_store`` does) and time one-query searches over all levels
at k = 64. Run: ``.venv/bin/python benchmarks/scale.py`` (``--quick`` for small sizes).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np

from benchmarks._common import (
    REPO,
    BenchRun,
    Report,
    benchmark_parser,
    build_synthetic_index,
    level_sizes,
    markdown_table,
    pct,
    proc_status,
)

NAME = "scale"
# how the searching process holds the index: (open_store resident=, query threads; None = torch's default)
SETTINGS: dict[str, tuple[bool | str, int | None]] = {
    "mapped": (False, None),  # before issue 15: every FAISS file memory-mapped, default threads
    "resident": ("auto", 1),  # what locate/serve do now: upper levels in RAM, one query thread
    "all-in-ram": (True, 1),  # --resident yes: every FAISS file read into RAM (needs its size free)
}
DEFAULT_SETTINGS = ("mapped", "resident")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = benchmark_parser(NAME, __doc__)
    p.add_argument("--sizes", type=float, nargs="+", help="deepest-level tiles (default 1e4 1e5 1e6 1e7)")
    p.add_argument("--dim", type=int, help="embedding dimension (default 512; 64 with --quick)")
    p.add_argument("--k", type=int, default=64, help="beam width (default 64)")
    p.add_argument("--codec", default="fp16", choices=("fp16", "flat", "sq8"))
    p.add_argument("--queries", type=int, help="timed queries per size (default 1000; 300 with --quick)")
    p.add_argument("--warmup", type=int, default=20, help="untimed queries first (different from the timed ones)")
    p.add_argument("--workdir", type=Path, default=Path("/tmp/geoindex-bench-scale"),
                   help="where the indexes are written (each is deleted after it is measured)")
    p.add_argument("--keep", action="store_true", help="keep the indexes (and their queries) for --reuse")
    p.add_argument("--reuse", action="store_true",
                   help="search an index a --keep run left under --workdir instead of building it again")
    p.add_argument("--max-build-s", type=float, default=600.0,
                   help="skip a size whose build, extrapolated linearly from the previous size, would take longer")
    p.add_argument("--settings", nargs="+", choices=tuple(SETTINGS), default=list(DEFAULT_SETTINGS),
                   help="how the searching process holds the index and threads, in turn (default: mapped "
                        "resident; all-in-ram reads every FAISS file into memory)")
    p.add_argument("--setting", choices=tuple(SETTINGS), default="resident", help=argparse.SUPPRESS)
    p.add_argument("--search-worker", type=Path, help=argparse.SUPPRESS)  # internal: the fresh process
    p.add_argument("--queries-file", type=Path, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.smoke:
        a.sizes, a.dim, a.queries, a.warmup = a.sizes or [1e3, 1e4], a.dim or 32, a.queries or 50, 5
    elif a.quick:
        a.sizes, a.dim, a.queries = a.sizes or [1e4, 1e5, 1e6], a.dim or 64, a.queries or 300
    a.sizes = [int(s) for s in (a.sizes or [1e4, 1e5, 1e6, 1e7])]
    a.dim = a.dim or 512
    a.queries = a.queries or 1000
    return a


# ---------------------------------------------------------------------------------------------
# the fresh searching process


def search_worker(index_dir: Path, queries_file: Path, k: int, warmup: int, setting: str) -> dict:
    """Open the index, search one query at a time; timings and this process's memory as a dict."""
    before_import = proc_status()
    from geoindex.models.threads import configure_query_threads
    from geoindex.retrieval.beam import beam_search
    from geoindex.retrieval.levels.stored import FaissLevel
    from geoindex.retrieval.results import make_results
    from geoindex.storage.store import open_store

    resident, threads = SETTINGS[setting]
    if threads is not None:
        configure_query_threads(threads)

    data = np.load(queries_file)
    xq, leaf_rows = data["xq"].astype(np.float32), data["leaf_rows"]
    before_open = proc_status()
    t = time.perf_counter()
    _, stored = open_store(index_dir, resident=resident)
    open_s = time.perf_counter() - t
    levels = [FaissLevel(s) for s in stored]
    after_open = proc_status()
    for i in range(min(warmup, len(xq))):
        beam_search(xq[i : i + 1], levels, k)
    timed = range(min(warmup, len(xq) - 1), len(xq))
    beam_s, results_s, final_rows, probed = [], [], [], []
    for i in timed:
        t0 = time.perf_counter()
        hits = beam_search(xq[i : i + 1], levels, k)
        t1 = time.perf_counter()
        make_results(hits)
        t2 = time.perf_counter()
        beam_s.append(t1 - t0)
        results_s.append(t2 - t1)
        final_rows.append(int(hits[-1].I[0, 0]))
        probed.append(hits)
    after_search = proc_status()
    # candidates scored per query: all first-level rows, then the children of the kept ids
    cand = []
    for hits in probed[:200]:
        n = stored[0].rows
        for lv, h in zip(stored[1:], hits[:-1]):
            ids = h.I[0][h.I[0] >= 0]
            n += sum(lv.index.invlists.list_size(int(i)) for i in ids)
        cand.append(n)
    total = np.asarray(beam_s) + np.asarray(results_s)
    return {
        "setting": setting, "resident_levels": sum(s.resident for s in stored),
        "queries": len(beam_s),
        "search_ms_p50": pct(total, 50), "search_ms_p95": pct(total, 95),
        "beam_ms_p50": pct(beam_s, 50), "beam_ms_p95": pct(beam_s, 95),
        "results_ms_p50": pct(results_s, 50),
        "open_s": open_s,
        "recall_at_1": float(np.mean(np.asarray(final_rows) == leaf_rows[list(timed)])),
        "candidates_per_query": float(np.mean(cand)),
        "rss_mb": after_search.get("VmRSS"), "rss_anon_mb": after_search.get("RssAnon"),
        "rss_file_mb": after_search.get("RssFile"), "peak_rss_mb": after_search.get("VmHWM"),
        "rss_after_open_mb": after_open.get("VmRSS"), "rss_before_open_mb": before_open.get("VmRSS"),
        "rss_anon_before_open_mb": before_open.get("RssAnon"), "rss_anon_after_open_mb": after_open.get("RssAnon"),
        "rss_before_import_mb": before_import.get("VmRSS"),
    }


def _run_worker(index_dir: Path, queries_file: Path, k: int, warmup: int, setting: str) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.scale", "--search-worker", str(index_dir),
           "--queries-file", str(queries_file), "--k", str(k), "--warmup", str(warmup), "--setting", setting]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=3600)
    if proc.returncode != 0:
        raise RuntimeError(f"search worker failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------


def run(a: argparse.Namespace, argv: Sequence[str] | None) -> Report:
    from geoindex.storage.store import (
        mem_available_bytes,  # here: the search worker measures RSS before importing geoindex
    )

    bench = BenchRun.start(NAME, argv)
    rows, notes = [], []
    a.workdir.mkdir(parents=True, exist_ok=True)
    for size in a.sizes:
        per_level = level_sizes(size, 7, 16)
        total_rows = sum(per_level)
        code = {"fp16": 2, "flat": 4, "sq8": 1}[a.codec]
        est_faiss = total_rows * a.dim * code
        est_disk = est_faiss + total_rows * a.dim * 2
        free_disk = shutil.disk_usage(a.workdir).free
        if est_disk * 1.15 > free_disk:
            notes.append(f"{size:.0e} tiles skipped: needs about {est_disk / 2**30:.1f} GiB on disk, "
                         f"{free_disk / 2**30:.1f} GiB free under {a.workdir}")
            break
        # finish_level holds a level's whole IVF in memory while it builds it
        if est_faiss * 1.3 > mem_available_bytes():
            notes.append(f"{size:.0e} tiles skipped: building holds about {est_faiss / 2**30:.1f} GiB of codes "
                         f"in memory, {mem_available_bytes() / 2**30:.1f} GiB available")
            break
        if rows and rows[-1]["build_s"] * total_rows / rows[-1]["total_rows"] > a.max_build_s:
            predicted = rows[-1]["build_s"] * total_rows / rows[-1]["total_rows"]
            notes.append(f"{size:.0e} tiles skipped: its build would take about {predicted:.0f} s "
                         f"(linear in rows from {rows[-1]['tiles']:.0e} tiles' {rows[-1]['build_s']:.0f} s), over "
                         f"--max-build-s {a.max_build_s:.0f}")
            break
        path = a.workdir / f"n{size}"
        qfile = a.workdir / f"queries-{size}.npz"
        kept = a.workdir / f"built-{size}.json"
        if a.reuse and kept.is_file() and qfile.is_file() and (path / "manifest.json").is_file():
            info = json.loads(kept.read_text())
            print(f"reusing {path} (built in {info['build_s']:.0f} s by an earlier --keep run)", file=sys.stderr)
        else:
            shutil.rmtree(path, ignore_errors=True)
            print(f"building {size:,} tiles ({total_rows:,} rows over 7 levels, d={a.dim}, {a.codec})...",
                  file=sys.stderr)
            built = build_synthetic_index(path, size, dim=a.dim, codec=a.codec, n_queries=a.queries + a.warmup,
                                          seed=a.seed)
            np.savez(qfile, xq=built.queries, leaf_rows=built.query_leaf_rows)
            info = {"rows_per_level": list(built.rows), "index_bytes": built.index_bytes,
                    "faiss_bytes": built.faiss_bytes, "parquet_bytes": built.parquet_bytes, "build_s": built.seconds}
            kept.write_text(json.dumps(info))
            print(f"  built in {built.seconds:.1f} s; searching in a fresh process...", file=sys.stderr)
        for setting in a.settings:
            w = _run_worker(path, qfile, a.k, a.warmup, setting)
            rows.append({"tiles": size, "total_rows": total_rows, "dim": a.dim, "codec": a.codec, "k": a.k,
                         **w, **info})
        if not a.keep:
            shutil.rmtree(path, ignore_errors=True)
            qfile.unlink(missing_ok=True)
            kept.unlink(missing_ok=True)
    table = markdown_table(
        ["tiles (deepest)", "setting", "levels in RAM", "rows, 7 levels",
         "candidates/query", "search p50 ms", "search p95 ms", "beam only p50 ms",
         "recall@1", "index on disk MiB", "FAISS MiB", "RSS MiB before open", "RSS MiB after searches (anon + file)",
         "build s"],
        [[r["tiles"], r["setting"], r["resident_levels"], r["total_rows"],
          r["candidates_per_query"], r["search_ms_p50"], r["search_ms_p95"],
          r["beam_ms_p50"], r["recall_at_1"], r["index_bytes"] / 2**20, r["faiss_bytes"] / 2**20,
          r["rss_before_open_mb"],
          f"{r['rss_mb']:.0f} ({r['rss_anon_mb']:.0f} + {r['rss_file_mb']:.0f})", r["build_s"]] for r in rows],
    )
    targets = []
    final = [r for r in rows if r["setting"] == ("resident" if "resident" in a.settings else a.settings[-1])]
    if final:
        small, big = final[0], final[-1]
        ratio = big["search_ms_p50"] / small["search_ms_p50"]
        targets.append((f"p50 search at {big['tiles']:,} tiles <= 1.5x p50 at {small['tiles']:,}",
                        f"{big['search_ms_p50']:.3f} / {small['search_ms_p50']:.3f} ms = {ratio:.2f}x", ratio <= 1.5))
        targets.append(("search over 7 levels at k=64: p50 < 1 ms",
                        f"{big['search_ms_p50']:.3f} ms at {big['tiles']:,} tiles", big["search_ms_p50"] < 1.0))
        grew = big["rss_mb"] - big["rss_before_open_mb"]
        grew_anon = big["rss_anon_mb"] - big["rss_anon_before_open_mb"]
        targets.append((f"RSS far below the index size ({big['tiles']:,} tiles)",
                        f"opening + {a.queries} searches added {grew:,.0f} MiB RSS ({grew_anon:,.0f} MiB anonymous, "
                        f"the rest mapped index pages) to a {big['rss_before_open_mb']:,.0f} MiB process; index "
                        f"{big['index_bytes'] / 2**20:,.0f} MiB on disk ({big['faiss_bytes'] / 2**20:,.0f} MiB FAISS)",
                        grew_anon * 2**20 < 0.1 * big["index_bytes"]))
        targets.append((f"p50 <= 1 ms and p95 <= 3 ms at {big['tiles']:,} tiles ({big['setting']})",
                        f"{big['search_ms_p50']:.3f} / {big['search_ms_p95']:.3f} ms",
                        big["search_ms_p50"] <= 1.0 and big["search_ms_p95"] <= 3.0))
    notes = [
        f"Synthetic embeddings (d={a.dim}, {a.codec}), compact region of 7 levels (z4..z16, 16 children per parent); "
        f"one query per call, k={a.k}, {a.queries} timed queries after {a.warmup} untimed ones, each a noisy copy of a "
        "random leaf. search = beam_search + make_results (what search_embeddings does); beam only = the FAISS levels.",
        "Each index is searched in a fresh process per setting. `mapped`: open_store(resident=False), every FAISS "
        "file memory-mapped, torch/OpenMP default threads (how this was measured before). `resident`: "
        "open_store(resident='auto') reads the upper levels' FAISS files into RAM (up to 2 GB or a quarter of free "
        "memory) and maps the rest, with one query thread (geoindex.models.threads.configure_query_threads), as "
        "locate and "
        "serve now run. `all-in-ram` (when asked for): open_store(resident=True), every FAISS file read into RAM, "
        "one thread. The page cache is warm from the build. "
        "RSS = VmRSS after the searches: anonymous memory plus the file pages of the "
        "memory-mapped index the queries touched (shared, reclaimable page cache). RSS before open is the "
        "process with numpy, faiss, pyarrow and torch imported (geoindex.retrieval.beam imports torch via encoders).",
        "candidates/query: rows scored per query over all levels. Small indexes have fewer than k rows in their "
        "upper levels, so they score fewer candidates than large ones.",
        *notes,
    ]
    return bench.report("scale: search latency vs index size", f"synthetic d={a.dim}", rows, (table,), notes, targets)


def main(argv: Sequence[str] | None = None) -> int:
    a = parse_args(argv)
    if a.search_worker is not None:
        print(json.dumps(search_worker(a.search_worker, a.queries_file, a.k, a.warmup, a.setting)))
        return 0
    run(a, argv).emit_as_asked(a)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
