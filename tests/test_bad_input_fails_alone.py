"""No input may cost the other answers, hang, or give a silent wrong answer."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from faiss.contrib.ivf_tools import add_preassigned

import geoindex
from geoindex.errors import IndexFormatError
from geoindex.storage.manifest import Manifest
from geoindex.storage.store import (
    FAISS_FILE,
    level_dir,
    list_shards,
    read_embeddings,
    read_level_columns,
    write_faiss,
)
from tests.conftest import png_claiming, relist, write_tiles


@pytest.fixture
def index_copy(small_index, tmp_path) -> Path:
    dst = tmp_path / "copy"
    shutil.copytree(small_index, dst)
    return dst


def _edit_manifest(index_dir: Path, edit) -> None:
    path = index_dir / "manifest.json"
    data = json.loads(path.read_text())
    data = edit(data)
    path.write_text(json.dumps(data))


# -- item 6: malformed manifests ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "edit,match",
    [
        (lambda d: [], "JSON object"),
        (lambda d: None, "JSON object"),
        (lambda d: {**d, "dim": "abc"}, "'dim' is 'abc'"),
        (lambda d: {**d, "imagery": 5}, "'imagery' is 5"),
        (lambda d: {**d, "format_version": "1"}, "not a positive integer"),
        (lambda d: {**d, "levels": [{"zoom": 1}]}, "malformed"),
        (lambda d: {**d, "levels": "z01"}, "'levels'"),
        (lambda d: {**d, "photo_encoder": {"name": "tiny"}}, "base_fingerprint"),
    ],
)
def test_malformed_manifest_is_an_index_format_error(index_copy, edit, match):
    _edit_manifest(index_copy, edit)
    with pytest.raises(IndexFormatError, match=match) as info:
        geoindex.open_index(index_copy)
    assert str(index_copy / "manifest.json") in str(info.value)
    assert "newer" not in str(info.value)


# -- item 7: nothing wrong on disk turns into a silently wrong tile -----------------------------------


def test_level_listing_no_files_is_refused(index_copy):
    def edit(d):
        d["levels"][1]["files"] = []
        return d

    _edit_manifest(index_copy, edit)
    with pytest.raises(IndexFormatError, match="does not list"):
        geoindex.open_index(index_copy)


def test_unlisted_extra_shard_is_refused(index_copy):
    shard = list_shards(index_copy, 2)[0]
    shutil.copy(shard, shard.with_name("part-00099.parquet"))
    with pytest.raises(IndexFormatError, match="part-00099.parquet"):
        geoindex.open_index(index_copy, verify=False)


@pytest.mark.parametrize("edit", ["shift_x", "negate_y", "swap_parent"])
def test_tile_coordinates_are_checked_on_open(index_copy, edit):
    shard = list_shards(index_copy, 3)[0]
    table = pq.read_table(shard)
    x = table.column("x").to_numpy().copy()
    y = table.column("y").to_numpy().copy()
    if edit == "shift_x":
        x += 100000
    elif edit == "negate_y":
        y = -y
    else:  # in range, but under another parent: the tile would be reported for the wrong place
        x[[0, -1]] = x[[-1, 0]]
        y[[0, -1]] = y[[-1, 0]]
    table = table.set_column(1, "x", pa.array(x)).set_column(2, "y", pa.array(y))
    pq.write_table(table, shard)
    relist(index_copy)  # checksums agree: only the content check can tell
    with pytest.raises(IndexFormatError, match="z03|zoom-3") as info:
        geoindex.open_index(index_copy, verify=True)
    assert "build_index --zoom 3" in str(info.value)


def _rewrite_ids(index_dir: Path, zoom: int, change) -> None:
    """Rebuild level ``zoom``'s FAISS file from parquet with ids passed through ``change``; same size."""
    cols = read_level_columns(index_dir, zoom, ("parent_row",))
    emb = np.concatenate([read_embeddings(p) for p in list_shards(index_dir, zoom)]).astype(np.float32)
    old = faiss.read_index(str(level_dir(index_dir, zoom) / FAISS_FILE))
    ivf = faiss.IndexIVFScalarQuantizer(faiss.IndexFlatIP(emb.shape[1]), emb.shape[1], old.nlist,
                                        faiss.ScalarQuantizer.QT_fp16, faiss.METRIC_INNER_PRODUCT, False)
    ivf.is_trained = True
    ids = change(np.arange(len(emb), dtype=np.int64))
    add_preassigned(ivf, emb, cols["parent_row"].astype(np.int64), ids)
    write_faiss(ivf, level_dir(index_dir, zoom) / FAISS_FILE)
    relist(index_dir)


