"""Atomic file writes, file hashes and the index write lock: the one place where geoindex replaces a file.

A writer fills a fresh temporary file beside the target (a unique name, so two writers of one
file never share it), fsyncs it where the data must survive a crash, and renames it over the
target: readers see the old file or the complete new one, never a partial write.

Atomic files do not make two writers of one index safe: two builds with other shard sizes or codecs
would each finish and leave a level that fails to open, or the last writer's. Builds and compactions
therefore hold ``<index>/write.lock`` (``index_write_lock``, an ``flock``); a second writer is refused
at once with the first one's pid and command.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from geoindex.errors import IndexBusyError

__all__ = ["CACHE_ENV", "WRITE_LOCK", "atomic_path", "atomic_write_bytes", "default_cache_dir", "file_sha256",
           "index_write_lock"]

WRITE_LOCK = "write.lock"
_held: dict[Path, int] = {}  # lock files this process holds -> depth (a build's levels take it again)
_held_guard = threading.Lock()

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


@contextlib.contextmanager
def index_write_lock(index_dir: str | os.PathLike[str], *, what: str) -> Iterator[None]:
    """Hold ``<index_dir>/write.lock`` (created with the folder if missing) while the block writes the index.

    Re-entrant within a process (a build holds it, and each level it builds takes it again).

    Args:
        what: the operation, named to a second writer (e.g. ``build_index --zoom 12``).

    Raises:
        IndexBusyError: another process holds the lock; the message names its pid and command.
        OSError: the lock file cannot be created (a read-only or full file system).
    """
    path = (Path(index_dir) / WRITE_LOCK).resolve()
    with _held_guard:
        if _held.get(path):
            _held[path] += 1
            reentered = True
        else:
            reentered = False
    if reentered:
        try:
            yield
        finally:
            with _held_guard:
                _held[path] -= 1
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+b") as f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as e:
            f.seek(0)
            holder = f.read(500).decode("utf-8", "replace").strip() or "another process"
            raise IndexBusyError(
                f"{path.parent} is being written by {holder}; wait for it to finish (or stop it), then rerun. "
                f"Two writers of one index would leave it unreadable (lock: {path})"
            ) from e
        try:
            f.truncate(0)
            f.write(f"pid {os.getpid()} ({what}, since {time.strftime('%Y-%m-%d %H:%M:%S')}, "
                    f"{os.path.basename(sys.argv[0]) or 'python'})".encode())
            f.flush()
            with _held_guard:
                _held[path] = 1
            yield
        finally:
            with _held_guard:
                _held.pop(path, None)
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)
