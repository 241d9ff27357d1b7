"""End-to-end experiment on real imagery: views -> train map encoders -> build index -> evaluate, before and after.

`python -m pipelines.experiment` (about 15-25 minutes on a 2-core CPU with the default, pretrained
EfficientNet-Lite0; `--encoder tiny` runs the same mechanics with a random-init encoder):

1. plans the places (zoom-6 tiles of the imagery, |lat| < 70; Blue Marble from
   ../shared/data/bluemarble, else the embedded raster): the ``--tiles`` most textured of
   ``--candidates`` random tiles are the evaluation tiles; ``--heldout-share`` of them are held
   out (no view of them is ever trained on); ``--regions`` blocks of 2x2 neighbouring zoom-4
   tiles are held out whole, with their most textured tiles evaluated; with ``--train-tiles all``
   every other tile of the level contributes ``--train-views`` training views;
2. renders views with known centres (``geoindex.training.views``: off-grid, zoom 5.4-6.6, any rotation,
   colour and blur changes);
3. builds an index (zoom 4 and 6, whole world) with the untrained encoders and evaluates four
   splits: ``heldout`` (other views of trained tiles), ``heldout_tiles`` (tiles never trained
   on), ``heldout_regions`` (whole regions never trained on) and ``train`` (the training views
   of the evaluation tiles);
4. trains the zoom-6 then the zoom-4 map encoder with pipelines.train (``--head``, ``--l2sp``,
   ``--negatives``, ``--lr``, ``--epochs`` choose the recipe);
5. builds the index again with the trained map encoders and evaluates the same views;
6. appends a dated section to benchmarks/RESULTS.md (append only) and writes the before/after
   figures of every split to benchmarks/results/experiment.json.

Views and the untrained index are reused by a rerun with the same places (``<out>/plan.json``), so
several recipes can be compared on the same views with ``--recipe-name`` folders.

Views of trained tiles measure memorisation; the held-out tiles and regions measure what a new
place gets. The recipe presumes a pretrained photo encoder: with the random-init `tiny` no
accuracy bar applies. With CLIP weights, pass --encoder clip-vit-b-32 --weights FILE.
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
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import mercantile
import numpy as np
import torch

from geoindex.errors import ConfigError, TileNotFoundError
from geoindex.files import atomic_write_bytes
from geoindex.models.encoders import ENCODERS, HEADS, PRECISIONS, resolve_precision
from geoindex.sources import TileSource, open_source
from geoindex.training.dataset import PhotoTable, write_photo_csv
from geoindex.training.evaluate import EvalReport, KResult
from geoindex.training.views import random_views
from pipelines import build_index, evaluate, train
from pipelines._cli import pipeline_main, progress_bar

log = logging.getLogger("pipelines.experiment")

SHARED_BLUEMARBLE = Path(__file__).resolve().parents[2] / "shared" / "data" / "bluemarble"
RESULTS_MD = Path(__file__).resolve().parents[1] / "benchmarks" / "RESULTS.md"
RESULTS_JSON = RESULTS_MD.parent / "results" / "experiment.json"
VIEW_ZOOM = 6
MAX_ABS_LAT = 70.0
# Evaluation splits: (CSV name, JSON key, what it measures).
SPLITS = (
    ("heldout-tiles", "heldout_tiles", "views of tiles never trained on"),
    ("heldout-regions", "heldout_regions", "views in regions never trained on"),
    ("heldout", "heldout", "other views of trained tiles"),
    ("train", "train", "training views"),
)


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
    heldout_share: float = 0.5
    regions: int = 4
    train_tiles: str = "all"
    train_views: int = 2
    epochs: int = 10
    batch_size: int = 128
    lr: float = 3e-4
    logit_scale: float = 1 / 0.07
    negatives: int = 0
    head: str = "projection"
    l2sp: float = 0.0
    recipe_name: str = "trained"
    schedule: tuple[int, int, int] = (4, VIEW_ZOOM, 2)
    ks: tuple[int, ...] = (16, 256)
    seed: int = 0
    threads: int = 2
    device: str = "cpu"
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
        if not 0 < self.heldout_share < 1:
            raise ConfigError(f"--heldout-share must be in (0, 1), got {self.heldout_share}")
        if self.regions < 0 or self.train_views < 1 or self.train_tiles not in ("all", "eval"):
            raise ConfigError(f"need --regions >= 0, --train-views >= 1 and --train-tiles all|eval; got "
                              f"{self.regions}, {self.train_views}, {self.train_tiles!r}")
        if self.schedule[1] != VIEW_ZOOM or self.schedule[0] > VIEW_ZOOM or self.schedule[2] < 1:
            raise ConfigError(f"--schedule must end at zoom {VIEW_ZOOM} (the views' zoom), got {self.schedule}")
        if not self.recipe_name or "/" in self.recipe_name or self.recipe_name.startswith("."):
            raise ConfigError(f"--recipe-name must be a plain folder name, got {self.recipe_name!r}")

    def plan_identity(self) -> dict[str, Any]:
        """What decides the places and views: a rerun with the same identity reuses them."""
        return {"source": self.source, "tiles": self.tiles, "candidates": self.candidates, "views": self.views,
                "val_views": self.val_views, "test_views": self.test_views, "heldout_share": self.heldout_share,
                "regions": self.regions, "train_tiles": self.train_tiles, "train_views": self.train_views,
                "seed": self.seed, "encoder": self.encoder, "precision": self.precision,
                "schedule": list(self.schedule), "format": 2}

    @property
    def zooms(self) -> list[int]:
        return list(range(self.schedule[0], self.schedule[1] + 1, self.schedule[2]))


def add_recipe_arguments(p: argparse.ArgumentParser, defaults: Config) -> None:
    """The options that say what is trained and how (encoder, places, views, optimiser, zooms, device),
    with ``defaults``' values: shared by this experiment and ``pipelines.ship_encoders``."""
    p.add_argument("--encoder", default=defaults.encoder, choices=sorted(ENCODERS),
                   help=f"base encoder (default: {defaults.encoder})")
    p.add_argument("--tiles", type=int, default=defaults.tiles, help="zoom-6 evaluation tiles (half held out)")
    p.add_argument("--candidates", type=int, default=defaults.candidates,
                   help="random zoom-6 tiles (|lat| < 70) the most textured --tiles are chosen from")
    p.add_argument("--train-views", type=int, default=defaults.train_views,
                   help=f"training views per tile beyond the evaluation tiles (default {defaults.train_views})")
    p.add_argument("--epochs", type=int, default=defaults.epochs, help="epochs per level")
    p.add_argument("--batch-size", type=int, default=defaults.batch_size)
    p.add_argument("--lr", type=float, default=defaults.lr)
    p.add_argument("--negatives", type=int, default=defaults.negatives,
                   help=f"extra negatives per step from the whole level (default {defaults.negatives}: in-batch only)")
    p.add_argument("--head", choices=HEADS, default=defaults.head,
                   help=f"what the map encoders fine-tune (default {defaults.head})")
    p.add_argument("--l2sp", type=float, default=defaults.l2sp, help="weight of the pull towards the start weights")
    start, stop, step = defaults.schedule
    p.add_argument("--schedule", type=int, nargs=3, default=list(defaults.schedule), metavar=("START", "STOP", "STEP"),
                   help=f"zoom levels of the index and of training; STOP must be {VIEW_ZOOM} "
                        f"(default {start} {stop} {step})")
    p.add_argument("--seed", type=int, default=defaults.seed)
    p.add_argument("--threads", type=int, default=defaults.threads, help=f"torch threads (default {defaults.threads})")
    p.add_argument("--device", default=defaults.device,
                   help=f"torch device for training, building and evaluating: cpu, cuda (default: {defaults.device})")
    p.add_argument("--quiet", action="store_true")


