"""Regenerate the README's example transcripts from this code.

``make docs-examples`` runs it. Every ```console block of README.md sits between two markers::

    <!-- generated: NAME -->
    ```console
    ...
    ```
    <!-- end: NAME -->

and this script replaces what lies between them with the output of the commands that NAME stands
for (:data:`EXAMPLES`), run now against ``--index`` (default ``indexes/demo``, which ``make demo``
builds). The commands run in a scratch folder where the index is ``indexes/demo`` and the photos
``photos/*.jpg``, so the transcripts read as a user's would. The photos are real ones with EXIF GPS
(``--photos``, default ``../shared/data/photos``: Berlin, Lund and near Arezzo) plus one broken file.
``demo`` is the transcript of ``python -m pipelines.demo`` (several minutes; ``--skip demo`` keeps the
README's). ``make docs-examples`` also redraws the page's picture (``benchmarks/page_screenshot.py``).
Nothing is written unless every requested example ran: a failed command leaves the README as it was.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from geoindex.errors import ConfigError
from geoindex.files import atomic_write_bytes
from pipelines._cli import pipeline_main
from pipelines.serving import serving_subprocess

ROOT = Path(__file__).resolve().parents[1]
# The photos the examples show, under short names (file in --photos -> name in the transcript).
PHOTOS = {"berlin.jpg": "opensfm_data_berlin_images_01.jpg", "lund.jpg": "opensfm_data_lund_images_01.jpg",
          "arezzo.jpg": "exif-samples_jpg_gps_dscn0010.jpg"}
SHOWN_PORT = 8765
BLOCK = re.compile(r"(<!-- generated: (?P<name>[\w-]+) -->\n)(?P<body>.*?)(<!-- end: (?P=name) -->)", re.S)


@dataclass(frozen=True)
class Config:
    readme: Path = ROOT / "README.md"
    index: Path = ROOT / "indexes" / "demo"
    photos: Path = ROOT.parent / "shared" / "data" / "photos"
    skip: tuple[str, ...] = ()
    quiet: bool = False  # pipeline_main's logging: the examples print only their transcripts


def parse_args(argv: Sequence[str] | None = None) -> Config:
    p = argparse.ArgumentParser(prog="python -m pipelines.docs_examples", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--readme", type=Path, default=Config.readme)
    p.add_argument("--index", type=Path, default=Config.index, help="the index the examples use (make demo builds it)")
    p.add_argument("--photos", type=Path, default=Config.photos, help="folder holding the example photos")
    p.add_argument("--skip", nargs="*", default=[], choices=list(EXAMPLES), help="examples to leave as they are")
    a = p.parse_args(argv)
    return Config(a.readme, a.index, a.photos, tuple(a.skip))


# -- running commands in a scratch folder that looks like a user's --------------------------------------


def _workspace(cfg: Config, scratch: Path) -> Path:
    """``scratch`` with ``indexes/demo`` (a link to the index) and ``photos/`` (the example photos)."""
    if not (cfg.index / "manifest.json").is_file():
        raise ConfigError(f"{cfg.index}: no index there; build it with `make demo` or pass --index")
    missing = [src for src in PHOTOS.values() if not (cfg.photos / src).is_file()]
    if missing:
        raise ConfigError(f"{cfg.photos}: missing example photos {missing}; pass --photos")
    (scratch / "indexes").mkdir()
    (scratch / "indexes" / "demo").symlink_to(cfg.index.resolve(), target_is_directory=True)
    (scratch / "photos").mkdir()
    for name, src in PHOTOS.items():
        shutil.copyfile(cfg.photos / src, scratch / "photos" / name)
    (scratch / "photos" / "broken.jpg").write_bytes(b"this is not a JPEG")
    return scratch


def _run(cwd: Path, command: str, *, exit_status: bool = False) -> str:
    """``$ command`` and what it printed (stdout and stderr, interleaved as a terminal shows them)."""
    argv = command.split()
    if argv[0] == "geoindex":
        argv = [sys.executable, "-m", "geoindex", *argv[1:]]
    env = {**os.environ, "COLUMNS": "120", "PYTHONUNBUFFERED": "1"}
    done = subprocess.run(argv, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          check=False)
    if done.returncode not in (0, 1):
        raise ConfigError(f"`{command}` failed with exit status {done.returncode}:\n{done.stdout}")
    shown = f'{command}; echo "exit $?"' if exit_status else command
    return f"$ {shown}\n{done.stdout}" + (f"exit {done.returncode}\n" if exit_status else "")


def abbreviate(value: Any, *, keep: Sequence[str]) -> Any:
    """A JSON value for a README: lists and objects not named in ``keep`` shown as ``[...]`` / ``{...}``."""
    if isinstance(value, dict):
        elided: dict[type, str] = {list: "[...]", dict: "{...}"}
        return {k: v if k in keep or type(v) not in elided else elided[type(v)] for k, v in value.items()}
    return value


def _rounded(value: Any) -> Any:
    """Floats to 4 decimals, for reading (the service sends them whole)."""
    if isinstance(value, float):
        return round(value, 4)
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_rounded(v) for v in value]
    return value


def _json_line(value: Any) -> str:
    text = json.dumps(_rounded(value), separators=(",", ":"))
    return text.replace('"[...]"', "[...]").replace('"{...}"', "{...}")


def _serve_example(cwd: Path) -> str:
    import requests

    with serving_subprocess("indexes/demo", cwd=cwd) as (base, _):
        health = requests.get(f"{base}/health", timeout=30).json()
        with open(cwd / "photos" / "berlin.jpg", "rb") as f:
            answer = requests.post(f"{base}/locate", files={"image": ("berlin.jpg", f)}, data={"top_n": "2"},
                                   timeout=120).json()
    port = SHOWN_PORT  # the server ran on a free port; the transcript shows the one users would pick
    answer["reason"] = answer["reason"] and answer["reason"][:60] + " ..."
    return (f"$ geoindex serve --index indexes/demo --port {port}      # binds to 127.0.0.1; the page at /, "
            f"API docs at /docs and /redoc\n$ curl -s localhost:{port}/health\n"
            f"{_json_line(abbreviate(health, keep=()))}\n"
            f"$ curl -s -F image=@photos/berlin.jpg -F top_n=2 localhost:{port}/locate\n"
            f"{_json_line(abbreviate(answer, keep=('exif', 'radius_km', 'tile', 'bbox')))}\n")


def _demo_example(cwd: Path) -> str:
    """``make demo``'s transcript: the demo built into a scratch index (the one the examples use stays)."""
    argv = [sys.executable, "-m", "pipelines.demo", "--index", str(cwd / "demo-index"), "--quiet"]
    done = subprocess.run(argv, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, check=False)
    if done.returncode != 0:
        raise ConfigError(f"the demo failed with exit status {done.returncode}:\n{done.stdout}")
    return "$ python -m pipelines.demo --quiet      # what make demo runs, without the progress bars\n" + \
        done.stdout.replace(str(cwd / "demo-index"), "indexes/demo")


