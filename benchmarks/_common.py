"""Shared benchmark plumbing: machine info, atomic JSON, RESULTS.md sections, timing stats, synthetic indexes.

Benchmarks are scripts, not tests: each prints a table, writes ``benchmarks/results/<name>.json``
and appends a dated section to ``benchmarks/RESULTS.md`` with the exact command that produced it.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
RESULTS_DIR = BENCH_DIR / "results"
RESULTS_MD = BENCH_DIR / "RESULTS.md"

_RESULTS_HEADER = """# Benchmark results

Appended by the scripts in `benchmarks/` (one dated section per run: command, machine, encoder,
table). Numbers are what the run measured on that machine; a figure marked *extrapolated* is a
measured per-unit cost multiplied by a counted quantity, never a guess. Compare ratios within one
section: absolute times on a shared machine drift between runs.
"""


# ---------------------------------------------------------------------------------------------
# command line


def add_common_args(p: argparse.ArgumentParser, *, default_encoder: str = "vit-b-32-random") -> None:
    """The flags every benchmark takes."""
    p.add_argument("--quick", action="store_true",
                   help="small sizes and the tiny encoder: finishes in under a minute on 2 CPU cores")
    p.add_argument("--encoder", default=None,
                   help=f"encoder registry name (default: {default_encoder}; tiny with --quick)")
    p.add_argument("--smoke", action="store_true", help=argparse.SUPPRESS)  # tests: smallest sizes
    p.add_argument("--results-dir", type=Path, default=RESULTS_DIR, help="where <name>.json goes")
    p.add_argument("--results-md", type=Path, default=RESULTS_MD, help="the RESULTS.md to append to")
    p.add_argument("--no-record", action="store_true", help="print only: write no JSON and no RESULTS.md")
    p.add_argument("--seed", type=int, default=0)


def benchmark_parser(
    name: str, doc: str | None, *, raw: bool = False, default_encoder: str = "vit-b-32-random"
) -> argparse.ArgumentParser:
    """The parser of ``benchmarks/<name>.py``, with the flags every benchmark takes; ``raw`` keeps the
    description's line breaks."""
    p = argparse.ArgumentParser(prog=f"benchmarks/{name}.py", description=doc,
                                formatter_class=argparse.RawDescriptionHelpFormatter if raw else argparse.HelpFormatter)
    add_common_args(p, default_encoder=default_encoder)
    return p


def resolve_encoder(args: argparse.Namespace, default: str = "vit-b-32-random") -> str:
    if args.encoder:
        return str(args.encoder)
    return "tiny" if (args.quick or args.smoke) else default


def run_benchmark(
    parse_args: Callable[[Sequence[str] | None], argparse.Namespace],
    run: Callable[[argparse.Namespace, Sequence[str] | None], Report],
    argv: Sequence[str] | None,
) -> int:
    """A benchmark script's ``main``: parse its flags, run it, print and record the report; exit status."""
    a = parse_args(argv)
    run(a, argv).emit_as_asked(a)
    return 0


def command_line(script: str, argv: Sequence[str] | None) -> str:
    """The command that reproduces this run, as typed from the repository root."""
    args = list(sys.argv[1:] if argv is None else argv)
    return shlex.join([".venv/bin/python", f"benchmarks/{script}.py", *args])


# ---------------------------------------------------------------------------------------------
# machine, memory, timing


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def gpu_model() -> str:
    try:
        import torch

        if torch.cuda.is_available():
            return ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
    except Exception:  # noqa: BLE001 - a broken CUDA setup must not stop a CPU benchmark
        pass
    return "none"