def recipe_from_arguments(a: argparse.Namespace) -> dict[str, Any]:
    """The ``Config`` fields that :func:`add_recipe_arguments` set."""
    return dict(encoder=a.encoder, tiles=a.tiles, candidates=a.candidates, train_views=a.train_views,
                epochs=a.epochs, batch_size=a.batch_size, lr=a.lr, negatives=a.negatives, head=a.head, l2sp=a.l2sp,
                schedule=tuple(a.schedule), seed=a.seed, threads=a.threads, device=a.device, quiet=a.quiet)


def command_line(prog: str, argv: Sequence[str] | None) -> str:
    """How this run was started, quoted for a shell: recorded beside its figures."""
    return f"python -m {prog} " + " ".join(shlex.quote(x) for x in (argv if argv is not None else sys.argv[1:]))


def parse_args(argv: Sequence[str] | None = None) -> Config:
    p = argparse.ArgumentParser(prog="python -m pipelines.experiment", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Config.out,
                   help="working folder (default: indexes/experiment-bluemarble)")
    p.add_argument("--source", help=f"tile source with zoom 4 and 6 (default: {SHARED_BLUEMARBLE} if present, "
                                    "else the embedded Blue Marble raster)")
    p.add_argument("--weights", help="local weights file for the encoder")
    add_recipe_arguments(p, Config())
    p.add_argument("--views", type=int, default=Config.views, help="views per evaluation tile")
    p.add_argument("--val-views", type=int, default=Config.val_views, help="of which validation views")
    p.add_argument("--test-views", type=int, default=Config.test_views, help="of which held-out views")
    p.add_argument("--heldout-share", type=float, default=Config.heldout_share,
                   help=f"share of the evaluation tiles never trained on (default {Config.heldout_share})")
    p.add_argument("--regions", type=int, default=Config.regions,
                   help=f"blocks of 2x2 zoom-4 tiles held out whole (default {Config.regions})")
    p.add_argument("--train-tiles", choices=("all", "eval"), default=Config.train_tiles,
                   help="train on views of every tile not held out (all), or only of the evaluation tiles")
    p.add_argument("--logit-scale", type=float, default=Config.logit_scale,
                   help=f"1/temperature of the contrastive loss (default {Config.logit_scale:.2f}: tau 0.07)")
    p.add_argument("--recipe-name", default=Config.recipe_name,
                   help="folder under --out for this recipe's checkpoints, index and reports (default: trained)")
    p.add_argument("--k", type=int, nargs="+", default=list(Config.ks), help="beam widths to evaluate")
    p.add_argument("--precision", default=Config.precision, choices=PRECISIONS,
                   help="encoder arithmetic for building and querying (training runs fp32, with fp16 autocast "
                        "on CUDA)")
    p.add_argument("--results-md", type=Path, default=RESULTS_MD, help="the RESULTS.md to append to")
    p.add_argument("--results-json", type=Path, default=RESULTS_JSON, help="where to write the figures as JSON")
    p.add_argument("--no-record", action="store_true", help="write neither RESULTS.md nor the JSON figures")
    a = p.parse_args(argv)
    return Config(
        out=a.out, source=a.source, weights=a.weights, views=a.views, val_views=a.val_views,
        test_views=a.test_views, heldout_share=a.heldout_share, regions=a.regions, train_tiles=a.train_tiles,
        logit_scale=a.logit_scale, recipe_name=a.recipe_name, ks=tuple(a.k), precision=a.precision,
        results_md=None if a.no_record else a.results_md, results_json=None if a.no_record else a.results_json,
        command=command_line("pipelines.experiment", argv), **recipe_from_arguments(a),
    )


