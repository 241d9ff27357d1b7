"""Shared fixtures: a tiny random-init encoder, rendered tiles, small built indexes. No network."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import socket
import struct
import threading
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mercantile
import numpy as np
import pytest
from PIL import Image

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def png_claiming(width: int, height: int) -> bytes:
    """A valid 1x1 PNG whose header claims width x height pixels (a cheap decompression bomb)."""
    buf = io.BytesIO()
    Image.new("RGB", (1, 1)).save(buf, "PNG")
    data = bytearray(buf.getvalue())
    ihdr = bytearray(data[12:29])
    ihdr[4:12] = struct.pack(">II", width, height)
    data[12:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(ihdr)))
    return bytes(data)


def relist(index_dir: Path) -> None:
    """Record the files' current sizes and checksums in the manifest, as a consistent-looking index would."""
    from geoindex.storage.manifest import Manifest
    from geoindex.storage.store import file_info, level_dir

    manifest = Manifest.load(index_dir)
    levels = []
    for lv in manifest.levels:
        ldir = level_dir(index_dir, lv.zoom)
        levels.append(dataclasses.replace(lv, files=tuple(file_info(ldir / f.name) for f in lv.files)))
    dataclasses.replace(manifest, levels=tuple(levels)).save(index_dir)


def write_tiles(root: Path, zooms: tuple[int, ...], *, skip: frozenset | set = frozenset()) -> Path:
    """Every tile of ``zooms`` rendered into ``root`` as {z}/{x}/{y}.png, but those in ``skip``; returns root."""
    for z in zooms:
        for x in range(1 << z):
            for y in range(1 << z):
                if mercantile.Tile(x, y, z) in skip:
                    continue
                path = root / str(z) / str(x) / f"{y}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                render_tile(mercantile.Tile(x, y, z)).save(path)
    return root


def render_tile(tile: mercantile.Tile, size: int = 64) -> Image.Image:
    """A deterministic, distinct image per tile: a 4x4 block pattern seeded by (z, x, y)."""
    seed = int.from_bytes(hashlib.sha256(f"{tile.z}/{tile.x}/{tile.y}".encode()).digest()[:4], "little")
    blocks = np.random.default_rng(seed).integers(0, 256, (4, 4, 3), dtype=np.uint8)
    return Image.fromarray(blocks).resize((size, size), Image.Resampling.NEAREST)


@pytest.fixture(scope="session")
def tiny_encoder():
    from geoindex.models.encoders import create_encoder

    return create_encoder("tiny")


@pytest.fixture(scope="session")
def rendered_source():
    from geoindex.sources import MemorySource

    return MemorySource(render_tile, name="rendered")


@pytest.fixture(scope="session")
def world():
    from geoindex.geometry.coverage import Coverage

    return Coverage.world()


@pytest.fixture(scope="session")
def small_index(tmp_path_factory, tiny_encoder, rendered_source, world) -> Path:
    """An index over the whole world at zoom 1, 2, 3 (step 1: 4, 16, 64 tiles), fp16 codec."""
    from geoindex.geometry.tiles import LevelSchedule
    from geoindex.storage.build import build_level

    path = tmp_path_factory.mktemp("small_index")
    schedule = LevelSchedule(1, 3, 1)
    for zoom in schedule.zooms:
        build_level(path, zoom, source=rendered_source, encoder=tiny_encoder, coverage=world,
                    schedule=schedule, shard_size=16)
    return path


@pytest.fixture(scope="session")
def tile_dir(tmp_path_factory) -> Path:
    """Rendered tiles of zoom 1..3 as {z}/{x}/{y}.png; tile (3, 5, 3) is absent (a gap in coverage)."""
    return write_tiles(tmp_path_factory.mktemp("tiles"), (1, 2, 3), skip={mercantile.Tile(3, 5, 3)})


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data not present at {SHARED_DATA} (only on the project's dev machines)")
    return SHARED_DATA


@contextlib.contextmanager
def serving(app: Any, *, timeout: float = 30.0) -> Iterator[str]:
    """Run an ASGI app in a real uvicorn on 127.0.0.1 (a port the kernel picks); yield its base URL."""
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    srv = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not srv.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError(f"uvicorn did not start within {timeout:.0f} s")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        srv.should_exit = True
        thread.join(timeout=10)
        sock.close()


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models run fastest on one thread; two oversubscribe a shared 2-core machine badly.

    For a whole module: ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``.
    """
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True, scope="session")
def _private_cache_dir(tmp_path_factory):
    """Derived files (exported ONNX graphs, gallery embeddings) go to a folder of this test session,
    never to the user's ~/.cache/geoindex."""
    import os

    before = os.environ.get("GEOINDEX_CACHE_DIR")
    os.environ["GEOINDEX_CACHE_DIR"] = str(tmp_path_factory.mktemp("geoindex-cache"))
    yield
    if before is None:
        os.environ.pop("GEOINDEX_CACHE_DIR", None)
    else:
        os.environ["GEOINDEX_CACHE_DIR"] = before


@pytest.fixture(autouse=True)
def _restore_thread_count():
    """``locate`` and ``serve`` set the process's thread count (geoindex.models.threads); tests that run them
    in-process must not change it for the tests after them (builds compare bytes across processes)."""
    import torch

    before = torch.get_num_threads()
    yield
    if torch.get_num_threads() != before:
        from geoindex.models.threads import configure_query_threads

        configure_query_threads(before)