def machine_info() -> dict[str, Any]:
    """Where and with what a run happened."""
    import faiss

    info: dict[str, Any] = {
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
        "cpu": cpu_model(),
        "cpu_cores": os.cpu_count(),
        "gpu": gpu_model(),
        "python": platform.python_version(),
        "faiss": faiss.__version__,
        "numpy": np.__version__,
        "load_avg_1m": os.getloadavg()[0],
    }
    try:
        import torch

        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
    except ImportError:
        pass
    try:
        info["git"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                                     text=True, timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        info["git"] = "unknown"
    return info


def proc_status() -> dict[str, float]:
    """This process's memory from /proc/self/status, in MiB: VmRSS, VmHWM (peak), RssAnon, RssFile."""
    out: dict[str, float] = {}
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem"):
                out[key] = int(rest.split()[0]) / 1024.0  # kB
    except OSError:
        pass
    return out


def pct(samples_s: Sequence[float] | npt.NDArray[np.float64], q: float) -> float:
    """Percentile ``q`` of durations in seconds, in milliseconds."""
    return float(np.percentile(np.asarray(samples_s, dtype=np.float64), q) * 1e3)


def timed(fn: Any, *args: Any, **kwargs: Any) -> tuple[Any, float]:
    t = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - t


def dir_bytes(path: Path, pattern: str = "*") -> int:
    return sum(p.stat().st_size for p in Path(path).rglob(pattern) if p.is_file())


# ---------------------------------------------------------------------------------------------
# output


def atomic_write_text(path: Path, text: str) -> None:
    """Write text atomically (temporary file, fsync, rename), as the index store does."""
    from geoindex.files import atomic_write_bytes

    atomic_write_bytes(path, text.encode())


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, Path):
        return str(x)
    if isinstance(x, float) and not np.isfinite(x):
        return None
    return x


def fmt(v: Any, digits: int = 3) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, (int, np.integer)):
        return f"{int(v):,}"
    if isinstance(v, (float, np.floating)):
        v = float(v)
        if v == 0:
            return "0"
        if abs(v) >= 100:
            return f"{v:,.0f}"
        return f"{v:.{digits}g}"
    return str(v)


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [[fmt(c) for c in r] for r in rows]
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in cells]
    return "\n".join(lines)


@dataclass(frozen=True)
class Report:
    """One benchmark run: what gets printed, written as JSON and appended to RESULTS.md."""

    name: str
    title: str
    command: str
    encoder: str
    machine: dict[str, Any]
    results: Any
    tables: tuple[str, ...]
    notes: tuple[str, ...] = ()
    targets: tuple[tuple[str, str, bool | None], ...] = ()  # (target, measured, met)

    def markdown(self) -> str:
        m = self.machine
        lines = [
            f"## {self.title}: {m['date']}",
            "",
            f"- command: `{self.command}`",
            f"- machine: {m['cpu']} ({m['cpu_cores']} cores), GPU: {m['gpu']}; "
            f"load avg {m['load_avg_1m']:.2f} at start, {os.getloadavg()[0]:.2f} at end",
            f"- software: torch {m.get('torch', '-')} ({m.get('torch_threads', '-')} threads), faiss {m['faiss']}, "
            f"numpy {m['numpy']}, python {m['python']}, git {m['git']}",
            f"- encoder: `{self.encoder}`",
            "",
        ]
        for t in self.tables:
            lines += [t, ""]
        if self.targets:
            lines += ["| target | measured | met |", "|---|---|---|"]
            for t, v, ok in self.targets:
                lines.append(f"| {t} | {v} | {'-' if ok is None else ('yes' if ok else '**no**')} |")
            lines.append("")
        lines += [f"- {n}" for n in self.notes]
        return "\n".join(lines).rstrip() + "\n"

    def emit_as_asked(self, args: argparse.Namespace) -> None:
        """``emit`` as the common flags ask: ``--results-dir``, ``--results-md``, ``--no-record``."""
        self.emit(results_dir=args.results_dir, results_md=args.results_md, record=not args.no_record)

    def emit(self, *, results_dir: Path, results_md: Path, record: bool = True) -> None:
        print(self.markdown())
        if not record:
            return
        payload = {
            "name": self.name,
            "command": self.command,
            "encoder": self.encoder,
            "machine": self.machine,
            "results": self.results,
            "targets": [{"target": t, "measured": v, "met": ok} for t, v, ok in self.targets],
            **goal_and_verdict(self.targets),
            "notes": list(self.notes),
        }
        atomic_write_text(Path(results_dir) / f"{self.name}.json", json.dumps(_jsonable(payload), indent=2) + "\n")
        results_md = Path(results_md)
        old = results_md.read_text() if results_md.is_file() else _RESULTS_HEADER
        atomic_write_text(results_md, old.rstrip() + "\n\n" + self.markdown())


