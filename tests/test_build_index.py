"""build_index end to end: --zoom equals --all, SIGKILL + resume equals an uninterrupted build, encoders never mix."""

from __future__ import annotations

import http.server
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import faiss
import mercantile
import numpy as np
import pyarrow.parquet as pq
import pytest

import geoindex
from geoindex.errors import ConfigError, EncoderMismatchError, IndexMismatchError
from geoindex.storage.store import list_shards, shard_path
from pipelines import build_index
from tests.conftest import render_tile

ROOT = Path(__file__).resolve().parents[1]
SCHEDULE = ["--schedule", "1", "3", "1"]


def _build(argv: list[str]) -> list:
    return build_index.run(build_index.parse_args(argv + ["--encoder", "tiny", "--quiet"] + SCHEDULE))


def _level_rows(index: Path) -> dict[int, list]:
    out = {}
    for level in geoindex.open_index(index).manifest.levels:
        out[level.zoom] = [row for p in list_shards(index, level.zoom) for row in pq.read_table(p).to_pylist()]
    return out


def _search_all(index: Path) -> list:
    opened = geoindex.open_index(index)
    xq = np.random.default_rng(0).standard_normal((30, opened.photo_encoder.dim)).astype(np.float32)
    xq /= np.linalg.norm(xq, axis=1, keepdims=True)
    return [[(lv.tiles, lv.scores) for lv in r.trace] for r in opened.search_embeddings(xq, k=5)]


def test_zoom_by_zoom_equals_all(tmp_path, tile_dir):
    one = tmp_path / "one"
    for zoom in ("1", "2", "3"):
        _build(["--zoom", zoom, "--index", str(one), "--source", str(tile_dir), "--shard-size", "7"])
    every = tmp_path / "all"
    summaries = _build(["--all", "--index", str(every), "--source", str(tile_dir), "--shard-size", "7"])
    assert [s.rows for s in summaries] == [4, 16, 63] and summaries[-1].missing == 1
    assert _level_rows(one) == _level_rows(every)
    assert _search_all(one) == _search_all(every)
    for zoom in (1, 2, 3):
        a = (one / f"z{zoom:02d}" / "index.faiss").read_bytes()
        b = (every / f"z{zoom:02d}" / "index.faiss").read_bytes()
        assert a == b


def test_rerun_reuses_finished_shards(tmp_path, tile_dir):
    args = ["--all", "--index", str(tmp_path), "--source", str(tile_dir), "--shard-size", "10"]
    _build(args)
    before = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("part-*.parquet")}
    again = _build(args)
    assert [s.shards_written for s in again] == [0, 0, 0]
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("part-*.parquet")} == before


def test_deeper_level_needs_its_parent(tmp_path, tile_dir):
    with pytest.raises(ConfigError, match="--zoom 2"):
        _build(["--zoom", "3", "--index", str(tmp_path), "--source", str(tile_dir)])


def test_refuses_to_mix_encoders(tmp_path, tile_dir, monkeypatch):
    _build(["--zoom", "1", "--index", str(tmp_path), "--source", str(tile_dir)])
    import dataclasses

    from geoindex.models.encoders import ENCODERS
    monkeypatch.setitem(ENCODERS, "tiny-other", dataclasses.replace(ENCODERS["tiny"], name="tiny-other", seed=7))
    argv = ["--zoom", "2", "--index", str(tmp_path), "--source", str(tile_dir), "--quiet", *SCHEDULE]
    cfg = build_index.parse_args(argv + ["--encoder", "tiny"])
    with pytest.raises(EncoderMismatchError, match="photo encoder"):
        build_index.run(dataclasses.replace(cfg, encoder="tiny-other"))


def test_refuses_to_mix_codecs_with_an_index_mismatch(tmp_path, tile_dir):
    _build(["--zoom", "1", "--index", str(tmp_path), "--source", str(tile_dir)])
    argv = ["--zoom", "2", "--index", str(tmp_path), "--source", str(tile_dir), "--quiet", *SCHEDULE]
    with pytest.raises(IndexMismatchError, match="codec 'fp16' vs 'sq8'") as info:
        build_index.run(build_index.parse_args(argv + ["--encoder", "tiny", "--codec", "sq8"]))
    assert not isinstance(info.value, EncoderMismatchError)  # the encoders agree: only the codec differs


def test_main_reports_errors_with_exit_status(tmp_path, capsys):
    code = build_index.main(["--zoom", "5", "--index", str(tmp_path), "--encoder", "tiny", "--quiet"])
    assert code == 2
    assert "zoom 5 is not in the level schedule" in capsys.readouterr().err