def _set(i: int, value: int):
    def change(ids: np.ndarray) -> np.ndarray:
        ids = ids.copy()
        ids[i] = value
        return ids
    return change


@pytest.mark.parametrize(
    "change",
    [_set(5, 10**12), _set(5, -1), _set(5, -7), _set(5, 4), lambda ids: ids[::-1].copy()],
    ids=["huge", "minus-one", "negative", "duplicate", "swapped"],
)
def test_faiss_ids_are_checked_on_open_without_checksums(index_copy, change):
    _rewrite_ids(index_copy, 3, change)
    with pytest.raises(IndexFormatError, match="FAISS id") as info:
        geoindex.open_index(index_copy, verify=False)
    assert "index.faiss" in str(info.value) and "--zoom 3" in str(info.value)


def test_faiss_ids_fast_path_agrees_with_faiss(small_index):
    from geoindex.storage.store import ivf_ids_fast, ivf_ids_slow

    for zoom in (2, 3):
        path = level_dir(small_index, zoom) / FAISS_FILE
        index = faiss.read_index(str(path), faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY)
        sizes, slow = ivf_ids_slow(index)
        fast = ivf_ids_fast(path, index, sizes)
        assert fast is not None  # the layout was recognised, so large indexes take the fast path
        assert np.array_equal(fast, slow) and np.array_equal(slow, np.arange(index.ntotal))


@pytest.mark.parametrize("nonempty", [[1, 4, 7], list(range(9))], ids=["sparse", "full"])
def test_faiss_ids_fast_path_reads_both_list_layouts(tmp_path, nonempty):
    from geoindex.storage.store import ivf_ids_fast, ivf_ids_slow

    d, nlist = 6, 10  # code size 12: not a multiple of 8, the byte-gather path
    parents = np.sort(np.repeat(np.array(nonempty), 3)).astype(np.int64)
    ivf = faiss.IndexIVFScalarQuantizer(faiss.IndexFlatIP(d), d, nlist, faiss.ScalarQuantizer.QT_fp16,
                                        faiss.METRIC_INNER_PRODUCT, False)
    ivf.is_trained = True
    ids = np.arange(len(parents), dtype=np.int64)
    add_preassigned(ivf, np.random.default_rng(0).random((len(parents), d), dtype=np.float32), parents, ids)
    path = tmp_path / "ivf.faiss"
    write_faiss(ivf, path)
    index = faiss.read_index(str(path), faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY)
    sizes, slow = ivf_ids_slow(index)
    fast = ivf_ids_fast(path, index, sizes)
    assert fast is not None and np.array_equal(fast, slow) and np.array_equal(fast, ids)


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    from geoindex.interfaces.cli import main

    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def _photo_bytes(tile=(5, 2, 3)) -> bytes:
    import io

    import mercantile

    from tests.conftest import render_tile

    buf = io.BytesIO()
    render_tile(mercantile.Tile(*tile)).save(buf, "PNG")
    return buf.getvalue()


def _photo(path: Path, tile=(5, 2, 3)) -> Path:
    import mercantile

    from tests.conftest import render_tile

    render_tile(mercantile.Tile(*tile)).save(path)
    return path


