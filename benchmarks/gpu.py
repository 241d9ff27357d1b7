"""GPU data path: builds, one photo and batched photos on CUDA, each beside the bare network's ceiling.

In one run, on one CUDA device (skipped, with the reason, where there is none):

* builds: ``pipelines.build_index`` of the world z2..z8 (step 2; 69,904 tiles) from the embedded
  Blue Marble raster, and from the same tiles as a ``{z}/{x}/{y}.jpg`` folder (written beforehand,
  untimed), at ``--batch-size`` with the encoder's auto precision; tiles/s beside the bare
  network's tiles/s at that batch (uint8 input already on the device, preprocessing on the device
  included, no loading).
* one photo: ``index.search(photo, k=64)`` on the index opened with ``device="cuda"`` (CUDA-graph
  replay of the batch-1 forward pass, torch search), p50 / p95 ms; beside the batch-1 forward pass alone.
* batched: ``index.search(photos, k=64)`` photos/s for ``--photos`` views; beside the network at that batch.

Writes benchmarks/results/gpu.json. On the GPU machine (see ../shared/tools/gpu/prepare.sh):
``bash .gpu/run.sh python3 -m benchmarks.gpu --results-dir $OUT --results-md $OUT/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import mercantile
import numpy as np
import torch

from benchmarks._common import BenchRun, Report, benchmark_parser, markdown_table, pct, resolve_encoder

NAME = "gpu"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = benchmark_parser(NAME, __doc__, raw=True, default_encoder="efficientnet-lite0")
    p.add_argument("--max-zoom", type=int, help="deepest level built, from zoom 2 in steps of 2 (default 8; 4 --quick)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--photos", type=int, help="views searched in one batched call (default 300)")
    p.add_argument("--reps", type=int, help="one-photo searches timed (default 200)")
    p.add_argument("--device", default="cuda", help="cuda (default); cpu only runs the code path, for testing it")
    a = p.parse_args(argv)
    small = a.quick or a.smoke
    a.max_zoom = a.max_zoom or (4 if small else 8)
    a.photos = a.photos or (16 if small else 300)
    a.reps = a.reps or (10 if small else 200)
    return a


def skip_reason(device: str) -> str | None:
    """Why this machine cannot run the benchmark on ``device``, or None."""
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        return f"no CUDA device (torch {torch.__version__}, cuda build {torch.version.cuda})"
    return None


def _write_tiles(job: tuple[str, list[tuple[int, int, int]]]) -> int:
    from geoindex.sources import RasterSource

    root, tiles = job
    source = RasterSource()
    for x, y, z in tiles:
        path = Path(root) / str(z) / str(x) / f"{y}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        source.get(mercantile.Tile(x, y, z)).save(path, quality=90)
    return len(tiles)


def write_jpeg_folder(root: Path, zooms: Sequence[int]) -> int:
    """The world at ``zooms`` as JPEG tiles rendered from the embedded raster, on every core."""
    tiles = [(x, y, z) for z in zooms for x in range(1 << z) for y in range(1 << z)]
    chunks = [(str(root), tiles[i : i + 512]) for i in range(0, len(tiles), 512)]
    with ProcessPoolExecutor() as pool:
        return sum(pool.map(_write_tiles, chunks))


def network_ceiling(encoder: Any, batch: int, reps: int) -> float:
    """Images/s of the encoder alone: uint8 (batch, S, S, 3) already on the device -> embeddings on the device."""
    from geoindex.pixels import normalize_pixels

    size = encoder.preprocess.size
    pixels = torch.randint(0, 256, (batch, size, size, 3), dtype=torch.uint8, device=encoder.device)
    network = encoder._inference_network()
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(encoder.precision)
    kind = encoder.device.type

    def sync() -> None:
        if kind == "cuda":
            torch.cuda.synchronize()

    def once() -> None:
        x = normalize_pixels(pixels, encoder.preprocess.mean, encoder.preprocess.std)
        with torch.inference_mode(), torch.autocast(kind, dtype=dtype or torch.float32, enabled=dtype is not None,
                                                    cache_enabled=False):
            network(encoder.to_device(x))

    for _ in range(3):
        once()
    sync()
    t = time.perf_counter()
    for _ in range(reps):
        once()
    sync()
    return batch * reps / (time.perf_counter() - t)


def build(index: Path, source: str, enc_name: str, a: argparse.Namespace) -> tuple[float, int]:
    """Seconds and tiles of ``build_index`` over the world z2..max_zoom on the device."""
    from pipelines import build_index

    cfg = build_index.parse_args(["--all", "--schedule", "2", str(a.max_zoom), "2", "--index", str(index),
                                  "--source", source, "--encoder", enc_name, "--device", a.device,
                                  "--batch-size", str(a.batch_size), "--shard-size", "16384", "--quiet"])
    t = time.perf_counter()
    summaries = build_index.run(cfg)
    return time.perf_counter() - t, sum(s.rows for s in summaries)


def run(a: argparse.Namespace, argv: Sequence[str] | None) -> Report | None:
    import geoindex
    from geoindex.encoders import create_encoder
    from geoindex.sources import RasterSource

    reason = skip_reason(a.device)
    if reason is not None:
        print(f"benchmarks/gpu.py skipped: {reason}. Run it on a CUDA machine (../shared/tools/gpu/).")
        return None
    bench = BenchRun.start(NAME, argv)
    enc_name = resolve_encoder(a, "efficientnet-lite0")
    encoder = create_encoder(enc_name, device=a.device)
    zooms = list(range(2, a.max_zoom + 1, 2))
    work = Path(tempfile.mkdtemp(prefix="geoindex-bench-gpu-"))
    device = torch.cuda.get_device_name(0) if a.device.startswith("cuda") else a.device
    res: dict[str, Any] = {"device": device, "encoder": enc_name,
                           "precision": encoder.precision, "preprocessing": encoder.preprocessing,
                           "batch_size": a.batch_size, "zooms": zooms}
    try:
        res["network_tiles_per_s"] = network_ceiling(encoder, a.batch_size, 20)
        t = time.perf_counter()
        res["jpeg_tiles_written"] = write_jpeg_folder(work / "jpeg", zooms)
        res["jpeg_write_s"] = time.perf_counter() - t
        for label, source in (("raster", "bluemarble"), ("jpeg", f"dir:{work / 'jpeg'}")):
            seconds, built = build(work / f"index-{label}", source, enc_name, a)
            res[f"build_{label}"] = {"seconds": seconds, "tiles": built, "tiles_per_s": built / seconds}
        index = geoindex.open_index(work / "index-raster", device=a.device)
        res["search_backend"] = index.search_backend
        raster = RasterSource()
        rng = np.random.default_rng(a.seed)
        views = [np.asarray(raster.render_view(float(rng.uniform(-60, 60)), float(rng.uniform(-180, 180)),
                                               zoom=float(rng.uniform(5.5, 6.5)), size=480))
                 for _ in range(a.photos)]
        for _ in range(5):
            index.search(views[0], k=64)
        one = []
        for i in range(a.reps):
            t = time.perf_counter()
            index.search(views[i % len(views)], k=64)
            one.append(time.perf_counter() - t)
        res["one_photo_ms"] = {"p50": pct(one, 50), "p95": pct(one, 95)}
        res["network_batch1_per_s"] = network_ceiling(encoder, 1, 100)
        index.search(views[: min(16, len(views))], k=64)
        t = time.perf_counter()
        index.search(views, k=64)
        res["batched_photos_per_s"] = len(views) / (time.perf_counter() - t)
        res["network_batched_per_s"] = network_ceiling(encoder, len(views), 5)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    net = res["network_tiles_per_s"]
    rows = [
        ["build, embedded raster", f"{res['build_raster']['tiles_per_s']:.0f} tiles/s", f"{net:.0f} tiles/s",
         res["build_raster"]["tiles_per_s"] / net],
        ["build, JPEG folder", f"{res['build_jpeg']['tiles_per_s']:.0f} tiles/s", f"{net:.0f} tiles/s",
         res["build_jpeg"]["tiles_per_s"] / net],
        ["one photo, k=64", f"p50 {res['one_photo_ms']['p50']:.2f} / p95 {res['one_photo_ms']['p95']:.2f} ms",
         f"{1e3 / res['network_batch1_per_s']:.2f} ms (batch-1 forward)", None],
        [f"{len(views)} photos, k=64", f"{res['batched_photos_per_s']:.0f} photos/s",
         f"{res['network_batched_per_s']:.0f} images/s", res["batched_photos_per_s"] / res["network_batched_per_s"]],
    ]
    table = markdown_table(["what", "measured", "bare network (ceiling)", "fraction"], rows)
    targets = [
        ("build from the embedded raster >= 10,000 tiles/s", f"{res['build_raster']['tiles_per_s']:.0f}",
         res["build_raster"]["tiles_per_s"] >= 10_000),
        ("build from a JPEG folder >= 5,000 tiles/s", f"{res['build_jpeg']['tiles_per_s']:.0f}",
         res["build_jpeg"]["tiles_per_s"] >= 5_000),
        ("one photo p50 <= 3 ms", f"{res['one_photo_ms']['p50']:.2f} ms", res["one_photo_ms"]["p50"] <= 3.0),
        ("batched >= 5,000 photos/s at k=64", f"{res['batched_photos_per_s']:.0f}",
         res["batched_photos_per_s"] >= 5_000),
    ]
    notes = [
        f"{res['device']}; encoder {enc_name} at {encoder.precision}, preprocessing {encoder.preprocessing}; "
        f"world z{zooms[0]}..z{zooms[-1]} step 2, --batch-size {a.batch_size}, build_index's default --workers.",
        f"Photos: {len(views)} views (480 px, zoom 5.5-6.5) of random places rendered from the embedded raster; "
        f"search backend {res['search_backend']}. Ceilings: the network alone on uint8 already on the device.",
    ]
    return bench.report("GPU data path: builds, one photo, batched photos", enc_name, res, (table,), notes, targets)


def main(argv: Sequence[str] | None = None) -> int:
    a = parse_args(argv)
    report = run(a, argv)
    if report is not None:
        report.emit_as_asked(a)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
