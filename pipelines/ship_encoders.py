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
import dataclasses
import datetime as dt
import json
import logging
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mercantile
import numpy as np

from geoindex.files import atomic_path, atomic_write_bytes, file_sha256
from geoindex.models.encoders import create_encoder, load_map_encoder
from geoindex.sources import open_source
from geoindex.training.shipped import MANIFEST, SHIPPED_ROOT, CheckSet, check_top1
from pipelines import experiment
from pipelines._cli import pipeline_main

log = logging.getLogger("pipelines.ship_encoders")


# The demo index's imagery and zooms, the recipe the experiment chose, and every tile trained on.
RECIPE = experiment.Config(out=Path("indexes/ship-encoders"), source="bluemarble", schedule=(2, 6, 2),
                           train_tiles="all", precision="fp32", recipe_name="shipped", results_json=None)


@dataclass(frozen=True)
class Config:
    """Arguments of the shipping run (see ``parse_args``): the experiment that trains and measures the
    encoders, and what is shipped from it."""

    experiment: experiment.Config = RECIPE
    dest: Path | None = None
    check_views: int = 32
    check_candidates: int = 64

    @property
    def quiet(self) -> bool:
        return self.experiment.quiet


def parse_args(argv: Sequence[str] | None = None) -> Config:
    p = argparse.ArgumentParser(prog="python -m pipelines.ship_encoders", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=RECIPE.out, help=f"working folder (default: {RECIPE.out})")
    p.add_argument("--dest", type=Path, help=f"where the checkpoints go (default: {SHIPPED_ROOT}/<encoder>)")
    p.add_argument("--source", default=RECIPE.source, help=f"the demo index's imagery (default: {RECIPE.source})")
    experiment.add_recipe_arguments(p, RECIPE)
    p.add_argument("--check-views", type=int, default=Config.check_views,
                   help="held-out views in each zoom's check set")
    p.add_argument("--check-candidates", type=int, default=Config.check_candidates,
                   help="tiles each check view is ranked against")
    p.add_argument("--no-record", action="store_true", help="do not append the experiment to benchmarks/RESULTS.md")
    a = p.parse_args(argv)
    recipe = dataclasses.replace(RECIPE, out=a.out, source=a.source,
                                 results_md=None if a.no_record else RECIPE.results_md,
                                 command=experiment.command_line("pipelines.ship_encoders", argv),
                                 **experiment.recipe_from_arguments(a))
    return Config(recipe, a.dest, a.check_views, a.check_candidates)


def _check_sets(cfg: Config, heldout: Sequence[mercantile.Tile], zooms: Sequence[int]) -> dict[int, CheckSet]:
    """Per zoom: views of the first held-out tiles against their true tiles plus seeded distractors."""
    view_tiles = tuple(sorted(heldout, key=lambda t: (t.y, t.x))[: cfg.check_views])
    sets = {}
    for zoom in zooms:
        truths = sorted({mercantile.parent(t, zoom=zoom) if t.z > zoom else t for t in view_tiles})
        others = [mercantile.Tile(x, y, zoom) for y in range(2**zoom) for x in range(2**zoom)]
        others = [t for t in others if t not in truths]
        rng = np.random.default_rng([cfg.experiment.seed, zoom])
        extra = rng.choice(len(others), size=min(len(others), max(0, cfg.check_candidates - len(truths))),
                           replace=False)
        candidates = tuple(truths + sorted(others[i] for i in extra.tolist()))
        sets[zoom] = CheckSet(zoom, view_tiles, cfg.experiment.seed + 1000, candidates)
    return sets


def run(cfg: Config) -> dict[str, Any]:
    exp = cfg.experiment
    experiment.run(exp)
    work = exp.out / exp.recipe_name
    figures = json.loads((work / "experiment.json").read_text())
    plan = json.loads((exp.out / "plan.json").read_text())["plan"]
    checkpoints = work / "checkpoints"
    dest = cfg.dest or SHIPPED_ROOT / exp.encoder
    dest.mkdir(parents=True, exist_ok=True)

    base = create_encoder(exp.encoder, precision="fp32")
    assert exp.source is not None  # RECIPE names one
    source = open_source(exp.source)
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
        "format": "geoindex-shipped-encoders/1", "encoder": exp.encoder, "base_fingerprint": base.base_fingerprint,
        "imagery": exp.source, "schedule": list(exp.schedule), "head": exp.head, "command": exp.command,
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
