"""Bad input gets one line naming the file, value and option; lazy levels recover; nothing silently wrong."""

from __future__ import annotations

import json
import os
from pathlib import Path

import mercantile
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from geoindex.api import GeoIndex
from geoindex.errors import (
    ConfigError,
    IndexFormatError,
    IndexMismatchError,
    LazyLevelError,
    TileNotFoundError,
)
from geoindex.geometry.coverage import Coverage
from geoindex.sources import MemorySource
from geoindex.storage.lazy_store import LAZY_FILE, compact, declare_lazy
from tests.conftest import relist, render_tile, write_tiles

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _lazy_index(path: Path, encoder, source, world, *, spec: str = "rendered") -> Path:
    """z1..3 step 1 with z1 built and z2, z3 lazy."""
    from geoindex.geometry.tiles import LevelSchedule
    from geoindex.storage.build import build_level

    build_level(path, 1, source=source, encoder=encoder, coverage=world, schedule=LevelSchedule(1, 3, 1),
                shard_size=16)
    declare_lazy(path, from_zoom=2, source=spec)
    return path


def _query(encoder, tile=(5, 3, 3)) -> np.ndarray:
    return encoder.encode([render_tile(mercantile.Tile(*tile))])


class _Broken:
    """A lazy source whose every tile fails with a long server message."""

    name = "rendered"

    def __init__(self, padding: int) -> None:
        self.padding = padding

    def get(self, tile):
        from geoindex.errors import TileSourceError

        raise TileSourceError(f"tile {tuple(tile)}: the server said 503 " + "x" * self.padding)


class _Switchable:
    """A source that lacks every tile of some zooms until told otherwise (a folder not mounted)."""

    name = "rendered"

    def __init__(self, absent: set[int]) -> None:
        self.absent = absent

    def get(self, tile):
        if tile.z in self.absent:
            raise TileNotFoundError(f"no tile {tuple(tile)}")
        return render_tile(tile)


# -- lazy levels -------------------------------------------------------------------------------------


def test_lazy_source_without_a_zoom_answers_from_the_levels_above(tmp_path, tiny_encoder, rendered_source, world):
    index = GeoIndex(_lazy_index(tmp_path, tiny_encoder, rendered_source, world), lazy_source=_Switchable({2}))
    res = index.search_embeddings(_query(tiny_encoder), 3)[0]
    assert res.tile.z == 1  # the answer comes from the built level
    assert "stopped early above z2" in res.trace[1].note


def test_missing_lazy_tiles_are_asked_for_again(tmp_path, tiny_encoder, rendered_source, world):
    path = _lazy_index(tmp_path, tiny_encoder, rendered_source, world)
    source = _Switchable({3})
    xq = _query(tiny_encoder)
    first = GeoIndex(path, lazy_source=source).search_embeddings(xq, 3)[0]
    assert first.tile.z == 2 and "missing from the source" in first.trace[-1].note
    source.absent = set()  # the source comes back
    assert GeoIndex(path, lazy_source=source).search_embeddings(xq, 3)[0].tile.z == 2  # not yet asked again
    retried = GeoIndex(path, lazy_source=source, retry_missing=True).search_embeddings(xq, 3)[0]
    assert retried.tile.z == 3 and "missing" not in retried.trace[-1].note
    # the new rows win over the old ones for every later reader, and through compaction
    assert GeoIndex(path, lazy_source=source).search_embeddings(xq, 3)[0].tile == retried.tile
    compact(path)
    assert GeoIndex(path, lazy_source=source).search_embeddings(xq, 3)[0].tile == retried.tile


def test_missing_lazy_tiles_are_retried_after_the_configured_time(tmp_path, tiny_encoder, rendered_source, world):
    path = _lazy_index(tmp_path, tiny_encoder, rendered_source, world)
    source = _Switchable({3})
    xq = _query(tiny_encoder)
    GeoIndex(path, lazy_source=source).search_embeddings(xq, 3)
    cfg = json.loads((path / LAZY_FILE).read_text())
    (path / LAZY_FILE).write_text(json.dumps({**cfg, "retry_missing_after_s": 0}))
    source.absent = set()
    assert GeoIndex(path, lazy_source=source).search_embeddings(xq, 3)[0].tile.z == 3


