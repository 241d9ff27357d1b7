"""Resident memory of ``geoindex serve`` through a burst of large-pixel uploads, before and after issue 14.

Starts the server in a fresh process over a tiny index (random-init ``tiny`` encoder, zoom 1-3),
once with ``geoindex`` at ``--before`` (exported with ``git archive``) and once with this tree,
then sends ``--uploads`` PNGs of ``--side`` x ``--side`` pixels (a few hundred KB each: one
colour) from ``--clients`` threads, and reads the server's VmRSS / VmHWM from /proc. Run:
``.venv/bin/python benchmarks/service_memory.py``. ``--include-map`` asks every request for the map
thumbnail too (which decodes the upload again).
"""

from __future__ import annotations

import argparse
import io
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import REPO, BenchRun, Report, benchmark_parser, markdown_table, run_benchmark
from pipelines.serving import serving_subprocess

NAME = "service_memory"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = benchmark_parser(NAME, __doc__)
    p.add_argument("--before", default="6402bf0", help="git revision before the limits (default: 6402bf0)")
    p.add_argument("--sides", type=int, nargs="+", default=[9400, 4900],
                   help="upload sizes in pixels per side (default: 9400, refused after; 4900, 24 MP, accepted)")
    p.add_argument("--uploads", type=int, default=16)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--workdir", type=Path, default=Path("/tmp/geoindex-bench-service-memory"))
    p.add_argument("--include-map", action="store_true", help="every request asks for the map thumbnail")
    a = p.parse_args(argv)
    if a.smoke:
        a.sides, a.uploads, a.clients = [600], 2, 2
    return a


def _rss(pid: int) -> dict[str, float]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(rest.split()[0]) / 1024.0
    return out


def _measure(tree: Path, index: Path, png: bytes, a: argparse.Namespace) -> dict[str, object]:
    import httpx

    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(tree), "OMP_NUM_THREADS": "1"}
    with serving_subprocess(index, cwd=tree, env=env, options=("--device", "cpu", "-k", "4", "-q"),
                            timeout=120) as (base, proc):
        httpx.post(f"{base}/locate", files={"image": ("warm.png", _png(64))}, timeout=60)
        baseline = _rss(proc.pid)
        started = time.perf_counter()
        with ThreadPoolExecutor(a.clients) as pool:
            form = {"include_map": "true"} if a.include_map else {}
            codes = list(pool.map(lambda i: httpx.post(f"{base}/locate", files={"image": (f"{i}.png", png)},
                                                       data=form, timeout=600).status_code, range(a.uploads)))
        seconds = time.perf_counter() - started
        time.sleep(2.0)
        after = _rss(proc.pid)
    return {"baseline_mb": baseline["VmRSS"], "peak_mb": after["VmHWM"], "after_mb": after["VmRSS"],
            "statuses": sorted(set(codes)), "answered": codes.count(200), "seconds": seconds}


def _png(side: int) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (side, side), (40, 90, 160)).save(buf, "PNG")
    return buf.getvalue()


def run(a: argparse.Namespace, argv: Sequence[str] | None) -> Report:
    from PIL import Image

    from geoindex.geometry.coverage import Coverage
    from geoindex.geometry.tiles import LevelSchedule
    from geoindex.models.encoders import create_encoder
    from geoindex.sources import MemorySource
    from geoindex.storage.build import build_level

    def render_tile(t):  # any distinct image per tile: the index only has to exist
        return Image.new("RGB", (64, 64), ((t.x * 37) % 256, (t.y * 59) % 256, (t.z * 83) % 256))

    bench = BenchRun.start(NAME, argv)
    a.workdir.mkdir(parents=True, exist_ok=True)
    rows = []
    with tempfile.TemporaryDirectory(dir=a.workdir) as tmp:
        index = Path(tmp) / "index"
        encoder = create_encoder("tiny")
        for zoom in (1, 2, 3):
            build_level(index, zoom, source=MemorySource(render_tile, name="rendered"), encoder=encoder,
                        coverage=Coverage.world(), schedule=LevelSchedule(1, 3, 1), shard_size=64)
        before = Path(tmp) / "before"
        before.mkdir()
        archive = subprocess.run(["git", "archive", a.before, "geoindex"], cwd=REPO, capture_output=True, check=True)
        subprocess.run(["tar", "-x", "-C", str(before)], input=archive.stdout, check=True)
        for side in a.sides:
            png = _png(side)
            for label, tree in (("before", before), ("after", REPO)):
                print(f"{label}: {a.uploads} uploads of {side}x{side} ({len(png) // 1024} KB)...", file=sys.stderr)
                rows.append({"tree": label, "side": side, "png_kb": len(png) / 1024, **_measure(tree, index, png, a)})
    table = markdown_table(
        ["geoindex", "upload", "PNG KB", "HTTP statuses", "answered (200)", "RSS before MiB", "peak RSS MiB",
         "RSS 2 s after MiB", "burst s"],
        [[r["tree"], f"{r['side']}x{r['side']}", r["png_kb"], " ".join(map(str, r["statuses"])), r["answered"],
          r["baseline_mb"], r["peak_mb"], r["after_mb"], r["seconds"]] for r in rows],
    )
    slots = min(4, os.cpu_count() or 1)
    notes = (f"`geoindex serve` (tiny encoder, zoom 1-3 index, OMP_NUM_THREADS=1) in a fresh process per row; "
             f"{a.uploads} uploads from {a.clients} client threads"
             f"{', each with include_map' if a.include_map else ''}; RSS from /proc/PID/status. before = {a.before}; "
             f"after = this tree with its defaults (--max-megapixels 25, --max-concurrent {slots}).",)
    return bench.report("service_memory: server RSS through a burst of large-pixel uploads", "tiny", rows, (table,),
                        notes)


def main(argv: Sequence[str] | None = None) -> int:
    return run_benchmark(parse_args, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
