"""Train the per-zoom map encoders with the paper's recipe: `python -m pipelines.train --photos photos.csv`.

Input: a CSV of photos (path, lat, lon; MP-16 / YFCC layout, see geoindex.training.dataset) and a tile
source. The photos are split 10:1:1 into train/val/test (seeded, by photo; a `split` column in
the CSV overrides it) and embedded once with the frozen photo encoder (cached under --out).
Each level's map encoder is then trained contrastively, finest zoom first, each coarser level
starting from the finer one; per epoch it reports validation tile top-1/top-5 accuracy.
Output: <out>/zNN.pt per level (read by `build_index --map-checkpoints <out>`), <out>/train.json,
and <out>/splits/{train,val,test}.csv (evaluate on test.csv). Rerun the same command to resume.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from geoindex.errors import ConfigError
from geoindex.geometry.coverage import Coverage
from geoindex.geometry.tiles import LevelSchedule, tile_code_array
from geoindex.models.encoders import AUTO_ENCODER, ENCODER_CHOICES, HEADS, create_encoder
from geoindex.models.threads import cpu_cores
from geoindex.sources import open_source
from geoindex.training.dataset import SPLITS, photo_embeddings, read_photo_csv, table_splits, write_photo_csv
from geoindex.training.train import LevelResult, TrainConfig, train_levels
from pipelines._cli import pipeline_main, progress_bar

log = logging.getLogger("pipelines.train")


@dataclass(frozen=True)
class Config:
    """Arguments of a training run; see ``parse_args`` for their meaning."""

    photos: Path
    source: str = "bluemarble"
    out: Path = Path("checkpoints")
    image_root: Path | None = None
    zooms: tuple[int, ...] = LevelSchedule().zooms
    encoder: str = AUTO_ENCODER  # CLIP when its weights are here, else EfficientNet-Lite0
    weights: str | None = None
    download: bool = False
    epochs: int = 5
    batch_size: int = 64
    lr: float = 1e-4
    split: tuple[float, float, float] = (10, 1, 1)
    seed: int = 0
    device: str = "cpu"
    workers: int | None = None  # None: one tile loader per core beyond the first, at most 4
    max_val_photos: int | None = 10_000
    checkpoint_every: int = 200
    threads: int | None = None
    logit_scale: float = TrainConfig.logit_scale
    negatives: int = 0
    cache_trunk_gb: float = 0.0
    head: str = TrainConfig.head
    l2sp: float = 0.0
    bbox: tuple[float, float, float, float] | None = None
    geojson: Path | None = None
    quiet: bool = False

    @property
    def loader_workers(self) -> int:
        """``--workers``, or one per core beyond the one that trains (at most 4): more only compete for the cores."""
        return self.workers if self.workers is not None else min(4, cpu_cores() - 1)

    def train_config(self) -> TrainConfig:
        return TrainConfig(epochs=self.epochs, batch_size=self.batch_size, lr=self.lr, seed=self.seed,
                           device=self.device, workers=self.loader_workers, checkpoint_every=self.checkpoint_every,
                           max_val_photos=self.max_val_photos, logit_scale=self.logit_scale,
                           negatives=self.negatives, cache_trunk_gb=self.cache_trunk_gb, head=self.head,
                           l2sp=self.l2sp)


def parse_args(argv: Sequence[str] | None = None) -> Config:
    p = argparse.ArgumentParser(prog="python -m pipelines.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--photos", type=Path, required=True, help="CSV of photos: path, lat, lon (MP-16: IMG_ID, LAT, LON)")
    p.add_argument("--image-root", type=Path, help="folder relative photo paths start from (default: the CSV's)")
    p.add_argument("--source", default="bluemarble",
                   help="tile source: a tile folder, .mbtiles, URL template, xyzservices name or bluemarble")
    p.add_argument("--out", type=Path, default=Config.out, help="output folder (default: checkpoints)")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--zooms", type=int, nargs="+", help="zoom levels to train (trained finest first)")
    which.add_argument("--schedule", type=int, nargs=3, metavar=("START", "STOP", "STEP"),
                       help="train every level of this schedule (default: 4 16 2, the paper's)")
    p.add_argument("--encoder", default=Config.encoder, choices=ENCODER_CHOICES,
                   help="base encoder: the frozen photo encoder and every map encoder's start (default: auto, "
                        "CLIP ViT-B/32 when its weights are here, else EfficientNet-Lite0)")
    p.add_argument("--weights", help="local weights file for the encoder (else the local model caches)")
    p.add_argument("--download", action="store_true", help="download missing encoder weights")
    p.add_argument("--epochs", type=int, default=Config.epochs, help="epochs per level (paper: 5)")
    p.add_argument("--batch-size", type=int, default=Config.batch_size, help="photos per batch (paper: 64)")
    p.add_argument("--lr", type=float, default=Config.lr, help="Adam learning rate (paper: 1e-4)")
    p.add_argument("--split", type=float, nargs=3, default=Config.split, metavar=("TRAIN", "VAL", "TEST"),
                   help="train:val:test ratio, by photo (paper: 10 1 1); a `split` column overrides it")
    p.add_argument("--seed", type=int, default=0, help="seed of the split and of the batch order")
    p.add_argument("--device", default="auto", help="torch device: auto (CUDA when available), cpu, cuda")
    p.add_argument("--workers", type=int,
                   help="tile-loading worker processes (default: one per core beyond the first, at most 4)")
    p.add_argument("--max-val-photos", type=int, default=Config.max_val_photos,
                   help="validation photos scored per epoch (seeded subset; 0 = all)")
    p.add_argument("--checkpoint-every", type=int, default=Config.checkpoint_every,
                   help="steps between saved states (the unit of resumption)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--logit-scale", type=float, default=Config.logit_scale,
                   help=f"similarity scale = 1/temperature (default {Config.logit_scale:g}, CLIP's)")
    p.add_argument("--negatives", type=int, default=0,
                   help="extra negative tiles per step drawn from the whole level inside --bbox/--geojson "
                        "(default 0: the paper's in-batch negatives only)")
    p.add_argument("--cache-trunk-gb", type=float, default=0.0,
                   help="keep each tile's frozen-trunk output in this much memory (speeds up --negatives)")
    p.add_argument("--head", default=TrainConfig.head, choices=HEADS,
                   help="what each map encoder fine-tunes: the paper's last two stages, or only the output "
                        f"projection (default: {TrainConfig.head})")
    p.add_argument("--l2sp", type=float, default=0.0,
                   help="weight of the penalty that keeps the trained weights near their start (default 0: off)")
    p.add_argument("--bbox", type=float, nargs=4, metavar=("W", "S", "E", "N"),
                   help="the region --negatives are drawn from (default: the world)")
    p.add_argument("--geojson", type=Path, help="the region --negatives are drawn from, as polygons")
    p.add_argument("--quiet", action="store_true", help="no progress bars, warnings only")
    a = p.parse_args(argv)
    zooms = tuple(a.zooms) if a.zooms else LevelSchedule(*(a.schedule or (4, 16, 2))).zooms
    device = a.device
    if device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    return Config(
        photos=a.photos, source=a.source, out=a.out, image_root=a.image_root, zooms=zooms, encoder=a.encoder,
        weights=a.weights, download=a.download, epochs=a.epochs, batch_size=a.batch_size, lr=a.lr,
        split=tuple(a.split), seed=a.seed, device=device, workers=a.workers,
        max_val_photos=a.max_val_photos or None, checkpoint_every=a.checkpoint_every, threads=a.threads,
        logit_scale=a.logit_scale, negatives=a.negatives, cache_trunk_gb=a.cache_trunk_gb, head=a.head,
        l2sp=a.l2sp, bbox=tuple(a.bbox) if a.bbox else None, geojson=a.geojson, quiet=a.quiet,
    )


def run(cfg: Config) -> list[LevelResult]:
    """Split, embed the photos (cached), train every level; returns one result per level, finest first."""
    started = time.perf_counter()
    if cfg.threads:
        import torch

        torch.set_num_threads(cfg.threads)
    train_cfg = cfg.train_config()
    table = read_photo_csv(cfg.photos, image_root=cfg.image_root)
    splits = table_splits(table, ratios=cfg.split, seed=cfg.seed)
    if len(splits["train"]) == 0:
        raise ConfigError(f"{cfg.photos}: no training photos after the split {cfg.split}")
    for name in SPLITS:
        write_photo_csv(cfg.out / "splits" / f"{name}.csv", table.subset(splits[name]),
                        relative_to=cfg.out / "splits")
    log.info("%d photos: %s -> %s", len(table), ", ".join(f"{len(splits[s])} {s}" for s in SPLITS),
             cfg.out / "splits")
    source = open_source(cfg.source)
    base = create_encoder(cfg.encoder, weights=cfg.weights, download=cfg.download, device=cfg.device)

    with progress_bar("photo embeddings", quiet=cfg.quiet, unit="photo") as bar:
        def on_plan(total: int, done: int) -> None:
            bar.reset(total=total)
            bar.update(done)

        emb, ok = photo_embeddings(table, base, cfg.out / "cache", batch_size=cfg.batch_size,
                                   workers=max(1, cfg.loader_workers), progress=bar.update, on_plan=on_plan)
    train_rows, val_rows = splits["train"][ok[splits["train"]]], splits["val"][ok[splits["val"]]]

    pools = None
    if cfg.negatives:
        coverage = Coverage.from_options(cfg.bbox, cfg.geojson)
        pools = {z: tile_code_array(*coverage.tiles(zoom=z), zoom=z) for z in cfg.zooms}
        log.info("negatives: %d per step from %s", cfg.negatives,
                 ", ".join(f"{len(p):,} z{z} tiles" for z, p in pools.items()))
    key = hashlib.sha256(table.key().encode())
    for name in SPLITS:
        key.update(splits[name].tobytes())
    with progress_bar("train", quiet=cfg.quiet, unit="step") as bar:
        def on_epoch(zoom: int, epoch: int, steps: int, done: int) -> None:
            bar.set_description(f"z{zoom:02d} epoch {epoch}/{cfg.epochs}")
            bar.reset(total=steps)
            bar.update(done)

        def on_step(loss: float) -> None:
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.3f}", refresh=False)

        results = train_levels(
            base, cfg.zooms, photo_emb=emb, lat=table.lat, lon=table.lon, train_rows=train_rows,
            val_rows=val_rows, source=source, out_dir=cfg.out, cfg=train_cfg, run_key=key.hexdigest(),
            on_epoch=on_epoch, on_step=on_step, negative_pools=pools,
        )
    levels = "; ".join(
        f"z{r.zoom:02d} val top-1 {_fmt(r.history[0].val_top1)} -> {_fmt(r.history[-1].val_top1)}"
        + (" (already trained)" if r.skipped else "")
        for r in results
    )
    log.info("trained %d levels on %d photos in %.0f s: %s; checkpoints in %s",
             len(results), len(train_rows), time.perf_counter() - started, levels, cfg.out)
    return results


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def main(argv: Sequence[str] | None = None) -> int:
    return pipeline_main(argv, parse_args, run)


if __name__ == "__main__":
    raise SystemExit(main())