def goal_and_verdict(targets: Sequence[tuple[str, str, bool | None]]) -> dict[str, Any]:
    """``goal`` (the targets' wording) and ``verdict`` (met, missed, or which of them were met, with what was
    measured) for a result file; nothing for a benchmark without targets."""
    judged = [(t, v, ok) for t, v, ok in targets if ok is not None]
    if not judged:
        return {}
    met = [t for t, _, ok in judged if ok]
    verdict = ("met" if len(met) == len(judged) else "missed" if not met
               else f"partly met ({len(met)} of {len(judged)})")
    return {"goal": [t for t, _, _ in judged],
            "verdict": verdict + ": " + "; ".join(f"{t}: {v} ({'met' if ok else 'missed'})" for t, v, ok in judged)}


@dataclass(frozen=True)
class BenchRun:
    """A benchmark run as it starts: its name, the command that reproduces it, the machine before the work."""

    name: str
    command: str
    machine: dict[str, Any]

    @classmethod
    def start(cls, name: str, argv: Sequence[str] | None) -> BenchRun:
        return cls(name, command_line(name, argv), machine_info())

    def report(
        self, title: str, encoder: str, results: Any, tables: tuple[str, ...], notes: Sequence[str] = (),
        targets: Sequence[tuple[str, str, bool | None]] = (),
    ) -> Report:
        """The run's :class:`Report`."""
        return Report(self.name, title, self.command, encoder, self.machine, results, tables, tuple(notes),
                      tuple(targets))


# ---------------------------------------------------------------------------------------------
# synthetic indexes: the real on-disk format, embeddings with a tree structure