def test_lazy_store_refuses_other_imagery(tmp_path, tiny_encoder, rendered_source, world):
    path = _lazy_index(tmp_path, tiny_encoder, rendered_source, world)
    GeoIndex(path, lazy_source=rendered_source).search_embeddings(_query(tiny_encoder), 3)
    other = MemorySource(render_tile, name="other-imagery")
    with pytest.raises(IndexMismatchError, match=r"imagery 'rendered', not from 'other-imagery'.*lazy.json"):
        GeoIndex(path, lazy_source=other).search_embeddings(_query(tiny_encoder, (1, 6, 3)), 3)


@pytest.mark.parametrize("text", ["[]", '"z14"', "null", "{", '{"zooms": [2, 3], "source": 5}'])
def test_malformed_lazy_json_is_an_index_format_error(tmp_path, tiny_encoder, rendered_source, world, text):
    path = _lazy_index(tmp_path, tiny_encoder, rendered_source, world)
    (path / LAZY_FILE).write_text(text)
    with pytest.raises(IndexFormatError, match="lazy.json"):
        GeoIndex(path, lazy_source=rendered_source)


@pytest.mark.parametrize("text", ["", "garbage", "[1, 2]"])
def test_damaged_encoder_json_is_an_index_format_error(tmp_path, tiny_encoder, rendered_source, world, text):
    path = _lazy_index(tmp_path, tiny_encoder, rendered_source, world)
    GeoIndex(path, lazy_source=rendered_source).search_embeddings(_query(tiny_encoder), 3)
    (path / "lazy" / "z02" / "encoder.json").write_text(text)
    with pytest.raises(IndexFormatError, match=r"encoder.json: damaged"):
        GeoIndex(path, lazy_source=rendered_source)


def test_segment_with_variable_length_embeddings_is_an_index_format_error(tmp_path, tiny_encoder, rendered_source,
                                                                         world):
    path = _lazy_index(tmp_path, tiny_encoder, rendered_source, world)
    seg = path / "lazy" / "z02" / "seg-00000000000000000001-1-abcdef01.parquet"
    seg.parent.mkdir(parents=True)
    pq.write_table(pa.table({"code": pa.array([0], pa.int64()), "x": pa.array([0], pa.int32()),
                             "y": pa.array([0], pa.int32()), "found": [True],
                             "embedding": pa.array([[0.5] * 3], pa.list_(pa.float16()))}), seg)
    with pytest.raises(IndexFormatError, match=r"seg-.*fixed_size_list"):
        GeoIndex(path, lazy_source=rendered_source)


def test_compact_leaves_foreign_part_names_alone(tmp_path, tiny_encoder, rendered_source, world):
    path = _lazy_index(tmp_path, tiny_encoder, rendered_source, world)
    GeoIndex(path, lazy_source=rendered_source).search_embeddings(_query(tiny_encoder), 3)
    stray = path / "lazy" / "z02" / "part-gXYZ-notes.parquet"
    stray.write_text("not ours")
    compact(path)
    assert stray.exists()
    assert GeoIndex(path, lazy_source=rendered_source).search_embeddings(_query(tiny_encoder), 3)


def test_lazy_source_gone_still_answers_built_levels(tmp_path, tiny_encoder, rendered_source, world, tile_dir):
    import shutil

    folder = tmp_path / "tiles"
    shutil.copytree(tile_dir, folder)
    path = _lazy_index(tmp_path / "index", tiny_encoder, rendered_source, world, spec=str(folder))
    shutil.rmtree(folder)
    index = GeoIndex(path)  # opening does not need the source
    region = index.within(Coverage.from_bbox(-10, -10, 10, 10))
    assert region.search_embeddings(_query(tiny_encoder), 3)[0].tile.z == 1
    with pytest.raises(LazyLevelError, match=r"lazy.json: the lazy levels' tile source .* cannot be opened") as info:
        index.search_embeddings(_query(tiny_encoder), 3)
    assert "--source" not in str(info.value)


def test_failing_lazy_source_message_is_bounded(tmp_path, tiny_encoder, rendered_source, world):
    index = GeoIndex(_lazy_index(tmp_path, tiny_encoder, rendered_source, world), lazy_source=_Broken(padding=100))
    with pytest.raises(LazyLevelError) as info:
        index.search_embeddings(_query(tiny_encoder), 3)
    assert len(str(info.value)) < 1000


