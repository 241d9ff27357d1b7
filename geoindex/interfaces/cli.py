"""The ``geoindex`` command: ``geoindex locate PHOTO...``, ``geoindex serve`` and ``geoindex export``.

Exit status of ``locate``: 0 when every image was located, 1 when some could not be read
(each is named on stderr; the others are still answered), 2 when nothing could run (bad
arguments, no index, no input images). Results go to stdout; progress, errors and the closing
summary go to stderr, so ``--format json`` and ``--format csv`` stay machine-readable.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import logging
import math
import os
import signal
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from geoindex.errors import ConfigError, GeoIndexError
from geoindex.models.precision import PRECISION_HELP, PRECISIONS
from geoindex.storage.manifest import DEFAULT_INDEX, INDEX_ENV

if TYPE_CHECKING:
    from geoindex.api import GeoIndex, RegionSearcher
    from geoindex.geometry.coverage import Coverage
    from geoindex.interfaces.outputs import OutputFormat, ResultWriter
    from geoindex.retrieval.results import SearchResult
    from geoindex.sources import TileSource

# Everything else (torch, FAISS, the encoders, PIL, tqdm) is imported inside the command that needs
# it, so that `geoindex --help` answers at once; `tests/test_cli.py` checks what a bare import loads.

__all__ = ["IMAGE_EXTENSIONS", "expand_inputs", "main", "resolve_device", "run_command"]

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".tif", ".tiff", ".bmp", ".gif"})
LOCATE_HELP = """Geolocate photos: the centre of the best map tile, the top candidates with probabilities,
and the photos' own EXIF GPS with the distance to it. Results go to stdout; progress, errors and a
closing summary (device, images/s) go to stderr.

exit status: 0 every image located; 1 some images could not be read (each is named on stderr,
the others are still answered); 2 nothing could run (bad arguments, no index, no input images)."""
EXPORT_HELP = """Write one level of an index as a single parquet file, for dataframes, DuckDB or a vector database.

Columns: row (the FAISS id in the index), z, x, y (XYZ tile, y from the north), lat, lon (the
tile's centre, degrees), embedding (fixed-size list of float32, or float16 with --dtype float16).
Rows are in the index's order. Lazy levels are not exported."""
RESPONSIBLE_USE = (
    "Geolocating other people's photos can reveal where they live, work or travel. Locate only photos "
    "you own or have permission to analyse, and never to find or follow a person."
)


@dataclass(frozen=True)
class _Failed:
    """An input that produced no result, and why."""

    image: str
    reason: str


def expand_inputs(args: Sequence[str]) -> tuple[list[str], list[_Failed]]:
    """Files, folders (searched recursively for image files) and glob patterns -> image paths.

    Paths given explicitly are kept whatever their extension (the decoder decides); folder and
    glob matches are filtered by extension. Order is the order given, folders sorted; no
    duplicates. Arguments that match nothing are returned as failures.
    """
    from geoindex.imagery import describe_os_error

    found: list[str] = []
    failed: list[_Failed] = []
    for arg in args:
        try:
            hits, reason = _expand_one(arg)
        except OSError as e:  # e.g. a folder on the path may not be searched, or a name too long
            hits, reason = [], describe_os_error(arg, e)
        if reason:
            failed.append(_Failed(arg, reason))
        found += hits
    return list(dict.fromkeys(found)), failed


def _expand_one(arg: str) -> tuple[list[str], str | None]:
    """The image paths one argument stands for, or the reason it stands for none."""
    from geoindex.imagery import describe_os_error
    from geoindex.interfaces.outputs import one_line

    path = Path(arg)
    if path.is_dir():
        try:
            os.scandir(path).close()
        except OSError as e:
            return [], f"folder cannot be read: {describe_os_error(arg, e)}"
        unreadable: list[str] = []
        hits = sorted(str(p) for p in _walk_images(path, unreadable))
        if unreadable:
            log.warning("%s: %d folder(s) inside could not be read and were skipped, e.g. %s",
                        one_line(arg), len(unreadable), one_line(unreadable[0]))
        if not hits:
            return [], f"folder holds no images ({', '.join(sorted(IMAGE_EXTENSIONS))})" + (
                f"; {len(unreadable)} folder(s) inside could not be read" if unreadable else "")
        return hits, None
    if path.exists() or path.is_symlink() or not glob.has_magic(arg):
        return [arg], None  # a missing or unreadable file fails later, with the decoder's message
    hits = sorted(p for p in glob.glob(arg, recursive=True)
                  if Path(p).is_file() and Path(p).suffix.lower() in IMAGE_EXTENSIONS)
    return hits, (None if hits else "no image file matches this pattern")


def _walk_images(folder: Path, unreadable: list[str]) -> Iterator[Path]:
    """Image files under ``folder``, recursively; folders that cannot be read are appended to ``unreadable``."""
    for root, _, files in os.walk(folder, onerror=lambda e: unreadable.append(str(e.filename))):
        for f in files:
            p = Path(root) / f
            if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file():
                yield p


def _region(args: argparse.Namespace) -> Coverage | None:
    from geoindex.geometry.coverage import Coverage

    if args.bbox is not None:
        return Coverage.from_bbox(*args.bbox)
    if args.region is not None:
        return Coverage.from_geojson(args.region, option="--region")
    return None


def resolve_device(name: str, *, option: str = "--device") -> str:
    """A torch device string that exists on this machine; ``auto`` is CUDA when available, else CPU.

    Raises:
        ConfigError: not a device name, or a CUDA/MPS device this machine does not have.
    """
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError) as e:
        raise ConfigError(f"{option} {name!r} is not a torch device; use auto, cpu, cuda or cuda:N") from e
    if device.type == "cpu":
        return name
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ConfigError(f"{option} {name}: no CUDA GPU is visible to torch here; use {option} cpu (or auto)")
        if device.index is not None and device.index >= count:
            raise ConfigError(f"{option} {name}: this machine has {count} CUDA GPU(s), cuda:0..cuda:{count - 1}")
        return name
    if device.type == "mps":
        if not torch.backends.mps.is_available():
            raise ConfigError(f"{option} {name}: MPS (Apple GPU) is not available here; use {option} cpu (or auto)")
        return name
    raise ConfigError(f"{option} {name!r}: unsupported device type {device.type!r}; use auto, cpu, cuda or cuda:N")


