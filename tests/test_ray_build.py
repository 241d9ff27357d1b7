"""The Ray engine writes what the local engine writes: same shards, rows, FAISS files and search results; resumable.

Runs on a local Ray instance (``ray.init(num_cpus=2)``) with the tiny encoder. Skipped, with the
reason, where Ray Data is not installed (``pip install -e '.[ray]'`` in the checkout).
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

import geoindex
from geoindex.errors import ConfigError
from geoindex.storage.build import BuildIncompleteError
from geoindex.storage.store import list_shards, read_embeddings
from pipelines import build_index

ROOT = Path(__file__).resolve().parents[1]
SCHEDULE = ["--schedule", "1", "3", "1"]
# Ray Data reads its own deprecated settings when it pickles its context; nothing here sets them.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:ray.*")
RAY_MISSING = "Ray Data is not installed here; pip install -e '.[ray]' (or 'ray[data]') to run the Ray engine tests"


@pytest.fixture(scope="module")
def ray_local():
    """One local Ray instance for the module, 2 CPUs, quiet."""
    pytest.importorskip("ray.data", reason=RAY_MISSING)
    import ray

    from geoindex.storage.distributed import init_ray

    if ray.is_initialized():
        ray.shutdown()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR)
    init_ray(quiet=True)  # connected already: only quiets Ray Data's logging and progress bars
    yield ray
    ray.shutdown()


def _build(argv: list[str]) -> list:
    return build_index.run(build_index.parse_args(argv + ["--encoder", "tiny", "--quiet"] + SCHEDULE))


def _ray(argv: list[str]) -> list:
    return _build(argv + ["--engine", "ray", "--ray-actors", "2", "--ray-cpus-per-actor", "1"])


@pytest.fixture(scope="module")
def local_index(tmp_path_factory, tile_dir) -> Path:
    """The reference: the local engine, with the torch threads of a 1-CPU Ray actor (GEMM sums depend on them)."""
    path = tmp_path_factory.mktemp("local")
    _build(["--all", "--index", str(path), "--source", str(tile_dir), "--shard-size", "7", "--threads", "1"])
    return path


@pytest.fixture(scope="module")
def ray_index(tmp_path_factory, tile_dir, ray_local) -> tuple[Path, list]:
    path = tmp_path_factory.mktemp("ray")
    return path, _ray(["--all", "--index", str(path), "--source", str(tile_dir), "--shard-size", "7"])


def _tables(index: Path) -> dict[int, list]:
    return {lv.zoom: [pq.read_table(p) for p in list_shards(index, lv.zoom)]
            for lv in geoindex.open_index(index).manifest.levels}


def _search(index: Path) -> list:
    opened = geoindex.open_index(index)
    xq = np.random.default_rng(0).standard_normal((30, opened.photo_encoder.dim)).astype(np.float32)
    xq /= np.linalg.norm(xq, axis=1, keepdims=True)
    return [[(lv.tiles, lv.scores) for lv in r.trace] for r in opened.search_embeddings(xq, k=5)]


def _assert_same_index(got: Path, want: Path) -> None:
    """Same shard files, rows and search results; embeddings equal within fp16 rounding."""
    a, b = _tables(got), _tables(want)
    assert a.keys() == b.keys() == {1, 2, 3}
    for zoom in a:
        assert [p.name for p in list_shards(got, zoom)] == [p.name for p in list_shards(want, zoom)]
        for ta, tb, pa_, pb in zip(a[zoom], b[zoom], list_shards(got, zoom), list_shards(want, zoom)):
            for col in ("z", "x", "y", "quadkey", "parent_row"):
                assert ta.column(col).equals(tb.column(col)), (zoom, col)
            ea = read_embeddings(pa_).astype(np.float32)  # from the level's FAISS file, where they are kept
            eb = read_embeddings(pb).astype(np.float32)
            np.testing.assert_allclose(ea, eb, rtol=0, atol=2**-10)
    sa, sb = _search(got), _search(want)
    for ra, rb in zip(sa, sb):
        for (tiles_a, scores_a), (tiles_b, scores_b) in zip(ra, rb):
            assert tiles_a == tiles_b
            np.testing.assert_allclose(scores_a, scores_b, rtol=0, atol=1e-3)


def test_ray_build_equals_local_build(ray_index, local_index):
    path, summaries = ray_index
    assert [s.rows for s in summaries] == [4, 16, 63] and summaries[-1].missing == 1
    _assert_same_index(path, local_index)
    # Same batches and torch threads: the embeddings, hence the FAISS files, are bit-identical.
    for zoom in (1, 2, 3):
        assert (path / f"z{zoom:02d}" / "index.faiss").read_bytes() == \
            (local_index / f"z{zoom:02d}" / "index.faiss").read_bytes()
    assert _search(path) == _search(local_index)
    assert not list(path.rglob("_plan-*.npy")), "the plan file for the workers is removed once a level is done"
    manifest = geoindex.open_index(path).manifest
    assert manifest.build_args["z3"]["engine"] == "ray"


def test_rerun_encodes_only_missing_shards(tmp_path, tile_dir, ray_index):
    src, _ = ray_index
    index = tmp_path / "copy"
    shutil.copytree(src, index)
    removed = [list_shards(index, 3)[i] for i in (2, 5)]
    for p in removed:
        p.unlink()
    before = {p: p.stat().st_mtime_ns for p in index.rglob("part-*.parquet")}
    again = _ray(["--all", "--index", str(index), "--source", str(tile_dir), "--shard-size", "7"])
    assert [s.shards_written for s in again] == [0, 0, 2]
    assert [s.shards_reused for s in again] == [1, 3, 8]
    assert {p: p.stat().st_mtime_ns for p in before} == before, "finished shards are not rewritten"
    assert all(p.exists() for p in removed)
    _assert_same_index(index, src)


def test_failed_shard_is_reported_then_resumed(tmp_path, tile_dir, local_index, ray_local):
    tiles = tmp_path / "tiles"
    shutil.copytree(tile_dir, tiles)
    damaged = tiles / "3" / "6" / "6.png"  # a zoom-3 tile in the middle of the quadkey order
    good = damaged.read_bytes()
    damaged.write_bytes(good[: len(good) // 3])
    index = tmp_path / "index"
    args = ["--all", "--index", str(index), "--source", str(tiles), "--shard-size", "7"]
    with pytest.raises(BuildIncompleteError, match=r"1 of 10 shards could not be encoded.*6\.png"):
        _ray(args)
    assert len(list_shards(index, 3)) == 9
    assert 3 not in geoindex.open_index(index).zooms, "an incomplete level never enters the manifest"
    before = {p: (pq.read_table(p, columns=["x", "y", "parent_row"]), read_embeddings(p))
              for p in list_shards(index, 3)}

    damaged.write_bytes(good)
    summaries = _ray(args)
    assert [s.shards_written for s in summaries] == [0, 0, 1]
    # finished shards are not re-encoded: the same rows and embeddings (once the level is finished, each shard
    # is rewritten once without its embedding column, which the level's FAISS file then holds)
    for p, (table, emb) in before.items():
        assert pq.read_table(p, columns=["x", "y", "parent_row"]).equals(table)
        np.testing.assert_array_equal(read_embeddings(p), emb)
    # The source folder differs from the reference's, so compare rows and results, not manifests.
    _assert_same_index(index, local_index)


def test_worker_errors_keep_their_type(tmp_path, tile_dir, ray_local, monkeypatch):
    """An encoder the driver has but the workers lack: the driver raises the workers' ConfigError."""
    from geoindex.models.encoders import ENCODERS

    monkeypatch.setitem(ENCODERS, "tiny-driver-only", dataclasses.replace(ENCODERS["tiny"], name="tiny-driver-only"))
    cfg = build_index.parse_args(["--zoom", "1", "--index", str(tmp_path), "--source", str(tile_dir), "--quiet",
                                  "--engine", "ray", "--ray-actors", "1", *SCHEDULE, "--encoder", "tiny"])
    with pytest.raises(ConfigError, match="Ray worker on .*unknown encoder 'tiny-driver-only'"):
        build_index.run(dataclasses.replace(cfg, encoder="tiny-driver-only"))


