"""The codec registry: every registered codec builds and searches a level as exact search would; a codec is
one registry entry; a finished level keeps its vectors once (in its FAISS file) and a rebuild reads them there."""

from __future__ import annotations

import dataclasses
import shutil

import faiss
import numpy as np
import pyarrow.parquet as pq
import pytest

from geoindex.errors import ConfigError, IndexFormatError
from geoindex.geometry.tiles import LevelSchedule, children_array
from geoindex.retrieval.beam import beam_search
from geoindex.retrieval.levels.stored import FaissLevel
from geoindex.storage.build import build_level
from geoindex.storage.codecs import CODEC_NAMES, REGISTRY, Codec, get_codec
from geoindex.storage.manifest import CODECS, EncoderIdentity, Manifest
from geoindex.storage.store import (
    FAISS_FILE,
    drop_embeddings,
    finish_level,
    list_shards,
    open_store,
    read_embeddings,
    shard_path,
    write_shard,
)

D = 40


def _unit(rng: np.random.Generator, n: int, d: int = D) -> np.ndarray:
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _two_levels(root, codec: str, *, children: int = 64, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Zoom 1 (4 rows) and zoom 5 (``children`` per parent, two shards) with clustered embeddings, finished with
    ``codec`` and recorded in a manifest; returns the zoom-5 embeddings (as stored, float16) and parent rows."""
    rng = np.random.default_rng(seed)
    x1, y1 = np.array([0, 1, 0, 1]), np.array([0, 0, 1, 1])
    centres = _unit(rng, 4)
    write_shard(shard_path(root, 1, 0), zoom=1, x=x1, y=y1, parent_row=np.full(4, -1), embeddings=centres)
    parents = np.repeat(np.arange(4), children)
    emb = centres[parents] + 0.6 * _unit(rng, len(parents))
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    cx, cy = children_array(x1, y1, zoom=1, step=4)
    xs, ys = cx[:, :children].ravel(), cy[:, :children].ravel()
    half = len(parents) // 2 + 5  # the second shard starts inside a parent's list
    for s, sl in enumerate((slice(0, half), slice(half, None))):
        write_shard(shard_path(root, 5, s), zoom=5, x=xs[sl], y=ys[sl], parent_row=parents[sl], embeddings=emb[sl])
    info1 = finish_level(root, 1, n_parents=None, codec=codec, dim=D)
    info2 = finish_level(root, 5, n_parents=4, codec=codec, dim=D)
    manifest = Manifest(schedule=LevelSchedule(1, 5, 4), dim=D, codec=codec, imagery="x", levels=(info1, info2),
                        photo_encoder=EncoderIdentity(name="tiny", base_fingerprint="0" * 64))
    manifest.save(root)
    levels = (drop_embeddings(root, 1, info1, codec="flat"), drop_embeddings(root, 5, info2, codec=codec))
    dataclasses.replace(manifest, levels=levels).save(root)
    return emb.astype(np.float16).astype(np.float32), parents


@pytest.mark.parametrize("codec", CODEC_NAMES)
def test_every_codec_searches_its_lists_as_exact_search_does(tmp_path, codec):
    """Each registered codec: restricted search over the lists of given parents against exact inner products."""
    emb, parents = _two_levels(tmp_path, codec)
    _, stored = open_store(tmp_path, verify=True)
    assert isinstance(stored[1].index, faiss.IndexIVF) and stored[1].index.nlist == 4
    xq = _unit(np.random.default_rng(1), 8)
    lists = np.array([[0, 2], [1, -1], [3, 2], [0, 1]] * 2, dtype=np.int64)
    D_, I = FaissLevel(stored[1]).search(xq, 5, lists)
    spec = get_codec(codec)
    agree = []
    for q in range(len(xq)):
        allowed = np.flatnonzero(np.isin(parents, lists[q][lists[q] >= 0]))
        best = allowed[np.argsort(-(emb[allowed] @ xq[q]), kind="stable")[:5]]
        got = I[q]
        assert np.isin(got, allowed).all() and len(set(got.tolist())) == 5
        if spec.exact and not spec.reranks:  # a re-ranking codec re-scores only its first stage's candidates
            assert list(got) == list(best)
            np.testing.assert_allclose(D_[q], emb[got] @ xq[q], atol=1e-5)
        agree.append(got[0] == best[0])
        # whatever the codec, its first answer scores close to the best under exact arithmetic
        assert emb[got[0]] @ xq[q] >= emb[best[0]] @ xq[q] - 0.1
    assert np.mean(agree) >= (1.0 if spec.exact and not spec.reranks else 0.5)
    hits = beam_search(xq, [FaissLevel(s) for s in stored], 2)
    assert (hits[-1].I >= 0).all()


def test_the_shipped_codecs_are_the_registry():
    assert CODECS == CODEC_NAMES == ("fp16", "flat", "sq8", "pq", "pq_small")
    assert {c.name for c in REGISTRY.values()} >= set(CODEC_NAMES)
    with pytest.raises(ConfigError, match=r"unknown codec 'zstd'.*fp16.*--codec"):
        get_codec("zstd")
    with pytest.raises(ConfigError, match="unknown codec"):
        Manifest(schedule=LevelSchedule(1, 5, 4), dim=D, codec="zstd", imagery="x",
                 photo_encoder=EncoderIdentity(name="tiny", base_fingerprint="0"))


@pytest.fixture
def sq4_codec(monkeypatch):
    """A codec no module of geoindex knows: 4-bit scalar quantisation, registered only for this test."""

    def make(quantizer, dim, nlist, sample):
        index = faiss.IndexIVFScalarQuantizer(quantizer, dim, nlist, faiss.ScalarQuantizer.QT_4bit,
                                              faiss.METRIC_INNER_PRODUCT, False)
        index.sq.train(sample)
        return index

    codec = Codec("sq4", "4-bit scalar quantiser", make, lambda d: d // 2, train_rows=1000)
    monkeypatch.setitem(REGISTRY, "sq4", codec)
    return codec


def test_a_codec_is_one_registry_entry(tmp_path, sq4_codec, tiny_encoder, rendered_source, world):
    """Registering a codec is all it takes for a build, the manifest, the store and the search to use it."""
    schedule = LevelSchedule(1, 2, 1)
    for zoom in schedule.zooms:
        build_level(tmp_path, zoom, source=rendered_source, encoder=tiny_encoder, coverage=world,
                    schedule=schedule, codec="sq4", shard_size=8)
    manifest, stored = open_store(tmp_path, verify=True)
    assert manifest.codec == "sq4" and stored[1].index.code_size == tiny_encoder.dim // 2
    emb = np.concatenate([read_embeddings(p) for p in list_shards(tmp_path, 2)]).astype(np.float32)
    xq = emb[[3, 9]] / np.linalg.norm(emb[[3, 9]], axis=1, keepdims=True)
    hits = beam_search(xq, [FaissLevel(s) for s in stored], 4)
    assert list(hits[-1].I[:, 0]) == [3, 9]  # each tile's own (decoded) vector is its best match


def test_a_finished_level_keeps_its_vectors_once(tmp_path):
    """No shard of a finished level holds an embedding column; the FAISS file gives the embeddings back exactly."""
    emb, _ = _two_levels(tmp_path, "fp16")
    for zoom in (1, 5):
        for shard in list_shards(tmp_path, zoom):
            assert "embedding" not in pq.read_schema(shard).names
    back = np.concatenate([read_embeddings(p) for p in list_shards(tmp_path, 5)])
    np.testing.assert_array_equal(back, emb.astype(np.float16))
    manifest = Manifest.load(tmp_path)
    listed = {f.name: f.size for f in manifest.levels[1].files}
    assert listed[FAISS_FILE] < 2 * D * len(emb) + 4096  # the vectors once, plus ids and a header
    assert sum(v for k, v in listed.items() if k != FAISS_FILE) < 16 * len(emb) + 8192  # tiles only


def test_a_pq_level_keeps_its_vectors_once_in_its_rerank_copy(tmp_path):
    emb, _ = _two_levels(tmp_path, "pq")
    back = np.concatenate([read_embeddings(p) for p in list_shards(tmp_path, 5)])
    np.testing.assert_array_equal(back, emb.astype(np.float16))
    info = finish_level(tmp_path, 5, n_parents=4, codec="fp16", dim=D)  # and it can change codec from there
    assert info.rows == len(emb)


def test_a_level_changes_codec_from_its_faiss_file(tmp_path):
    """An exact level's FAISS file is enough to rebuild it with another codec (the codecs benchmark does this)."""
    emb, parents = _two_levels(tmp_path, "fp16")
    manifest = Manifest.load(tmp_path)
    info = finish_level(tmp_path, 5, n_parents=4, codec="flat", dim=D)
    info = drop_embeddings(tmp_path, 5, info, codec="flat")
    dataclasses.replace(manifest, codec="flat", levels=(manifest.levels[0], info)).save(tmp_path)
    _, stored = open_store(tmp_path, verify=True)
    assert isinstance(stored[1].index, faiss.IndexIVFFlat)
    np.testing.assert_array_equal(stored[1].index.reconstruct_n(0, len(emb)), emb)


def test_a_lossy_level_is_not_rebuilt_from_its_codes(tmp_path):
    _two_levels(tmp_path, "pq_small")
    with pytest.raises(IndexFormatError, match=r"pq_small codes.*--overwrite"):
        finish_level(tmp_path, 5, n_parents=4, codec="fp16", dim=D)


def test_slim_shards_refuse_a_replaced_faiss_file(tmp_path, tiny_encoder, rendered_source, world):
    """A shard's vectors are trusted only in the FAISS file it was slimmed against: a rebuild re-encodes otherwise."""
    schedule = LevelSchedule(1, 2, 1)
    args = dict(source=rendered_source, encoder=tiny_encoder, coverage=world, schedule=schedule, shard_size=8)
    for zoom in schedule.zooms:
        build_level(tmp_path, zoom, **args)
    want = np.concatenate([read_embeddings(p) for p in list_shards(tmp_path, 2)])
    copy = tmp_path.parent / (tmp_path.name + "-copy")
    shutil.copytree(tmp_path, copy)
    faiss_path = copy / "z02" / FAISS_FILE
    data = faiss_path.read_bytes()
    faiss_path.write_bytes(data[:-1] + bytes([data[-1] ^ 0xFF]))  # a crash replaced it with other bytes
    with pytest.raises(IndexFormatError, match=r"missing or was replaced.*--overwrite"):
        read_embeddings(list_shards(copy, 2)[0])
    summary = build_level(copy, 2, **args)
    assert summary.shards_reused == 0 and summary.shards_written == 2  # none trusted: re-encoded
    np.testing.assert_array_equal(np.concatenate([read_embeddings(p) for p in list_shards(copy, 2)]), want)
    again = build_level(copy, 2, **args)
    assert again.shards_written == 0  # slim shards of the FAISS file on disk are reused