class _StallingTiles:
    """An HTTP tile server on 127.0.0.1 serving rendered PNGs; it can hang on one chosen tile."""

    def __init__(self) -> None:
        self.stall_on: tuple[int, int, int] | None = None
        self.release = threading.Event()
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                z, x, y = (int(v) for v in self.path.strip("/").removesuffix(".png").split("/"))
                if (x, y, z) == (3, 5, 3):
                    self.send_error(404)
                    return
                if owner.stall_on == (z, x, y):
                    owner.release.wait(60)  # hang until the test ends; the client is killed first
                buf = io.BytesIO()
                render_tile(mercantile.Tile(x, y, z)).save(buf, "PNG")
                self.send_response(200)
                self.send_header("Content-Type", "image/png")
                self.send_header("Content-Length", str(len(buf.getvalue())))
                self.end_headers()
                self.wfile.write(buf.getvalue())

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/{{z}}/{{x}}/{{y}}.png"

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()


@pytest.fixture(scope="module")
def stalling_server():
    server = _StallingTiles()
    yield server
    server.close()


@pytest.fixture(scope="module")
def reference_index(tmp_path_factory, stalling_server) -> Path:
    path = tmp_path_factory.mktemp("reference")
    stalling_server.stall_on = None
    _build(["--all", "--index", str(path), "--source", stalling_server.url, "--shard-size", "6",
            "--workers", "1"])
    return path


def _kill_when_stalled(index: Path, url: str, stall_level: int, shards_before: int) -> None:
    """Start a build in a subprocess and SIGKILL it once it hangs on the stalling tile."""
    cmd = [sys.executable, "-m", "pipelines.build_index", "--all", "--index", str(index), "--source", url,
           "--shard-size", "6", "--workers", "1", "--encoder", "tiny", "--quiet", *SCHEDULE]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        # The build cannot pass the stalled tile, so waiting for the shards before it is race-free.
        while len(list_shards(index, stall_level)) < shards_before and time.monotonic() < deadline:
            assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
            time.sleep(0.02)
        time.sleep(0.3)  # let it reach the stalled request
        assert proc.poll() is None, "the build finished although a tile was stalled"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
        if proc.stderr:
            proc.stderr.close()


# (stalled tile as z, x, y; its level; shards of that level finished before it, with 6 tiles a shard)
KILL_POINTS = [
    ((1, 0, 0), 1, 0),  # first tile of the first level: nothing written yet
    ((2, 1, 1), 2, 0),  # first shard of level 2; level 1 complete, in the manifest
    ((2, 3, 3), 2, 2),  # after two shards of level 2
    ((3, 0, 1), 3, 0),  # first shard of the last level
    ((3, 7, 7), 3, 10),  # the very last tile
]


@pytest.mark.parametrize("stall,level,shards_before", KILL_POINTS)
def test_sigkill_and_resume_equals_uninterrupted(tmp_path, stalling_server, reference_index,
                                                 stall, level, shards_before):
    index = tmp_path / "killed"
    stalling_server.stall_on = stall
    _kill_when_stalled(index, stalling_server.url, level, shards_before)
    # What a reader sees now: either no index yet, or an index whose files are all complete.
    if (index / "manifest.json").exists():
        opened = geoindex.open_index(index, verify=True)
        assert max(opened.zooms) < level
    stalling_server.stall_on = None
    _build(["--all", "--index", str(index), "--source", stalling_server.url, "--shard-size", "6",
            "--workers", "1"])
    assert _level_rows(index) == _level_rows(reference_index)
    assert _search_all(index) == _search_all(reference_index)
    ref = faiss.read_index(str(reference_index / "z03" / "index.faiss"))
    got = faiss.read_index(str(index / "z03" / "index.faiss"))
    assert ref.ntotal == got.ntotal == 63
    assert shard_path(index, level, shards_before).exists()


def test_manifest_records_the_source_spec_and_fills_in_an_old_one(tmp_path, tile_dir):
    index = tmp_path / "index"
    _build(["--zoom", "1", "--index", str(index), "--source", str(tile_dir)])
    manifest = index / "manifest.json"
    assert geoindex.open_index(index).manifest.imagery_spec == f"dir:{tile_dir}"
    old = json.loads(manifest.read_text())
    del old["imagery_spec"]  # as written before the spec was recorded: still opens
    manifest.write_text(json.dumps(old))
    assert geoindex.open_index(index).manifest.imagery_spec is None
    _build(["--zoom", "2", "--index", str(index), "--source", str(tile_dir)])
    assert geoindex.open_index(index).manifest.imagery_spec == f"dir:{tile_dir}"


def test_thread_counts_are_checked_and_default_to_the_cpu_count():
    cfg = build_index.parse_args(["--zoom", "2"])
    assert cfg.threads is None and cfg.workers is None  # chosen at run time from the cores
    cfg = build_index.parse_args(["--zoom", "2", "--threads", "1", "--workers", "3"])
    assert (cfg.threads, cfg.workers) == (1, 3)
    for flag in ("--threads", "--workers"):
        with pytest.raises(ConfigError, match=f"{flag} 0: must be in 1..1024"):
            build_index.parse_args(["--zoom", "2", flag, "0"])


def _tile_folder(root: Path, tiles: list[mercantile.Tile]) -> Path:
    for t in tiles:
        path = root / str(t.z) / str(t.x) / f"{t.y}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        render_tile(t).save(path)
    return root