def _map_source(index: GeoIndex, spec: str | None) -> TileSource:
    """The tile source for ``--map``: ``--map-source``, else the index's own imagery when local."""
    from geoindex.sources import map_source

    return map_source(index.manifest.imagery, spec, imagery_spec=index.manifest.imagery_spec)


def _check_output(path: Path, option: str, *, image: bool, example: str | None = None) -> None:
    """ConfigError now, before any search, if ``path`` cannot be written later; ``example`` names a file
    in the error for a directory (default: ``out.png`` for an image, else ``out.geojson``)."""
    from PIL import Image

    from geoindex.imagery import describe_os_error

    if path.is_dir():
        example = example or ("out.png" if image else "out.geojson")
        raise ConfigError(f"{option} {path}: is a directory; give a file name, e.g. {option} {path / example}")
    if image:
        Image.init()
        fmt = Image.registered_extensions().get(path.suffix.lower())
        if fmt is None or fmt not in Image.SAVE:
            raise ConfigError(f"{option} {path}: unknown image extension {path.suffix or '(none)'!r}; "
                              "use .png, .jpg or .webp")
    folder = path.parent
    if not folder.is_dir():
        raise ConfigError(f"{option} {path}: the folder {folder} does not exist; create it first")
    try:
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".geoindex-", suffix=".tmp")
        os.close(fd)
        os.unlink(tmp)
    except OSError as e:
        raise ConfigError(f"{option} {path}: cannot write in {folder} ({describe_os_error(folder, e)})") from e


def _write_output(path: Path, data: bytes, option: str) -> None:
    from geoindex.files import atomic_write_bytes
    from geoindex.imagery import describe_os_error

    try:
        atomic_write_bytes(path, data)
    except OSError as e:
        raise ConfigError(f"{option} {path}: cannot write ({describe_os_error(path, e)})") from e


def _batches(items: Sequence[str], size: int) -> Iterator[list[str]]:
    for start in range(0, len(items), size):
        yield list(items[start : start + size])