def test_cli_verify_checks_checksums_on_large_indexes(index_copy, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("geoindex.storage.store.VERIFY_AUTO_BYTES", 0)  # as if the index were large
    shard = list_shards(index_copy, 3)[0]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF  # an embedding byte: same size, other content
    shard.write_bytes(bytes(data))
    photo = _photo(tmp_path / "a.png")
    code, _, err = _run(capsys, "locate", str(photo), "--index", str(index_copy), "-k", "4", "--device", "cpu",
                        "--verify")
    assert code == 2 and "checksum" in err and str(shard) in err


def test_search_refuses_ids_beyond_the_level(small_index):
    """A last guard: an id past the rows raises a typed error instead of IndexError (file changed after open)."""
    from geoindex.retrieval.levels.stored import FaissLevel

    index = geoindex.open_index(small_index)
    level = FaissLevel(index.stored[1])
    with pytest.raises(IndexFormatError, match="id 16 outside its 16 rows"):
        level.tiles(np.array([[0, 16]]))
    assert level.tiles(np.array([[0, -1]]))[0][0, 1] == -1


# -- item 1 and 11: a path that cannot be read costs only its own answer ------------------------------


def _deny(monkeypatch, locked: Path) -> None:
    """Make every stat or listing under ``locked`` fail with EACCES, as chmod 000 does for other users.

    Tests run as root here, where chmod does not deny access, so the failure is simulated at os level.
    """
    import errno
    import os

    real_stat, real_scandir, real_listdir = os.stat, os.scandir, os.listdir

    def denied(p) -> bool:
        return str(os.fspath(p)).startswith(str(locked))

    def stat(p, *a, **kw):
        if denied(p) and str(os.fspath(p)) != str(locked):
            raise PermissionError(errno.EACCES, "Permission denied", str(p))
        return real_stat(p, *a, **kw)

    def scandir(p="."):
        if denied(p):
            raise PermissionError(errno.EACCES, "Permission denied", str(p))
        return real_scandir(p)

    def listdir(p="."):
        if denied(p):
            raise PermissionError(errno.EACCES, "Permission denied", str(p))
        return real_listdir(p)

    monkeypatch.setattr(os, "stat", stat)
    monkeypatch.setattr(os, "scandir", scandir)
    monkeypatch.setattr(os, "listdir", listdir)


def test_unreadable_paths_fail_alone_in_locate(small_index, tmp_path, capsys, monkeypatch):
    import os

    good = _photo(tmp_path / "good.png")
    locked = tmp_path / "locked"
    locked.mkdir()
    _photo(locked / "inside.png")
    long_name = tmp_path / ("x" * 300 + ".png")
    loop = tmp_path / "loop.png"
    os.symlink(loop, loop)
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    newline = _photo(tmp_path / "two\nlines.png")
    _deny(monkeypatch, locked)
    args = [str(good), str(locked / "inside.png"), str(locked), str(long_name), str(loop), str(fifo), "/dev/zero",
            str(newline)]
    code, out, err = _run(capsys, "locate", *args, "--index", str(small_index), "-k", "4", "--device", "cpu",
                          "--top-n", "1")
    assert code == 1, err
    assert "Traceback" not in err
    assert f"{locked / 'inside.png'}: permission denied" in err
    assert f"{locked}: folder cannot be read: permission denied" in err
    assert "characters, longest part 304; the file system allows 255 bytes per name): rename" in err
    assert f"{loop}: symbolic link loop" in err
    assert f"{fifo}: is a FIFO (named pipe)" in err
    assert "/dev/zero: is a character device" in err
    assert "2 of 8 images located" in err and "6 failed" in err
    rows = [line for line in out.splitlines()[1:] if "uncalibrated index" not in line]  # the table's note per image
    assert len(rows) == 2  # one per located photo, top-n 1
    assert "good.png" in rows[0] and "two\\nlines.png" in rows[1]  # escaped: one line per candidate


def test_unreadable_paths_fail_alone_in_the_api(small_index, tmp_path, monkeypatch):
    good = _photo(tmp_path / "good.png")
    locked = tmp_path / "locked"
    locked.mkdir()
    _photo(locked / "inside.png")
    long_name = tmp_path / ("x" * 300 + ".png")
    _deny(monkeypatch, locked)
    index = geoindex.open_index(small_index)
    results = index.search([good, locked / "inside.png", long_name], k=4, on_error="return")
    assert isinstance(results[0], geoindex.SearchResult)
    assert isinstance(results[1], geoindex.ImageError) and "permission denied" in str(results[1])
    assert isinstance(results[2], geoindex.ImageError) and "file name too long" in str(results[2])


# -- item 3: bad output paths are refused before the search -------------------------------------------


@pytest.mark.parametrize(
    "option,target,match",
    [
        ("--map", "{tmp}/missing/map.png", "the folder .*missing does not exist"),
        ("--map", "{tmp}", "is a directory"),
        ("--map", "/proc", "is a directory"),
        ("--map", "/proc/map.png", "cannot write in /proc"),
        ("--map", "{tmp}/map.xyz", "unknown image extension '.xyz'"),
        ("--map", "{tmp}/map", "unknown image extension"),
        ("--geojson", "{tmp}/missing/out.geojson", "the folder .*missing does not exist"),
        ("--geojson", "{tmp}", "is a directory"),
        ("--geojson", "/proc/out.geojson", "cannot write in /proc"),
    ],
)
def test_bad_output_paths_fail_before_the_search(small_index, tmp_path, capsys, monkeypatch, option, target, match):
    import re

    from geoindex import api

    def no_search(*a, **kw):
        raise AssertionError("searched before checking the output path")

    monkeypatch.setattr(api._Searcher, "search", no_search)
    photo = _photo(tmp_path / "a.png")
    code, out, err = _run(capsys, "locate", str(photo), "--index", str(small_index), "-k", "4", "--device", "cpu",
                          option, target.format(tmp=tmp_path), "--map-source", "bluemarble")
    assert code == 2 and out == ""
    assert re.search(f"error: {option} .*{match}", err), err
    assert len(err.strip().splitlines()) == 1


# -- item 4: a dead --map-source costs seconds, and a bad one is refused before the search ------------


def test_dead_map_source_gives_up_fast(small_index, tmp_path, capsys, caplog):
    import http.server
    import threading

    requests_seen = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - the stdlib's name
            requests_seen.append(self.path)
            self.send_response(503)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *a):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        photo = _photo(tmp_path / "a.png")
        png = tmp_path / "map.png"
        code, out, err = _run(capsys, "locate", str(photo), "--index", str(small_index), "-k", "4", "--device",
                              "cpu", "--map", str(png), "--map-source",
                              f"http://127.0.0.1:{server.server_address[1]}/{{z}}/{{x}}/{{y}}.png")
    finally:
        server.shutdown()
        server.server_close()
    assert code == 0 and png.is_file()
    assert "failed 2 times in a row and was not asked again" in caplog.text and "--map-source" in caplog.text
    # 2 tiles x 2 attempts; without the breaker: 17 tiles x up to 7 ancestors x 6 attempts
    assert len(requests_seen) == 4, requests_seen