# ------------------------------------------------------------------------------------------ places


def _texture(source: TileSource, tile: mercantile.Tile) -> float:
    try:
        grey = np.asarray(source.get(tile).convert("L").resize((64, 64)), dtype=np.float32)
    except TileNotFoundError:
        return -1.0
    return float(grey.std())


def _most_textured(source: TileSource, tiles: Sequence[mercantile.Tile], n: int) -> list[mercantile.Tile]:
    texture = np.array([_texture(source, t) for t in tiles])
    return [tiles[i] for i in np.argsort(-texture, kind="stable")[:n] if texture[i] >= 0]


@dataclass(frozen=True)
class Plan:
    """The zoom-6 tiles of each role: evaluation tiles trained on, held out, held-out regions, extra training."""

    trained: tuple[mercantile.Tile, ...]
    heldout_tiles: tuple[mercantile.Tile, ...]
    heldout_regions: tuple[mercantile.Tile, ...]
    region_blocks: tuple[tuple[int, int], ...]  # (x, y) of each block's north-west zoom-4 tile
    extra: tuple[mercantile.Tile, ...]


def plan_places(cfg: Config, source: TileSource) -> Plan:
    """Seeded choice of the places of every split; held-out tiles and regions never reach training."""
    rng = np.random.default_rng(cfg.seed)
    n = 1 << VIEW_ZOOM
    rows = range(mercantile.tile(0, MAX_ABS_LAT, VIEW_ZOOM).y, mercantile.tile(0, -MAX_ABS_LAT, VIEW_ZOOM).y + 1)
    pool = [mercantile.Tile(x, y, VIEW_ZOOM) for y in rows for x in range(n)]
    # Regions: non-overlapping blocks of 2x2 zoom-4 tiles (8x8 zoom-6 tiles) inside the rows.
    block_rows = range(-(-rows.start // 8), (rows.stop - 8) // 8 + 1)
    blocks = [(bx, by) for by in block_rows for bx in range(n // 8)]
    chosen_blocks = [blocks[i] for i in sorted(rng.choice(len(blocks), size=min(cfg.regions, len(blocks)),
                                                          replace=False).tolist())]
    in_region = {(bx * 8 + dx, by * 8 + dy) for bx, by in chosen_blocks for dx in range(8) for dy in range(8)}
    outside = [t for t in pool if (t.x, t.y) not in in_region]
    picks = rng.choice(len(outside), size=min(cfg.candidates, len(outside)), replace=False)
    evaluation = _most_textured(source, [outside[i] for i in picks], cfg.tiles)
    order = rng.permutation(len(evaluation))
    n_held = int(round(cfg.heldout_share * len(evaluation)))
    held = [evaluation[i] for i in sorted(order[:n_held].tolist())]
    trained = [evaluation[i] for i in sorted(order[n_held:].tolist())]
    region_tiles = [t for t in pool if (t.x, t.y) in in_region]
    region_eval = _most_textured(source, region_tiles, cfg.tiles // 2)
    used = set(evaluation)
    extra = [t for t in outside if t not in used] if cfg.train_tiles == "all" else []
    return Plan(tuple(trained), tuple(held), tuple(region_eval),
                tuple((bx * 2, by * 2) for bx, by in chosen_blocks), tuple(extra))


# ------------------------------------------------------------------------------------------ views


def make_views(cfg: Config, source: TileSource, plan: Plan) -> dict[str, PhotoTable]:
    """Render the views of every role under <out>/views; returns the tables by CSV name.

    ``training`` holds the views training may use (train and val roles, plus the trained
    evaluation tiles' test views as ``test``, which training ignores); the evaluation tables are
    those of ``SPLITS``.
    """
    folder = cfg.out / "views"
    folder.mkdir(parents=True, exist_ok=True)
    n_train = cfg.views - cfg.val_views - cfg.test_views
    role_rng = np.random.default_rng([cfg.seed, 1])
    groups = [("trained", plan.trained, cfg.views), ("heldout_tiles", plan.heldout_tiles, cfg.views),
              ("heldout_regions", plan.heldout_regions, cfg.views), ("extra", plan.extra, cfg.train_views)]
    rows: dict[str, list[tuple[str, float, float, str]]] = {
        name: [] for name in ("training", *(csv for csv, _, _ in SPLITS))}
    with progress_bar("views", quiet=cfg.quiet, unit="view") as bar:
        bar.reset(total=sum(len(tiles) * per for _, tiles, per in groups))
        for g, (group, tiles, per) in enumerate(groups):
            for start in range(0, len(tiles), 64):
                chunk = tiles[start : start + 64]
                views = random_views(source, chunk, per_tile=per, seed=[cfg.seed, g, start])
                for i, view in enumerate(views):
                    path = folder / f"{group}-{view.tile.x}_{view.tile.y}_{i % per:02d}.jpg"
                    view.image.save(path, quality=90)
                    if group == "trained":
                        if i % per == 0:  # each tile's roles, in a seeded order
                            roles = role_rng.permutation(["train"] * n_train + ["val"] * cfg.val_views
                                                         + ["test"] * cfg.test_views).tolist()
                        role = roles[i % per]
                        rows["training"].append((str(path), view.lat, view.lon, role))
                        rows["heldout" if role == "test" else "train"].append((str(path), view.lat, view.lon, "test"))
                    elif group == "extra":
                        rows["training"].append((str(path), view.lat, view.lon, "train"))
                    else:
                        rows[group.replace("_", "-")].append((str(path), view.lat, view.lon, "test"))
                bar.update(len(views))
    tables = {}
    for name, items in rows.items():
        table = PhotoTable(tuple(r[0] for r in items), np.array([r[1] for r in items]),
                           np.array([r[2] for r in items]), tuple(r[3] for r in items), source=f"views-{name}")
        write_photo_csv(cfg.out / f"views-{name}.csv", table, relative_to=cfg.out)
        tables[name] = table
    return tables


def prepare(cfg: Config, source: TileSource) -> tuple[Plan, dict[str, int]]:
    """The plan and views, made once per plan identity (``<out>/plan.json`` is written last)."""
    plan_file = cfg.out / "plan.json"
    identity = cfg.plan_identity()
    if plan_file.is_file():
        saved = json.loads(plan_file.read_text())
        if saved.get("identity") == identity:
            tiles = {k: tuple(mercantile.Tile(*t) for t in saved["plan"][k])
                     for k in ("trained", "heldout_tiles", "heldout_regions", "extra")}
            plan = Plan(tiles["trained"], tiles["heldout_tiles"], tiles["heldout_regions"],
                        tuple(tuple(b) for b in saved["plan"]["region_blocks"]), tiles["extra"])
            log.info("reusing the places and views of %s", plan_file)
            return plan, saved["counts"]
        log.info("%s was made with other settings: planning and rendering again", plan_file)
        plan_file.unlink()
    cfg.out.mkdir(parents=True, exist_ok=True)
    plan = plan_places(cfg, source)
    tables = make_views(cfg, source, plan)
    counts = {name: len(t) for name, t in tables.items()}
    atomic_write_bytes(plan_file, json.dumps({"identity": identity, "plan": asdict(plan), "counts": counts}).encode())
    return plan, counts


# ------------------------------------------------------------------------------------------- run


def _build(cfg: Config, source_spec: str, index: Path, checkpoints: Path | None) -> None:
    # --no-calibrate: the experiment scores tiles, not probabilities; calibration would add a minute per build.
    args = ["--all", "--no-calibrate", "--schedule", *map(str, cfg.schedule), "--index", str(index),
            "--source", source_spec, "--encoder", cfg.encoder, "--shard-size", "4096", "--precision", cfg.precision,
            "--device", cfg.device]
    args += ["--weights", cfg.weights] if cfg.weights else []
    args += ["--map-checkpoints", str(checkpoints)] if checkpoints else []
    args += ["--quiet"] if cfg.quiet else []
    build_index.run(build_index.parse_args(args))


def _evaluate(cfg: Config, index: Path, split: str, out: Path) -> EvalReport:
    args = ["--photos", str(cfg.out / f"views-{split}.csv"), "--index", str(index), "--k", *map(str, cfg.ks),
            "--out", str(out), "--quiet", "--precision", cfg.precision, "--device", cfg.device]
    args += ["--weights", cfg.weights] if cfg.weights else []
    return evaluate.run(evaluate.parse_args(args))


def _train(cfg: Config, source_spec: str, checkpoints: Path) -> list[train.LevelResult]:
    args = ["--photos", str(cfg.out / "views-training.csv"), "--source", source_spec, "--out", str(checkpoints),
            "--zooms", *map(str, cfg.zooms), "--encoder", cfg.encoder, "--epochs", str(cfg.epochs), "--batch-size",
            str(cfg.batch_size), "--lr", str(cfg.lr), "--seed", str(cfg.seed), "--device", cfg.device, "--workers", "0",
            "--max-val-photos", "0", "--logit-scale", str(cfg.logit_scale), "--negatives", str(cfg.negatives),
            "--cache-trunk-gb", "2", "--head", cfg.head, "--l2sp", str(cfg.l2sp)]
    args += ["--weights", cfg.weights] if cfg.weights else []
    args += ["--quiet"] if cfg.quiet else []
    return train.run(train.parse_args(args))


def _untrained_reports(cfg: Config, source_spec: str) -> dict[str, EvalReport]:
    """The untrained index and its reports, reused while the plan is (they do not depend on the recipe)."""
    index = cfg.out / "index-untrained"
    reports = {}
    for split, _, _ in SPLITS:
        out = cfg.out / "eval" / f"untrained-{split}"
        cached = out.with_suffix(".json")
        if cached.is_file() and (index / "manifest.json").is_file():
            try:
                reports[split] = EvalReport.from_json(json.loads(cached.read_text()))
                continue
            except (KeyError, TypeError, ValueError) as e:
                log.warning("%s is not a readable report (%s): evaluating again", cached, e)
        if not (index / "manifest.json").is_file():
            _build(cfg, source_spec, index, None)
        reports[split] = _evaluate(cfg, index, split, out)
    return reports


def run(cfg: Config) -> dict[str, EvalReport]:
    started = time.perf_counter()
    torch.set_num_threads(cfg.threads)
    source_spec = cfg.source or (str(SHARED_BLUEMARBLE) if SHARED_BLUEMARBLE.is_dir() else "bluemarble")
    source = open_source(source_spec)
    t0 = time.perf_counter()
    plan, counts = prepare(cfg, source)
    timings = {"places + views": time.perf_counter() - t0}
    log.info("views: %s", ", ".join(f"{v} {k}" for k, v in counts.items()))

    t0 = time.perf_counter()
    reports = {f"before-{k}": v for k, v in _untrained_reports(cfg, source_spec).items()}
    timings["build + evaluate (untrained)"] = time.perf_counter() - t0

    recipe = cfg.out / cfg.recipe_name
    t0 = time.perf_counter()
    results = _train(cfg, source_spec, recipe / "checkpoints")
    timings["train"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    _build(cfg, source_spec, recipe / "index", recipe / "checkpoints")
    for split, _, _ in SPLITS:
        reports[f"after-{split}"] = _evaluate(cfg, recipe / "index", split, recipe / "eval" / split)
    timings["build + evaluate (trained)"] = time.perf_counter() - t0
    timings["total"] = time.perf_counter() - started

    history = {r.zoom: [(h.epoch, h.loss, h.val_top1, h.val_top5) for h in r.history] for r in results}
    section = _section(cfg, source_spec, plan, counts, reports, history, timings)
    (recipe / "experiment.md").write_text(section)
    figs = figures(cfg, plan, counts, reports, timings)
    (recipe / "experiment.json").write_text(json.dumps({**figs, "history": history}, indent=2))
    if cfg.results_md is not None:
        with open(cfg.results_md, "a", encoding="utf-8") as f:  # append only: others write here too
            f.write("\n" + section)
    if cfg.results_json is not None:
        atomic_write_bytes(cfg.results_json, json.dumps(figs, indent=2).encode())
    r, k = reports, cfg.ks[-1]
    log.info("experiment done in %.0f s (k=%d, z06 top-1 / median km): tiles never trained on %s -> %s; "
             "regions never trained on %s -> %s; other views of trained tiles %s -> %s; report %s",
             timings["total"], k, *(_brief(r[f"{w}-{s}"]) for s in ("heldout-tiles", "heldout-regions", "heldout")
                                   for w in ("before", "after")), cfg.results_md or recipe / "experiment.md")
    return reports


def _brief(report: EvalReport) -> str:
    last = report.results[-1]
    return f"{100 * last.tile_top1[VIEW_ZOOM]:.1f} % / {last.median_km:,.0f}"


def _level_figures(r: KResult) -> dict[str, float]:
    out: dict[str, float] = {}
    for z in sorted(r.tile_top1):
        out[f"z{z}_top1"] = r.tile_top1[z]
        out[f"z{z}_beam_recall"] = r.beam_recall[z]
    out["median_km"] = r.median_km
    out.update({f"acc_{km:g}km": acc for km, acc in sorted(r.accuracy.items())})
    return out


def figures(cfg: Config, plan: Plan, counts: dict[str, int], reports: dict[str, EvalReport],
            timings: dict[str, float]) -> dict[str, Any]:
    """The before/after figures as fractions: ``results[untrained|trained][split]`` at the widest k
    (k=256 keeps every z4 tile, so z6 is exhaustive over the level), and every k under ``by_k``.
    Splits: ``heldout_tiles`` and ``heldout_regions`` (places never trained on), ``heldout``
    (other views of trained tiles) and ``train``."""
    results: dict[str, Any] = {}
    for when, label in (("before", "untrained"), ("after", "trained")):
        results[label] = {}
        for split, name, _ in SPLITS:
            rep = reports[f"{when}-{split}"]
            results[label][name] = {**_level_figures(rep.results[-1]), "k": rep.results[-1].k,
                                    "views": rep.results[-1].n,
                                    "by_k": {str(r.k): _level_figures(r) for r in rep.results}}
    return {
        "encoder": cfg.encoder, "command": cfg.command,
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d"),
        "machine": _machine(cfg),
        "precision": resolve_precision(cfg.precision, spec=ENCODERS[cfg.encoder]),
        "recipe": {"head": cfg.head, "epochs": cfg.epochs, "batch_size": cfg.batch_size, "lr": cfg.lr,
                   "logit_scale": cfg.logit_scale, "negatives": cfg.negatives, "l2sp": cfg.l2sp,
                   "train_tiles": cfg.train_tiles, "train_views_per_extra_tile": cfg.train_views},
        "places": {"trained_eval_tiles": len(plan.trained), "heldout_tiles": len(plan.heldout_tiles),
                   "heldout_region_tiles": len(plan.heldout_regions),
                   "region_blocks_z4": [list(b) for b in plan.region_blocks],
                   "extra_training_tiles": len(plan.extra), "views": counts},
        "timings_s": timings, "results": results,
    }


def _machine(cfg: Config) -> str:
    where = "" if cfg.device == "cpu" else f", device {cfg.device} ({torch.cuda.get_device_name(cfg.device)})"
    return (f"{platform.processor() or platform.machine()} ({os.cpu_count()} cores), torch {torch.__version__} "
            f"({cfg.threads} thread{'s' if cfg.threads > 1 else ''}){where}")


def _pct(x: float | None) -> str:
    return "-" if x is None or x != x else f"{100 * x:.1f} %"


def _section(cfg: Config, source: str, plan: Plan, counts: dict[str, int], reports: dict[str, EvalReport],
             history: dict[int, list[tuple[int, float | None, float | None, float | None]]],
             timings: dict[str, float]) -> str:
    now = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    lines = [
        f"## training experiment: map encoders on Blue Marble views, held out by place: {now}",
        "",
        f"- command: `{cfg.command}`",
        f"- machine: {_machine(cfg)}, load avg {os.getloadavg()[0]:.2f} at end",
        f"- imagery: `{source}`; index: whole world, levels "
        + ", ".join(f"z{z} ({4**z:,} tiles)" for z in cfg.zooms),
        f"- encoder: `{cfg.encoder}` (photo encoder frozen; map encoders trained "
        + " then ".join(f"z{z}" for z in reversed(cfg.zooms)) + f", head `{cfg.head}`, "
        f"{cfg.epochs} epochs, batch {cfg.batch_size}, Adam lr {cfg.lr:g}, logit scale {cfg.logit_scale:.2f}, "
        f"{cfg.negatives} extra negatives per step, L2-SP {cfg.l2sp:g})",
        f"- places (|lat| < 70): {len(plan.trained)} evaluation tiles trained on, {len(plan.heldout_tiles)} "
        f"evaluation tiles never trained on, {len(plan.heldout_regions)} tiles evaluated in {len(plan.region_blocks)} "
        f"regions of 2x2 zoom-4 tiles never trained on, {len(plan.extra)} further training tiles "
        f"({cfg.train_views} views each)",
        "- views: centre anywhere in the tile, zoom 5.4-6.6, any rotation, brightness/colour/contrast changes, "
        "Gaussian blur 0-1.5 px; " + ", ".join(f"{v} {k}" for k, v in counts.items()),
        "- wall time: " + ", ".join(f"{k} {v:.0f} s" for k, v in timings.items()),
        "",
        "Tile top-1 = the true tile ranked first at that level; k = beam width (a k that keeps every tile of "
        "the level above makes that level's figure exhaustive retrieval).",
        "",
        "| split | encoders | k | " + " | ".join(f"z{z} tile top-1 | z{z} beam recall" for z in cfg.zooms)
        + " | median error km | 200 km | 750 km | 2500 km |",
        "|---|---|---:|" + "---:|---:|" * len(cfg.zooms) + "---:|---:|---:|---:|",
    ]
    for split_name, _, label in SPLITS:
        for when in ("before", "after"):
            rep = reports[f"{when}-{split_name}"]
            for r in rep.results:
                levels = " | ".join(f"{_pct(r.tile_top1[z])} | {_pct(r.beam_recall[z])}" for z in cfg.zooms)
                lines.append(
                    f"| {label} | {'untrained' if when == 'before' else 'trained'} | {r.k} | {levels} "
                    f"| {r.median_km:,.0f} "
                    f"| {_pct(r.accuracy[200.0])} | {_pct(r.accuracy[750.0])} | {_pct(r.accuracy[2500.0])} |")
    lines += ["", "Training (loss per epoch):", "", "| level | epoch | mean loss |", "|---|---:|---:|"]
    for zoom in sorted(history, reverse=True):
        for epoch, loss, _top1, _top5 in history[zoom]:
            lines.append(f"| z{zoom} | {epoch} | {'-' if loss is None else f'{loss:.3f}'} |")
    lines += ["", ""]  # a blank line after the table, so that notes appended below stay out of it
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    return pipeline_main(argv, parse_args, run)


if __name__ == "__main__":
    raise SystemExit(main())
