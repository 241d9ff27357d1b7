"""Lazy deep levels: encoded on first use, appended atomically, equal to a fully built index; compaction."""

from __future__ import annotations

import json
import multiprocessing
import threading
from pathlib import Path

import mercantile
import numpy as np
import pytest

from geoindex.api import GeoIndex
from geoindex.errors import ConfigError, LazyLevelError, TileSourceError
from geoindex.sources import MemorySource
from geoindex.storage.lazy_store import LAZY_FILE, compact, declare_lazy
from tests.conftest import render_tile

K = 3


def _lazy_index(path: Path, encoder, source, world, *, from_zoom: int = 2) -> Path:
    """The small_index fixture's schedule (z1..3, step 1) with only the levels above ``from_zoom`` built."""
    from geoindex.geometry.tiles import LevelSchedule
    from geoindex.storage.build import build_level

    schedule = LevelSchedule(1, 3, 1)
    for zoom in schedule.zooms:
        if zoom < from_zoom:
            build_level(path, zoom, source=source, encoder=encoder, coverage=world, schedule=schedule, shard_size=16)
    declare_lazy(path, from_zoom=from_zoom, source="rendered")
    return path


def _queries(encoder, n: int = 6) -> np.ndarray:
    rng = np.random.default_rng(0)
    tiles = [mercantile.Tile(int(x), int(y), 3) for x, y in rng.integers(0, 8, (n, 2))]
    xq = encoder.encode([render_tile(t) for t in tiles])
    xq += 0.05 * rng.standard_normal(xq.shape).astype(np.float32)
    return xq / np.linalg.norm(xq, axis=1, keepdims=True)


def _answers(results):
    return [[(lt.zoom, lt.tiles) for lt in r.trace] for r in results]


def _scores(results):
    return np.array([[s for lt in r.trace for s in lt.scores] for r in results])


def _encoded(index: GeoIndex) -> int:
    return sum(lv.tiles_encoded for lv in index.lazy)


@pytest.mark.parametrize("from_zoom", [2, 3])
def test_lazy_equals_built(tmp_path, small_index, tiny_encoder, rendered_source, world, from_zoom):
    built = GeoIndex(small_index)
    lazy = GeoIndex(_lazy_index(tmp_path, tiny_encoder, rendered_source, world, from_zoom=from_zoom),
                    lazy_source=rendered_source)
    assert [lv.zoom for lv in lazy.lazy] == list(range(from_zoom, 4))
    xq = _queries(tiny_encoder)
    want = built.search_embeddings(xq, K)
    first = lazy.search_embeddings(xq, K)
    assert _answers(first) == _answers(want)  # same tiles at every level
    np.testing.assert_allclose(_scores(first), _scores(want), atol=1e-5)  # same scores
    assert _encoded(lazy) > 0
    assert all(lt.note and "appended" in lt.note for lt in first[0].trace if lt.zoom >= from_zoom)
    from geoindex.interfaces.outputs import result_to_dict

    assert "appended" in result_to_dict(first[0], trace=True)["trace"][-1]["note"]  # the JSON trace says it too
    # repeated: nothing encoded; a freshly opened index (another process) reads the appended rows
    before = _encoded(lazy)
    again = lazy.search_embeddings(xq, K)
    assert _encoded(lazy) == before and _answers(again) == _answers(want)
    assert all(lt.note == "lazy: every tile from the index" for lt in again[0].trace if lt.zoom >= from_zoom)
    reopened = GeoIndex(tmp_path, lazy_source=rendered_source)
    np.testing.assert_allclose(_scores(reopened.search_embeddings(xq, K)), _scores(want), atol=1e-5)
    assert _encoded(reopened) == 0
    # a wider beam needs new tiles; still the built answer
    np.testing.assert_allclose(_scores(reopened.search_embeddings(xq, K + 2)),
                               _scores(built.search_embeddings(xq, K + 2)), atol=1e-5)


def test_declare_lazy_checks_levels(tmp_path, tiny_encoder, rendered_source, world):
    _lazy_index(tmp_path, tiny_encoder, rendered_source, world)
    with pytest.raises(ConfigError, match="first level"):
        declare_lazy(tmp_path, from_zoom=1, source="rendered")
    with pytest.raises(ConfigError, match="needs exactly the levels"):
        declare_lazy(tmp_path, from_zoom=3, source="rendered")  # z2 is not built
    assert json.loads((tmp_path / LAZY_FILE).read_text())["zooms"] == [2, 3]


class _Counting:
    """A rendered source that counts fetches per tile and can be told to fail."""

    name = "counting"

    def __init__(self) -> None:
        self.calls: dict[mercantile.Tile, int] = {}
        self.lock = threading.Lock()
        self.fail = False

    def get(self, tile):
        if self.fail:
            raise TileSourceError(f"tile {tile} unavailable: server said 503")
        with self.lock:
            self.calls[tile] = self.calls.get(tile, 0) + 1
        return render_tile(tile)