@pytest.mark.parametrize("spec,match", [("{tmp}/nothing.mbtiles", "check --map-source"),
                                        ("{tmp}/notes.txt", "cannot use --map-source"),
                                        ("{tmp}/locked", "cannot use --map-source")])
def test_bad_map_source_is_refused_before_the_search(small_index, tmp_path, capsys, monkeypatch, spec, match):
    from geoindex import api

    (tmp_path / "notes.txt").write_text("not tiles")
    (tmp_path / "locked").mkdir()
    (tmp_path / "locked" / "4").mkdir()
    _deny(monkeypatch, tmp_path / "locked" / "4")
    monkeypatch.setattr(api._Searcher, "search", lambda *a, **kw: pytest.fail("searched first"))
    photo = _photo(tmp_path / "a.png")
    code, out, err = _run(capsys, "locate", str(photo), "--index", str(small_index), "-k", "4", "--device", "cpu",
                          "--map", str(tmp_path / "map.png"), "--map-source", spec.format(tmp=tmp_path))
    assert code == 2 and out == "" and match in err and "--source" not in err.replace("--map-source", "")


# -- item 2: bad devices; item 5: server arguments --------------------------------------------------


@pytest.mark.parametrize(
    "device,gpus,match",
    [
        ("bogus", 0, "'bogus' is not a torch device; use auto, cpu, cuda or cuda:N"),
        ("cuda", 0, "no CUDA GPU is visible to torch here; use --device cpu"),
        ("cuda:7", 0, "no CUDA GPU is visible"),
        ("cuda:7", 2, "this machine has 2 CUDA GPU\\(s\\), cuda:0..cuda:1"),
        ("cpu:0:1", 0, "not a torch device"),
    ],
)
def test_bad_devices_are_usage_errors(small_index, tmp_path, capsys, monkeypatch, device, gpus, match):
    import re

    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpus > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    photo = _photo(tmp_path / "a.png")
    for argv in (["locate", str(photo)], ["serve"]):
        code, out, err = _run(capsys, *argv, "--index", str(small_index), "--device", device)
        assert code == 2 and out == "", err
        assert re.search(f"^error: --device .*{match}", err), err
        assert len(err.strip().splitlines()) == 1


