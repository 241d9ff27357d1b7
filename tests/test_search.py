"""The hierarchical search: indexed equals on-the-fly, a wide beam equals exhaustive search, edge cases."""

from __future__ import annotations

import mercantile
import numpy as np
import pytest
from PIL import Image

import geoindex
from geoindex.api import OnTheFlySearcher
from geoindex.errors import ConfigError
from geoindex.geometry.tiles import LevelSchedule
from geoindex.sources import MemorySource
from geoindex.storage.build import build_level
from tests.conftest import render_tile


def random_queries(n: int, zoom: int, seed: int = 0) -> list:
    """Rendered tiles of the deepest level, lightly perturbed so that no query is an exact copy."""
    rng = np.random.default_rng(seed)
    side = 1 << zoom
    out = []
    for code in rng.choice(side * side, size=n, replace=False):
        img = np.asarray(render_tile(mercantile.Tile(int(code % side), int(code // side), zoom)), dtype=np.int16)
        out.append(np.clip(img + rng.integers(-20, 21, img.shape), 0, 255).astype(np.uint8))
    return out


def _trace_tiles(result: geoindex.SearchResult) -> list[tuple[mercantile.Tile, ...]]:
    return [level.tiles for level in result.trace]


def _brute_force(index: geoindex.GeoIndex, encoder, source, xq: np.ndarray, zoom: int) -> list[mercantile.Tile]:
    """Best tile of the whole level by exact inner product over fp16-rounded tile embeddings."""
    level = next(s for s in index.stored if s.zoom == zoom)
    tiles = [mercantile.Tile(int(x), int(y), zoom) for x, y in zip(level.x, level.y)]
    emb = encoder.encode([source.get(t) for t in tiles]).astype(np.float16).astype(np.float32)
    return [tiles[i] for i in np.argmax(xq @ emb.T, axis=1)]


def test_indexed_equals_on_the_fly(small_index, rendered_source):
    index = geoindex.open_index(small_index)
    otf = OnTheFlySearcher.for_index(index, rendered_source)
    queries = random_queries(24, zoom=3)
    indexed = index.search(queries, k=3)
    onthefly = otf.search(queries, k=3)
    assert len(indexed) == len(onthefly) == 24
    for a, b in zip(indexed, onthefly):
        assert _trace_tiles(a) == _trace_tiles(b)
        for la, lb in zip(a.trace, b.trace):
            np.testing.assert_allclose(la.scores, lb.scores, atol=2e-3)  # fp16 storage tolerance
    assert otf.tiles_encoded > 0


def test_indexed_equals_on_the_fly_with_paper_step(tmp_path, tiny_encoder, rendered_source, world):
    """Step 2 (16 children per tile, as in the paper) over zoom 0, 2, 4."""
    schedule = LevelSchedule(0, 4, 2)
    for zoom in schedule.zooms:
        build_level(tmp_path, zoom, source=rendered_source, encoder=tiny_encoder, coverage=world,
                    schedule=schedule, shard_size=100)
    index = geoindex.open_index(tmp_path)
    assert [s.rows for s in index.stored] == [1, 16, 256]
    queries = random_queries(20, zoom=4, seed=1)
    otf = OnTheFlySearcher.for_index(index, rendered_source)
    for a, b in zip(index.search(queries, k=2), otf.search(queries, k=2)):
        assert _trace_tiles(a) == _trace_tiles(b)


def test_wide_beam_equals_exhaustive(small_index, tiny_encoder, rendered_source):
    index = geoindex.open_index(small_index)
    queries = random_queries(20, zoom=3, seed=2)
    xq = index.embed(queries)
    results = index.search_embeddings(xq, k=64)  # 64 >= rows of every level
    assert [r.tile for r in results] == _brute_force(index, tiny_encoder, rendered_source, xq, 3)


def test_narrow_beam_scores_fewer_candidates_but_stays_consistent(small_index):
    index = geoindex.open_index(small_index)
    xq = index.embed(random_queries(5, zoom=3, seed=3))
    for result in index.search_embeddings(xq, k=1):
        first, second, third = result.trace
        assert len(first.tiles) == len(second.tiles) == len(third.tiles) == 1
        # every kept tile descends from the tile kept above it
        assert mercantile.parent(second.tiles[0]) == first.tiles[0]
        assert mercantile.parent(third.tiles[0]) == second.tiles[0]


def test_padding_when_beam_exceeds_level(small_index):
    """k = 10 > 4 rows at zoom 1: FAISS pads with -1; the trace holds only real tiles."""
    index = geoindex.open_index(small_index)
    result = index.search(random_queries(1, zoom=3, seed=4), k=10)[0]
    assert len(result.trace[0].tiles) == 4
    assert len(result.trace[1].tiles) == 10
    assert all(t.x >= 0 and t.y >= 0 for level in result.trace for t in level.tiles)
    assert len(set(result.trace[1].tiles)) == 10


def test_empty_child_lists(tmp_path, tiny_encoder, world):
    """A parent whose children are all missing has an empty inverted list: search skips it."""
    hole = mercantile.Tile(1, 0, 1)

    def render(tile: mercantile.Tile):
        if tile.z > 1 and mercantile.parent(tile, zoom=1) == hole:
            return None
        return render_tile(tile)

    source = MemorySource(render, name="with-hole")
    schedule = LevelSchedule(1, 3, 1)
    for zoom in schedule.zooms:
        build_level(tmp_path, zoom, source=source, encoder=tiny_encoder, coverage=world, schedule=schedule)
    index = geoindex.open_index(tmp_path)
    assert [s.rows for s in index.stored] == [4, 12, 48]
    queries = random_queries(10, zoom=3, seed=5)
    xq = index.embed(queries)
    results = index.search_embeddings(xq, k=4)
    for r in results:
        assert hole in r.trace[0].tiles  # the hole's parent is kept (k = all 4) but has no children
        assert all(mercantile.parent(t, zoom=1) != hole for t in r.trace[2].tiles)
    otf = OnTheFlySearcher.for_index(index, source)
    assert [_trace_tiles(r) for r in results] == [_trace_tiles(r) for r in otf.search(queries, k=4)]
    wide = index.search_embeddings(xq, k=64)
    assert [r.tile for r in wide] == _brute_force(index, tiny_encoder, source, xq, 3)


def test_batch_equals_one_by_one(small_index):
    index = geoindex.open_index(small_index)
    queries = random_queries(8, zoom=3, seed=6)
    batch = index.search(queries, k=3)
    for q, r in zip(queries, batch):
        single = index.search(q, k=3)
        assert _trace_tiles(single) == _trace_tiles(r)
        np.testing.assert_allclose(single.score, r.score, rtol=1e-5)


def test_result_fields(small_index, tmp_path):
    path = tmp_path / "q.png"
    render_tile(mercantile.Tile(5, 2, 3)).save(path)
    result = geoindex.search(path, k=4, index=small_index, top_n=3)
    assert isinstance(result, geoindex.SearchResult)
    assert result.image == str(path)
    assert result.tile.z == 3 and len(result.candidates) == 3
    assert result.candidates[0].tile == result.tile
    lat, lon = result.lat, result.lon
    west, south, east, north = result.bbox
    assert west < lon < east and south < lat < north
    probs = [c.probability for c in result.candidates]
    assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1 + 1e-9
    scores = [c.score for c in result.candidates]
    assert scores == sorted(scores, reverse=True) and result.score == scores[0]
    assert [t.zoom for t in result.trace] == [1, 2, 3]
    # an exact copy of an indexed tile is found (its own embedding is the best match)
    assert result.tile == mercantile.Tile(5, 2, 3)


def test_list_input_returns_list(small_index):
    results = geoindex.search(random_queries(2, zoom=3), k=2, index=small_index)
    assert isinstance(results, list) and len(results) == 2


@pytest.mark.parametrize("k", [0, -1, 2049, 1.5, True])
def test_bad_k(small_index, k):
    with pytest.raises(ConfigError, match="1..2048"):
        geoindex.search(random_queries(1, zoom=3)[0], k=k, index=small_index)


def test_k_is_checked_once_per_call(small_index, monkeypatch):
    from geoindex.retrieval import beam

    calls = []
    check_k = beam.check_k

    def counting(k):
        calls.append(k)
        return check_k(k)

    monkeypatch.setattr(beam, "check_k", counting)  # every check goes through beam.beam_width
    index = geoindex.open_index(small_index)
    geoindex.search(random_queries(1, zoom=3)[0], k=3, index=index)
    index.search(random_queries(2, zoom=3), k=3)
    index.search_embeddings(np.zeros((1, index.photo_encoder.dim), np.float32), k=3)
    assert calls == [3, 3, 3]


def test_levels_that_take_an_injected_prior_declare_it(small_index):
    from geoindex.retrieval.levels import PriorLevel
    from geoindex.retrieval.levels.lazy import LazyLevel
    from geoindex.retrieval.levels.onthefly import OnTheFlyLevel
    from geoindex.retrieval.levels.stored import FaissLevel

    index = geoindex.open_index(small_index)
    assert all(isinstance(level, PriorLevel) for level in index.levels)
    assert PriorLevel in FaissLevel.__mro__ and PriorLevel in OnTheFlyLevel.__mro__  # declared, not just shaped
    assert not hasattr(LazyLevel, "ids_of")  # refused by inject with a ConfigError naming the level


def test_search_docstring_documents_k_and_fields():
    doc = geoindex.search.__doc__ or ""
    assert "beam width" in doc
    for field in ("lat", "lon", "tile", "bbox", "score", "candidates", "probability", "trace"):
        assert field in doc


def test_build_and_on_the_fly_read_rgba_tiles_alike(tiny_encoder):
    """A source whose tiles carry transparency: the build's reader and the on-the-fly level share one
    step (tile_encoding), so both composite over white and give the same embeddings."""
    from concurrent.futures import ThreadPoolExecutor

    from geoindex.geometry.tiles import tile_code_array
    from geoindex.retrieval.levels.onthefly import OnTheFlyLevel
    from geoindex.storage.build import encode_tiles

    rng = np.random.default_rng(0)
    tiles = [mercantile.Tile(x, y, 2) for x in range(4) for y in range(4)]
    rgba = {t: render_tile(t, size=64).convert("RGBA") for t in tiles}
    for img in rgba.values():
        img.putalpha(Image.fromarray(rng.integers(0, 256, (64, 64), dtype=np.uint8)))
    del rgba[tiles[5]]  # one missing tile
    source = MemorySource(rgba)
    x = np.array([t.x for t in tiles])
    y = np.array([t.y for t in tiles])
    with ThreadPoolExecutor(2) as pool:
        found, built = encode_tiles(x, y, zoom=2, source=source, encoder=tiny_encoder, pool=pool, batch_size=5)
    level = OnTheFlyLevel(2, tiny_encoder, source, batch_size=5, round_to=None)
    fly, fly_found = level._encode(tile_code_array(x, y, zoom=2))
    np.testing.assert_array_equal(found, fly_found)
    assert not found[5] and found.sum() == 15
    np.testing.assert_allclose(fly, built, atol=1e-6)
    white = tiny_encoder.encode([Image.alpha_composite(Image.new("RGBA", (64, 64), "white"), rgba[tiles[0]])])
    np.testing.assert_allclose(built[0], white[0], atol=1e-6)


def test_index_search_and_geoindex_search_agree_on_one_image_and_on_lists(small_index):
    """One image in, one result out; a list in, a list out: the same for the method and the function."""
    index = geoindex.open_index(small_index)
    photo = random_queries(1, zoom=3)[0]
    one, function_one = index.search(photo, k=3), geoindex.search(photo, k=3, index=index)
    assert isinstance(one, geoindex.SearchResult) and _trace_tiles(one) == _trace_tiles(function_one)
    many = index.search([photo, photo], k=3)
    assert isinstance(many, list) and [_trace_tiles(r) for r in many] == [_trace_tiles(one)] * 2
    assert isinstance(index.search((photo,), k=3), list)
    assert isinstance(index.search(b"not an image", k=3, on_error="return"), geoindex.ImageError)


def _hits(levels, xq, k):
    from geoindex.retrieval.beam import beam_search

    return beam_search(xq, levels, k)


@pytest.mark.parametrize("k", [1, 3, 7, 64])
def test_torch_search_gives_faiss_tiles_and_scores(small_index, k):
    """The batched torch search (CPU tensors here) keeps the same ids at every level as FAISS, with the same
    scores, also under a region's mask and where the beam is wider than a level."""
    from geoindex.retrieval.levels.device import TorchLevel
    from geoindex.storage.store import level_embeddings

    index = geoindex.open_index(small_index)
    xq = index.embed(random_queries(16, zoom=3, seed=k))
    pairs = _against_faiss(index, xq, k, lambda s, m: TorchLevel(
        s, *level_embeddings(small_index, s.zoom), device="cpu", allowed=m,
        block=64))  # a small block: queries are searched in several chunks
    for a, b, unmasked in pairs:
        assert np.array_equal(a.I, b.I), (a.zoom, unmasked)
        np.testing.assert_allclose(a.D, b.D, rtol=0, atol=1e-5)


def _against_faiss(index, xq, k, make_level) -> list:
    """(FAISS's hits, the other kind's hits, unmasked) per level, searched over the whole index and under a
    region's mask (every third row left out); ``make_level(stored, allowed)`` builds the other kind."""
    from geoindex.retrieval.levels.stored import FaissLevel

    allowed = [np.arange(s.rows) % 3 != 1 for s in index.stored]
    pairs = []
    for masks in (None, allowed):
        kept = masks if masks is not None else [None] * len(index.stored)
        faiss_levels = [FaissLevel(s, allowed=m) for s, m in zip(index.stored, kept, strict=True)]
        other_levels = [make_level(s, m) for s, m in zip(index.stored, kept, strict=True)]
        pairs += [(a, b, masks is None)
                  for a, b in zip(_hits(faiss_levels, xq, k), _hits(other_levels, xq, k), strict=True)]
    return pairs


def test_index_opened_with_the_torch_backend_answers_as_faiss(small_index):
    faiss_index = geoindex.open_index(small_index, search_backend="faiss")
    torch_index = geoindex.open_index(small_index, search_backend="torch")
    assert torch_index.search_backend == "torch" and faiss_index.search_backend == "faiss"
    assert geoindex.open_index(small_index).search_backend == "faiss"  # auto on a CPU
    queries = random_queries(8, zoom=3, seed=11)
    for a, b in zip(faiss_index.search(queries, k=3), torch_index.search(queries, k=3), strict=True):
        assert _trace_tiles(a) == _trace_tiles(b)
        np.testing.assert_allclose(a.score, b.score, atol=1e-5)
    with pytest.raises(ConfigError, match="search_backend"):
        geoindex.open_index(small_index, search_backend="gpu")


class _StandInGpuResources:
    """Where faiss-gpu's StandardGpuResources would be: the CPU stand-in of knn_gpu checks it is passed."""


def _stand_in_faiss_gpu(monkeypatch) -> list[int]:
    """faiss with GPU support on this CPU machine: knn_gpu answered by faiss.knn (the same contract: float32
    arrays in, (D, I) of the k best out). Returns the number of queries of each knn_gpu call."""
    import faiss

    calls: list[int] = []

    def knn_gpu(res, xq, xb, k, D=None, I=None, metric=faiss.METRIC_L2, device=-1, **options):  # noqa: E741
        assert isinstance(res, _StandInGpuResources) and D is None and I is None
        assert xq.dtype == np.float32 and xb.dtype == np.float32 and xb.flags.c_contiguous
        calls.append(len(xq))
        return faiss.knn(xq, xb, k, metric=metric)

    monkeypatch.setattr(faiss, "StandardGpuResources", _StandInGpuResources, raising=False)
    monkeypatch.setattr(faiss, "get_num_gpus", lambda: 1)
    monkeypatch.setattr(faiss, "knn_gpu", knn_gpu, raising=False)
    return calls


@pytest.mark.parametrize("k", [1, 3, 64])
def test_faiss_gpu_search_gives_faiss_tiles_and_scores(small_index, monkeypatch, k):
    """The faiss-gpu path gathers each query's children (allowed rows only) and searches them with knn_gpu:
    the same ids and scores as FAISS on the CPU at every level, also under a region's mask and where the
    beam is wider than a level; the trace says faiss-gpu ran."""
    from geoindex.retrieval.levels.device import TorchLevel
    from geoindex.storage.store import level_embeddings

    calls = _stand_in_faiss_gpu(monkeypatch)
    index = geoindex.open_index(small_index, search_backend="faiss")
    xq = index.embed(random_queries(16, zoom=3, seed=k))
    pairs = _against_faiss(index, xq, k, lambda s, m: TorchLevel(s, *level_embeddings(small_index, s.zoom),
                                                                  allowed=m, faiss_gpu=True))
    for a, b, unmasked in pairs:
        assert np.array_equal(a.I, b.I), (a.zoom, unmasked)
        np.testing.assert_allclose(a.D, b.D, rtol=0, atol=1e-5)
        assert b.note is not None and b.note.startswith("faiss-gpu")
    assert set(calls) == {1, len(xq)} and calls.count(len(xq)) == 2  # per mask: first level one call, then per query


def test_faiss_gpu_backend_answers_as_faiss_and_falls_back_to_torch(small_index, monkeypatch):
    """search_backend='faiss-gpu' gives FAISS's answers; where faiss has no GPU support the torch search runs
    instead, with the same answers, and every level's trace says so."""
    import faiss

    queries = random_queries(8, zoom=3, seed=13)
    want = geoindex.open_index(small_index, search_backend="faiss").search(queries, k=3)
    assert all(lt.note is None for lt in want[0].trace)
    calls = _stand_in_faiss_gpu(monkeypatch)
    on_gpu = geoindex.open_index(small_index, search_backend="faiss-gpu")
    got = on_gpu.search(queries, k=3)
    assert calls and on_gpu.search_backend == "faiss-gpu"
    assert all(lt.note.startswith("faiss-gpu") for lt in got[0].trace)
    monkeypatch.setattr(faiss, "get_num_gpus", lambda: 0)  # faiss with GPU support, but no GPU visible
    n_calls = len(calls)
    fallback = geoindex.open_index(small_index, search_backend="faiss-gpu").search(queries, k=3)
    assert len(calls) == n_calls  # knn_gpu never called
    assert all("faiss-gpu was asked for" in lt.note and lt.note.startswith("torch") for lt in fallback[0].trace)
    for a, b, c in zip(want, got, fallback, strict=True):
        assert _trace_tiles(a) == _trace_tiles(b) == _trace_tiles(c)
        np.testing.assert_allclose(a.score, b.score, atol=1e-5)
        np.testing.assert_allclose(a.score, c.score, atol=1e-5)


def test_torch_search_on_cuda_matches_the_cpu(small_index):
    import torch

    if not torch.cuda.is_available():
        pytest.skip("no CUDA device here: the GPU search is checked where one is (tests on CPU tensors run above)")
    on_gpu = geoindex.open_index(small_index, device="cuda")
    assert on_gpu.search_backend == "torch"
    on_cpu = geoindex.open_index(small_index, search_backend="faiss")
    queries = random_queries(8, zoom=3, seed=12)
    xq = on_cpu.embed(queries)
    for a, b in zip(on_cpu.search_embeddings(xq, k=3), on_gpu.search_embeddings(xq, k=3), strict=True):
        assert _trace_tiles(a) == _trace_tiles(b)


def test_indexed_equals_on_the_fly_with_torch_preprocessing(tmp_path, tiny_encoder, rendered_source, world):
    """Tiles resized as tensor operations (the device path): recorded per level, used again on the fly, and the
    index refuses to extend a level with the other preprocessing."""
    from geoindex.errors import EncoderMismatchError

    encoder = tiny_encoder.with_precision("fp32", preprocessing="torch")
    schedule = LevelSchedule(1, 3, 1)
    for zoom in schedule.zooms:
        build_level(tmp_path, zoom, source=rendered_source, encoder=encoder, coverage=world, schedule=schedule,
                    shard_size=16)
    index = geoindex.open_index(tmp_path)
    assert all(level.encoder.preprocessing == "torch" for level in index.manifest.levels)
    otf = OnTheFlySearcher.for_index(index, rendered_source)
    queries = random_queries(12, zoom=3, seed=21)
    for a, b in zip(index.search(queries, k=3), otf.search(queries, k=3), strict=True):
        assert _trace_tiles(a) == _trace_tiles(b)
    with pytest.raises(EncoderMismatchError):
        build_level(tmp_path, 3, source=MemorySource(render_tile, name="rendered"), encoder=tiny_encoder,
                    coverage=world, schedule=schedule, shard_size=16)