@contextlib.contextmanager
def loading_notice(what: str, *, quiet: bool, after: float = 1.0) -> Iterator[None]:
    """Say on stderr what is loading if it takes longer than ``after`` seconds (importing torch, opening an index).

    A SIGALRM timer, not a thread: importing torch holds the GIL for seconds at a time, so a timer
    thread would speak only once the import is over. Off the main thread (or without SIGALRM) a
    thread does it, late or not at all.
    """
    if quiet:
        yield
        return

    def say(*_: object) -> None:
        print(f"loading {what} ...", file=sys.stderr, flush=True)

    if hasattr(signal, "setitimer") and threading.current_thread() is threading.main_thread():
        before = signal.signal(signal.SIGALRM, say)
        signal.setitimer(signal.ITIMER_REAL, after)
        try:
            yield
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, before)
        return
    timer = threading.Timer(after, say)
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()


def _map_paths(path: Path, images: Sequence[str]) -> list[Path]:
    """Where ``--map PATH`` draws each image's map: PATH itself for one image, else one file per image
    named after it beside PATH (``maps/map.png`` and ``a/berlin.jpg`` -> ``maps/map-berlin.png``);
    photos of the same name get ``-2``, ``-3``."""
    if len(images) == 1:
        return [path]
    out: list[Path] = []
    taken: set[str] = set()
    for image in images:
        stem = f"{path.stem}-{Path(image).stem}"
        name, n = stem, 1
        while name.lower() in taken:
            n += 1
            name = f"{stem}-{n}"
        taken.add(name.lower())
        out.append(path.with_name(name + path.suffix))
    return out


@dataclass(frozen=True)
class _FileOutput:
    """One ``--NAME FILE`` of ``geoindex locate``: its format, the option, and where each photo's file goes
    for a format that draws one file per photo."""

    format: OutputFormat
    option: str
    path: Path
    per_image: dict[str, Path]


def _file_outputs(args: argparse.Namespace, images: Sequence[str]) -> list[_FileOutput]:
    """The file formats asked for, their paths checked now, before any search."""
    from geoindex.interfaces.outputs import file_formats

    outputs = []
    for fmt in file_formats():
        path = getattr(args, fmt.name, None)
        if path is None:
            continue
        option = _file_option(fmt)
        per_image = dict(zip(images, _map_paths(path, images), strict=True)) if fmt.per_result else {}
        _check_output(path, option, image=fmt.media_type.startswith("image/"), example=f"out{fmt.extension}")
        outputs.append(_FileOutput(fmt, option, path, per_image))
    return outputs


def _file_option(fmt: OutputFormat) -> str:
    return "--" + fmt.name.replace("_", "-")


def _check_locate_args(args: argparse.Namespace) -> None:
    from geoindex.interfaces.outputs import REGISTRY

    if args.top_n < 1:
        raise ConfigError(f"--top-n must be >= 1, got {args.top_n}")
    if args.batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.trace and not REGISTRY[args.format].trace:
        traced = " or ".join(f"--format {f.name}" for f in REGISTRY.values() if f.trace)
        example = next((f.name for f in REGISTRY.values() if f.trace), "json")
        raise ConfigError(f"--trace is written in {traced} only (one record per image); --format {args.format} "
                          f"has one row per candidate. Use --format {example} --trace, or --map to draw the trace")