@pytest.mark.parametrize(
    "args,match",
    [
        (["--port", "99999"], "--port must be in 1..65535, got 99999"),
        (["--port", "-1"], "--port must be in 1..65535"),
        (["--max-upload-mb", "-1"], "--max-upload-mb must be a positive number of megabytes, got -1.0"),
        (["--max-upload-mb", "0"], "--max-upload-mb must be a positive"),
        (["--max-upload-mb", "nan"], "--max-upload-mb must be a positive"),
    ],
)
def test_bad_server_arguments_are_usage_errors(small_index, capsys, monkeypatch, args, match):
    import uvicorn

    monkeypatch.setattr(uvicorn, "run", lambda *a, **kw: pytest.fail("served despite a bad argument"))
    code, _, err = _run(capsys, "serve", "--index", str(small_index), "--device", "cpu", *args)
    assert code == 2 and f"error: {match}" in err, err


def test_build_index_refuses_a_missing_gpu(tmp_path, capsys, monkeypatch):
    import torch

    from pipelines import build_index

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    code = build_index.main(["--zoom", "1", "--index", str(tmp_path / "idx"), "--encoder", "tiny",
                             "--schedule", "1", "3", "1", "--device", "cuda:1", "--quiet"])
    assert code == 2 and "--device cuda:1: no CUDA GPU is visible" in capsys.readouterr().err


# -- item 8: server memory; item 11: two image parts -------------------------------------------------


def _encoded(img, fmt: str) -> bytes:
    import io

    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


@pytest.fixture
def client_for(small_index):
    pytest.importorskip("httpx")
    from fastapi.testclient import TestClient

    from geoindex.interfaces.service import create_app

    index = geoindex.open_index(small_index)

    def make(**kw):
        return TestClient(create_app(index, default_k=4, **kw))

    return make


def test_service_pixel_limit_refuses_before_decoding_but_passes_big_jpegs(client_for, monkeypatch):
    from PIL import Image


    client = client_for(max_pixels=2_000_000)
    r = client.post("/locate", files={"image": ("bomb.png", png_claiming(9400, 9400))})
    assert r.status_code == 413 and "9400x9400 pixels exceeds the 2000000 pixel limit" in r.json()["detail"]
    wide = _encoded(Image.new("RGB", (2000, 1001)), "PNG")
    loads = []
    monkeypatch.setattr(Image.Image, "load", lambda self, _load=Image.Image.load: loads.append(self.size) or
                        _load(self))
    r = client.post("/locate", files={"image": ("wide.png", wide)})
    assert r.status_code == 413 and not [s for s in loads if s == (2000, 1001)]  # no pixels were decoded
    r = client.post("/locate", files={"image": ("phone.jpg", _encoded(Image.new("RGB", (4096, 4096)), "JPEG"))})
    assert r.status_code == 200, r.text  # 16.8 MP, decoded at 1/4 scale: 1.05 MP
    assert client.get("/health").json()["max_pixels"] == 2_000_000