def test_lazy_threads_encode_each_tile_once(tmp_path, tiny_encoder, rendered_source, world):
    source = _Counting()
    lazy = GeoIndex(_lazy_index(tmp_path, tiny_encoder, rendered_source, world), lazy_source=source)
    xq = _queries(tiny_encoder, 8)
    results: list = [None] * 8
    barrier = threading.Barrier(8)

    def one(i: int) -> None:
        barrier.wait()
        results[i] = lazy.search_embeddings(xq[i : i + 1], K)[0]

    threads = [threading.Thread(target=one, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert source.calls and max(source.calls.values()) == 1  # no tile fetched or encoded twice
    want = lazy.search_embeddings(xq, K)
    assert _answers(results) == _answers(want)


def _search_in_process(path: str, queue) -> None:  # runs in a spawned process
    from geoindex.api import GeoIndex as _GeoIndex
    from geoindex.models.encoders import create_encoder
    from geoindex.sources import MemorySource as _Memory

    index = _GeoIndex(path, lazy_source=_Memory(render_tile, name="rendered"))
    xq = _queries(create_encoder("tiny"))
    res = index.search_embeddings(xq, K)
    queue.put((_encoded(index), [[lt.tiles for lt in r.trace] for r in res]))


def test_lazy_processes_share_appends(tmp_path, small_index, tiny_encoder, rendered_source, world):
    """Two processes fill the same lazy levels at once: the level stays readable, no tile is stored twice."""
    _lazy_index(tmp_path, tiny_encoder, rendered_source, world)
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_search_in_process, args=(str(tmp_path), queue)) for _ in range(2)]
    for p in procs:
        p.start()
    outs = [queue.get(timeout=600) for _ in procs]
    for p in procs:
        p.join()
    assert all(p.exitcode == 0 for p in procs)
    want = GeoIndex(small_index).search_embeddings(_queries(tiny_encoder), K)
    assert all(tiles == [[lt.tiles for lt in r.trace] for r in want] for _, tiles in outs)
    reopened = GeoIndex(tmp_path, lazy_source=rendered_source)
    stored = sum(lv.rows for lv in reopened.lazy)
    assert sum(n for n, _ in outs) == stored  # the second process encoded only what the first had not
    for lv in reopened.lazy:
        c = np.concatenate([lv.store.read(p).codes for p in lv.store.files()])
        assert len(c) == len(np.unique(c))


def test_crash_during_append_loses_nothing_committed(tmp_path, tiny_encoder, rendered_source, world, monkeypatch):
    lazy = GeoIndex(_lazy_index(tmp_path, tiny_encoder, rendered_source, world), lazy_source=rendered_source)
    xq = _queries(tiny_encoder)
    want = lazy.search_embeddings(xq[:3], K)
    committed = sum(lv.rows for lv in lazy.lazy)
    # a writer killed mid-append leaves a temporary file behind: readers must ignore it
    seg_dir = lazy.lazy[0].store.dir
    (seg_dir / "seg-99999999999999999999-1-deadbeef.parquet.1234abcd.tmp").write_bytes(b"PAR1 half a file")

    import geoindex.storage.lazy_store as lazy_mod

    def die(*a, **k):
        raise KeyboardInterrupt  # the process is interrupted while writing the next segment

    monkeypatch.setattr(lazy_mod.pq, "write_table", die)
    with pytest.raises(KeyboardInterrupt):
        lazy.search_embeddings(xq[3:], K)
    monkeypatch.undo()
    reopened = GeoIndex(tmp_path, lazy_source=rendered_source)
    assert sum(lv.rows for lv in reopened.lazy) == committed
    again = reopened.search_embeddings(xq[:3], K)
    assert _answers(again) == _answers(want) and _encoded(reopened) == 0


def test_read_only_index_falls_back_to_on_the_fly(tmp_path, small_index, tiny_encoder, rendered_source, world,
                                                   monkeypatch):
    _lazy_index(tmp_path, tiny_encoder, rendered_source, world)
    xq = _queries(tiny_encoder)
    want = GeoIndex(small_index).search_embeddings(xq, K)
    ro = GeoIndex(tmp_path, lazy_source=rendered_source, read_only=True)
    res = ro.search_embeddings(xq, K)
    assert _answers(res) == _answers(want)
    assert all(lt.note.startswith("on-the-fly: opened read-only") for lt in res[0].trace[1:])
    assert not any(lv.store.files() for lv in ro.lazy)  # nothing written
    # a write that fails (read-only filesystem, permissions) falls back the same way, and says why
    import geoindex.storage.lazy_store as lazy_mod

    def refuse(self, rows):
        raise PermissionError(13, "Permission denied", str(self.dir))

    monkeypatch.setattr(lazy_mod.LazyStore, "append", refuse)
    monkeypatch.setattr(lazy_mod, "atomic_write_bytes", lambda path, data: refuse(ro.lazy[0].store, None))
    for enc_file in tmp_path.glob("lazy/z*/encoder.json"):
        enc_file.unlink()  # opening must not need to write either
    rw = GeoIndex(tmp_path, lazy_source=rendered_source)
    res = rw.search_embeddings(xq, K)
    assert _answers(res) == _answers(want)
    assert "on-the-fly: cannot write" in res[0].trace[1].note and "PermissionError" in res[0].trace[1].note


