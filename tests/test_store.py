"""The level store: parquet round trip, FAISS built from parquet, codecs against exact search, manifest checks."""

from __future__ import annotations

import faiss
import numpy as np
import pyarrow.parquet as pq
import pytest

from geoindex.errors import ConfigError, IndexFormatError
from geoindex.geometry.tiles import LevelSchedule, children_array, quadkey_int_array
from geoindex.retrieval.beam import beam_search
from geoindex.retrieval.levels.stored import FaissLevel
from geoindex.storage.manifest import EncoderIdentity, Manifest
from geoindex.storage.store import (
    FAISS_FILE,
    RERANK_CODEBOOK,
    RERANK_FILE,
    build_faiss_level,
    finish_level,
    level_dir,
    open_store,
    pq_subquantizers,
    read_embeddings,
    read_level_columns,
    resident_levels,
    shard_path,
    write_shard,
)


def _unit(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _write_two_levels(root, rng, d=16, shard=20):
    """Zoom 1 (4 rows) and zoom 2 (16 rows, 4 per parent) with random embeddings, in row order."""
    x1, y1 = np.array([0, 1, 0, 1]), np.array([0, 0, 1, 1])
    order = np.argsort(quadkey_int_array(x1, y1, zoom=1))
    x1, y1 = x1[order], y1[order]
    e1 = _unit(rng, 4, d)
    write_shard(shard_path(root, 1, 0), zoom=1, x=x1, y=y1, parent_row=np.full(4, -1), embeddings=e1)
    cx, cy = children_array(x1, y1, zoom=1, step=1)
    parents = np.repeat(np.arange(4), 4)
    e2 = _unit(rng, 16, d)
    for s, lo in enumerate(range(0, 16, shard)):
        sl = slice(lo, lo + shard)
        write_shard(shard_path(root, 2, s), zoom=2, x=cx.ravel()[sl], y=cy.ravel()[sl],
                    parent_row=parents[sl], embeddings=e2[sl])
    return e1, e2, parents


def test_shard_round_trip_and_schema(tmp_path):
    rng = np.random.default_rng(0)
    e1, e2, parents = _write_two_levels(tmp_path, rng, shard=6)
    schema = pq.read_schema(shard_path(tmp_path, 2, 0))
    assert str(schema.field("embedding").type) == "fixed_size_list<element: halffloat>[16]"
    cols = read_level_columns(tmp_path, 2, ("x", "y", "parent_row", "quadkey"))
    assert list(cols["parent_row"]) == list(parents)
    # rows sorted by (parent_row, quadkey)
    keys = list(zip(cols["parent_row"], cols["quadkey"]))
    assert keys == sorted(keys)
    emb = np.concatenate([read_embeddings(p) for p in sorted(level_dir(tmp_path, 2).glob("part-*.parquet"))])
    np.testing.assert_array_equal(emb, e2.astype(np.float16))


@pytest.mark.parametrize("codec,atol", [("flat", 1e-6), ("fp16", 1e-6), ("sq8", 2e-2)])
def test_ivf_level_matches_exact_search(tmp_path, codec, atol):
    rng = np.random.default_rng(1)
    _, e2, parents = _write_two_levels(tmp_path, rng, d=32)
    stored = e2.astype(np.float16).astype(np.float32)
    index = build_faiss_level(tmp_path, 2, n_parents=4, codec=codec, dim=32)
    assert isinstance(index, faiss.IndexIVF) and index.nlist == 4 and index.ntotal == 16
    assert index.quantizer.ntotal == 0  # the coarse quantizer is never filled
    for p in range(4):
        assert index.invlists.list_size(p) == 4
    xq = _unit(rng, 5, 32)
    lists = np.array([[2, 0], [1, -1], [3, 2], [0, 1], [-1, -1]], dtype=np.int64)
    level = FaissLevel(type("S", (), {"zoom": 2, "index": index, "exact": None})())  # type: ignore[arg-type]
    D, I = level.search(xq, 3, lists)
    for q in range(5):
        allowed = np.flatnonzero(np.isin(parents, lists[q][lists[q] >= 0]))
        exact = stored[allowed] @ xq[q]
        best = allowed[np.argsort(-exact)[:3]]
        got = I[q][I[q] >= 0]
        if codec != "sq8":
            assert list(got) == list(best)
        np.testing.assert_allclose(D[q][: len(got)], stored[got] @ xq[q], atol=atol)
        assert len(got) == min(3, len(allowed))
    assert list(I[4]) == [-1, -1, -1]


def test_open_store_and_manifest_checks(tmp_path, tiny_encoder):
    rng = np.random.default_rng(2)
    _write_two_levels(tmp_path, rng)
    info1 = finish_level(tmp_path, 1, n_parents=None, codec="fp16", dim=16)
    info2 = finish_level(tmp_path, 2, n_parents=4, codec="fp16", dim=16)
    manifest = Manifest(schedule=LevelSchedule(1, 2, 1), dim=16, codec="fp16",
                        photo_encoder=EncoderIdentity(name="x", base_fingerprint="y"), imagery="test",
                        levels=(info1, info2))
    manifest.save(tmp_path)
    assert Manifest.load(tmp_path) == manifest
    m, levels = open_store(tmp_path, verify=True)
    assert [lv.rows for lv in levels] == [4, 16]
    assert isinstance(levels[0].index, faiss.IndexFlatIP) and levels[1].is_ivf
    hits = beam_search(_unit(rng, 2, 16), [FaissLevel(s) for s in levels], k=2)
    assert hits[1].I.shape == (2, 2) and (hits[1].I >= 0).all()

    # a partial FAISS file: refused before FAISS reads it
    faiss_path = level_dir(tmp_path, 2) / FAISS_FILE
    data = faiss_path.read_bytes()
    faiss_path.write_bytes(data[: len(data) // 2])
    with pytest.raises(IndexFormatError, match="partial"):
        open_store(tmp_path)
    # same size, different bytes: caught by verify
    faiss_path.write_bytes(data[:-1] + bytes([data[-1] ^ 0xFF]))
    with pytest.raises(IndexFormatError, match="checksum"):
        open_store(tmp_path, verify=True)
    faiss_path.write_bytes(data)
    # a missing shard
    shard_path(tmp_path, 2, 0).rename(tmp_path / "elsewhere.parquet")
    with pytest.raises(IndexFormatError, match="missing"):
        open_store(tmp_path)


def test_pq_subquantizers_keep_entries_within_100_bytes():
    assert pq_subquantizers(512) == 64 and pq_subquantizers(1280) == 64 and pq_subquantizers(100) == 50
    for d in (16, 64, 100, 384, 512, 768, 1024, 1280):
        m = pq_subquantizers(d)
        assert d % m == 0 and m + 8 <= 72


@pytest.mark.parametrize("codec", ["pq", "pq_small"])
@pytest.mark.parametrize("children", [300, 20])  # 8-bit codebooks; and fewer rows than 256 centroids
def test_pq_level_reranks_from_its_rerank_copy(tmp_path, children, codec):
    """IVF-PQ (by_residual off, empty coarse quantizer) + re-ranking from the level's re-rank copy (pq: float16
    vectors, so exact search; pq_small: a finer product code) equals an exhaustive search over that copy."""
    rng = np.random.default_rng(3)
    d, n_par = 32, 4
    x1, y1 = np.array([0, 1, 0, 1]), np.array([0, 0, 1, 1])
    write_shard(shard_path(tmp_path, 1, 0), zoom=1, x=x1, y=y1, parent_row=np.full(4, -1),
                embeddings=_unit(rng, 4, d))
    parents = np.repeat(np.arange(n_par), children)
    emb = _unit(rng, len(parents), d)
    cx, cy = children_array(x1, y1, zoom=1, step=8)  # (4, 65536) each, in quadkey order
    xs, ys = cx[:, :children].ravel(), cy[:, :children].ravel()
    half = len(parents) // 2
    for s, sl in enumerate((slice(0, half), slice(half, None))):
        write_shard(shard_path(tmp_path, 9, s), zoom=9, x=xs[sl], y=ys[sl], parent_row=parents[sl],
                    embeddings=emb[sl])
    info1 = finish_level(tmp_path, 1, n_parents=None, codec=codec, dim=d)
    info2 = finish_level(tmp_path, 9, n_parents=n_par, codec=codec, dim=d)
    assert [f.name for f in info1.files] == ["part-00000.parquet", FAISS_FILE]  # first level: flat, no re-rank code
    names = [f.name for f in info2.files]
    assert names[-2:] == ([FAISS_FILE, RERANK_FILE] if codec == "pq" else [RERANK_FILE, RERANK_CODEBOOK])
    Manifest(schedule=LevelSchedule(1, 9, 8), dim=d, codec=codec, imagery="x", levels=(info1, info2),
             photo_encoder=EncoderIdentity(name="tiny", base_fingerprint="0" * 64)).save(tmp_path)
    _, stored = open_store(tmp_path)
    index = stored[1].index
    assert isinstance(index, faiss.IndexIVFPQ) and not index.by_residual and index.quantizer.ntotal == 0
    assert index.pq.M == pq_subquantizers(d) and index.pq.nbits == (8 if children * n_par >= 256 else 6)
    assert index.code_size <= pq_subquantizers(d)
    vectors = np.asarray(stored[1].exact[np.arange(len(emb))], dtype=np.float32)  # the re-rank copy, (rows, d)
    assert vectors.shape == emb.shape
    if codec == "pq":
        np.testing.assert_array_equal(vectors, emb.astype(np.float16))
    assert np.median(np.einsum("nd,nd->n", vectors, emb)) > 0.7  # near the embeddings (random: about 0)
    xq = _unit(rng, 6, d)
    lists = np.array([[2, 0], [1, -1], [3, 2], [0, 1], [3, -1], [-1, -1]], dtype=np.int64)
    everything = FaissLevel(stored[1], rerank=2 * children)  # re-rank every candidate: an exhaustive search
    default = FaissLevel(stored[1])
    for level in (everything, default):
        D, I = level.search(xq, 5, lists)
        for q in range(5):
            allowed = np.flatnonzero(np.isin(parents, lists[q][lists[q] >= 0]))
            got = I[q][I[q] >= 0]
            assert len(got) == 5 and np.isin(got, allowed).all()
            np.testing.assert_allclose(D[q], vectors[got] @ xq[q], atol=1e-5)  # scores are the re-rank code's
            if level is everything:
                assert list(got) == list(allowed[np.argsort(-(vectors[allowed] @ xq[q]), kind="stable")[:5]])
        assert list(I[5]) == [-1] * 5
    # score_ids reports the re-ranked score too
    row = int(I[0, 0])
    np.testing.assert_allclose(default.score_ids(xq[:1], np.array([row]), lists[:1]), [vectors[row] @ xq[0]],
                               atol=1e-5)


def test_resident_levels_fill_ram_from_the_top(monkeypatch):
    monkeypatch.setattr("geoindex.storage.store.mem_available_bytes", lambda: 64 << 30)
    mib = 1 << 20
    assert resident_levels([mib, 10 * mib, 1 << 30, 20 << 30], "auto") == [True, True, True, False]
    assert resident_levels([mib, 3 << 30, mib], "auto") == [True, False, False]  # never below a mapped level
    monkeypatch.setattr("geoindex.storage.store.mem_available_bytes", lambda: 8 * mib)  # a quarter of free RAM at most
    assert resident_levels([mib, mib, 4 * mib], "auto") == [True, True, False]
    assert resident_levels([mib, 20 << 30], True) == [True, True]
    assert resident_levels([mib, mib], False) == [False, False]
    with pytest.raises(ConfigError, match="--resident"):
        resident_levels([mib], "sometimes")


def test_resident_and_mapped_levels_search_alike(small_index):
    """Reading FAISS files into RAM changes where the bytes live, not what a search returns."""
    _, mapped = open_store(small_index, resident=False)
    _, in_ram = open_store(small_index, resident=True)
    assert not any(s.resident for s in mapped) and all(s.resident for s in in_ram)
    rng = np.random.default_rng(3)
    xq = _unit(rng, 20, mapped[0].index.d)
    for a, b in zip(beam_search(xq, [FaissLevel(s) for s in mapped], 8),
                    beam_search(xq, [FaissLevel(s) for s in in_ram], 8)):
        np.testing.assert_array_equal(a.I, b.I)
        np.testing.assert_array_equal(a.D, b.D)


def test_column_to_numpy_matches_pyarrow_on_sliced_chunks_and_refuses_nulls():
    """Reading a column from its buffers (pyarrow's to_numpy imports pandas) gives what pyarrow gives."""
    import pyarrow as pa

    from geoindex.storage.store import column_to_numpy

    for kind, values in ((pa.int64(), range(10)), (pa.int32(), range(-5, 5)), (pa.float16(), np.linspace(0, 1, 10))):
        whole = pa.array(np.asarray(list(values)), type=kind)
        column = pa.chunked_array([whole.slice(2, 5), whole.slice(7, 3), whole.slice(0, 0)])
        got = column_to_numpy(column)
        assert got.dtype == column.to_numpy().dtype
        np.testing.assert_array_equal(got, column.to_numpy())
    assert column_to_numpy(pa.chunked_array([], type=pa.int64())).shape == (0,)
    with pytest.raises(IndexFormatError, match="nulls"):
        column_to_numpy(pa.chunked_array([pa.array([1, None, 3], type=pa.int64())]))