def test_worker_that_does_not_see_the_index_refuses(tmp_path):
    """No Ray needed: an actor whose node lacks the index folder fails every shard with an actionable error."""
    from geoindex.storage.distributed import EncoderRecipe, ShardEncoder

    # The actor sets process-wide state (torch threads, a root-log filter); other tests' builds depend on it.
    threads, filters = torch.get_num_threads(), list(logging.getLogger().filters)
    try:
        actor = ShardEncoder(index_dir=str(tmp_path / "elsewhere"), zoom=1, plan_file="_plan-x.npy",
                              identity={"zoom": 1}, shard_size=4, source="bluemarble", encoder=EncoderRecipe("tiny"),
                              device="cpu", threads=1, batch_size=4, workers=1)
        out = actor({"shard": np.array([0, 1])})
    finally:
        torch.set_num_threads(threads)
        logging.getLogger().filters[:] = filters
    assert list(out["fatal"]) == ["ConfigError", "ConfigError"]
    assert "filesystem that every Ray node mounts" in out["error"][0]
    assert not (tmp_path / "elsewhere").exists()


def test_pool_size_follows_cluster_resources():
    pytest.importorskip("ray.data", reason=RAY_MISSING)
    from geoindex.storage.distributed import RayOptions

    assert RayOptions().pool_size({"CPU": 8.0}, shards=100) == 8
    assert RayOptions(cpus_per_actor=3).pool_size({"CPU": 8.0}, shards=100) == 2
    assert RayOptions(gpus_per_actor=1, cpus_per_actor=4).pool_size({"CPU": 64.0, "GPU": 4.0}, shards=100) == 4
    assert RayOptions(gpus_per_actor=0.5).pool_size({"CPU": 64.0, "GPU": 4.0}, shards=100) == 8
    assert RayOptions().pool_size({"CPU": 8.0}, shards=3) == 3
    assert RayOptions(actors=5).pool_size({"CPU": 1.0}, shards=100) == 5
    with pytest.raises(ConfigError, match="--ray-gpus-per-actor"):
        RayOptions(gpus_per_actor=1).pool_size({"CPU": 8.0}, shards=10)
    with pytest.raises(ConfigError, match="--ray-actors"):
        RayOptions(actors=0)