def test_failing_source_is_a_clear_error(tmp_path, tiny_encoder, rendered_source, world):
    source = _Counting()
    source.fail = True
    lazy = GeoIndex(_lazy_index(tmp_path, tiny_encoder, rendered_source, world), lazy_source=source)
    with pytest.raises(LazyLevelError, match=r"tile source 'counting' failed .* nothing was stored"):
        lazy.search_embeddings(_queries(tiny_encoder), K)
    assert not any(lv.store.files() for lv in lazy.lazy)
    source.fail = False  # the source recovers: the same index answers
    assert lazy.search_embeddings(_queries(tiny_encoder), K)


def test_source_without_a_tile_records_it(tmp_path, small_index, tiny_encoder, rendered_source, world):
    """Tiles the source lacks are left out, as a build leaves them out, and are not fetched again."""
    gap = mercantile.Tile(3, 5, 3)

    def render(tile):
        if tile == gap:
            from geoindex.errors import TileNotFoundError

            raise TileNotFoundError(f"no tile {tile}")
        return render_tile(tile)

    lazy = GeoIndex(_lazy_index(tmp_path, tiny_encoder, rendered_source, world), lazy_source=MemorySource(render))
    xq = tiny_encoder.encode([render_tile(gap)])
    res = lazy.search_embeddings(xq, 4)
    assert gap not in res[0].trace[-1].tiles
    n = _encoded(lazy)
    lazy.search_embeddings(xq, 4)
    assert _encoded(lazy) == n


def test_compact_folds_segments(tmp_path, small_index, tiny_encoder, rendered_source, world):
    lazy = GeoIndex(_lazy_index(tmp_path, tiny_encoder, rendered_source, world), lazy_source=rendered_source)
    xq = _queries(tiny_encoder)
    for i in range(len(xq)):
        lazy.search_embeddings(xq[i : i + 1], K)
    store = lazy.lazy[-1].store
    assert len(list(store.dir.glob("seg-*.parquet"))) > 1
    rows = [lv.rows for lv in lazy.lazy]
    summary = compact(tmp_path, rows_per_part=20)
    assert [s.rows for s in summary] == rows
    assert not list(store.dir.glob("seg-*.parquet")) and list(store.dir.glob("part-g0001-*.parquet"))
    # the old reader keeps working and may append again; a new reader sees everything once
    more = lazy.search_embeddings(xq, K + 3)
    reopened = GeoIndex(tmp_path, lazy_source=rendered_source)
    assert _answers(reopened.search_embeddings(xq, K + 3)) == _answers(more) and _encoded(reopened) == 0
    summary = compact(tmp_path)
    assert [s.parts for s in summary] == [1, 1]
    assert _answers(GeoIndex(small_index).search_embeddings(xq, K + 3)) == _answers(more)


def test_build_index_lazy_from_and_compact(tmp_path, tile_dir, tiny_encoder):
    """`build_index --all --lazy-from 2 --source DIR` then searches answer as `--all`; `--compact` folds the appends."""
    from pipelines import build_index

    common = ["--source", str(tile_dir), "--encoder", "tiny", "--quiet", "--schedule", "1", "3", "1"]
    build_index.run(build_index.parse_args(["--all", "--index", str(tmp_path / "full")] + common))
    summaries = build_index.run(build_index.parse_args(["--all", "--lazy-from", "2", "--index",
                                                        str(tmp_path / "lazy")] + common))
    assert [s.zoom for s in summaries] == [1]
    cfg = json.loads((tmp_path / "lazy" / LAZY_FILE).read_text())
    assert cfg["zooms"] == [2, 3] and cfg["source"] == str(tile_dir)
    xq = _queries(tiny_encoder)
    want = GeoIndex(tmp_path / "full").search_embeddings(xq, K)
    lazy = GeoIndex(tmp_path / "lazy")  # the source comes from lazy.json
    assert _answers(lazy.search_embeddings(xq[:3], K)) == _answers(want[:3])
    assert _answers(lazy.search_embeddings(xq, K)) == _answers(want)
    assert build_index.main(["--compact", "--index", str(tmp_path / "lazy"), "--quiet"]) == 0
    assert not list((tmp_path / "lazy" / "lazy").glob("z*/seg-*"))
    reopened = GeoIndex(tmp_path / "lazy")
    assert _answers(reopened.search_embeddings(xq, K)) == _answers(want) and _encoded(reopened) == 0
    with pytest.raises(ConfigError, match="first level"):
        build_index.parse_args(["--all", "--lazy-from", "1", "--index", str(tmp_path / "x")] + common)
