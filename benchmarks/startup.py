"""Command start-up: wall time of `geoindex --help` and of `geoindex locate` on one photo, before and after.

Each command runs in a fresh process (what a user types), alternating between two trees so that the
machine's drift hits both alike: ``before`` = the ``geoindex`` package at ``--before`` (a git
revision, extracted with ``git archive``), ``after`` = this tree. The index and the photo are the
same for both: ``--index`` (default ``indexes/demo``, from ``make demo``) and ``--photo`` (default
the first photo of ``../shared/data/photos``, else a view rendered from the embedded Blue Marble).
Wall time includes Python's start, every import, opening the index and its encoder, the search and
the output; the page cache is warm after the first round, as the goal assumes.

Run: ``.venv/bin/python benchmarks/startup.py`` (after ``make demo``).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import REPO, BenchRun, Report, benchmark_parser, markdown_table, run_benchmark

NAME = "startup"
SHARED_PHOTOS = REPO.parent / "shared" / "data" / "photos"
HELP_GOAL_S, LOCATE_GOAL_S = 0.5, 4.0  # issue 26, on 2 cores with a warm disk cache


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = benchmark_parser(NAME, __doc__, raw=True, default_encoder="the index's")
    p.add_argument("--before", default="2f69f6a", help="git revision to compare with (default: 2f69f6a, "
                                                       "before the lazy imports)")
    p.add_argument("--index", type=Path, default=REPO / "indexes" / "demo", help="index to locate with")
    p.add_argument("--photo", type=Path, help="photo to locate (default: ../shared/data/photos, else a view)")
    p.add_argument("--rounds", type=int, default=5, help="runs of each command per tree (default 5)")
    p.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "geoindex-bench-startup")
    a = p.parse_args(argv)
    if a.smoke:
        a.rounds = 1
    return a


def _smoke_index(workdir: Path) -> Path:
    """A two-level index of the tiny encoder, for the smoke test (no make demo there)."""
    from geoindex.geometry.coverage import Coverage
    from geoindex.geometry.tiles import LevelSchedule
    from geoindex.models.encoders import create_encoder
    from geoindex.sources import RasterSource
    from geoindex.storage.build import build_level

    path, schedule, encoder = workdir / "index", LevelSchedule(1, 2, 1), create_encoder("tiny")
    for zoom in schedule.zooms:
        build_level(path, zoom, source=RasterSource(), encoder=encoder, coverage=Coverage.world(), schedule=schedule)
    return path


def _photo(a: argparse.Namespace, workdir: Path) -> Path:
    if a.photo is not None:
        return Path(a.photo)
    shared = sorted(SHARED_PHOTOS.glob("*.jpg")) if SHARED_PHOTOS.is_dir() else []
    if shared:
        return shared[0]
    from geoindex.sources import RasterSource

    path = workdir / "view.jpg"
    RasterSource().render_view(46.5, 10.0, zoom=5.3, rotation_deg=15.0).save(path)
    return path


def _wall_s(tree: Path, args: list[str]) -> float:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "geoindex", *args], cwd=tree, env=env, capture_output=True,
                          text=True, timeout=600)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise RuntimeError(f"geoindex {' '.join(args)} in {tree} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return wall


def run(a: argparse.Namespace, argv: Sequence[str] | None) -> Report:
    bench = BenchRun.start(NAME, argv)
    a.workdir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=a.workdir) as tmp:
        work = Path(tmp)
        index = _smoke_index(work) if a.smoke else Path(a.index).resolve()
        if not (index / "manifest.json").is_file():
            raise SystemExit(f"no index at {index}: run `make demo` first, or pass --index")
        photo = _photo(a, work).resolve()
        from geoindex.storage.manifest import Manifest

        encoder = Manifest.load(index).photo_encoder.name
        before = work / "before"
        before.mkdir()
        archive = subprocess.run(["git", "archive", a.before, "geoindex"], cwd=REPO, capture_output=True, check=True)
        subprocess.run(["tar", "-x", "-C", str(before)], input=archive.stdout, check=True)
        commands = {"geoindex --help": ["--help"],
                    "geoindex locate (1 photo)": ["locate", str(photo), "--index", str(index), "-q", "--device",
                                                  "cpu"]}
        times: dict[str, dict[str, list[float]]] = {c: {"before": [], "after": []} for c in commands}
        _wall_s(REPO, commands["geoindex locate (1 photo)"])  # warm the page cache (and any exported graph)
        for _ in range(a.rounds):
            for name, args in commands.items():
                for tree_name, tree in (("before", before), ("after", REPO)):
                    times[name][tree_name].append(_wall_s(tree, args))
    load = os.getloadavg()[0]
    rows = [{"command": c, "before_s": t["before"], "after_s": t["after"],
             "before_median_s": statistics.median(t["before"]), "after_median_s": statistics.median(t["after"])}
            for c, t in times.items()]
    table = markdown_table(
        ["command", "before s (median)", "after s (median)", "speed-up", "all runs before / after s"],
        [[r["command"], r["before_median_s"], r["after_median_s"], r["before_median_s"] / r["after_median_s"],
          " ".join(f"{t:.2f}" for t in r["before_s"]) + " / " + " ".join(f"{t:.2f}" for t in r["after_s"])]
         for r in rows],
    )
    help_s, locate_s = rows[0]["after_median_s"], rows[1]["after_median_s"]
    targets = [(f"geoindex --help < {HELP_GOAL_S} s", f"{help_s:.2f} s", help_s < HELP_GOAL_S),
               (f"geoindex locate, one photo, < {LOCATE_GOAL_S} s wall", f"{locate_s:.2f} s",
                locate_s < LOCATE_GOAL_S)]
    notes = (
        f"Fresh process per run, {a.rounds} rounds alternating before ({a.before}) and after (this tree); "
        f"index {index.name} ({'tiny, smoke' if a.smoke else 'from make demo'}), photo {photo.name}, "
        f"load average {load:.2f} at the end: the machine is shared, so absolute times are inflated.",
    )
    return bench.report("startup: geoindex --help and locate of one photo, before and after lazy imports",
                        encoder, rows, (table,), notes, targets)


def main(argv: Sequence[str] | None = None) -> int:
    return run_benchmark(parse_args, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