def test_service_bounds_concurrent_decodes_with_503(client_for):
    import threading

    client = client_for(max_concurrent=1, busy_timeout_s=0.2)
    index = client.app.state.index
    inside, release = threading.Event(), threading.Event()
    real_embed = index.embed

    def slow_embed(images, **kw):
        inside.set()
        release.wait(60)
        return real_embed(images, **kw)

    index.embed = slow_embed
    png = _photo_bytes()
    first: list = []
    t = threading.Thread(target=lambda: first.append(client.post("/locate", files={"image": ("a.png", png)})))
    t.start()
    try:
        assert inside.wait(60)
        busy = client.post("/locate", files={"image": ("b.png", png)})
        assert busy.status_code == 503 and busy.headers["Retry-After"] == "1" and "busy" in busy.json()["detail"]
    finally:
        release.set()
        t.join(60)
        del index.embed
    assert first[0].status_code == 200
    assert client.post("/locate", files={"image": ("c.png", png)}).status_code == 200  # the slot was released


def test_service_arguments_are_checked(small_index):
    from geoindex.errors import ConfigError
    from geoindex.interfaces.service import create_app

    index = geoindex.open_index(small_index)
    for kw, match in [({"max_upload_bytes": -1}, "max-upload-mb"), ({"max_pixels": 0}, "max-megapixels"),
                      ({"max_concurrent": 0}, "max-concurrent")]:
        with pytest.raises(ConfigError, match=match):
            create_app(index, **kw)


# -- item 9: damaged shards are repaired by a rerun ----------------------------------------------------

BUILD_SCHEDULE = ["--schedule", "1", "3", "1", "--encoder", "tiny", "--quiet"]


def _build_index(argv: list[str]) -> list:
    from pipelines import build_index

    return build_index.run(build_index.parse_args(argv + BUILD_SCHEDULE))


