"""Small helpers shared by the pipeline command lines: logging, progress bars, error exit codes."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Protocol, TypeVar

from tqdm import tqdm

from geoindex.interfaces.cli import run_command
from geoindex.models.malloc import keep_freed_memory


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
    return run_command(body, interrupted="interrupted; finished shards and tiles are kept, rerun to resume")


class _Options(Protocol):
    @property
    def quiet(self) -> bool: ...


C = TypeVar("C", bound=_Options)
R = TypeVar("R")


def pipeline_main(
    argv: Sequence[str] | None,
    parse_args: Callable[[Sequence[str] | None], C],
    run: Callable[[C], R],
    *,
    finish: Callable[[C, R], int] | None = None,
) -> int:
    """A pipeline's ``main``: parse ``argv``, set up logging, ``run(cfg)`` under :func:`run_main`.

    Pipelines are batch programs: freed memory is kept for the next batch (``keep_freed_memory``).

    The exit status is 0, or what ``finish(cfg, result)`` makes of the result (a report to print,
    a status of its own). An argument the pipeline's own checks refuse (a ConfigError from
    ``parse_args``) is a usage error, exit status 2, as argparse's own refusals are.
    """
    parsed: list[C] = []

    def parse() -> int:
        parsed.append(parse_args(argv))
        return 0

    if run_main(parse) != 0:
        return 2
    cfg = parsed[0]
    setup_logging(cfg.quiet)
    keep_freed_memory()

    def body() -> int:
        result = run(cfg)
        return 0 if finish is None else finish(cfg, result)

    return run_main(body)
