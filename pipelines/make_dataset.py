"""Make the photo CSV from a folder of photos with EXIF GPS: `python -m pipelines.make_dataset PHOTOS --out photos.csv`.

Every image under the folder (recursively) whose EXIF carries a usable GPS position becomes one
row `path,lat,lon` (paths relative to the CSV's folder), the input of pipelines.train and
pipelines.evaluate. Photos without GPS, and files that are not readable images, are reported
(and listed with --missing FILE) but not written.
"""

from __future__ import annotations

import argparse
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from geoindex.errors import ConfigError, ImageError
from geoindex.exif import read_gps
from geoindex.files import atomic_write_bytes
from geoindex.training.dataset import PhotoTable, write_photo_csv
from pipelines._cli import pipeline_main, progress_bar

log = logging.getLogger("pipelines.make_dataset")

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".tif", ".tiff", ".png", ".webp", ".heic", ".heif")


@dataclass(frozen=True)
class Config:
    """Arguments of make_dataset; see ``parse_args`` for their meaning."""

    photos: Path
    out: Path = Path("photos.csv")
    missing: Path | None = None
    recursive: bool = True
    quiet: bool = False


@dataclass(frozen=True)
class Summary:
    """What make_dataset found: the table written, photos without GPS, unreadable files."""

    table: PhotoTable
    without_gps: tuple[str, ...]
    unreadable: tuple[str, ...]


def parse_args(argv: Sequence[str] | None = None) -> Config:
    p = argparse.ArgumentParser(prog="python -m pipelines.make_dataset", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("photos", type=Path, help="folder of photos")
    p.add_argument("--out", type=Path, default=Config.out, help="CSV to write (default: photos.csv)")
    p.add_argument("--missing", type=Path, help="also list the photos without GPS (and unreadable files) here")
    p.add_argument("--no-recursive", action="store_true", help="only the folder itself, not its subfolders")
    p.add_argument("--quiet", action="store_true", help="no progress bar, warnings only")
    a = p.parse_args(argv)
    return Config(a.photos, a.out, a.missing, not a.no_recursive, a.quiet)


def find_photos(folder: Path, *, recursive: bool = True) -> list[Path]:
    """Image files under ``folder`` (by suffix, any case), sorted."""
    if not folder.is_dir():
        raise ConfigError(f"photo folder {folder} does not exist or is not a folder")
    files = folder.rglob("*") if recursive else folder.iterdir()
    return sorted(p for p in files if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def run(cfg: Config) -> Summary:
    """Read every photo's EXIF GPS, write the CSV, report the photos without GPS."""
    started = time.perf_counter()
    files = find_photos(cfg.photos, recursive=cfg.recursive)
    paths: list[str] = []
    lat: list[float] = []
    lon: list[float] = []
    without: list[str] = []
    unreadable: list[str] = []
    with progress_bar("read EXIF", quiet=cfg.quiet, unit="photo") as bar:
        bar.reset(total=len(files))
        for f in files:
            try:
                gps = read_gps(f)
            except ImageError as e:
                log.warning("%s", e)
                unreadable.append(str(f))
                gps = None
            else:
                if gps is None:
                    without.append(str(f))
            if gps is not None:
                paths.append(str(f))
                lat.append(gps[0])
                lon.append(gps[1])
            bar.update(1)
    table = PhotoTable(tuple(paths), np.asarray(lat), np.asarray(lon), source=str(cfg.photos))
    cfg.out.parent.mkdir(parents=True, exist_ok=True)
    write_photo_csv(cfg.out, table, relative_to=cfg.out.parent)
    if cfg.missing is not None:
        lines = [f"{p}\tno GPS" for p in without] + [f"{p}\tunreadable" for p in unreadable]
        atomic_write_bytes(cfg.missing, ("\n".join(lines) + "\n" if lines else "").encode())
    if without:
        shown = ", ".join(Path(p).name for p in without[:5]) + (", ..." if len(without) > 5 else "")
        log.warning("%d photos have no EXIF GPS and were left out (%s)%s", len(without), shown,
                    f"; all listed in {cfg.missing}" if cfg.missing else "; list them all with --missing FILE")
    log.info("%d photos: %d with GPS -> %s, %d without GPS, %d unreadable (%.1f s)", len(files), len(table),
             cfg.out, len(without), len(unreadable), time.perf_counter() - started)
    return Summary(table, tuple(without), tuple(unreadable))


def main(argv: Sequence[str] | None = None) -> int:
    return pipeline_main(argv, parse_args, run)


if __name__ == "__main__":
    raise SystemExit(main())
