"""Planet sizing: tiles per level z4..z16 (worldwide and land-only), bytes per codec, encode core-hours.

* Tiles: 4**z worldwide. Land-only: counted on a land mask at zoom-14 resolution made from NASA
  Blue Marble (``../shared/data/bluemarble/6``: 4,096 tiles of 256 px = one pixel per zoom-14
  tile). A pixel is water when it is blue (``b - r > 12`` and ``b >= g``: ocean, bathymetry, lakes);
  everything else (including ice sheets) is land. A tile at zoom z <= 14 is a land tile when any
  of its pixels is land; zoom 16 is 16 x the zoom-14 land tiles. Coastal tiles therefore count as land.
* Bytes per tile per codec, every file of a level counted: the codec's code bytes + the 8-byte id
  of an IVF entry (``index.faiss``), its re-rank code (pq's ``rerank.npy``) and the parquet
  shards' tile columns (a finished level keeps its vectors once, in ``index.faiss``), as measured
  per tile by benchmarks/codecs.py (``benchmarks/results/codecs.json``; per-level codebooks fade).
* Encode cost: tiles/s of the encoders measured here (batch 64, torch threads as configured, the
  build path's ``encode_tensor``), turned into core-seconds per tile.

Run: ``.venv/bin/python benchmarks/planet.py``.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
from PIL import Image

from benchmarks._common import REPO, BenchRun, Report, benchmark_parser, markdown_table, run_benchmark

NAME = "planet"
BLUEMARBLE = REPO.parent / "shared" / "data" / "bluemarble" / "6"
ZOOMS = tuple(range(4, 17, 2))
DIMS = {"vit-b-32-random": 512, "efficientnet-lite0": 1280}
PARQUET_TILE_BYTES = 40  # z, x, y, quadkey, parent_row per row before compression, where codecs.json lacks a measure
CODECS_JSON = REPO / "benchmarks" / "results" / "codecs.json"
CLUSTER_CORES = 64 * 50  # the Ray cluster the table prices: 50 nodes of 64 cores


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = benchmark_parser(NAME, __doc__, raw=True)
    p.add_argument("--encode-tiles", type=int, help="tiles encoded per encoder to time (default 192)")
    a = p.parse_args(argv)
    a.encode_tiles = a.encode_tiles or (8 if a.smoke else 192)
    return a


def parquet_tile_bytes() -> tuple[float, str]:
    """Bytes per tile of a finished level's parquet shards (tile columns only) and where the figure comes from."""
    import json

    try:
        results = json.loads(CODECS_JSON.read_text())["results"]
        return float(results["fp16"]["synthetic_index"]["deepest_level_parquet_bytes_per_tile"]), str(CODECS_JSON)
    except (OSError, ValueError, KeyError, TypeError):
        return float(PARQUET_TILE_BYTES), "uncompressed size (no codecs.json measure)"


def tile_bytes(dim: int, parquet: float) -> dict[str, float]:
    """Bytes per tile on disk of a level of every registered codec: FAISS entry + re-rank code + parquet tiles."""
    from geoindex.storage.codecs import REGISTRY

    return {name: c.code_bytes(dim) + 8 + c.rerank_bytes(dim) + parquet for name, c in REGISTRY.items()}


def land_mask(root: Path, *, side: int) -> np.ndarray:
    """(side * 256, side * 256) bool, True = land, from the zoom-log2(side) Blue Marble tiles (y from the north)."""
    mask = np.zeros((side * 256, side * 256), dtype=bool)
    for x in range(side):
        for y in range(side):
            a = np.asarray(Image.open(root / str(x) / f"{y}.jpeg").convert("RGB")).astype(np.int16)
            water = (a[..., 2] - a[..., 0] > 12) & (a[..., 2] >= a[..., 1])
            mask[y * 256 : (y + 1) * 256, x * 256 : (x + 1) * 256] = ~water
    return mask


def land_tiles(mask: np.ndarray, zoom: int, mask_zoom: int) -> int:
    """Tiles of ``zoom`` holding any land pixel of a mask with one pixel per ``mask_zoom`` tile."""
    if zoom > mask_zoom:
        return int(mask.sum()) * 4 ** (zoom - mask_zoom)
    f = 1 << (mask_zoom - zoom)
    n = mask.shape[0] // f
    return int(mask.reshape(n, f, n, f).any(axis=(1, 3)).sum())


def encode_rate(name: str, n: int) -> float:
    """Tiles per second of ``name`` on this process's torch threads (batch 64, after one warm-up batch)."""
    import torch

    from geoindex.models.encoders import create_encoder
    from geoindex.sources import RasterSource

    enc = create_encoder(name)
    src = RasterSource()
    import mercantile

    tiles = [mercantile.Tile(x, y, 6) for x in range(20, 36) for y in range(20, 36)][: max(n, 8)]
    batch = torch.stack([enc.preprocess(src.get(t)) for t in tiles])
    enc.encode_tensor(batch[:8])
    t = time.perf_counter()
    for s in range(0, len(batch), 64):
        enc.encode_tensor(batch[s : s + 64])
    return len(batch) / (time.perf_counter() - t)


