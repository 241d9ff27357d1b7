"""``geoindex serve`` in a child process on a free port, for scripts that talk to it over HTTP
(the README's transcripts, the service memory benchmark)."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

from geoindex.errors import ConfigError

__all__ = ["serving_subprocess"]


@contextlib.contextmanager
def serving_subprocess(index: str | Path, *, cwd: Path, options: Sequence[str] = (),
                       env: Mapping[str, str] | None = None, timeout: float = 180.0,
                       ) -> Iterator[tuple[str, subprocess.Popen[str]]]:
    """``geoindex serve --index INDEX OPTIONS`` run from ``cwd`` until the block ends: (its base URL, the process).

    Raises:
        ConfigError: the server exited, or did not answer ``/health`` within ``timeout`` seconds (its stderr).
    """
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "geoindex", "serve", "--index", str(index), "--port", str(port),
                               *options], cwd=cwd, env=dict(env) if env is not None else None,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while not _healthy(base):
            if server.poll() is not None or time.monotonic() > deadline:
                server.terminate()
                _, stderr = server.communicate(timeout=30)
                raise ConfigError(f"geoindex serve --index {index} did not start:\n{stderr[-2000:]}")
            time.sleep(0.3)
        yield base, server
    finally:
        server.terminate()
        server.wait(timeout=30)


def _healthy(base: str) -> bool:
    try:
        with urllib.request.urlopen(f"{base}/health", timeout=5) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, OSError):
        return False
