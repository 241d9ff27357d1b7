"""Tile loading alone: tiles/s read, decoded or rendered, and resized to the network's uint8 crop, no encoder.

What a build's loaders do per tile (``tile_encoding.read_tile_batches`` with EfficientNet-Lite0's
loader step: PIL bicubic resize of the 256-px tile to 224, centre crop, uint8), timed for:
reading in the calling process (``in-process``), 2 loader threads (the loaders before issue 25),
and 1 and 2 worker processes (``TileProcessPool``). Two sources: tiles rendered from the embedded
Blue Marble raster (world zoom 6 by default, 4,096 tiles), and the same tiles as JPEG files in a
``{z}/{x}/{y}.jpg`` folder (written beforehand, untimed). Rounds alternate the modes; each
figure is the median over rounds. The pool's start-up (fork) is inside the timing: a build pays it
once per level.

Writes benchmarks/results/loaders.json. Run: ``.venv/bin/python benchmarks/loaders.py``.
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import mercantile

from benchmarks._common import BenchRun, Report, benchmark_parser, markdown_table, run_benchmark

NAME = "loaders"
MODES = ("in-process", "2 threads", "1 process", "2 processes")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = benchmark_parser(NAME, __doc__, raw=True)
    p.add_argument("--zoom", type=int, help="the world at this zoom (default 6: 4,096 tiles; 4 with --quick)")
    p.add_argument("--rounds", type=int, help="rounds, each timing every mode once (default 3; 2 --quick)")
    p.add_argument("--batch-size", type=int, default=64)
    a = p.parse_args(argv)
    a.zoom = a.zoom if a.zoom is not None else (2 if a.smoke else 4 if a.quick else 6)
    a.rounds = a.rounds or (1 if a.smoke else 2 if a.quick else 3)
    return a


@contextlib.contextmanager
def _pool(mode: str, source: Any, step: Callable[[Any], Any]) -> Iterator[Any]:
    from geoindex.tile_encoding import TileProcessPool

    if mode == "in-process":
        yield None
    elif mode == "2 threads":
        with ThreadPoolExecutor(2) as threads:
            yield threads
    else:
        with TileProcessPool(source, step, int(mode.split()[0])) as processes:
            yield processes


def time_mode(mode: str, source: Any, tiles: list[mercantile.Tile], step: Callable[[Any], Any],
              batch_size: int) -> float:
    """Seconds to read every tile (pool start-up included); checks that every tile came back as pixels."""
    from geoindex.tile_encoding import read_tile_batches

    t = time.perf_counter()
    with _pool(mode, source, step) as pool:
        got = 0
        for _, loads in read_tile_batches(source, tiles, step, batch_size=batch_size, pool=pool):
            got += sum(load.pixels is not None for load in loads)
    elapsed = time.perf_counter() - t
    if got != len(tiles):
        raise RuntimeError(f"{mode}: {got} of {len(tiles)} tiles loaded")
    return elapsed


def write_jpeg_folder(source: Any, tiles: list[mercantile.Tile], root: Path) -> None:
    for tile in tiles:
        path = root / str(tile.z) / str(tile.x) / f"{tile.y}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        source.get(tile).save(path, quality=90)


def run(a: argparse.Namespace, argv: Sequence[str] | None) -> Report:
    from geoindex.families import _IMAGENET_MEAN, _IMAGENET_STD
    from geoindex.pixels import ResizeCropNormalize
    from geoindex.sources import DirectorySource, RasterSource

    bench = BenchRun.start(NAME, argv)
    step = ResizeCropNormalize(224, _IMAGENET_MEAN, _IMAGENET_STD).crop  # EfficientNet-Lite0's loader step
    side = 1 << a.zoom
    tiles = [mercantile.Tile(x, y, a.zoom) for y in range(side) for x in range(side)]
    raster = RasterSource()
    work = Path(tempfile.mkdtemp(prefix="geoindex-bench-loaders-"))
    try:
        write_jpeg_folder(raster, tiles, work)
        sources = {"raster (bluemarble)": raster, "JPEG folder": DirectorySource(work)}
        seconds: dict[str, dict[str, list[float]]] = {s: {m: [] for m in MODES} for s in sources}
        for _ in range(a.rounds):
            for name, source in sources.items():
                for mode in MODES:
                    seconds[name][mode].append(time_mode(mode, source, tiles, step, a.batch_size))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    results: dict[str, Any] = {"tiles": len(tiles), "zoom": a.zoom, "rounds": a.rounds, "sources": {}}
    rows, targets = [], []
    for name in sources:
        rate = {m: len(tiles) / statistics.median(seconds[name][m]) for m in MODES}
        results["sources"][name] = {m: {"tiles_per_s": rate[m], "seconds": seconds[name][m]} for m in MODES}
        scaling = rate["2 processes"] / rate["1 process"]
        results["sources"][name]["two_processes_over_one"] = scaling
        rows += [[name, m, rate[m], f"{rate[m] / rate['in-process']:.2f}x"] for m in MODES]
        targets.append((f"{name}: 2 processes >= 1.8x 1 process", f"{scaling:.2f}x", scaling >= 1.8))
    table = markdown_table(["source", "loaders", "tiles/s", "vs in-process"], rows)
    notes = [
        f"{len(tiles)} tiles (the world at zoom {a.zoom}), batches of {a.batch_size}; median of {a.rounds} "
        "rounds, the modes interleaved. Loader step: PIL bicubic 256 -> 224 and crop to uint8 (EfficientNet-Lite0's).",
        "Each figure includes starting the pool (fork of the worker processes), once per pass.",
        "On a 2-core machine shared with other work the scaling from 1 to 2 processes is bounded by what the "
        "other processes take: compare the load averages recorded above.",
    ]
    return bench.report("tile loading without an encoder: in-process, threads, processes", "none (loader only)",
                        results, (table,), notes, targets)


def main(argv: Sequence[str] | None = None) -> int:
    return run_benchmark(parse_args, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
