"""Atomic file writes and file hashes: the one place where geoindex replaces a file.

A writer fills a fresh temporary file beside the target (a unique name, so two writers of one
file never share it), fsyncs it where the data must survive a crash, and renames it over the
target: readers see the old file or the complete new one, never a partial write.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

__all__ = ["CACHE_ENV", "atomic_path", "atomic_write_bytes", "default_cache_dir", "file_sha256"]

CACHE_ENV = "GEOINDEX_CACHE_DIR"

FILE_MODE = 0o644  # mkstemp creates 0600; indexes, tiles and checkpoints are meant to be shared


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str], *, durable: bool = True) -> Iterator[Path]:
    """A fresh temporary path beside ``path`` to write; renamed over ``path`` when the block succeeds.

    Args:
        path: the file to replace; its folder is created if missing.
        durable: fsync the file before the rename (indexes, checkpoints); False where a lost file
            is merely fetched again (downloaded tiles), for throughput.

    If the block raises, the temporary file is removed and ``path`` is left as it was.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=target.parent, prefix=target.name + ".", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        if durable:
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        os.chmod(tmp, FILE_MODE)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes, *, durable: bool = True) -> None:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_path`)."""
    with atomic_path(path, durable=durable) as tmp:
        tmp.write_bytes(data)


def file_sha256(path: str | os.PathLike[str]) -> str:
    """The sha256 of a file's bytes, hex (streamed: large files are not read into memory)."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def default_cache_dir() -> Path:
    """``$GEOINDEX_CACHE_DIR``, else ``~/.cache/geoindex``: derived files kept between processes."""
    return Path(os.environ.get(CACHE_ENV) or Path("~/.cache/geoindex").expanduser())
