"""Build engines: tiles/s of the local engine vs the Ray engine (local Ray instance), same tiles, encoder, shards.

Each engine builds one first level (``--zoom`` over the world or ``--bbox``) from the embedded Blue
Marble raster into a fresh index, then the level one zoom up (a quarter of the tiles). ``end to
end`` is ``BuildSummary.seconds`` of the larger build (plan, encode, parquet, FAISS, manifest; for
Ray also starting the actors, which import torch and build the encoder). ``marginal`` is the extra
tiles over the extra seconds between the two builds: the fixed costs cancel, so it is the rate a
long build converges to, and ``fixed`` is what is left of the end-to-end time.
Run: ``.venv/bin/python benchmarks/build_engines.py`` (needs ``pip install -e '.[ray]'``).
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import BenchRun, Report, benchmark_parser, markdown_table, resolve_encoder, run_benchmark

if TYPE_CHECKING:
    from geoindex.storage.build import BuildSummary

NAME = "build_engines"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = benchmark_parser(NAME, __doc__)
    p.add_argument("--zoom", type=int, help="zoom of the larger level built (default: 4, the world's 256 tiles; "
                                            "5 with the tiny encoder); zoom - 1 is the smaller")
    p.add_argument("--bbox", type=float, nargs=4, metavar=("W", "S", "E", "N"), help="coverage (default: world)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--shard-size", type=int, help="tiles per shard (default: an eighth of the level)")
    p.add_argument("--workers", type=int, default=4, help="tile-loading threads per engine / per actor")
    p.add_argument("--ray", nargs="+", default=["2x1", "1x2"], metavar="ACTORSxCPUS[xGPUS]",
                   help="Ray pool shapes to measure: actors x CPUs per actor, optionally x GPUs per actor "
                        "(e.g. 1x8x1 on a GPU node; default: 2x1 1x2)")
    p.add_argument("--local-threads", type=int, nargs="+", default=[0, 1], metavar="N",
                   help="torch threads of the local engine runs; 0 = torch's default (default: 0 1)")
    p.add_argument("--ray-cpus", type=int, default=2, help="CPUs of the local Ray instance (default: 2)")
    a = p.parse_args(argv)
    enc = resolve_encoder(a)
    a.zoom = a.zoom if a.zoom is not None else (5 if enc == "tiny" else 4)
    if a.smoke:
        a.zoom, a.ray = 2, ["2x1"]
    if a.zoom < 1:
        p.error("--zoom must be >= 1")
    return a


def _measure(name: str, build: Callable[[Path, int], BuildSummary], zoom: int, work: Path) -> dict[str, object]:
    big = build(work / "big", zoom)
    small = build(work / "small", zoom - 1)
    shutil.rmtree(work / "big", ignore_errors=True)
    shutil.rmtree(work / "small", ignore_errors=True)
    rate = (big.planned - small.planned) / (big.seconds - small.seconds)
    return {"engine": name, "tiles": big.planned, "tiles_small": small.planned, "end_to_end_s": big.seconds,
            "end_to_end_s_small": small.seconds, "end_to_end_tiles_per_s": big.tiles_per_s,
            "marginal_tiles_per_s": rate, "fixed_s": big.seconds - big.planned / rate}


def _some_tiles(zoom: int) -> list:  # type: ignore[type-arg]
    import mercantile

    return [mercantile.Tile(x, 0, zoom) for x in range(2)]


def run(a: argparse.Namespace, argv: Sequence[str] | None) -> Report:
    import ray
    import torch

    from geoindex.geometry.coverage import Coverage
    from geoindex.geometry.tiles import LevelSchedule
    from geoindex.models.encoders import create_encoder
    from geoindex.sources import RasterSource
    from geoindex.storage.build import build_level
    from geoindex.storage.distributed import EncoderRecipe, RayOptions, build_level_ray, init_ray

    bench = BenchRun.start(NAME, argv)
    enc_name = resolve_encoder(a)
    coverage = Coverage.from_bbox(*a.bbox) if a.bbox else Coverage.world()
    n_tiles = len(coverage.tiles(zoom=a.zoom)[0])
    shard_size = a.shard_size or max(1, -(-n_tiles // 8))
    common = {"coverage": coverage, "shard_size": shard_size, "batch_size": a.batch_size, "workers": a.workers}
    work = Path(tempfile.mkdtemp(prefix="geoindex-bench-engines-"))
    rows = []
    try:
        source, encoder = RasterSource(), create_encoder(enc_name)
        print(f"{n_tiles} tiles at zoom {a.zoom}, {shard_size} a shard; local engine...", file=sys.stderr)
        encoder.encode_tensor(torch.stack([encoder.preprocess(source.get(t)) for t in _some_tiles(a.zoom)]))
        default_threads = torch.get_num_threads()
        for threads in a.local_threads:
            torch.set_num_threads(threads or default_threads)
            rows.append(_measure(f"local ({threads or default_threads} torch threads)", lambda index, z: build_level(
                index, z, source=source, encoder=encoder, schedule=LevelSchedule(z, z, 2), **common), a.zoom, work))
        torch.set_num_threads(default_threads)
        ray.init(num_cpus=a.ray_cpus, include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR)
        init_ray(quiet=True)
        for shape in a.ray:
            actors, cpus, gpus = (float(v) for v in (shape.split("x") + ["0"])[:3])
            print(f"ray {shape}...", file=sys.stderr)
            options = RayOptions(actors=int(actors), cpus_per_actor=cpus, gpus_per_actor=gpus)
            label = f"ray {int(actors)} actor(s) x {cpus:g} CPU" + (f" x {gpus:g} GPU" if gpus else "")
            rows.append(_measure(label, lambda index, z, o=options: build_level_ray(
                index, z, source="bluemarble", encoder=EncoderRecipe(enc_name), schedule=LevelSchedule(z, z, 2),
                options=o, **common), a.zoom, work))
    finally:
        if ray.is_initialized():
            ray.shutdown()
        shutil.rmtree(work, ignore_errors=True)
    local = float(rows[0]["marginal_tiles_per_s"])  # type: ignore[arg-type]
    table = markdown_table(
        ["engine", "tiles (small)", "end to end s (small)", "end to end tiles/s", "marginal tiles/s", "fixed s",
         "marginal vs local"],
        [[r["engine"], f"{r['tiles']} ({r['tiles_small']})", f"{r['end_to_end_s']:.1f} ({r['end_to_end_s_small']:.1f})",
          r["end_to_end_tiles_per_s"], r["marginal_tiles_per_s"], r["fixed_s"],
          float(r["marginal_tiles_per_s"]) / local] for r in rows],  # type: ignore[arg-type]
    )
    notes = [
        f"Level: zoom {a.zoom} of {'bbox ' + str(a.bbox) if a.bbox else 'the world'} ({n_tiles} tiles) rendered from "
        f"the embedded Blue Marble raster; batch {a.batch_size}, {shard_size} tiles a shard, {a.workers} loader "
        f"threads per engine/actor; local Ray instance with {a.ray_cpus} CPUs. A Ray actor runs as many torch "
        "threads as it has CPUs.",
        f"Each engine also built zoom {a.zoom - 1} (the smaller build); marginal = extra tiles / extra seconds "
        "between the two, fixed = end to end - tiles / marginal (plan, FAISS, manifest; Ray: actor start-up, "
        "each actor imports torch and builds the encoder).",
    ]
    results = {"rows": rows, "zoom": a.zoom, "tiles": n_tiles, "shard_size": shard_size, "batch_size": a.batch_size}
    return bench.report("Build engines: local vs Ray Data", enc_name, results, (table,), notes)


def main(argv: Sequence[str] | None = None) -> int:
    return run_benchmark(parse_args, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
