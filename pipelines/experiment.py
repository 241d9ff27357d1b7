"""End-to-end experiment on real imagery: views -> train map encoders -> build index -> evaluate, before and after.

`python -m pipelines.experiment` (about 20-25 minutes on a 2-core CPU with the default, pretrained
EfficientNet-Lite0; `--encoder tiny` runs the same mechanics with a random-init encoder):

1. picks the most textured zoom-6 tiles of the imagery (Blue Marble: ../shared/data/bluemarble, else the
   embedded raster) and renders views of them with known centres: off-grid crops at other scales
   (zoom 5.4-6.6) and rotations, with colour and blur changes; the views of each tile are split
   into train / val / held-out (test) sets;
2. builds an index (zoom 4 and 6, whole world) with the untrained encoders and evaluates both the
   training views and the held-out views with pipelines.evaluate;
3. trains the zoom-6 then the zoom-4 map encoder with pipelines.train (the paper's recipe, plus
   --negatives tiles per step drawn from the whole level: in-batch negatives alone leave the tiles
   no view lies in untrained, and those are the distractors at search time);
4. builds the index again with the trained map encoders and evaluates the same views;
5. appends a dated section to benchmarks/RESULTS.md (append only) with the command and the figures,
   and writes the before/after figures to benchmarks/results/experiment.json.

The recipe presumes a pretrained photo encoder: with the random-init `tiny` no accuracy bar
applies. With CLIP weights, pass --encoder clip-vit-b-32 --weights FILE.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import platform
import shlex
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mercantile
import numpy as np
import torch
from PIL import ImageEnhance, ImageFilter

from geoindex.dataset import PhotoTable, write_photo_csv
from geoindex.encoders import ENCODERS, PRECISIONS, resolve_precision
from geoindex.errors import ConfigError, TileNotFoundError
from geoindex.evaluate import EvalReport, KResult
from geoindex.files import atomic_write_bytes
from geoindex.sources import TileSource, open_source
from geoindex.views import Mosaic
from pipelines import build_index, evaluate, train
from pipelines._cli import pipeline_main, progress_bar

log = logging.getLogger("pipelines.experiment")

SHARED_BLUEMARBLE = Path(__file__).resolve().parents[2] / "shared" / "data" / "bluemarble"
RESULTS_MD = Path(__file__).resolve().parents[1] / "benchmarks" / "RESULTS.md"
RESULTS_JSON = RESULTS_MD.parent / "results" / "experiment.json"
VIEW_ZOOM = 6


@dataclass(frozen=True)
class Config:
    """Arguments of the experiment; see ``parse_args``."""

    out: Path = Path("indexes/experiment-bluemarble")
    source: str | None = None
    encoder: str = "efficientnet-lite0"
    weights: str | None = None
    tiles: int = 128
    candidates: int = 1024
    views: int = 9
    val_views: int = 1
    test_views: int = 2
    epochs: int = 10
    batch_size: int = 64
    lr: float = 1e-4
    logit_scale: float = 1 / 0.07
    negatives: int = 448
    ks: tuple[int, ...] = (16, 256)
    seed: int = 0
    threads: int = 2
    precision: str = "auto"
    results_md: Path | None = RESULTS_MD
    results_json: Path | None = RESULTS_JSON
    quiet: bool = False
    command: str = ""

    def __post_init__(self) -> None:
        if self.views - self.val_views - self.test_views < 1:
            raise ConfigError(f"--views {self.views} leaves no training view after --val-views and --test-views")
        if not 2 <= self.tiles <= self.candidates:
            raise ConfigError(f"need 2 <= --tiles <= --candidates, got {self.tiles} and {self.candidates}")


def parse_args(argv: Sequence[str] | None = None) -> Config:
    p = argparse.ArgumentParser(prog="python -m pipelines.experiment", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Config.out,
                   help="working folder (default: indexes/experiment-bluemarble)")
    p.add_argument("--source", help=f"tile source with zoom 4 and 6 (default: {SHARED_BLUEMARBLE} if present, "
                                    "else the embedded Blue Marble raster)")
    p.add_argument("--encoder", default=Config.encoder, choices=sorted(ENCODERS),
                   help=f"base encoder (default: {Config.encoder})")
    p.add_argument("--weights", help="local weights file for the encoder")
    p.add_argument("--tiles", type=int, default=Config.tiles, help="zoom-6 tiles to make views of")
    p.add_argument("--candidates", type=int, default=Config.candidates,
                   help="random zoom-6 tiles (|lat| < 70) the most textured --tiles are chosen from")
    p.add_argument("--views", type=int, default=Config.views, help="views per tile")
    p.add_argument("--val-views", type=int, default=Config.val_views, help="of which validation views")
    p.add_argument("--test-views", type=int, default=Config.test_views, help="of which held-out views")
    p.add_argument("--epochs", type=int, default=Config.epochs, help="epochs per level")
    p.add_argument("--batch-size", type=int, default=Config.batch_size)
    p.add_argument("--lr", type=float, default=Config.lr)
    p.add_argument("--logit-scale", type=float, default=Config.logit_scale,
                   help=f"1/temperature of the contrastive loss (default {Config.logit_scale:.2f}: tau 0.07)")
    p.add_argument("--negatives", type=int, default=Config.negatives,
                   help=f"extra negatives per step from the whole level (default {Config.negatives}; 0: in-batch only)")
    p.add_argument("--k", type=int, nargs="+", default=list(Config.ks), help="beam widths to evaluate")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=Config.threads, help=f"torch threads (default {Config.threads})")
    p.add_argument("--precision", default=Config.precision, choices=PRECISIONS,
                   help="encoder arithmetic for building and querying (training always runs fp32)")
    p.add_argument("--results-md", type=Path, default=RESULTS_MD, help="the RESULTS.md to append to")
    p.add_argument("--results-json", type=Path, default=RESULTS_JSON, help="where to write the figures as JSON")
    p.add_argument("--no-record", action="store_true", help="write neither RESULTS.md nor the JSON figures")
    p.add_argument("--quiet", action="store_true")
    a = p.parse_args(argv)
    command = "python -m pipelines.experiment " + " ".join(
        shlex.quote(x) for x in (argv if argv is not None else sys.argv[1:]))
    return Config(
        out=a.out, source=a.source, encoder=a.encoder, weights=a.weights, tiles=a.tiles, candidates=a.candidates,
        views=a.views, val_views=a.val_views, test_views=a.test_views, epochs=a.epochs, batch_size=a.batch_size,
        lr=a.lr, logit_scale=a.logit_scale, negatives=a.negatives, ks=tuple(a.k), seed=a.seed, threads=a.threads,
        precision=a.precision,
        results_md=None if a.no_record else a.results_md, results_json=None if a.no_record else a.results_json,
        quiet=a.quiet, command=command.strip(),
    )


# ------------------------------------------------------------------------------------------ views


def _texture(source: TileSource, tile: mercantile.Tile) -> float:
    try:
        grey = np.asarray(source.get(tile).convert("L").resize((64, 64)), dtype=np.float32)
    except TileNotFoundError:
        return -1.0
    return float(grey.std())


def make_views(cfg: Config, source: TileSource) -> PhotoTable:
    """Views of the most textured zoom-6 tiles with known centres, split by view; written under <out>/views."""
    rng = np.random.default_rng(cfg.seed)
    n = 1 << VIEW_ZOOM
    lim = mercantile.tile(0, 70.0, VIEW_ZOOM).y, mercantile.tile(0, -70.0, VIEW_ZOOM).y
    pool = [(x, y) for x in range(n) for y in range(lim[0], lim[1] + 1)]
    picks = rng.choice(len(pool), size=min(cfg.candidates, len(pool)), replace=False)
    candidates = [mercantile.Tile(*pool[i], VIEW_ZOOM) for i in picks]
    texture = np.array([_texture(source, t) for t in candidates])
    chosen = [candidates[i] for i in np.argsort(-texture, kind="stable")[: cfg.tiles]]
    mosaic = Mosaic(source, VIEW_ZOOM)
    folder = cfg.out / "views"
    folder.mkdir(parents=True, exist_ok=True)
    paths, lats, lons, splits = [], [], [], []
    n_train = cfg.views - cfg.val_views - cfg.test_views
    roles = ["train"] * n_train + ["val"] * cfg.val_views + ["test"] * cfg.test_views
    with progress_bar("views", quiet=cfg.quiet, unit="view") as bar:
        bar.reset(total=len(chosen) * cfg.views)
        for tile in chosen:
            b = mercantile.bounds(tile)
            for j, role in enumerate(rng.permutation(roles).tolist()):
                # A centre anywhere in the tile (its Mercator square), so the true tile is this one.
                fx, fy = rng.uniform(0.02, 0.98, size=2)
                lon = b.west + fx * (b.east - b.west)
                lat = mercantile.lnglat(*(np.array(mercantile.xy(b.west, b.north)) + fy * (
                    np.array(mercantile.xy(b.east, b.south)) - np.array(mercantile.xy(b.west, b.north))))).lat
                img = mosaic.render_view(lat, lon, zoom=float(rng.uniform(5.4, 6.6)),
                                  rotation_deg=float(rng.uniform(-180.0, 180.0)))
                img = ImageEnhance.Brightness(img).enhance(float(rng.uniform(0.75, 1.25)))
                img = ImageEnhance.Color(img).enhance(float(rng.uniform(0.6, 1.4)))
                img = ImageEnhance.Contrast(img).enhance(float(rng.uniform(0.8, 1.2)))
                img = img.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.0, 1.5))))
                path = folder / f"{tile.x}_{tile.y}_{j:02d}.jpg"
                img.save(path, quality=90)
                paths.append(str(path))
                lats.append(lat)
                lons.append(lon)
                splits.append(role)
                bar.update(1)
    table = PhotoTable(tuple(paths), np.array(lats), np.array(lons), tuple(splits), source="views")
    write_photo_csv(cfg.out / "views.csv", table, relative_to=cfg.out)
    for role in ("train", "test"):
        write_photo_csv(cfg.out / f"views-{role}.csv", table.subset(
            [i for i, s in enumerate(splits) if s == role]), relative_to=cfg.out)
    return table


# ------------------------------------------------------------------------------------------- run


def _build(cfg: Config, source_spec: str, index: Path, checkpoints: Path | None) -> None:
    args = ["--all", "--schedule", "4", "6", "2", "--index", str(index), "--source", source_spec,
            "--encoder", cfg.encoder, "--shard-size", "4096", "--workers", "2", "--precision", cfg.precision]
    args += ["--weights", cfg.weights] if cfg.weights else []
    args += ["--map-checkpoints", str(checkpoints)] if checkpoints else []
    args += ["--quiet"] if cfg.quiet else []
    build_index.run(build_index.parse_args(args))


def _evaluate(cfg: Config, index: Path, split: str, name: str) -> EvalReport:
    args = ["--photos", str(cfg.out / f"views-{split}.csv"), "--index", str(index), "--k", *map(str, cfg.ks),
            "--out", str(cfg.out / "eval" / name), "--quiet", "--precision", cfg.precision]
    args += ["--weights", cfg.weights] if cfg.weights else []
    return evaluate.run(evaluate.parse_args(args))


def run(cfg: Config) -> dict[str, EvalReport]:
    started = time.perf_counter()
    torch.set_num_threads(cfg.threads)
    source_spec = cfg.source or (str(SHARED_BLUEMARBLE) if SHARED_BLUEMARBLE.is_dir() else "bluemarble")
    source = open_source(source_spec)
    cfg.out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    table = make_views(cfg, source)
    timings = {"views": time.perf_counter() - t0}
    log.info("%d views of %d tiles in %.0f s", len(table), cfg.tiles, timings["views"])

    reports: dict[str, EvalReport] = {}
    t0 = time.perf_counter()
    _build(cfg, source_spec, cfg.out / "index-untrained", None)
    for split in ("train", "test"):
        reports[f"before-{split}"] = _evaluate(cfg, cfg.out / "index-untrained", split, f"before-{split}")
    timings["build + evaluate (untrained)"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    train_args = ["--photos", str(cfg.out / "views.csv"), "--source", source_spec, "--out",
                  str(cfg.out / "checkpoints"), "--zooms", "4", "6", "--encoder", cfg.encoder, "--epochs",
                  str(cfg.epochs), "--batch-size", str(cfg.batch_size), "--lr", str(cfg.lr), "--seed",
                  str(cfg.seed), "--device", "cpu", "--workers", "0", "--max-val-photos", "0",
                  "--logit-scale", str(cfg.logit_scale), "--negatives", str(cfg.negatives), "--cache-trunk-gb", "2"]
    train_args += ["--weights", cfg.weights] if cfg.weights else []
    train_args += ["--quiet"] if cfg.quiet else []
    results = train.run(train.parse_args(train_args))
    timings["train"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    _build(cfg, source_spec, cfg.out / "index-trained", cfg.out / "checkpoints")
    for split in ("train", "test"):
        reports[f"after-{split}"] = _evaluate(cfg, cfg.out / "index-trained", split, f"after-{split}")
    timings["build + evaluate (trained)"] = time.perf_counter() - t0
    timings["total"] = time.perf_counter() - started

    history = {r.zoom: [(h.epoch, h.loss, h.val_top1, h.val_top5) for h in r.history] for r in results}
    section = _section(cfg, source_spec, table, reports, history, timings)
    (cfg.out / "experiment.md").write_text(section)
    (cfg.out / "experiment.json").write_text(json.dumps(
        {"command": cfg.command, "timings_s": timings, "history": history,
         "reports": {k: v.to_json() for k, v in reports.items()}}, indent=2))
    if cfg.results_md is not None:
        with open(cfg.results_md, "a", encoding="utf-8") as f:  # append only: others write here too
            f.write("\n" + section)
    if cfg.results_json is not None:
        atomic_write_bytes(cfg.results_json, json.dumps(figures(cfg, reports, timings), indent=2).encode())
    r = reports
    log.info("experiment done in %.0f s: held-out z06 top-1 (k=%d) %.1f %% -> %.1f %%, median error %.0f -> %.0f km;"
             " report %s", timings["total"], cfg.ks[-1], 100 * r["before-test"].results[-1].tile_top1[6],
             100 * r["after-test"].results[-1].tile_top1[6], r["before-test"].results[-1].median_km,
             r["after-test"].results[-1].median_km, cfg.results_md or cfg.out / "experiment.md")
    return reports


def _level_figures(r: KResult) -> dict[str, float]:
    out: dict[str, float] = {}
    for z in sorted(r.tile_top1):
        out[f"z{z}_top1"] = r.tile_top1[z]
        out[f"z{z}_beam_recall"] = r.beam_recall[z]
    out["median_km"] = r.median_km
    out.update({f"acc_{km:g}km": acc for km, acc in sorted(r.accuracy.items())})
    return out


def figures(cfg: Config, reports: dict[str, EvalReport], timings: dict[str, float]) -> dict[str, Any]:
    """The before/after figures as fractions: ``results[untrained|trained][heldout|train]`` at the widest k
    (k=256 keeps every z4 tile, so z6 is exhaustive over the level), and every k under ``by_k``."""
    results: dict[str, Any] = {}
    for when, label in (("before", "untrained"), ("after", "trained")):
        results[label] = {}
        for split, name in (("test", "heldout"), ("train", "train")):
            rep = reports[f"{when}-{split}"]
            results[label][name] = {**_level_figures(rep.results[-1]), "k": rep.results[-1].k,
                                    "views": rep.results[-1].n,
                                    "by_k": {str(r.k): _level_figures(r) for r in rep.results}}
    return {
        "encoder": cfg.encoder, "command": cfg.command,
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d"),
        "machine": f"{platform.processor() or platform.machine()} ({os.cpu_count()} cores), torch {torch.__version__}",
        "precision": resolve_precision(cfg.precision, spec=ENCODERS[cfg.encoder]),
        "recipe": {"epochs": cfg.epochs, "batch_size": cfg.batch_size, "lr": cfg.lr, "logit_scale": cfg.logit_scale,
                   "negatives": cfg.negatives, "tiles": cfg.tiles, "views_per_tile": cfg.views},
        "timings_s": timings, "results": results,
    }


def _pct(x: float | None) -> str:
    return "-" if x is None or x != x else f"{100 * x:.1f} %"


def _section(cfg: Config, source: str, table: PhotoTable, reports: dict[str, EvalReport],
             history: dict[int, list[tuple[int, float | None, float | None, float | None]]],
             timings: dict[str, float]) -> str:
    split = np.asarray(table.split)
    now = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    lines = [
        f"## training experiment: map encoders on Blue Marble views, before and after: {now}",
        "",
        f"- command: `{cfg.command}`",
        f"- machine: {platform.processor() or platform.machine()} ({os.cpu_count()} cores), torch {torch.__version__}"
        f" ({cfg.threads} thread{'s' if cfg.threads > 1 else ''}), load avg {os.getloadavg()[0]:.2f} at end",
        f"- imagery: `{source}` (zoom 4 and 6); index: whole world, levels z4 (256 tiles) and z6 (4,096 tiles)",
        f"- encoder: `{cfg.encoder}` (photo encoder frozen; map encoders trained z6 then z4, "
        f"{cfg.epochs} epochs, batch {cfg.batch_size}, Adam lr {cfg.lr:g}, logit scale {cfg.logit_scale:.2f}, "
        f"{cfg.negatives} negatives per step from the whole level)",
        f"- queries: {len(table)} views of the {cfg.tiles} most textured of {cfg.candidates} random zoom-6 tiles "
        f"(|lat| < 70): centre anywhere in the tile, zoom 5.4-6.6, any rotation, brightness/colour/contrast "
        f"changes, Gaussian blur 0-1.5 px; split by view: {int((split == 'train').sum())} train, "
        f"{int((split == 'val').sum())} val, {int((split == 'test').sum())} held-out",
        "- wall time: " + ", ".join(f"{k} {v:.0f} s" for k, v in timings.items()),
        "",
        "Tile top-1 = the true tile ranked first at that level; k = beam width (k=256 keeps every z4 tile, "
        "so its z6 figure is exhaustive retrieval over all 4,096 z6 tiles).",
        "",
        "| split | encoders | k | z4 tile top-1 | z4 beam recall | z6 tile top-1 | z6 beam recall "
        "| median error km | 200 km | 750 km | 2500 km |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for split_name, label in (("train", "training views"), ("test", "held-out views")):
        for when in ("before", "after"):
            rep = reports[f"{when}-{split_name}"]
            for r in rep.results:
                lines.append(
                    f"| {label} | {'untrained' if when == 'before' else 'trained'} | {r.k} | {_pct(r.tile_top1[4])} "
                    f"| {_pct(r.beam_recall[4])} | {_pct(r.tile_top1[6])} | {_pct(r.beam_recall[6])} "
                    f"| {r.median_km:,.0f} "
                    f"| {_pct(r.accuracy[200.0])} | {_pct(r.accuracy[750.0])} | {_pct(r.accuracy[2500.0])} |")
    lines += ["", "Training (validation = the val views, tile top-1/top-5 among the val views' own tiles):", "",
              "| level | epoch | mean loss | val top-1 | val top-5 |", "|---|---:|---:|---:|---:|"]
    for zoom in sorted(history, reverse=True):
        for epoch, loss, top1, top5 in history[zoom]:
            lines.append(f"| z{zoom} | {epoch} | {'-' if loss is None else f'{loss:.3f}'} | {_pct(top1)} "
                         f"| {_pct(top5)} |")
    lines += ["", ""]  # a blank line after the table, so that notes appended below stay out of it
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    return pipeline_main(argv, parse_args, run)


if __name__ == "__main__":
    raise SystemExit(main())