def test_lazy_scoring_is_chunked_and_equals_the_einsum(monkeypatch):
    from geoindex.retrieval.levels import lazy
    from geoindex.storage.lazy_store import Rows

    rng = np.random.default_rng(0)
    emb = rng.standard_normal((50, 8)).astype(np.float16)
    table = Rows(np.arange(50, dtype=np.int64), np.ones(50, bool), emb, np.zeros(50, np.int64))
    rows = rng.integers(-1, 50, (3, 40))
    xq = rng.standard_normal((3, 8)).astype(np.float32)
    want = np.einsum("qcd,qd->qc", emb[np.maximum(rows, 0)].astype(np.float32), xq)
    for block in (16, 8 * 40 * 2):  # two candidates per block; two queries per block
        monkeypatch.setattr(lazy, "SCORE_BLOCK", block)
        np.testing.assert_allclose(lazy.score_rows(table, rows, xq), want, rtol=1e-5, atol=1e-6)
    assert lazy.score_rows(Rows.empty(8), np.full((2, 5), -1), xq[:2]).shape == (2, 5)


# -- arguments ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("body", ['{"type": "Polygon", "coordinates": 5}',
                                  '{"type": "FeatureCollection", "features": 5}',
                                  "[" * 100_000 + "]" * 100_000])
def test_malformed_geojson_is_a_config_error(tmp_path, body):
    path = tmp_path / "region.geojson"
    path.write_text(body)
    with pytest.raises(ConfigError, match=r"region.geojson \(--region\)"):
        Coverage.from_geojson(path, option="--region")


def test_zero_width_bbox_at_the_antimeridian_is_empty():
    with pytest.raises(ConfigError, match="empty"):
        Coverage.from_bbox(180, -10, -180, 10)
    assert Coverage.from_bbox(-180, -10, 180, 10).tiles(zoom=1)[0].size == 4


@pytest.mark.parametrize("threads", [0, 100_000])
def test_thread_counts_are_bounded(threads):
    from geoindex.models.threads import build_threads, configure_query_threads

    with pytest.raises(ConfigError, match=rf"--threads {threads}: must be in 1\.\.1024"):
        configure_query_threads(threads, apply=False)
    with pytest.raises(ConfigError, match="--threads"):
        with build_threads(threads):
            pass


def test_locate_refuses_huge_thread_counts(small_index, tmp_path, capsys):
    from geoindex.interfaces.cli import main

    photo = tmp_path / "p.png"
    render_tile(mercantile.Tile(1, 1, 2)).save(photo)
    assert main(["locate", str(photo), "--index", str(small_index), "--threads", "100000", "--device", "cpu"]) == 2
    assert "--threads 100000" in capsys.readouterr().err