def test_ray_is_optional(tmp_path, capsys, monkeypatch):
    """geoindex never imports ray by itself; without it --engine ray says how to install it."""
    code = ("import sys, geoindex, geoindex.storage.build, geoindex.storage.distributed, pipelines.build_index; "
            "assert 'ray' not in sys.modules, 'ray imported at module import time'")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)
    for name in [m for m in sys.modules if m == "ray" or m.startswith("ray.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    argv = ["--zoom", "1", "--index", str(tmp_path), "--encoder", "tiny", "--quiet", "--engine", "ray", *SCHEDULE]
    assert build_index.main(argv) == 2
    assert "pip install -e '.[ray]'" in capsys.readouterr().err


def test_engine_flags():
    cfg = build_index.parse_args(["--zoom", "12", "--engine", "ray", "--ray-address", "auto", "--ray-actors", "16",
                                  "--ray-gpus-per-actor", "0.5", "--ray-cpus-per-actor", "4", "--batch-size", "256"])
    assert (cfg.engine, cfg.ray_address, cfg.ray_actors, cfg.ray_gpus_per_actor, cfg.ray_cpus_per_actor,
            cfg.batch_size) == ("ray", "auto", 16, 0.5, 4.0, 256)
    assert build_index.parse_args(["--zoom", "12"]).engine == "local"
    with pytest.raises(ConfigError, match="--device"):
        build_index.parse_args(["--zoom", "12", "--engine", "ray", "--device", "cuda"])
