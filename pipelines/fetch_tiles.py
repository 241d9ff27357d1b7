"""Download map tiles into a local store: `python -m pipelines.fetch_tiles --source S --out D --zoom 4 6`.

Tiles land in DIR/{z}/{x}/{y}.{ext} (ext from the image format), which `--source DIR` and
geoindex.sources.DirectorySource read. Every image is validated before it is stored; reruns
skip stored tiles and tiles the server reported missing (DIR/missing.json) unless
--retry-missing. Exit status 1 when some tiles still failed: rerun to retry them.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import mercantile
import numpy as np
from tqdm.contrib.logging import logging_redirect_tqdm

from geoindex.errors import ConfigError
from geoindex.geometry.coverage import Coverage
from geoindex.geometry.tiles import MAX_ZOOM
from geoindex.sources import FetchSummary, fetch_to_directory, open_source
from pipelines._cli import progress_bar, run_main, setup_logging

log = logging.getLogger("pipelines.fetch_tiles")


@dataclass(frozen=True)
class Config:
    """Arguments of a fetch; see ``parse_args`` for their meaning."""

    source: str
    out: Path
    zooms: tuple[int, ...]
    bbox: tuple[float, float, float, float] | None = None
    geojson: Path | None = None
    workers: int = 8
    max_rps: float | None = 10.0
    retries: int = 5
    timeout: float = 10.0
    retry_missing: bool = False
    quiet: bool = False

    def __post_init__(self) -> None:
        if not self.zooms or any(not 0 <= z <= MAX_ZOOM for z in self.zooms):
            raise ConfigError(f"--zoom needs one or more zooms in 0..{MAX_ZOOM}, got {list(self.zooms)}")
        if self.bbox and self.geojson:
            raise ConfigError("give either --bbox or --geojson, not both")

    def coverage(self) -> Coverage:
        """The area to fetch: --bbox, --geojson, or the whole world."""
        return Coverage.from_options(self.bbox, self.geojson)


def parse_args(argv: Sequence[str] | None = None) -> Config:
    """Command line -> Config (argparse exits with status 2 on malformed arguments)."""
    p = argparse.ArgumentParser(
        prog="python -m pipelines.fetch_tiles",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--source",
        required=True,
        help="an XYZ URL template ('https://host/{z}/{x}/{y}.png', {s} and {q} allowed), an xyzservices "
        "provider ('Esri.WorldImagery', 'xyz:NAME?apikey=KEY'), a .mbtiles file, a tile folder, "
        "'raster:PATH' or 'bluemarble'",
    )
    p.add_argument("--out", type=Path, required=True, help="tile store folder, DIR/{z}/{x}/{y}.{ext}")
    p.add_argument("--zoom", type=int, nargs="+", required=True, help="zoom level(s) to fetch, e.g. 4 6 8")
    where = p.add_mutually_exclusive_group()
    where.add_argument(
        "--bbox", type=float, nargs=4, metavar=("W", "S", "E", "N"), help="fetch only this area"
    )
    where.add_argument(
        "--geojson", type=Path, help="fetch only tiles meeting the polygons of this GeoJSON file"
    )
    p.add_argument("--workers", type=int, default=8, help="concurrent downloads (default: 8)")
    p.add_argument(
        "--max-rps", type=float, default=10.0, help="requests per second, all workers together; 0 = no limit"
    )
    p.add_argument(
        "--retries", type=int, default=5, help="retries per tile after the first attempt (default: 5)"
    )
    p.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for a server (default: 10)")
    p.add_argument("--retry-missing", action="store_true", help="request tiles an earlier run found missing")
    p.add_argument("--quiet", action="store_true", help="no progress bar, warnings only")
    a = p.parse_args(argv)
    return Config(
        source=a.source,
        out=a.out,
        zooms=tuple(a.zoom),
        bbox=tuple(a.bbox) if a.bbox else None,
        geojson=a.geojson,
        workers=a.workers,
        max_rps=a.max_rps or None,
        retries=a.retries,
        timeout=a.timeout,
        retry_missing=a.retry_missing,
        quiet=a.quiet,
    )


def _tiles(levels: dict[int, tuple[np.ndarray, np.ndarray]]) -> Iterator[mercantile.Tile]:
    for zoom, (x, y) in levels.items():
        for tx, ty in zip(x.tolist(), y.tolist(), strict=True):
            yield mercantile.Tile(tx, ty, zoom)


def run(cfg: Config) -> FetchSummary:
    """Fetch every tile of the coverage at the requested zooms into ``cfg.out``."""
    coverage = cfg.coverage()
    levels = {zoom: coverage.tiles(zoom=zoom) for zoom in cfg.zooms}
    total = sum(len(x) for x, _ in levels.values())
    source = open_source(
        cfg.source,
        timeout=cfg.timeout,
        max_retries=cfg.retries,
        max_rps=cfg.max_rps,
        pool_size=max(10, cfg.workers),
    )
    log.info("fetching %d tiles at zoom %s from %s into %s", total, list(cfg.zooms), source.name, cfg.out)
    try:
        with progress_bar("fetch", quiet=cfg.quiet) as bar, logging_redirect_tqdm():
            return fetch_to_directory(
                source,
                cfg.out,
                _tiles(levels),
                total=total,
                workers=cfg.workers,
                retry_missing=cfg.retry_missing,
                progress=bar,
            )
    finally:
        close = getattr(source, "close", None)
        if close is not None:
            close()


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; exit status 0 when every tile is stored or known missing, 1 when some failed."""

    def body() -> int:
        cfg = parse_args(argv)
        setup_logging(cfg.quiet)
        summary = run(cfg)
        retry = "" if summary.ok else "; rerun the same command to retry the failed tiles"
        print(f"{summary.line()} -> {cfg.out}{retry}")
        return 0 if summary.ok else 1

    return run_main(body)


if __name__ == "__main__":
    raise SystemExit(main())
