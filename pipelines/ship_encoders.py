"""Train the map encoders that ship in the package for the demo's world index, and record how they do.

`python -m pipelines.ship_encoders` (EfficientNet-Lite0, the embedded Blue Marble raster, zoom 2, 4
and 6 as `make demo` builds them; about 20-40 minutes on a 2-core CPU):

1. runs ``pipelines.experiment`` on that imagery and schedule with the chosen recipe: views of
   every tile except held-out tiles and regions train the map encoders, and the figures on the
   held-out places are measured before and after (appended to benchmarks/RESULTS.md);
2. copies the checkpoints to ``geoindex/checkpoints/<encoder>/`` and writes ``shipped.json`` last:
   the command, the recipe, each file's sha256, the experiment's figures, and per zoom a small
   fixed check set of held-out views with the top-1 measured here, which a test reproduces.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import shlex
import shutil
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mercantile
import numpy as np

from geoindex.encoders import HEADS, create_encoder, load_map_encoder
from geoindex.files import atomic_path, atomic_write_bytes, file_sha256
from geoindex.shipped import MANIFEST, SHIPPED_ROOT, CheckSet, check_top1
from geoindex.sources import open_source
from pipelines import experiment
from pipelines._cli import pipeline_main

log = logging.getLogger("pipelines.ship_encoders")


@dataclass(frozen=True)
class Config:
    """Arguments of the shipping run; see ``parse_args``."""

    out: Path = Path("indexes/ship-encoders")
    dest: Path | None = None
    encoder: str = "efficientnet-lite0"
    source: str = "bluemarble"
    schedule: tuple[int, int, int] = (2, 6, 2)
    head: str = "projection"
    epochs: int = 10
    batch_size: int = 128
    lr: float = 3e-4
    l2sp: float = 0.0
    negatives: int = 0
    train_views: int = 2
    tiles: int = 128
    candidates: int = 1024
    check_views: int = 32
    check_candidates: int = 64
    seed: int = 0
    threads: int = 2
    device: str = "cpu"
    record: bool = True
    quiet: bool = False
    command: str = ""


def parse_args(argv: Sequence[str] | None = None) -> Config:
    p = argparse.ArgumentParser(prog="python -m pipelines.ship_encoders", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Config.out, help=f"working folder (default: {Config.out})")
    p.add_argument("--dest", type=Path, help=f"where the checkpoints go (default: {SHIPPED_ROOT}/<encoder>)")
    p.add_argument("--encoder", default=Config.encoder, help=f"base encoder (default: {Config.encoder})")
    p.add_argument("--source", default=Config.source, help=f"the demo index's imagery (default: {Config.source})")
    p.add_argument("--schedule", type=int, nargs=3, default=list(Config.schedule), metavar=("START", "STOP", "STEP"))
    p.add_argument("--head", choices=HEADS, default=Config.head)
    p.add_argument("--epochs", type=int, default=Config.epochs)
    p.add_argument("--batch-size", type=int, default=Config.batch_size)
    p.add_argument("--lr", type=float, default=Config.lr)
    p.add_argument("--l2sp", type=float, default=Config.l2sp)
    p.add_argument("--negatives", type=int, default=Config.negatives)
    p.add_argument("--train-views", type=int, default=Config.train_views)
    p.add_argument("--tiles", type=int, default=Config.tiles, help="evaluation tiles (half of them held out)")
    p.add_argument("--candidates", type=int, default=Config.candidates,
                   help="random tiles the most textured --tiles are chosen from")
    p.add_argument("--check-views", type=int, default=Config.check_views,
                   help="held-out views in each zoom's check set")
    p.add_argument("--check-candidates", type=int, default=Config.check_candidates,
                   help="tiles each check view is ranked against")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=Config.threads)
    p.add_argument("--device", default=Config.device, help="torch device for training and building (default: cpu); "
                   "the check sets are always measured on the CPU at fp32, as the test does")
    p.add_argument("--no-record", action="store_true", help="do not append the experiment to benchmarks/RESULTS.md")
    p.add_argument("--quiet", action="store_true")
    a = p.parse_args(argv)
    command = "python -m pipelines.ship_encoders " + " ".join(
        shlex.quote(x) for x in (argv if argv is not None else sys.argv[1:]))
    return Config(out=a.out, dest=a.dest, encoder=a.encoder, source=a.source, schedule=tuple(a.schedule),
                  head=a.head, epochs=a.epochs, batch_size=a.batch_size, lr=a.lr, l2sp=a.l2sp,
                  negatives=a.negatives, train_views=a.train_views, tiles=a.tiles, candidates=a.candidates,
                  check_views=a.check_views, check_candidates=a.check_candidates,
                  seed=a.seed, threads=a.threads, device=a.device, record=not a.no_record, quiet=a.quiet,
                  command=command.strip())


def _check_sets(cfg: Config, heldout: Sequence[mercantile.Tile], zooms: Sequence[int]) -> dict[int, CheckSet]:
    """Per zoom: views of the first held-out tiles against their true tiles plus seeded distractors."""
    view_tiles = tuple(sorted(heldout, key=lambda t: (t.y, t.x))[: cfg.check_views])
    sets = {}
    for zoom in zooms:
        truths = sorted({mercantile.parent(t, zoom=zoom) if t.z > zoom else t for t in view_tiles})
        others = [mercantile.Tile(x, y, zoom) for y in range(2**zoom) for x in range(2**zoom)]
        others = [t for t in others if t not in truths]
        rng = np.random.default_rng([cfg.seed, zoom])
        extra = rng.choice(len(others), size=min(len(others), max(0, cfg.check_candidates - len(truths))),
                           replace=False)
        candidates = tuple(truths + sorted(others[i] for i in extra.tolist()))
        sets[zoom] = CheckSet(zoom, view_tiles, cfg.seed + 1000, candidates)
    return sets


def run(cfg: Config) -> dict[str, Any]:
    exp = experiment.Config(
        out=cfg.out, source=cfg.source, encoder=cfg.encoder, schedule=cfg.schedule, head=cfg.head,
        epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr, l2sp=cfg.l2sp, negatives=cfg.negatives,
        train_views=cfg.train_views, tiles=cfg.tiles, candidates=cfg.candidates,
        train_tiles="all", seed=cfg.seed, threads=cfg.threads, device=cfg.device, precision="fp32",
        recipe_name="shipped",
        results_md=experiment.RESULTS_MD if cfg.record else None, results_json=None, quiet=cfg.quiet,
        command=cfg.command,
    )
    experiment.run(exp)
    figures = json.loads((cfg.out / "shipped" / "experiment.json").read_text())
    plan = json.loads((cfg.out / "plan.json").read_text())["plan"]
    checkpoints = cfg.out / "shipped" / "checkpoints"
    dest = cfg.dest or SHIPPED_ROOT / cfg.encoder
    dest.mkdir(parents=True, exist_ok=True)

    base = create_encoder(cfg.encoder, precision="fp32")
    source = open_source(cfg.source)
    heldout = [mercantile.Tile(*t) for t in plan["heldout_tiles"]]
    files, checks = {}, {}
    for zoom, check in _check_sets(cfg, heldout, exp.zooms).items():
        name = f"z{zoom:02d}.pt"
        with atomic_path(dest / name) as tmp:
            shutil.copyfile(checkpoints / name, tmp)
        files[str(zoom)] = {"file": name, "sha256": file_sha256(dest / name), "bytes": (dest / name).stat().st_size}
        top1 = check_top1(base, load_map_encoder(base, dest / name), source, check)
        untrained = check_top1(base, base, source, check)
        checks[str(zoom)] = {"set": check.to_json(), "top1": top1, "untrained_top1": untrained}
        log.info("z%02d: check set top-1 %.3f (untrained %.3f), %s", zoom, top1, untrained, dest / name)
    record = {
        "format": "geoindex-shipped-encoders/1", "encoder": cfg.encoder, "base_fingerprint": base.base_fingerprint,
        "imagery": cfg.source, "schedule": list(cfg.schedule), "head": cfg.head, "command": cfg.command,
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d"),
        "trained_on": "satellite views of the imagery (off-grid, rescaled, rotated, recoloured), not ground photos",
        "files": files, "checks": checks,
        "heldout": {"recipe": figures["recipe"], "places": figures["places"], "results": figures["results"],
                    "machine": figures["machine"], "k": figures["results"]["trained"]["heldout_tiles"]["k"]},
    }
    atomic_write_bytes(dest / MANIFEST, json.dumps(record, indent=1).encode())
    log.info("shipped %d map encoders to %s", len(files), dest)
    return record


def main(argv: Sequence[str] | None = None) -> int:
    return pipeline_main(argv, parse_args, run)


if __name__ == "__main__":
    raise SystemExit(main())
