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
* JPEG decoding on the host (PIL) against the device (``preprocessing="torch-nvjpeg"``, nvjpeg):
  per tile, per photo, pixel differences, and the JPEG folder's tiles encoded both ways
  (:func:`decode_figures`).

Writes benchmarks/results/gpu.json. On the GPU machine (see ../shared/tools/gpu/prepare.sh):
``bash .gpu/run.sh python3 -m benchmarks.gpu --results-dir $OUT --results-md $OUT/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import io
import os
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
    from geoindex.models.pixels import normalize_pixels

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


def _synced(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _p50_ms(fn: Any, reps: int, device: str) -> float:
    fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        _synced(device)
        times.append(time.perf_counter() - t)
    return pct(times, 50) * 1e3


def decode_figures(root: Path, zoom: int, enc_name: str, device: str, batch: int, *, max_tiles: int, reps: int,
                   seed: int) -> dict[str, Any]:
    """JPEG decoding on the host (PIL, one core) against the device (``torch-nvjpeg``: nvjpeg on CUDA).

    Per tile (a batch of the folder's tiles, decoded together on the device) and per photo (640 x 480
    and 4000 x 3000 JPEGs, to ``load_image``'s 1,024-px bound), p50 ms; pixel differences between the
    two decoders; and the folder's zoom-``zoom`` tiles encoded both ways through the build's loaders
    (``encode_tile_batches`` with ``loader_pool``: worker processes, pool start included), tiles/s and
    the smallest cosine between the two ways' embeddings.
    """
    from PIL import Image

    from geoindex.imagery import MAX_IMAGE_PIXELS, decode_tile, load_image
    from geoindex.models import device_jpeg
    from geoindex.models.encoders import create_encoder
    from geoindex.models.tile_encoding import encode_tile_batches, loader_pool
    from geoindex.sources import DirectorySource, RasterSource

    source = DirectorySource(root)
    xs, ys = source.tiles(zoom=zoom)
    tiles = [mercantile.Tile(int(x), int(y), zoom) for x, y in zip(xs, ys)][:max_tiles]
    datas = [source.path(t).read_bytes() for t in tiles[:batch]]  # type: ignore[union-attr]
    out: dict[str, Any] = {"on_device": device_jpeg.can_decode_on(device), "zoom": zoom, "tiles": len(tiles)}
    host = [np.asarray(decode_tile(d)) for d in datas]
    dev = device_jpeg.decode_jpegs(datas, device, max_side=4096, max_pixels=MAX_IMAGE_PIXELS)
    diff = np.concatenate([np.abs(h.astype(np.int16) - d.cpu().numpy().astype(np.int16)).ravel()
                           for h, d in zip(host, dev) if d is not None])
    out["tile_pixels"] = {"decoded_on_device": sum(d is not None for d in dev), "of": len(dev),
                          "mean_abs_diff": float(diff.mean()), "max_abs_diff": int(diff.max()),
                          "fraction_differing": float((diff > 0).mean())}
    out["tile_ms"] = {
        "host": _p50_ms(lambda: [np.asarray(decode_tile(d)) for d in datas], reps, device) / len(datas),
        "device": _p50_ms(lambda: device_jpeg.decode_jpegs(datas, device, max_side=4096,
                                                           max_pixels=MAX_IMAGE_PIXELS), reps, device) / len(datas)}
    rng = np.random.default_rng(seed)
    view = RasterSource().render_view(float(rng.uniform(-50, 50)), float(rng.uniform(-180, 180)), zoom=6.0, size=480)
    out["photo_ms"] = {}
    for w, h in ((640, 480), (4000, 3000)):
        buf = io.BytesIO()
        view.resize((w, h), Image.Resampling.BICUBIC).save(buf, "JPEG", quality=90)
        photo = buf.getvalue()
        out["photo_ms"][f"{w}x{h}"] = {
            "host": _p50_ms(lambda: np.asarray(load_image(photo)), reps, device),  # noqa: B023
            "device": _p50_ms(lambda: device_jpeg.decode_photos([photo], device), reps, device)}  # noqa: B023
    base = create_encoder(enc_name, device=device, preprocessing="torch")
    embeddings = {}
    for prep in ("torch", "torch-nvjpeg"):
        encoder = base.with_precision(base.precision, preprocessing=prep)
        embs = []
        t = time.perf_counter()
        with loader_pool(source, encoder, os.cpu_count() or 2) as pool:
            for b in encode_tile_batches(source, tiles, encoder, batch_size=batch, pool=pool):
                embs.append(b.emb)
        _synced(device)
        seconds = time.perf_counter() - t
        embeddings[prep] = np.concatenate(embs)
        out[f"encode_{prep}"] = {"seconds": seconds, "tiles_per_s": len(tiles) / seconds}
    out["embedding_cosine_min"] = float(np.min(np.sum(embeddings["torch"] * embeddings["torch-nvjpeg"], axis=1)))
    return out


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
    from geoindex.models.encoders import create_encoder
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
        res["jpeg_decode"] = decode_figures(work / "jpeg", zooms[-1], enc_name, a.device, a.batch_size,
                                            max_tiles=16_384, reps=a.reps // 10 + 3, seed=a.seed)
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
    dec = res["jpeg_decode"]
    decode_rows = [
        ["JPEG tile (256 px), in a batch of " + str(a.batch_size), dec["tile_ms"]["host"], dec["tile_ms"]["device"]],
        *[[f"JPEG photo {size}", ms["host"], ms["device"]] for size, ms in dec["photo_ms"].items()],
        [f"encode z{dec['zoom']} JPEG folder ({dec['tiles']} tiles), tiles/s", dec["encode_torch"]["tiles_per_s"],
         dec["encode_torch-nvjpeg"]["tiles_per_s"]],
    ]
    decode_table = markdown_table(["JPEG decoding", "host (PIL), ms or tiles/s", "device (torch-nvjpeg)"],
                                  decode_rows)
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
        f"JPEG decoding (geoindex/models/device_jpeg.py; nvjpeg on the device: {dec['on_device']}): p50 per tile of a "
        "batch decoded together, per photo to load_image's 1,024-px bound, host = PIL on one core. Tile pixels, "
        f"device against PIL: mean |diff| {dec['tile_pixels']['mean_abs_diff']:.3f} grey levels, max "
        f"{dec['tile_pixels']['max_abs_diff']}, {pct_text(dec['tile_pixels']['fraction_differing'])} of values "
        f"differ; embeddings of the two ways: smallest cosine {dec['embedding_cosine_min']:.5f}. The encode rows "
        "run encode_tile_batches through build's loaders (worker processes, pool start included) with "
        "preprocessing torch (PIL decodes in the workers) and torch-nvjpeg (workers only read bytes).",
    ]
    return bench.report("GPU data path: builds, one photo, batched photos", enc_name, res, (table, decode_table),
                        notes, targets)


def pct_text(fraction: float) -> str:
    return f"{100 * fraction:.2f} %"


def main(argv: Sequence[str] | None = None) -> int:
    a = parse_args(argv)
    report = run(a, argv)
    if report is not None:
        report.emit_as_asked(a)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
