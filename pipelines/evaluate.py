"""Evaluate geolocation on photos with known coordinates: `python -m pipelines.evaluate --photos test.csv --k 16 32 64`.

Reports accuracy within 1/25/200/750/2500 km (great-circle), median error, per-level tile top-1 and
beam recall (how often the true tile survived each level), and time per image, for each beam
width k (the paper's Table 1 layout). Indexed mode searches a built index; on-the-fly mode runs
the paper's inference over the same tiles and encoders, encoding candidate tiles at query time
from --source. Writes <out>.json and <out>.md (and <out>.predictions.csv with --predictions).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import os
import shlex
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from geoindex.api import OnTheFlySearcher, open_index
from geoindex.errors import ConfigError
from geoindex.files import atomic_write_bytes
from geoindex.models.encoders import PRECISIONS
from geoindex.models.precision import PRECISION_HELP
from geoindex.retrieval.beam import PriorOptions
from geoindex.sources import open_source
from geoindex.training.dataset import read_photo_csv
from geoindex.training.evaluate import EvalReport, Predictions, evaluate
from pipelines._cli import pipeline_main, progress_bar

log = logging.getLogger("pipelines.evaluate")


@dataclass(frozen=True)
class Config:
    """Arguments of an evaluation; see ``parse_args`` for their meaning."""

    photos: Path
    index: Path = Path("indexes/default")
    ks: tuple[int, ...] = (64,)
    mode: str = "indexed"
    source: str | None = None
    image_root: Path | None = None
    out: Path = Path("results/eval")
    weights: str | None = None
    device: str = "cpu"
    precision: str = "auto"
    limit: int | None = None
    query_batch: int | None = None
    predictions: bool = False
    threads: int | None = None
    quiet: bool = False
    command: str = ""
    prior: str | None = None
    prior_mode: str = "inject"
    prior_weight: float = 0.5
    geoclip_backbone: str | None = None

    def __post_init__(self) -> None:
        if self.mode not in ("indexed", "onthefly"):
            raise ConfigError(f"--mode must be indexed or onthefly, got {self.mode!r}")
        if self.mode == "onthefly" and not self.source:
            raise ConfigError("--mode onthefly encodes tiles at query time: give their --source")


def parse_args(argv: Sequence[str] | None = None) -> Config:
    p = argparse.ArgumentParser(prog="python -m pipelines.evaluate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--photos", type=Path, required=True, help="CSV of photos with true coordinates: path, lat, lon")
    p.add_argument("--image-root", type=Path, help="folder relative photo paths start from (default: the CSV's)")
    p.add_argument("--index", type=Path, default=Path(os.environ.get("GEOINDEX_INDEX", "indexes/default")),
                   help="index folder (default: $GEOINDEX_INDEX or indexes/default)")
    p.add_argument("--k", type=int, nargs="+", default=[64], help="beam width(s) to sweep, e.g. 16 32 64")
    p.add_argument("--mode", choices=("indexed", "onthefly"), default="indexed",
                   help="search the index, or encode the index's tiles at query time (the paper's inference)")
    p.add_argument("--source", help="tile source for --mode onthefly (the one the index was built from)")
    p.add_argument("--out", type=Path, default=Config.out, help="report path without suffix (default: results/eval)")
    p.add_argument("--weights", help="local weights file of the photo encoder")
    p.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    p.add_argument("--precision", default="auto", choices=PRECISIONS,
                   help=f"photo encoder arithmetic: {PRECISION_HELP}")
    p.add_argument("--limit", type=int, help="evaluate only the first N photos")
    p.add_argument("--query-batch", type=int,
                   help="photos per search call (default: 256 indexed, 1 on the fly: the per-photo cost)")
    p.add_argument("--predictions", action="store_true", help="also write <out>.predictions.csv")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--quiet", action="store_true", help="no progress bar, warnings only")
    p.add_argument("--prior", choices=["geoclip"],
                   help="add GeoCLIP's belief (pip install -e '.[geoclip]' in the geoindex checkout)")
    p.add_argument("--prior-mode", choices=["inject", "rerank"], default="inject",
                   help="inject: GeoCLIP's top tile joins the beam (the paper's Table 3); rerank: combined scores")
    p.add_argument("--prior-weight", type=float, default=0.5, help="rerank weight in [0, 1] (default: 0.5)")
    p.add_argument("--geoclip-backbone", help="local folder of openai/clip-vit-large-patch14")
    a = p.parse_args(argv)
    if a.mode == "onthefly" and not a.source:
        p.error("--mode onthefly encodes tiles at query time: give their --source")
    command = "python -m pipelines.evaluate " + " ".join(
        shlex.quote(x) for x in (argv if argv is not None else sys.argv[1:]))
    return Config(
        photos=a.photos, index=a.index, ks=tuple(a.k), mode=a.mode, source=a.source, image_root=a.image_root,
        out=a.out, weights=a.weights, device=a.device, precision=a.precision, limit=a.limit,
        query_batch=a.query_batch,
        predictions=a.predictions, threads=a.threads, quiet=a.quiet, command=command, prior=a.prior,
        prior_mode=a.prior_mode, prior_weight=a.prior_weight, geoclip_backbone=a.geoclip_backbone,
    )


def run(cfg: Config) -> EvalReport:
    """Evaluate, write <out>.json and <out>.md, and return the report."""
    started = time.perf_counter()
    if cfg.threads:
        import torch

        torch.set_num_threads(cfg.threads)
    table = read_photo_csv(cfg.photos, image_root=cfg.image_root)
    if cfg.limit is not None:
        table = table.subset(np.arange(min(cfg.limit, len(table))))
    index = open_index(cfg.index, weights=cfg.weights, device=cfg.device, precision=cfg.precision)
    searcher = index if cfg.mode == "indexed" else OnTheFlySearcher.for_index(index, open_source(cfg.source or ""))
    query_batch = cfg.query_batch or (256 if cfg.mode == "indexed" else 1)
    prior, prior_options = None, None
    if cfg.prior is not None:
        from geoindex.retrieval.prior import load_geoclip_prior

        prior = load_geoclip_prior(cfg.geoclip_backbone, device=cfg.device)
        prior_options = PriorOptions(cfg.prior_mode, cfg.prior_weight)  # type: ignore[arg-type]
    rows_out: list[list[object]] = []

    def on_predictions(k: int, rows: np.ndarray, pred: Predictions, errors: np.ndarray) -> None:
        if cfg.predictions:
            for j, i in enumerate(rows.tolist()):
                rows_out.append([table.paths[i], k, table.lat[i], table.lon[i], round(float(pred.lat[j]), 6),
                                 round(float(pred.lon[j]), 6), round(float(errors[j]), 3),
                                 f"{pred.zoom[j]}/{pred.x[j]}/{pred.y[j]}"])

    with progress_bar("evaluate", quiet=cfg.quiet, unit="photo") as bar:
        bar.reset(total=len(table) * (1 + len(cfg.ks)))
        report = evaluate(searcher, table, cfg.ks, query_batch=query_batch, progress=bar.update,
                          on_predictions=on_predictions, mode=cfg.mode, index=str(cfg.index),
                          prior=prior, prior_options=prior_options)
    report = EvalReport(report.mode, report.index, report.photos, report.unreadable, report.zooms, report.results,
                        meta={"photos_csv": str(cfg.photos), "command": cfg.command,
                              "encoder": index.manifest.photo_encoder.name,
                              "prior": f"{cfg.prior} ({cfg.prior_mode}, w={cfg.prior_weight})" if cfg.prior else None,
                              "map_checkpoints": {f"z{lv.zoom:02d}": lv.encoder.checkpoint if lv.encoder else None
                                                  for lv in index.manifest.levels}})
    cfg.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(Path(f"{cfg.out}.json"), json.dumps(report.to_json(), indent=2).encode())
    md = f"`{cfg.command}`\n\n" + report.to_markdown() if cfg.command else report.to_markdown()
    atomic_write_bytes(Path(f"{cfg.out}.md"), md.encode())
    if cfg.predictions:
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(["path", "k", "lat", "lon", "pred_lat", "pred_lon", "error_km", "tile"])
        w.writerows(rows_out)
        atomic_write_bytes(Path(f"{cfg.out}.predictions.csv"), buf.getvalue().encode())
    best = report.results[-1]
    log.info(
        "%d photos, %s, k=%s: median error %.0f km, %s; %s per image; report %s.{json,md} (%.0f s)",
        best.n, cfg.mode, "/".join(map(str, cfg.ks)), best.median_km,
        ", ".join(f"{100 * v:.1f}% @{t:g}km" for t, v in best.accuracy.items()),
        f"{best.ms_per_image:.1f} ms", cfg.out, time.perf_counter() - started,
    )
    return report


def _print_report(cfg: Config, report: EvalReport) -> int:
    if not cfg.quiet:
        print(report.to_markdown())
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return pipeline_main(argv, parse_args, run, finish=_print_report)


if __name__ == "__main__":
    raise SystemExit(main())