def _locate(args: argparse.Namespace) -> int:
    _check_locate_args(args)
    from geoindex.api import open_index
    from geoindex.interfaces.outputs import REGISTRY, one_line
    from geoindex.models.threads import configure_query_threads
    from geoindex.retrieval.beam import check_k

    k = check_k(args.k)
    device = resolve_device(args.device)
    configure_query_threads(args.threads)
    images, failed = expand_inputs(args.paths)
    for f in failed:
        print(f"error: {one_line(f.image)}: {f.reason}", file=sys.stderr)
    if not images:
        raise ConfigError("no input images (give files, folders or glob patterns)")
    outputs = _file_outputs(args, images)
    region = _region(args)

    with loading_notice(f"the index {args.index} and its photo encoder", quiet=args.quiet):
        index = open_index(args.index, weights=args.weights, download=args.download, device=device,
                           verify=args.verify or None, precision=args.precision,
                           resident=_RESIDENT[args.resident], retry_missing=args.retry_missing)
    searcher = index.within(region) if region is not None else index
    imagery = _map_source(index, args.map_source) if any(o.format.needs_imagery for o in outputs) else None
    prior_kwargs = _prior(args, str(index.photo_encoder.device))
    writer = REGISTRY[args.format].writer
    assert writer is not None  # --format offers stream formats only
    started = time.perf_counter()
    located, photos = _search_all(args, searcher, images, failed, k, prior_kwargs,
                                  writer(sys.stdout, top_n=args.top_n, trace=args.trace))
    seconds = time.perf_counter() - started

    _write_files(outputs, located, photos, imagery)
    n = len(located) + len(failed)
    rate = len(images) / seconds if seconds > 0 else float("inf")
    print(f"{len(located)} of {n} images located{_where(searcher)} in {seconds:.2f} s on "
          f"{index.photo_encoder.device} ({rate:.1f} images/s, k={k}); {len(failed)} failed", file=sys.stderr)
    return 1 if failed else 0


def _search_all(
    args: argparse.Namespace, searcher: GeoIndex | RegionSearcher, images: list[str], failed: list[_Failed], k: int,
    prior_kwargs: dict[str, Any], writer: ResultWriter,
) -> tuple[list[SearchResult], list[str]]:
    """Search ``images`` in batches, streaming each answer to ``writer``; failures are appended to ``failed``.
    Returns the results and the paths of the photos they answer."""
    from tqdm import tqdm

    from geoindex.interfaces.outputs import one_line

    for f in failed:
        writer.failure(f.image, f.reason)
    located: list[SearchResult] = []
    photos: list[str] = []
    bar = tqdm(total=len(images), unit="img", file=sys.stderr, dynamic_ncols=True,
               disable=args.quiet or len(images) < 2 or not sys.stderr.isatty())
    try:
        for batch in _batches(images, args.batch_size):
            for path, item in zip(batch, searcher.search(batch, k, top_n=args.top_n, on_error="return",
                                                         read_exif=not args.ignore_exif, **prior_kwargs),
                                  strict=True):
                if isinstance(item, GeoIndexError):
                    failed.append(_Failed(path, str(item)))
                    bar.write(f"error: {one_line(str(item))}", file=sys.stderr)
                    writer.failure(path, str(item))
                    continue
                located.append(item)
                photos.append(path)
                writer.result(item)
            bar.update(len(batch))
    finally:
        bar.close()
        writer.close()
    return located, photos


def _where(searcher: GeoIndex | RegionSearcher) -> str:
    """`` within the region (N tiles at zoom Z)`` for a region-restricted search, else nothing."""
    from geoindex.api import RegionSearcher

    if not isinstance(searcher, RegionSearcher):
        return ""
    deepest = max(searcher.tiles_per_level)
    return f" within the region ({searcher.tiles_per_level[deepest]} tiles at zoom {deepest})"


def _write_files(outputs: list[_FileOutput], located: list[SearchResult], photos: list[str],
                 imagery: TileSource | None) -> None:
    """Each ``--NAME FILE``: one file for every located photo, or one per photo (``--map``)."""
    from geoindex.interfaces.outputs import FileInputs, one_line

    def opened() -> TileSource:
        assert imagery is not None  # opened before the search for every format that needs it
        return imagery

    for out in outputs:
        encode = out.format.encode
        assert encode is not None  # a file format
        if not out.format.per_result:
            if located:
                done = encode(located, FileInputs(photos=photos, imagery=opened, suffix=out.path.suffix))
                _write_output(out.path, done.data, out.option)
                print(f"wrote {out.path} ({done.summary})", file=sys.stderr)
            continue
        for result, photo in zip(located, photos, strict=True):
            path = out.per_image[photo]
            done = encode([result], FileInputs(photos=[photo], imagery=opened, suffix=path.suffix))
            _write_output(path, done.data, out.option)
            print(f"wrote {path} ({done.summary})" + (f" for {one_line(photo)}" if len(located) > 1 else ""),
                  file=sys.stderr)


