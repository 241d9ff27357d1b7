"""Tiles -> embeddings: the same embeddings whatever loads the tiles (here, threads or worker processes)."""

from __future__ import annotations

import pickle
from concurrent.futures import ThreadPoolExecutor

import mercantile
import numpy as np
import pytest
import torch
from conftest import render_tile

from geoindex.errors import GeoIndexError
from geoindex.models.tile_encoding import TileProcessPool, encode_tile_batches, load_tile, loader_pool, read_tile
from geoindex.sources import DirectorySource, MBTilesSource, MemorySource, write_mbtiles

# zoom 3 with two tiles missing from the source, so that batches have gaps
TILES = [mercantile.Tile(x, y, 3) for x in range(8) for y in range(4)]
MISSING = {mercantile.Tile(2, 1, 3), mercantile.Tile(5, 3, 3)}


def _lacking(tile: mercantile.Tile):
    return None if tile in MISSING else render_tile(tile)


def _run(source, encoder, pool) -> tuple[list[int], np.ndarray]:
    rows, embs = [], []
    for batch in encode_tile_batches(source, TILES, encoder, batch_size=7, pool=pool):
        rows += (batch.start + batch.ok).tolist()
        embs.append(batch.emb)
    return rows, np.concatenate(embs)


def test_same_embeddings_whatever_the_loaders(tiny_encoder):
    """In order, read here, by 2 threads, by 1 and by 2 worker processes: identical rows and bytes."""
    source = MemorySource(_lacking, name="lacking")
    want_rows, want = _run(source, tiny_encoder, None)
    assert want_rows == [i for i, t in enumerate(TILES) if t not in MISSING]
    with ThreadPoolExecutor(2) as threads:
        assert _run(source, tiny_encoder, threads) == (want_rows, pytest.approx(want, abs=0))
    for processes in (1, 2):
        with TileProcessPool(source, tiny_encoder.loader_step, processes) as pool:
            rows, emb = _run(source, tiny_encoder, pool)
        assert rows == want_rows and np.array_equal(emb, want), processes


def test_uint8_pixels_encode_as_the_float_preprocessing_does(tiny_encoder):
    """Workers hand back uint8 crops, normalised on the encoder's device: the same tensor as preprocess, so the
    same embeddings as encoding the float tensors."""
    tile = TILES[0]
    loaded = load_tile(MemorySource(_lacking), tiny_encoder.preprocess, tile)
    read = read_tile(MemorySource(_lacking), tiny_encoder.loader_step, tile)
    assert read.pixels is not None and read.pixels.dtype == np.uint8 and read.tensor is None
    assert read.pixels.shape == (tiny_encoder.preprocess.size,) * 2 + (3,)
    want = tiny_encoder.encode_tensor(loaded.tensor[None])
    assert np.array_equal(tiny_encoder.encode_pixels(read.pixels[None]), want)


def test_folder_and_mbtiles_sources_load_in_worker_processes(tmp_path, tile_dir, tiny_encoder):
    """A folder is inherited by the workers; an MBTiles archive reopens its sqlite connection in each."""
    folder = DirectorySource(tile_dir)
    archive = tmp_path / "t.mbtiles"
    write_mbtiles(archive, {t: (tile_dir / str(t.z) / str(t.x) / f"{t.y}.png").read_bytes() for t in TILES})
    with MBTilesSource(archive) as mb:
        assert pickle.loads(pickle.dumps(mb)).path == mb.path
        want_rows, want = _run(folder, tiny_encoder, None)
        for source in (folder, mb):
            pool = loader_pool(source, tiny_encoder, 2)
            assert isinstance(pool, TileProcessPool)
            with pool:
                rows, emb = _run(source, tiny_encoder, pool)
            assert rows == want_rows and np.array_equal(emb, want), source.name


def test_bad_tiles_are_reported_from_workers(tiny_encoder):
    """An unreadable tile's typed error crosses the process boundary and is raised (on_error='raise')."""
    from geoindex.errors import TileSourceError

    def broken(tile: mercantile.Tile):
        if tile == TILES[3]:
            raise TileSourceError(f"tile {tuple(tile)} is damaged")
        return render_tile(tile)

    source = MemorySource(broken, name="broken")
    with TileProcessPool(source, tiny_encoder.loader_step, 2) as pool, \
            pytest.raises(TileSourceError, match=r"\(0, 3, 3\) is damaged"):
        _run(source, tiny_encoder, pool)


def test_a_pool_reads_only_its_own_source(tiny_encoder):
    with TileProcessPool(MemorySource(_lacking, name="a"), tiny_encoder.loader_step, 1) as pool, \
            pytest.raises(GeoIndexError, match="make one per source and encoder"):
        _run(MemorySource(_lacking, name="b"), tiny_encoder, pool)


def test_remote_sources_load_in_threads(tiny_encoder):
    from geoindex.sources import HttpSource

    pool = loader_pool(HttpSource("http://127.0.0.1:9/{z}/{x}/{y}.png"), tiny_encoder, 2)
    with pool:
        assert isinstance(pool, ThreadPoolExecutor)


def test_normalize_pixels_equals_the_table_bit_for_bit():
    from geoindex.models.pixels import ResizeCropNormalize, normalize_pixels

    rgb = ((np.arange(32 * 32 * 8)[:, None] + [0, 77, 155]) % 256).astype(np.uint8).reshape(8, 32, 32, 3)
    prep = ResizeCropNormalize(32, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    from PIL import Image

    want = torch.stack([prep(Image.fromarray(im)) for im in rgb])
    assert torch.equal(normalize_pixels(torch.from_numpy(rgb), prep.mean, prep.std), want)
    if torch.cuda.is_available():
        got = normalize_pixels(torch.from_numpy(rgb), prep.mean, prep.std, device="cuda")
        assert got.device.type == "cuda" and torch.equal(got.cpu(), want)
    else:
        print("no CUDA here: the on-device normalisation is checked on the CPU only")


def test_encode_pixels_on_a_cpu_normalizes_as_normalize_pixels(tiny_encoder):
    """The numpy table a CPU network's crops are normalised with (no torch operator) gives normalize_pixels' tensor."""
    from unittest import mock

    from geoindex.models import encoders
    from geoindex.models.pixels import normalize_pixels

    prep = tiny_encoder.preprocess
    rgb = np.random.default_rng(7).integers(0, 256, (5, prep.size, prep.size, 3), dtype=np.uint8)
    assert torch.equal(torch.from_numpy(prep.normalize(rgb)), normalize_pixels(torch.from_numpy(rgb), prep.mean,
                                                                               prep.std))
    seen = []
    with mock.patch.object(encoders.ImageEncoder, "_forward", lambda self, x: seen.append(x)):
        tiny_encoder.encode_pixels(list(rgb))
    assert torch.equal(seen[0], normalize_pixels(torch.from_numpy(rgb), prep.mean, prep.std))