@pytest.mark.parametrize("argv,named", [
    (["--threads", "0"], "--threads 0"), (["--workers", "-1"], "--workers -1"),
    (["--schedule", "6", "2", "2"], "--schedule 6 2 2"), (["--schedule", "2", "6", "0"], "--schedule 2 6 0"),
    (["--lazy-from", "4"], "--lazy-from 4"), (["--engine", "ray", "--skip-bad-tiles"], "--skip-bad-tiles"),
    (["--threads", "100000"], "--threads 100000"),
])
def test_build_index_argument_errors_are_usage_errors(tmp_path, capsys, argv, named):
    from pipelines import build_index

    assert build_index.main(["--all", *argv, "--index", str(tmp_path / "i"), "--encoder", "tiny", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and named in err and len(err.splitlines()) == 1
    assert not (tmp_path / "i").exists()  # refused before anything was written


def test_train_argument_errors_are_usage_errors(tmp_path, capsys):
    from pipelines import train

    assert train.main(["--photos", str(tmp_path / "p.csv"), "--schedule", "6", "2", "2",
                       "--out", str(tmp_path / "o")]) == 2
    assert capsys.readouterr().err.startswith("error: ")


@pytest.mark.parametrize("lr", [float("nan"), float("inf")])
def test_train_refuses_a_learning_rate_that_is_not_finite(lr):
    from geoindex.training.train import TrainConfig

    with pytest.raises(ConfigError, match="--lr"):
        TrainConfig(lr=lr)


def _csv(path: Path, text: str, encoding: str) -> Path:
    path.write_bytes(text.encode(encoding))
    return path


@pytest.mark.parametrize("encoding", ["utf-8-sig", "utf-16"])
def test_photo_csv_from_spreadsheets_is_read(tmp_path, encoding):
    from geoindex.training.dataset import read_photo_csv

    table = read_photo_csv(_csv(tmp_path / "p.csv", "path,lat,lon\na.jpg,1.5,2.5\n", encoding))
    assert table.lat.tolist() == [1.5] and table.paths[0].endswith("a.jpg")


@pytest.mark.parametrize("body,match", [(b"path,lat,lon\n\xe9t\xe9.jpg,1,2\n", "not UTF-8.*CSV UTF-8"),
                                        (b"path,lat,lon\n" + b"a" * 200_000 + b",1,2\n", r"p.csv:2: not a photo CSV")])
def test_unreadable_photo_csv_is_a_config_error(tmp_path, body, match):
    from geoindex.training.dataset import read_photo_csv

    path = tmp_path / "p.csv"
    path.write_bytes(body)
    with pytest.raises(ConfigError, match=match):
        read_photo_csv(path)


def test_lazy_rows_keep_their_time_when_a_segment_lacks_it(tmp_path, tiny_encoder, rendered_source, world):
    """Segments written before rows carried a time take the file's mtime."""
    from geoindex.storage.lazy_store import LazyStore

    path = _lazy_index(tmp_path, tiny_encoder, rendered_source, world)
    store = LazyStore(path, 2, tiny_encoder.dim)
    store.dir.mkdir(parents=True)
    seg = store.dir / "seg-00000000000000000001-1-abcdef01.parquet"
    pq.write_table(pa.table({"code": pa.array([0], pa.int64()), "x": pa.array([0], pa.int32()),
                             "y": pa.array([0], pa.int32()), "found": [False],
                             "embedding": pa.FixedSizeListArray.from_arrays(
                                 pa.array(np.zeros(tiny_encoder.dim, np.float16)), tiny_encoder.dim)}), seg)
    os.utime(seg, ns=(10**18, 10**18))
    assert store.read(seg).checked.tolist() == [10**18]


# -- service -----------------------------------------------------------------------------------------


def _png(tile=(1, 1, 2)) -> bytes:
    import io

    buf = io.BytesIO()
    render_tile(mercantile.Tile(*tile)).save(buf, "PNG")
    return buf.getvalue()


def _client(index, **kw):
    pytest.importorskip("httpx")
    from fastapi.testclient import TestClient

    from geoindex.interfaces.service import create_app

    return TestClient(create_app(index, default_k=3, **kw))


def test_service_lazy_source_failure_is_a_bounded_503(tmp_path, tiny_encoder, rendered_source, world):
    index = GeoIndex(_lazy_index(tmp_path, tiny_encoder, rendered_source, world), lazy_source=_Broken(padding=200))
    r = _client(index).post("/locate", files={"image": ("a.png", _png())})
    assert r.status_code == 503 and r.headers["Retry-After"] == "30"
    assert "tile source" in r.json()["detail"] and len(r.json()["detail"]) < 700


@pytest.mark.parametrize("stage", ["search", "map"])
def test_service_searches_and_draws_maps_inside_the_slot(small_index, stage, monkeypatch):
    """With one slot, a request arriving while another searches or draws its map waits, then gets 503."""
    import geoindex.interfaces.outputs.map_image as map_image

    index = GeoIndex(small_index)
    client = _client(index, max_concurrent=1, busy_timeout_s=0.1, map_source=MemorySource(render_tile))
    inner: list = []

    def nested() -> None:
        inner.append(client.post("/locate", files={"image": ("b.png", _png())}).status_code)

    if stage == "search":
        real = index.search_embeddings
        monkeypatch.setattr(index, "search_embeddings", lambda *a, **kw: nested() or real(*a, **kw))
    else:
        real_map = map_image.encode_map
        monkeypatch.setattr(map_image, "encode_map", lambda *a, **kw: nested() or real_map(*a, **kw))
    r = client.post("/locate", files={"image": ("a.png", _png())}, data={"include_map": "true"})
    assert r.status_code == 200 and inner == [503]


def test_service_draws_a_map_file_inside_the_slot(small_index, monkeypatch):
    """POST /locate/map draws the map (which decodes the upload again) in the photo's slot too."""
    import geoindex.interfaces.outputs.map_image as map_image

    client = _client(GeoIndex(small_index), max_concurrent=1, busy_timeout_s=0.1, map_source=MemorySource(render_tile))
    inner: list = []
    real_map = map_image.encode_map

    def nested(*a, **kw):
        inner.append(client.post("/locate", files={"image": ("b.png", _png())}).status_code)
        return real_map(*a, **kw)

    monkeypatch.setattr(map_image, "encode_map", nested)
    r = client.post("/locate/map", files={"image": ("a.png", _png())})
    assert r.status_code == 200 and r.content.startswith(b"\x89PNG") and inner == [503]


def test_service_closes_slow_bodies(small_index):
    import socket
    import time

    from geoindex.interfaces.service import create_app
    from tests.conftest import serving

    app = create_app(GeoIndex(small_index), body_timeout_s=1.0)
    with serving(app) as url:
        host, port = url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=10) as sock:
            sock.sendall(b"POST /locate HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
                         b"Content-Length: 1000\r\n\r\n--b")
            started = time.monotonic()
            reply = b""
            while chunk := sock.recv(4096):  # returns b"" once the server closes the connection
                reply += chunk
            assert time.monotonic() - started < 8
    assert reply.startswith(b"HTTP/1.1 408") and b"--body-timeout" in reply


# -- index files are checked even without checksums -------------------------------------------------


@pytest.fixture(scope="module")
def pq_index(tmp_path_factory, tiny_encoder, rendered_source, world) -> Path:
    from geoindex.geometry.tiles import LevelSchedule
    from geoindex.storage.build import build_level

    path = tmp_path_factory.mktemp("pq_index")
    schedule = LevelSchedule(1, 2, 1)
    for zoom in schedule.zooms:
        build_level(path, zoom, source=rendered_source, encoder=tiny_encoder, coverage=world, schedule=schedule,
                    shard_size=16, codec="pq")
    return path


def _rewrite_npy_header(path: Path, header: dict | bytes) -> None:
    """Replace the .npy header, keeping the data bytes and the header length (so the size stays right)."""
    raw = path.read_bytes()
    hlen = int.from_bytes(raw[8:10], "little")
    old = raw[10 : 10 + hlen]
    new = header if isinstance(header, bytes) else repr(header).encode()
    new = new.ljust(len(old) - 1) + b"\n"
    assert len(new) == len(old)
    path.write_bytes(raw[:10] + new + raw[10 + hlen :])


def _earlier_layout(src: Path, dst: Path) -> Path:
    """A copy of a pq index as the earlier layout kept it: the level's float16 vectors in exact.npy, no re-rank code."""
    import dataclasses
    import shutil

    from geoindex.storage.manifest import FileInfo, Manifest
    from geoindex.storage.store import EXACT_FILE, RERANK_CODEBOOK, RERANK_FILE, list_shards, read_embeddings

    shutil.copytree(src, dst)
    ldir = dst / "z02"
    np.save(ldir / EXACT_FILE, np.concatenate([read_embeddings(p) for p in list_shards(dst, 2)]))
    manifest = Manifest.load(dst)
    level = manifest.level(2)
    assert level is not None
    files = tuple(f for f in level.files if f.name not in (RERANK_FILE, RERANK_CODEBOOK))
    files += (FileInfo(EXACT_FILE, 0, ""),)
    for name in (RERANK_FILE, RERANK_CODEBOOK):
        (ldir / name).unlink(missing_ok=True)
    dataclasses.replace(manifest, levels=(manifest.levels[0], dataclasses.replace(level, files=files))).save(dst)
    relist(dst)
    return dst


def test_an_index_of_the_earlier_layout_reranks_from_exact_npy(pq_index, tmp_path):
    from geoindex.retrieval.levels.stored import FaissLevel
    from geoindex.storage.store import EXACT_FILE, open_store

    path = _earlier_layout(pq_index, tmp_path / "earlier")
    _, stored = open_store(path, verify=True)
    exact = np.load(path / "z02" / EXACT_FILE).astype(np.float32)
    np.testing.assert_array_equal(stored[1].exact, exact)
    xq = exact[:3] / np.linalg.norm(exact[:3], axis=1, keepdims=True)
    D, I = FaissLevel(stored[1]).search(xq, 2, np.zeros((3, 1), dtype=np.int64))
    np.testing.assert_allclose(D, np.einsum("qkd,qd->qk", exact[I], xq), atol=1e-5)  # scored from exact.npy


@pytest.mark.parametrize("header,match", [
    (lambda shape: {"descr": "<i2", "fortran_order": False, "shape": shape}, r"holds <i2"),
    (lambda shape: {"descr": "<f2", "fortran_order": True, "shape": shape}, r"Fortran order"),
    (lambda shape: b"{garbage", r"unreadable .npy header"),
])
def test_exact_npy_header_is_checked_without_checksums(pq_index, tmp_path, header, match):
    from geoindex.storage.store import EXACT_FILE, open_store

    path = _earlier_layout(pq_index, tmp_path / "copy")
    npy = path / "z02" / EXACT_FILE
    shape = np.load(npy, mmap_mode="r").shape
    _rewrite_npy_header(npy, header(shape))
    with pytest.raises(IndexFormatError, match=match) as info:
        open_store(path, verify=False)
    assert str(npy) in str(info.value) and "build_index" in str(info.value)


@pytest.mark.parametrize("header,match", [
    (lambda shape: {"descr": "|i1", "fortran_order": False, "shape": shape}, r"holds \|i1"),
    (lambda shape: {"descr": "|u1", "fortran_order": True, "shape": shape}, r"Fortran order"),
    (lambda shape: b"{garbage", r"unreadable .npy header"),
])
def test_rerank_code_header_is_checked_without_checksums(pq_index, tmp_path, header, match):
    import shutil

    from geoindex.storage.store import RERANK_FILE, open_store

    path = tmp_path / "copy"
    shutil.copytree(pq_index, path)
    npy = path / "z02" / RERANK_FILE
    shape = np.load(npy, mmap_mode="r").shape
    _rewrite_npy_header(npy, header(shape))
    with pytest.raises(IndexFormatError, match=match) as info:
        open_store(path, verify=False)
    assert str(npy) in str(info.value) and "build_index" in str(info.value)


def test_parquet_column_types_are_checked_without_checksums(small_index, tmp_path):
    import shutil

    from geoindex.storage.store import list_shards, open_store

    path = tmp_path / "copy"
    shutil.copytree(small_index, path)
    shard = list_shards(path, 2)[0]
    table = pq.read_table(shard)
    i = table.schema.get_field_index("x")
    pq.write_table(table.set_column(i, "x", table.column("x").cast(pa.float64())), shard)
    relist(path)  # a consistent-looking manifest: sizes and checksums agree
    with pytest.raises(IndexFormatError, match=r"column 'x' is double, not an integer"):
        open_store(path, verify=False)


# -- one writer per index; refused writes are one line ----------------------------------------------

_COMMON = ["--encoder", "tiny", "--quiet", "--schedule", "1", "3", "1"]


def _hold_lock(index: Path):
    """Another process holding the index's write lock until its stdin closes."""
    import subprocess
    import sys

    code = ("import sys; from geoindex.files import index_write_lock\n"
            f"with index_write_lock({str(index)!r}, what='build_index --zoom 1 (test)'):\n"
            "    print('held', flush=True); sys.stdin.read()\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            cwd=Path(__file__).resolve().parents[1])
    assert proc.stdout is not None and proc.stdout.readline().strip() == b"held"
    return proc


@pytest.mark.parametrize("argv", [["--zoom", "1"], ["--compact"]])
def test_second_writer_of_an_index_is_refused(tmp_path, tile_dir, capsys, argv):
    from pipelines import build_index

    index = tmp_path / "i"
    assert build_index.main(["--all", "--lazy-from", "2", "--index", str(index), "--source", str(tile_dir),
                             *_COMMON]) == 0
    before = sorted(p.relative_to(index) for p in index.rglob("*") if p.name != "write.lock")
    proc = _hold_lock(index)
    try:
        assert build_index.main([*argv, "--index", str(index), "--source", str(tile_dir), *_COMMON]) == 2
    finally:
        proc.communicate(b"")
    err = capsys.readouterr().err
    assert f"{index} is being written by pid {proc.pid} (build_index --zoom 1 (test)" in err
    assert sorted(p.relative_to(index) for p in index.rglob("*") if p.name != "write.lock") == before
    assert build_index.main([*argv, "--index", str(index), "--source", str(tile_dir), *_COMMON]) == 0  # released


def test_build_api_takes_the_index_lock(tmp_path, tiny_encoder, rendered_source, world):
    from geoindex.errors import IndexBusyError
    from geoindex.storage.build import build_level

    proc = _hold_lock(tmp_path)
    try:
        with pytest.raises(IndexBusyError, match="is being written by pid"):
            build_level(tmp_path, 1, source=rendered_source, encoder=tiny_encoder, coverage=world)
    finally:
        proc.communicate(b"")


@pytest.mark.parametrize("code,hint", [(28, "the disk is full"), (30, "read-only"), (27, "file-size limit")])
def test_refused_writes_are_one_line_and_lose_nothing(tmp_path, tile_dir, capsys, monkeypatch, code, hint):
    import geoindex.storage.build
    from geoindex.api import GeoIndex as Index
    from pipelines import build_index

    index = tmp_path / "i"
    args = ["--index", str(index), "--source", str(tile_dir), *_COMMON]
    assert build_index.main(["--zoom", "1", *args]) == 0

    def refuse(path, **_):
        raise OSError(code, os.strerror(code), str(path))

    monkeypatch.setattr(geoindex.storage.build, "write_shard", refuse)
    assert build_index.main(["--zoom", "2", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: build_index --zoom 2: cannot write") and hint in err and "part-00000" in err
    assert "Traceback" not in err and len(err.splitlines()) == 1
    assert Index(index).zooms == (1,)  # the finished level is intact
    monkeypatch.undo()
    assert build_index.main(["--zoom", "2", *args]) == 0


def test_refused_compaction_is_one_line(tmp_path, tile_dir, capsys, monkeypatch):
    from geoindex.storage.lazy_store import LazyStore
    from pipelines import build_index

    index = tmp_path / "i"
    assert build_index.main(["--all", "--lazy-from", "2", "--index", str(index), "--source", str(tile_dir),
                             *_COMMON]) == 0
    GeoIndex(index).search_embeddings(np.ones((1, 64), np.float32) / 8, 2)
    monkeypatch.setattr(LazyStore, "write", lambda self, path, rows: (_ for _ in ()).throw(
        OSError(30, "Read-only file system", str(path))))
    assert build_index.main(["--compact", "--index", str(index), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "read-only" in err and "Traceback" not in err


# -- odd entries at tile paths are bad tiles, not missing ones ---------------------------------------


@pytest.fixture
def odd_tiles(tmp_path) -> tuple[Path, list[Path]]:
    root = write_tiles(tmp_path / "tiles", (2,))
    odd = [root / "2" / "1" / f"{y}.png" for y in range(4)] + [root / "2" / "2" / "0.png"]
    for p in odd:
        p.unlink()
    os.mkfifo(odd[0])
    odd[1].mkdir()
    odd[2].symlink_to(root / "nowhere.png")
    odd[3].symlink_to(odd[3])
    odd[4].write_bytes(b"")
    return root, odd


def test_odd_entries_at_tile_paths_are_named_as_bad_tiles(tmp_path, odd_tiles, capsys):
    from pipelines import build_index

    root, odd = odd_tiles
    argv = ["--zoom", "2", "--index", str(tmp_path / "index"), "--source", str(root), "--encoder", "tiny",
            "--schedule", "2", "4", "2", "--quiet"]
    assert build_index.main(argv) == 2
    err = capsys.readouterr().err
    assert "5 tile(s) could not be read" in err and all(str(p) in err for p in odd), err
    summary = build_index.run(build_index.parse_args([*argv, "--skip-bad-tiles"]))[0]
    assert (summary.rows, summary.bad_skipped) == (11, 5)