def _serve(args: argparse.Namespace) -> int:
    from geoindex.models.threads import configure_query_threads
    from geoindex.retrieval.beam import check_k


    if not 1 <= args.port <= 65535:
        raise ConfigError(f"--port must be in 1..65535, got {args.port}")
    if not (math.isfinite(args.max_upload_mb) and args.max_upload_mb > 0):
        raise ConfigError(f"--max-upload-mb must be a positive number of megabytes, got {args.max_upload_mb}")
    if not (math.isfinite(args.max_megapixels) and args.max_megapixels > 0):
        raise ConfigError(f"--max-megapixels must be a positive number, got {args.max_megapixels}")
    if args.max_photos < 1:
        raise ConfigError(f"--max-photos must be >= 1, got {args.max_photos}")
    if args.max_concurrent is not None and args.max_concurrent < 1:
        raise ConfigError(f"--max-concurrent must be >= 1, got {args.max_concurrent}")
    if not 0 < args.body_timeout < math.inf:
        raise ConfigError(f"--body-timeout must be a positive number of seconds, got {args.body_timeout}")
    check_k(args.k)
    with loading_notice("torch, FAISS, the web framework and the search code", quiet=args.quiet):
        import uvicorn

        from geoindex.interfaces.service import create_app
    device = resolve_device(args.device)
    configure_query_threads(args.threads)
    limits: dict[str, Any] = {"max_pixels": max(1, int(args.max_megapixels * 1e6)), "max_photos": args.max_photos}
    if args.max_concurrent is not None:
        limits["max_concurrent"] = args.max_concurrent
    with loading_notice(f"the index {args.index} and its photo encoder", quiet=args.quiet):
        app = create_app(args.index, max_upload_bytes=int(args.max_upload_mb * 1024 * 1024), default_k=args.k, **limits,
                         body_timeout_s=args.body_timeout,
                         weights=args.weights, download=args.download, device=device,
                         verify=args.verify or None, precision=args.precision,
                         resident=_RESIDENT[args.resident], retry_missing=args.retry_missing)
    index = app.state.index
    print(f"serving {index.path} ({index.manifest.photo_encoder.name} on {index.photo_encoder.device}) at "
          f"http://{args.host}:{args.port}  docs: http://{args.host}:{args.port}/docs", file=sys.stderr)
    print(f"note: {RESPONSIBLE_USE}", file=sys.stderr)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning" if args.quiet else "info")
    return 0


def _prior(args: argparse.Namespace, device: str) -> dict[str, Any]:
    """Keyword arguments for ``search`` that attach GeoCLIP as a prior (none without --prior)."""
    if args.prior is None:
        return {}
    from geoindex.retrieval.prior import load_geoclip_prior

    prior = load_geoclip_prior(args.geoclip_backbone, download=args.download, device=device)
    return {"prior": prior, "prior_mode": args.prior_mode, "prior_weight": args.prior_weight}


def _bbox_arg(parser: argparse.ArgumentParser) -> None:
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--bbox", type=float, nargs=4, metavar=("W", "S", "E", "N"),
                       help="search only tiles meeting this box (degrees; W > E crosses the antimeridian)")
    where.add_argument("--region", type=Path, metavar="GEOJSON",
                       help="search only tiles meeting the polygons of this GeoJSON file")


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--index", type=Path, default=Path(os.environ.get(INDEX_ENV) or DEFAULT_INDEX),
                        help=f"index folder (default: ${INDEX_ENV} or {DEFAULT_INDEX})")
    parser.add_argument("-k", type=int, default=64, help="beam width: tiles kept per zoom level (default: 64)")
    parser.add_argument("--device", default="auto", help="torch device: auto, cpu, cuda, cuda:1 (default: auto)")
    parser.add_argument("--precision", default="auto", choices=PRECISIONS,
                        help=f"photo encoder arithmetic: {PRECISION_HELP}")
    parser.add_argument("--threads", type=int, help="threads of the photo encoder and the FAISS searches "
                                                    "(default 1: steady latency when the machine is busy)")
    parser.add_argument("--weights", help="local CLIP weights file (else $GEOINDEX_CLIP_WEIGHTS or the caches)")
    parser.add_argument("--download", action="store_true", help="download missing encoder weights")
    parser.add_argument("--quiet", "-q", action="store_true", help="no progress bar, warnings only")
    parser.add_argument("--verify", action="store_true",
                        help="check every index file's sha256 on open (default: only for indexes up to 256 MB; "
                             "sizes, tile coordinates and FAISS ids are always checked)")
    parser.add_argument("--resident", choices=tuple(_RESIDENT), default="auto",
                        help="read FAISS files into RAM instead of mapping them: auto (the upper levels, up to "
                             "2 GB or a quarter of free memory), yes (all), no (map all)")
    parser.add_argument("--retry-missing", action="store_true",
                        help="lazy levels: ask the tile source again for tiles it lacked before (else after "
                             "lazy.json's retry_missing_after_s, default a day)")