def _unit_rows(a: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    a /= np.linalg.norm(a, axis=1, keepdims=True)
    return a


@dataclass(frozen=True)
class SyntheticIndex:
    """What :func:`build_synthetic_index` made."""

    path: Path
    rows: tuple[int, ...]  # per level, coarsest first
    dim: int
    codec: str
    seconds: float  # generate + parquet + FAISS + manifest
    faiss_bytes: int
    parquet_bytes: int
    query_leaf_rows: npt.NDArray[np.int64]  # deepest-level rows the queries were made from
    queries: npt.NDArray[np.float32]  # (n_queries, dim), L2-normalised

    @property
    def index_bytes(self) -> int:
        return self.faiss_bytes + self.parquet_bytes


def level_sizes(deepest: int, n_levels: int, fanout: int) -> list[int]:
    """Rows per level of a compact region whose deepest level has ``deepest`` tiles, coarsest first."""
    sizes = [deepest]
    for _ in range(n_levels - 1):
        sizes.append(-(-sizes[-1] // fanout))
    return sizes[::-1]


def publish_slim(path: Path, manifest: Any) -> Any:
    """Drop the shards' copy of the vectors of every level ``manifest`` records (saved already), as a build
    does once a level is finished, and save the manifest with the slimmer shards; returns it."""
    import dataclasses

    from geoindex.storage.store import FIRST_LEVEL_CODEC, drop_embeddings

    levels = tuple(drop_embeddings(path, lv.zoom, lv, codec=manifest.codec if i else FIRST_LEVEL_CODEC)
                   for i, lv in enumerate(manifest.levels))
    manifest = dataclasses.replace(manifest, levels=levels)
    manifest.save(path)
    return manifest


def build_synthetic_index(
    path: Path,
    deepest: int,
    *,
    dim: int,
    codec: str = "fp16",
    schedule: Any = None,
    photo_encoder: dict[str, Any] | None = None,
    root: tuple[int, int] = (8, 5),
    child_noise: float = 1.0,
    query_noise: float = 0.5,
    n_queries: int = 1000,
    shard_rows: int = 1 << 18,
    seed: int = 0,
) -> SyntheticIndex:
    """Write a real index (parquet shards, FAISS files, manifest) with synthetic tree-structured embeddings.

    The covered region is compact: the first ``deepest`` tiles, in quadkey order, of the deepest
    zoom under one tile of the first zoom; each level above holds their parents, so every parent
    has ``fanout`` children except possibly the last. A child's embedding is its parent's plus
    Gaussian noise of norm about ``child_noise``, renormalised, so a query near a leaf is near
    its ancestors and the beam search does real work. Queries are leaves plus noise of norm
    about ``query_noise``.
    """
    from geoindex.geometry.tiles import LevelSchedule, child_offsets_array
    from geoindex.storage.manifest import EncoderIdentity, Manifest
    from geoindex.storage.store import finish_level, shard_path, write_shard

    schedule = schedule or LevelSchedule(4, 16, 2)
    zooms = schedule.zooms
    fanout = schedule.fanout
    sizes = level_sizes(deepest, len(zooms), fanout)
    depth_bits = zooms[-1] - zooms[0]
    if sizes[0] != 1 or deepest > 4 ** depth_bits:
        raise ValueError(f"{deepest} tiles do not fit under one zoom-{zooms[0]} tile over {len(zooms)} levels")
    rng = np.random.default_rng(seed)
    started = time.perf_counter()
    path.mkdir(parents=True, exist_ok=True)
    manifest = Manifest(
        schedule=schedule, dim=dim, codec=codec,
        photo_encoder=EncoderIdentity.from_dict(photo_encoder or {"name": "synthetic",
                                                                  "base_fingerprint": "synthetic"}),
        imagery="synthetic", coverage={"synthetic": {"deepest": deepest, "root": list(root)}},
        build_args={"synthetic": {"deepest": deepest, "dim": dim, "seed": seed, "child_noise": child_noise}},
    )
    scale = np.float32(child_noise / np.sqrt(dim))
    parent_emb: npt.NDArray[np.float16] | None = None
    n_queries = min(n_queries, deepest)
    query_rows = np.sort(rng.choice(deepest, size=n_queries, replace=False)).astype(np.int64)
    queries = np.empty((n_queries, dim), dtype=np.float32)
    for li, (zoom, n) in enumerate(zip(zooms, sizes)):
        bits = zoom - zooms[0]
        emb_level = np.empty((n, dim), dtype=np.float16) if li < len(zooms) - 1 else None
        for s, lo in enumerate(range(0, n, shard_rows)):
            hi = min(n, lo + shard_rows)
            rows = np.arange(lo, hi, dtype=np.int64)
            dx, dy = child_offsets_array(rows, step=bits)
            x = (root[0] << bits) + dx
            y = (root[1] << bits) + dy
            if parent_emb is None:
                emb = _unit_rows(rng.standard_normal((hi - lo, dim), dtype=np.float32))
                parents = np.full(hi - lo, -1, dtype=np.int64)
            else:
                parents = rows // fanout
                emb = parent_emb[parents].astype(np.float32)
                emb += scale * rng.standard_normal((hi - lo, dim), dtype=np.float32)
                _unit_rows(emb)
            write_shard(shard_path(path, zoom, s), zoom=zoom, x=x, y=y, parent_row=parents, embeddings=emb)
            if emb_level is not None:
                emb_level[lo:hi] = emb
            else:
                sel = query_rows[(query_rows >= lo) & (query_rows < hi)]
                pos = np.searchsorted(query_rows, sel)
                queries[pos] = emb[sel - lo].astype(np.float16).astype(np.float32)
            del emb
        info = finish_level(path, zoom, n_parents=None if li == 0 else sizes[li - 1], codec=codec, dim=dim)
        info = type(info)(zoom=info.zoom, rows=info.rows, encoder=EncoderIdentity("synthetic"),
                            files=info.files)
        manifest = manifest.with_level(info)
        parent_emb = emb_level
    manifest.save(path)
    manifest = publish_slim(path, manifest)
    noise = rng.standard_normal(queries.shape, dtype=np.float32) * np.float32(query_noise / np.sqrt(dim))
    queries = _unit_rows(queries + noise)
    seconds = time.perf_counter() - started
    faiss_bytes = dir_bytes(path, "index.faiss")
    parquet_bytes = dir_bytes(path, "*.parquet")
    return SyntheticIndex(path, tuple(sizes), dim, codec, seconds, faiss_bytes, parquet_bytes, query_rows, queries)
