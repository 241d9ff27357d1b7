"""Small helpers shared by the pipeline command lines: logging, progress bars, error exit codes."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from tqdm import tqdm

from geoindex.errors import GeoIndexError


def setup_logging(quiet: bool) -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    for name in ("geoindex", "pipelines"):
        logging.getLogger(name).setLevel(logging.WARNING if quiet else logging.INFO)


@contextmanager
def progress_bar(desc: str, *, quiet: bool, unit: str = "tile") -> Iterator[tqdm]:
    """A tqdm bar on stderr, shown only on a terminal unless quiet."""
    bar = tqdm(desc=desc, unit=unit, dynamic_ncols=True, disable=quiet or not sys.stderr.isatty(),
               file=sys.stderr, smoothing=0.1)
    try:
        yield bar
    finally:
        bar.close()


def run_main(body: Callable[[], int]) -> int:
    """Run a command's body; a GeoIndexError becomes one clear line on stderr and exit status 2."""
    try:
        return body()
    except GeoIndexError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; finished shards and tiles are kept, rerun to resume", file=sys.stderr)
        return 130