def _search_all(index: Path) -> list:
    opened = geoindex.open_index(index)
    xq = np.random.default_rng(0).standard_normal((20, opened.photo_encoder.dim)).astype(np.float32)
    xq /= np.linalg.norm(xq, axis=1, keepdims=True)
    return [[(lv.tiles, lv.scores) for lv in r.trace] for r in opened.search_embeddings(xq, k=5)]


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_rerun_repairs_a_damaged_shard_and_keeps_deeper_levels(tmp_path, tile_dir, damage):
    index = tmp_path / "index"
    args = ["--index", str(index), "--source", str(tile_dir), "--shard-size", "5"]
    _build_index(["--all", *args])
    expected = _search_all(index)
    shard = list_shards(index, 2)[1]
    good = shard.read_bytes()
    shard.write_bytes({"truncate": good[: len(good) // 2], "garbage": b"PAR1" + b"\0" * 100, "empty": b""}[damage])
    with pytest.raises(IndexFormatError, match="re-encodes damaged shards only"):
        geoindex.open_index(index)
    summary = _build_index(["--zoom", "2", *args])[0]
    assert (summary.shards_written, summary.shards_reused) == (1, 3)  # only the damaged shard
    assert shard.read_bytes() == good
    assert [lv.zoom for lv in Manifest.load(index).levels] == [1, 2, 3]  # z3 was not dropped
    assert _search_all(index) == expected


def test_corrupt_build_plan_is_rebuilt_not_a_traceback(tmp_path, tile_dir, caplog):
    index = tmp_path / "index"
    args = ["--index", str(index), "--source", str(tile_dir), "--shard-size", "5"]
    _build_index(["--zoom", "1", *args])
    (level_dir(index, 1) / "_build.json").write_text("{not json")
    summary = _build_index(["--zoom", "1", *args])[0]
    assert summary.shards_written == 1 and "_build.json is unreadable" in caplog.text
    geoindex.open_index(index)


# -- item 10: every bad tile in one run; --skip-bad-tiles; odd tile sizes ------------------------------


@pytest.fixture
def bad_tiles(tmp_path) -> tuple[Path, list[Path]]:
    root = write_tiles(tmp_path / "tiles", (1,))
    bad = [root / "1" / "0" / "1.png", root / "1" / "1" / "0.png", root / "1" / "1" / "1.png"]
    for p in bad:
        p.write_bytes(p.read_bytes()[:40])
    return root, bad


def test_one_run_names_every_bad_tile(tmp_path, bad_tiles, capsys):
    from pipelines import build_index

    root, bad = bad_tiles
    code = build_index.main(["--zoom", "1", "--index", str(tmp_path / "index"), "--source", str(root),
                             *BUILD_SCHEDULE])
    err = capsys.readouterr().err
    assert code == 2 and all(str(p) in err for p in bad), err
    assert "3 tile(s) could not be read" in err and "--skip-bad-tiles" in err


def test_skip_bad_tiles_leaves_them_out_and_counts_them(tmp_path, bad_tiles):
    root, _ = bad_tiles
    summary = _build_index(["--zoom", "1", "--index", str(tmp_path / "index"), "--source", str(root),
                            "--skip-bad-tiles"])[0]
    assert (summary.rows, summary.missing, summary.bad_skipped) == (1, 3, 3)
    assert len(geoindex.open_index(tmp_path / "index").stored[0].x) == 1


def test_tiles_of_another_size_are_reported(tmp_path, bad_tiles, caplog):
    from PIL import Image

    root, bad = bad_tiles
    for p in bad[:2]:
        p.unlink()  # two missing tiles; one good 64x64 tile and one placeholder remain
    Image.new("RGB", (10, 10), (200, 200, 200)).save(bad[2])
    summary = _build_index(["--zoom", "1", "--index", str(tmp_path / "index"), "--source", str(root)])[0]
    assert summary.rows == 2
    assert "1 tiles of zoom 1 are not 64x64" in caplog.text and "1/1/1 is 10x10" in caplog.text


# -- item 11: quiet means quiet; options are named as typed -----------------------------------------------


def test_quiet_hides_pillow_metadata_warnings(small_index, tmp_path):
    import io
    import subprocess
    import sys

    from PIL import Image

    exif = Image.Exif()
    exif[0x010E] = "x" * 200  # ImageDescription, then cut short: Pillow warns while reading it
    exif[0x0112] = 1
    data = exif.tobytes()
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), (90, 120, 40)).save(buf, "JPEG", exif=data[: len(data) - 150])
    photo = tmp_path / "odd_exif.jpg"
    photo.write_bytes(buf.getvalue())
    root = Path(__file__).resolve().parents[1]

    def run(*extra: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "geoindex", "locate", str(photo), "--index", str(small_index),
                               "-k", "4", "--device", "cpu", *extra], cwd=root, capture_output=True, text=True,
                              env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(root), "PYTHONWARNINGS": "default"})

    quiet = run("-q")
    assert quiet.returncode == 0, quiet.stderr
    assert "Warning" not in quiet.stderr and "Skipping tag" not in quiet.stderr, quiet.stderr
    assert "1 of 1 images located" in quiet.stderr


def test_region_errors_name_region(small_index, tmp_path, capsys):
    photo = _photo(tmp_path / "a.png")
    bad = tmp_path / "region.geojson"
    bad.write_text("{broken")
    code, _, err = _run(capsys, "locate", str(photo), "--index", str(small_index), "--device", "cpu",
                        "--region", str(bad))
    assert code == 2 and f"{bad} (--region): not a readable GeoJSON file" in err and "--geojson" not in err


def test_gps_of_a_png_does_not_decode_its_pixels(monkeypatch):
    from PIL import Image, PngImagePlugin

    from geoindex.exif import read_gps

    data = _encoded(Image.new("RGB", (3000, 3000)), "PNG")
    monkeypatch.setattr(PngImagePlugin.PngImageFile, "load", lambda self: pytest.fail("decoded the pixels"))
    assert read_gps(data) is None