EXAMPLES: dict[str, Callable[[Path], str]] = {
    "locate-one": lambda cwd: _run(cwd, "geoindex locate photos/berlin.jpg --index indexes/demo --top-n 3"),
    "locate-folder": lambda cwd: _run(cwd, "geoindex locate photos/ --index indexes/demo --top-n 1",
                                      exit_status=True),
    "locate-bbox": lambda cwd: _run(
        cwd, "geoindex locate photos/berlin.jpg --index indexes/demo --top-n 3 --bbox -12 34 35 72"),
    "serve": _serve_example,
    "demo": _demo_example,
}


# -- the README -------------------------------------------------------------------------------------


def generated_blocks(readme: str) -> dict[str, str]:
    """The README's generated blocks, by name (their ```console fences included)."""
    return {m["name"]: m["body"] for m in BLOCK.finditer(readme)}


def replace_blocks(readme: str, outputs: dict[str, str]) -> str:
    """``readme`` with each named block's body replaced by ``outputs[name]`` in a console fence."""
    unknown = set(outputs) - set(generated_blocks(readme))
    if unknown:
        raise ConfigError(f"README has no block marked <!-- generated: NAME --> for {sorted(unknown)}")

    def body(m: re.Match[str]) -> str:
        text = outputs.get(m["name"])
        if text is None:
            return m.group(0)
        return f"{m.group(1)}```console\n{text.rstrip()}\n```\n{m.group(4)}"

    return BLOCK.sub(body, readme)


def run(cfg: Config) -> int:
    readme = cfg.readme.read_text(encoding="utf-8")
    wanted = [name for name in EXAMPLES if name not in cfg.skip]
    with tempfile.TemporaryDirectory(prefix="geoindex-docs-") as tmp:
        cwd = _workspace(cfg, Path(tmp))
        outputs = {}
        for name in wanted:
            started = time.perf_counter()
            outputs[name] = EXAMPLES[name](cwd).replace(tmp, ".").replace(f"{ROOT}/", "")
            print(f"example {name}: {time.perf_counter() - started:.1f} s", file=sys.stderr, flush=True)
        atomic_write_bytes(cfg.readme, replace_blocks(readme, outputs).encode("utf-8"))
        print(f"wrote {len(outputs)} examples to {cfg.readme}", file=sys.stderr)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return pipeline_main(argv, parse_args, run, finish=lambda _cfg, status: status)


if __name__ == "__main__":
    raise SystemExit(main())