def run(a: argparse.Namespace, argv: Sequence[str] | None) -> Report:
    import torch

    from geoindex.storage.codecs import get_codec

    bench = BenchRun.start(NAME, argv)
    machine = bench.machine
    threads = torch.get_num_threads()
    have_bm = BLUEMARBLE.is_dir() and not a.smoke
    if have_bm:
        t = time.perf_counter()
        mask = land_mask(BLUEMARBLE, side=64)
        print(f"land mask from {BLUEMARBLE} in {time.perf_counter() - t:.0f} s", file=sys.stderr)
        mask_zoom = 14
    else:  # smoke or no shared data: the zoom-4 tiles of the embedded raster (coarse, only for plumbing)
        import mercantile

        from geoindex.sources import RasterSource

        src = RasterSource()
        mask = np.zeros((16 * 256, 16 * 256), dtype=bool)
        for x in range(16):
            for y in range(16):
                px = np.asarray(src.get(mercantile.Tile(x, y, 4)).convert("RGB").resize((256, 256))).astype(np.int16)
                mask[y * 256 : (y + 1) * 256, x * 256 : (x + 1) * 256] = ~(
                    (px[..., 2] - px[..., 0] > 12) & (px[..., 2] >= px[..., 1]))
        mask_zoom = 12
    land_pixel_fraction = float(mask.mean())

    encoders = ("tiny",) if a.smoke else ("vit-b-32-random", "efficientnet-lite0")
    rates = {name: encode_rate(name, a.encode_tiles) for name in encoders}
    core_s = {name: threads / r for name, r in rates.items()}

    parquet, parquet_source = parquet_tile_bytes()
    per_dim = {d: tile_bytes(d, parquet) for d in DIMS.values()}
    levels = []
    for z in ZOOMS:
        world = 4**z
        land = land_tiles(mask, z, mask_zoom)
        row: dict = {"zoom": z, "tiles_world": world, "tiles_land": land, "land_fraction": land / world}
        for d, per in per_dim.items():
            row[f"bytes_d{d}"] = {c: {"per_tile": b, "world": b * world, "land": b * land} for c, b in per.items()}
        for enc, cs in core_s.items():
            row[f"core_hours_{enc}"] = {"world": world * cs / 3600, "land": land * cs / 3600}
        levels.append(row)
    results = {"levels": levels, "land_pixel_fraction_z14": land_pixel_fraction, "mask_zoom": mask_zoom,
               "mask_source": str(BLUEMARBLE) if have_bm else "embedded raster, zoom 4 (smoke)",
               "encode_tiles_per_s": rates, "torch_threads": threads, "core_s_per_tile": core_s,
               "cluster_cores": CLUSTER_CORES, "parquet_bytes_per_tile": parquet, "parquet_source": parquet_source,
               "bytes_per_tile": {f"d{d}": per for d, per in per_dim.items()}}

    def gib(b: float) -> str:
        for unit, div in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20)):
            if b >= div:
                return f"{b / div:,.1f} {unit}"
        return f"{b / 1024:,.0f} KiB"

    size_table = markdown_table(
        ["zoom", "tiles world", "tiles land", "flat (fp32)", "fp16", "sq8", "pq", "pq_small"],
        [[f"z{r['zoom']}", f"{r['tiles_world']:,}", f"{r['tiles_land']:,} ({r['land_fraction']:.0%})"]
         + [f"{gib(r['bytes_d512'][c]['world'])} / {gib(r['bytes_d512'][c]['land'])}"
            for c in ("flat", "fp16", "sq8", "pq", "pq_small")] for r in levels],
    )
    compute_rows = []
    for r in levels:
        row = [f"z{r['zoom']}"]
        for enc in core_s:
            ch = r[f"core_hours_{enc}"]
            row.append(f"{ch['world']:,.0f} / {ch['land']:,.0f}")
        vit = r[f"core_hours_{encoders[0]}"]
        row.append(f"{vit['land'] / 64 / 24:,.1f} d")
        row.append(f"{vit['land'] / CLUSTER_CORES:,.1f} h")
        compute_rows.append(row)
    compute_table = markdown_table(
        ["zoom"] + [f"encode core-h world / land ({e}, {rates[e]:.1f} tiles/s on {threads} threads)" for e in core_s]
        + [f"one 64-core machine, land ({encoders[0]})", f"Ray, {CLUSTER_CORES} cores, land ({encoders[0]})"],
        compute_rows,
    )
    notes = (
        f"Land mask: {results['mask_source']}, one pixel per zoom-{mask_zoom} tile; water = blue pixels "
        f"(b - r > 12 and b >= g). Land pixels: {land_pixel_fraction:.1%} of the Web-Mercator square (Mercator "
        "inflates high latitudes: Antarctica and Greenland count at their stretched size). A tile is land when any "
        "of its pixels is; zoom 16 = 16 x zoom-14 land tiles. Sea ice, if bright, counts as land.",
        "Bytes on disk (cells: worldwide / land-only), every file of a level: for d=512 (CLIP ViT-B/32) per tile "
        + ", ".join(f"{c} {b:,.0f}" for c, b in per_dim[512].items())
        + "; d=1280 (EfficientNet-Lite0, in planet.json) "
        + ", ".join(f"{c} {b:,.0f}" for c, b in per_dim[1280].items())
        + f". Each is the FAISS entry (code + 8-byte id), pq's re-rank code ({get_codec('pq').rerank_bytes(512)} / "
        f"{get_codec('pq').rerank_bytes(1280)} bytes) and {parquet:.1f} bytes of parquet tile columns "
        f"({parquet_source}); per-level codebooks are left out.",
        f"Encode rates measured now on this machine ({machine['cpu']}, {threads} torch threads, shared with other "
        f"jobs: load {machine['load_avg_1m']:.1f}); core-hours = tiles x threads / rate / 3600. vit-b-32-random has "
        "the cost of CLIP ViT-B/32. GPU throughput was not measured here.",
    )
    return bench.report("planet sizing: tiles, bytes per codec, encode core-hours", ", ".join(encoders), results,
                        (size_table, compute_table), notes)


def main(argv: Sequence[str] | None = None) -> int:
    return run_benchmark(parse_args, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