_RESIDENT: dict[str, bool | str] = {"auto": "auto", "yes": True, "no": False}


COMMANDS = ("locate", "serve", "export")


def build_parser(commands: Sequence[str] = COMMANDS) -> argparse.ArgumentParser:
    """The command line. Every command is listed, but only those in ``commands`` get their options:
    ``main`` passes the one being run (none for ``geoindex --help``), since defining ``locate``'s
    options imports the output formats and, through them, the search code."""
    parser = argparse.ArgumentParser(
        prog="geoindex", description="Photo geolocation by hierarchical retrieval over map-tile indexes.",
        epilog=RESPONSIBLE_USE,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    loc = sub.add_parser("locate", help="geolocate photos", description=LOCATE_HELP,
                         formatter_class=argparse.RawDescriptionHelpFormatter, epilog=RESPONSIBLE_USE)
    srv = sub.add_parser("serve", help="HTTP service: a web page at /, POST /locate, GET /health, docs at /docs",
                         epilog=RESPONSIBLE_USE)
    exp = sub.add_parser("export", help="write one level's tiles and embeddings as a parquet file for other tools",
                         description=EXPORT_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    if "locate" in commands:
        _locate_options(loc)
    if "serve" in commands:
        _serve_options(srv)
    if "export" in commands:
        _export_options(exp)
    return parser


def _export_options(exp: argparse.ArgumentParser) -> None:
    exp.add_argument("--index", type=Path, default=Path(os.environ.get(INDEX_ENV) or DEFAULT_INDEX),
                     help=f"index folder (default: ${INDEX_ENV} or {DEFAULT_INDEX})")
    exp.add_argument("--zoom", type=int, required=True, help="the level to export (one of the index's zooms)")
    exp.add_argument("--out", type=Path, required=True, metavar="FILE", help="the parquet file to write")
    exp.add_argument("--dtype", choices=("float32", "float16"), default="float32",
                     help="embedding type: float32 (default, what most tools read) or float16 (as stored, half size)")
    exp.add_argument("--quiet", "-q", action="store_true", help="no summary line")
    exp.set_defaults(func=_export)


def _export(args: argparse.Namespace) -> int:
    from geoindex.storage.export import export_level

    if args.out.suffix.lower() != ".parquet":
        raise ConfigError(f"--out {args.out}: name the file *.parquet, e.g. --out {args.out.with_suffix('.parquet')}")
    _check_output(args.out, "--out", image=False)
    done = export_level(args.index, args.zoom, args.out, dtype=args.dtype)
    if not args.quiet:
        print(f"wrote {done.path}: {done.rows} tiles of zoom {done.zoom} with {done.dim}-d {done.dtype} embeddings "
              f"({done.bytes / 1e6:.1f} MB)", file=sys.stderr)
    return 0


def _locate_options(loc: argparse.ArgumentParser) -> None:
    from geoindex.interfaces.outputs import stream_formats

    streams = [f.name for f in stream_formats()]
    loc.add_argument("paths", nargs="+", metavar="PATH", help="image files, folders or glob patterns")
    _common(loc)
    loc.add_argument("--top-n", type=int, default=5, help="candidates per image (default: 5)")
    loc.add_argument("--format", choices=streams, default=streams[0], help=f"output on stdout (default: {streams[0]})")
    loc.add_argument("--batch-size", type=int, default=32, help="images per encoder batch (default: 32)")
    _bbox_arg(loc)
    loc.add_argument("--ignore-exif", action="store_true", help="do not read or show the photos' EXIF GPS")
    loc.add_argument("--trace", action="store_true", help="include the per-level trace in --format json")
    loc.add_argument("--prior", choices=["geoclip"],
                     help="add GeoCLIP's belief to the search (pip install -e '.[geoclip]' in the geoindex checkout)")
    loc.add_argument("--prior-mode", choices=["inject", "rerank"], default="inject",
                     help="inject: GeoCLIP's top tile joins the beam at every level (the paper); "
                          "rerank: tile scores are combined with GeoCLIP's probability (default: inject)")
    loc.add_argument("--prior-weight", type=float, default=0.5, help="rerank weight in [0, 1] (default: 0.5)")
    loc.add_argument("--geoclip-backbone", metavar="PATH",
                     help="local folder of openai/clip-vit-large-patch14 (else $GEOINDEX_GEOCLIP_BACKBONE)")
    _file_options(loc)
    loc.set_defaults(func=_locate)


def _file_options(loc: argparse.ArgumentParser) -> None:
    """``--NAME FILE`` for each file format, and ``--map-source`` where one draws on the imagery."""
    from geoindex.interfaces.outputs import file_formats

    drawn = []
    for fmt in file_formats():
        option = _file_option(fmt)
        each = (f"; for several images, one file per image named after it beside {fmt.metavar} ({option} "
                f"maps/m{fmt.extension}: maps/m-<photo name>{fmt.extension})") if fmt.per_result else ""
        loc.add_argument(option, type=Path, metavar=fmt.metavar, help=(fmt.help or f"write {fmt.label}") + each)
        if fmt.needs_imagery:
            drawn.append(option)
    if drawn:
        loc.add_argument("--map-source", metavar="SOURCE",
                         help=f"imagery for {', '.join(drawn)}: bluemarble, a tile folder, .mbtiles, a URL template "
                              "(default: the index's own imagery when local, else bluemarble)")


def _serve_options(srv: argparse.ArgumentParser) -> None:
    _common(srv)
    srv.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)")
    srv.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    srv.add_argument("--max-upload-mb", type=float, default=20.0, help="largest accepted upload (default: 20)")
    srv.add_argument("--max-megapixels", type=float, default=25.0,
                     help="largest decoded photo in millions of pixels; JPEGs count at their reduced decoding size, "
                          "so phone photos pass (default: 25)")
    srv.add_argument("--max-photos", type=int, default=16,
                     help="photos in one POST /locate, all within --max-upload-mb together (default: 16)")
    srv.add_argument("--max-concurrent", type=int, default=None,
                     help="photos decoded and encoded at once; others wait, then get 503 (default: CPU cores, <= 4)")
    srv.add_argument("--body-timeout", type=float, default=60.0, metavar="SECONDS",
                     help="seconds an upload may take to arrive before 408 (default: 60)")
    srv.set_defaults(func=_serve)


def _version() -> str:
    from geoindex import __version__

    return __version__


def _setup_logging(quiet: bool) -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    logging.getLogger("geoindex").setLevel(logging.WARNING if quiet else logging.INFO)


def run_command(body: Callable[[], int], *, interrupted: str = "interrupted") -> int:
    """Run a command's body; a GeoIndexError becomes one clear line on stderr and exit status 2, Ctrl-C 130.

    Shared by the ``geoindex`` command and the pipelines (``pipelines._cli.run_main``).
    """
    try:
        return body()
    except GeoIndexError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(interrupted, file=sys.stderr)
        return 130


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``geoindex`` console script and ``python -m geoindex``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = [c for c in COMMANDS if argv[:1] == [c]]
    # A command's options name its output formats, whose module imports the search code (torch, FAISS).
    with loading_notice("torch, FAISS and the search code", quiet=not commands or "-q" in argv or "--quiet" in argv):
        parser = build_parser(commands)
    args = parser.parse_args(argv)
    _setup_logging(args.quiet)

    def body() -> int:
        with warnings.catch_warnings():
            if args.quiet:
                # Pillow warns about damaged metadata ("Corrupt EXIF data", "Possibly corrupt EXIF
                # MakerNote") of photos it still decodes; one that cannot be decoded is an error anyway.
                warnings.filterwarnings("ignore", category=UserWarning, module=r"PIL\.")
            return int(args.func(args))

    try:
        return run_command(body)
    except BrokenPipeError:  # `geoindex locate ... | head`: the reader left; say nothing more
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