def test_children_of_missing_parents_are_counted_and_explained(tmp_path, caplog):
    """A zoom-2 tile whose zoom-1 parent the source lacks cannot be planned: say how many, and what to do."""
    absent = mercantile.Tile(1, 1, 1)
    tiles = [t for t in mercantile.tiles(-180, -85, 180, 85, [1, 2]) if t != absent]
    source = _tile_folder(tmp_path / "tiles", tiles)
    for name in ("geoindex", "pipelines"):  # an earlier --quiet run may have raised their levels
        caplog.set_level("INFO", logger=name)
    summaries = build_index.run(build_index.parse_args(
        ["--all", "--index", str(tmp_path / "index"), "--source", str(source), "--encoder", "tiny", "--quiet",
         "--schedule", "1", "2", "1"]))
    assert [s.rows for s in summaries] == [3, 12]
    assert summaries[0].orphaned is None and summaries[1].orphaned == 4
    warning = next(r.getMessage() for r in caplog.records if r.levelname == "WARNING" and "left out" in r.getMessage())
    assert "4 tiles" in warning and "zoom-1 parent" in warning and "--schedule 2" in warning
    assert "4 more tiles of the source skipped: parent tile missing" in caplog.text


def test_a_build_of_a_few_tiles_does_not_report_zero_tiles_per_second():
    from geoindex.storage.build import BuildSummary

    assert BuildSummary(2, 1, 1, 0, 1, 0, seconds=4.0).rate_text == "0.25 tiles/s"
    assert BuildSummary(4, 256, 256, 0, 1, 0, seconds=10.0).rate_text == "26 tiles/s"


def test_real_landsat_deep_level_counts_tiles_without_a_parent(tmp_path, shared_data):
    """landsat-sf holds 445 zoom-14 tiles but only 21 zoom-12 parents; the others are reported, not silent."""
    src = shared_data / "landsat-sf"
    summaries = build_index.run(build_index.parse_args(
        ["--all", "--index", str(tmp_path), "--source", str(src), "--encoder", "tiny", "--quiet",
         "--schedule", "12", "14", "2", "--bbox", "-122.7", "37.5", "-122.0", "38.0"]))
    z14 = summaries[-1]
    held = len(list((src / "14").glob("*/*.jpg")))
    assert z14.orphaned is not None and z14.orphaned > 0
    assert z14.rows + z14.orphaned == held


def _no_clip_here(monkeypatch) -> None:
    """As on a fresh machine: no CLIP weights in the caches (the installed EfficientNet-Lite0 stays)."""
    from geoindex.models.encoders import find_cached_weights

    monkeypatch.setattr("geoindex.models.encoders.find_cached_weights",
                        lambda spec: None if spec.family == "open_clip" else find_cached_weights(spec))


def test_encoder_auto_is_the_default_and_falls_back_to_efficientnet_without_clip(monkeypatch, tmp_path):
    from geoindex.models.encoders import choose_encoder
    from pipelines import train

    monkeypatch.delenv("GEOINDEX_CLIP_WEIGHTS", raising=False)
    _no_clip_here(monkeypatch)
    assert build_index.parse_args(["--all"]).encoder == "auto"
    assert train.parse_args(["--photos", "p.csv"]).encoder == "auto"
    name, why = choose_encoder()
    assert name == "efficientnet-lite0" and "no CLIP ViT-B/32 weights" in why and "--weights" in why
    weights = tmp_path / "open_clip_model.safetensors"
    weights.write_bytes(b"found, not loaded")
    assert choose_encoder(weights) == ("clip-vit-b-32", f"CLIP ViT-B/32 weights found at {weights}")
    with pytest.raises(geoindex.WeightsNotFoundError):  # asked for CLIP and it is not there: no silent swap
        choose_encoder(tmp_path / "missing.safetensors")


def test_encoder_auto_extends_an_index_with_its_own_encoder(tmp_path, tile_dir, caplog):
    _build(["--zoom", "1", "--index", str(tmp_path), "--source", str(tile_dir)])
    for name in ("geoindex", "pipelines"):  # an earlier --quiet run may have raised their levels
        caplog.set_level("INFO", logger=name)
    build_index.run(build_index.parse_args(["--zoom", "2", "--index", str(tmp_path), "--source", str(tile_dir),
                                            "--quiet"] + SCHEDULE))
    assert f"encoder tiny (--encoder auto: the encoder of the levels already in {tmp_path})" in caplog.text
    assert geoindex.open_index(tmp_path).manifest.level(2) is not None


def test_create_encoder_auto_says_which_and_why(monkeypatch, caplog):
    from geoindex.models.encoders import create_encoder

    monkeypatch.delenv("GEOINDEX_CLIP_WEIGHTS", raising=False)
    _no_clip_here(monkeypatch)
    for name in ("geoindex", "pipelines"):  # an earlier --quiet run may have raised their levels
        caplog.set_level("INFO", logger=name)
    assert create_encoder("auto").spec.name == "efficientnet-lite0"
    assert "encoder efficientnet-lite0 (auto: no CLIP ViT-B/32 weights on this machine" in caplog.text
