"""JPEG decoding on the encoder's device (``geoindex.models.device_jpeg``, ``preprocessing="torch-nvjpeg"``).

No GPU is needed: with ``device="cpu"`` the same code runs torchvision's CPU decoder, and the check
that says whether a device can decode (``can_decode_on``) is monkeypatched to let the CPU in, so the
whole path (loaders handing back bytes, the batched decode, the host fallbacks, photos) runs here.
What differs on a GPU is nvjpeg's arithmetic, measured by benchmarks/gpu.py.
"""

from __future__ import annotations

import io

import mercantile
import numpy as np
import pytest
import torch
from conftest import render_tile
from PIL import Image

from geoindex.errors import TileSourceError
from geoindex.imagery import MAX_IMAGE_PIXELS, load_image
from geoindex.models import device_jpeg
from geoindex.models.device_jpeg import KeepJpeg, decode_jpegs, decode_photos, read_header, thumbnail_size


def _jpeg(img: Image.Image, **kw: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90, **kw)
    return buf.getvalue()


def _photo(w: int, h: int, seed: int = 0) -> Image.Image:
    """A smooth, textured photo-like image (JPEG-friendly), w x h."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (max(2, h // 40), max(2, w // 40), 3), dtype=np.uint8)
    return Image.fromarray(small).resize((w, h), Image.Resampling.BICUBIC)


@pytest.fixture
def cpu_decodes(monkeypatch):
    """Let the CPU stand in for a CUDA device with nvjpeg."""
    monkeypatch.setattr(device_jpeg, "can_decode_on", lambda device: True)


def test_tiles_decode_as_pil_decodes_them():
    datas = [_jpeg(render_tile(mercantile.Tile(x, 3, 3), size=256)) for x in range(4)]
    got = decode_jpegs(datas, "cpu", max_side=4096, max_pixels=MAX_IMAGE_PIXELS)
    for data, pixels in zip(datas, got):
        assert pixels is not None and pixels.dtype == torch.uint8
        want = np.asarray(load_image(data, max_side=4096))
        assert pixels.shape == want.shape == (256, 256, 3)
        diff = np.abs(pixels.numpy().astype(int) - want.astype(int))
        # torchvision's CPU decoder is libjpeg-turbo, as PIL's: the same pixels, give or take a grey level
        assert diff.mean() < 0.05 and diff.max() <= 2, (diff.mean(), diff.max())


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_is_applied(orientation):
    img = _photo(120, 80, seed=orientation)
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = _jpeg(img, exif=exif.tobytes())
    (pixels,) = decode_jpegs([data], "cpu", max_side=1024, max_pixels=MAX_IMAGE_PIXELS)
    want = np.asarray(load_image(data))
    assert pixels is not None and pixels.shape == want.shape
    assert np.abs(pixels.numpy().astype(int) - want.astype(int)).max() <= 2


@pytest.mark.parametrize("size", [(2500, 1700), (1300, 900), (900, 2100), (2048, 2048)])
def test_large_photos_get_load_images_size(size):
    """Above ``max_side`` PIL decodes at a reduced scale and thumbnails; the device resizes once to the same size."""
    data = _jpeg(_photo(*size))
    (pixels,) = decode_jpegs([data], "cpu", max_side=1024, max_pixels=MAX_IMAGE_PIXELS)
    want = np.asarray(load_image(data))
    assert pixels is not None and pixels.shape == want.shape
    diff = np.abs(pixels.numpy().astype(int) - want.astype(int))
    assert diff.mean() < 1.5, diff.mean()  # two resamplings (DCT draft, PIL thumbnail) against one


def test_thumbnail_size_is_pillows():
    for w, h in [(2000, 1500), (1025, 3), (3, 1025), (1500, 1001), (999, 1000), (4000, 4000)]:
        img = Image.new("L", (w, h))
        img.thumbnail((1000, 1000))
        assert thumbnail_size(w, h, 1000) == (img.size if (w, h) != img.size else None)


def test_what_the_device_leaves_to_the_host():
    tile = render_tile(mercantile.Tile(1, 1, 2), size=256)
    png = io.BytesIO()
    tile.save(png, "PNG")
    jpeg = _jpeg(tile)
    cmyk = _jpeg(tile.convert("CMYK"))
    got = decode_jpegs([png.getvalue(), jpeg[: len(jpeg) // 2], cmyk, jpeg, b"\xff\xd8\xffjunk\xff\xd9"], "cpu",
                       max_side=4096, max_pixels=MAX_IMAGE_PIXELS)
    assert [g is None for g in got] == [True, True, True, False, True]
    assert decode_jpegs([jpeg], "cpu", max_side=4096, max_pixels=100) == [None]  # over max_pixels: the host's guard
    assert read_header(jpeg, max_side=4096) is not None and read_header(png.getvalue(), max_side=4096) is None
    assert not device_jpeg.can_decode_on("cpu")  # only CUDA devices decode, and only with nvjpeg


def test_photos_from_paths_and_bytes(tmp_path):
    data = _jpeg(_photo(1600, 1200, seed=3))
    path = tmp_path / "p.jpg"
    path.write_bytes(data)
    png = tmp_path / "p.png"
    _photo(64, 48).save(png)
    got = decode_photos([path, data, str(png), tmp_path / "missing.jpg", np.zeros((4, 4, 3), np.uint8)], "cpu")
    assert got[0] is not None and got[1] is not None and torch.equal(got[0], got[1])
    assert got[0].shape == (768, 1024, 3)
    assert got[2:] == [None, None, None]  # not JPEG, unreadable (the host names it), not bytes


def test_torch_nvjpeg_is_its_own_identity(tiny_encoder, cpu_decodes):
    enc = tiny_encoder.with_precision("fp32", preprocessing="torch-nvjpeg")
    assert enc.identity["preprocessing"] == "torch-nvjpeg"
    assert enc.identity != tiny_encoder.with_precision("fp32", preprocessing="torch").identity
    assert enc.decodes_jpeg_on_device and enc.loader_step == KeepJpeg(enc.device)


def test_without_a_device_decoder_it_runs_as_torch(tiny_encoder):
    enc = tiny_encoder.with_precision("fp32", preprocessing="torch-nvjpeg")
    assert not enc.decodes_jpeg_on_device and enc.loader_step is np.asarray


def test_photo_encoding_matches_the_host_path(tiny_encoder, cpu_decodes, tmp_path):
    paths = []
    for i, size in enumerate([(640, 480), (1800, 1200)]):
        paths.append(tmp_path / f"{i}.jpg")
        paths[-1].write_bytes(_jpeg(_photo(*size, seed=i)))
    device = tiny_encoder.with_precision("fp32", preprocessing="torch-nvjpeg")
    host = tiny_encoder.with_precision("fp32", preprocessing="torch")
    a, b = device.encode(paths), host.encode(paths)
    assert np.allclose(a[0], b[0], atol=1e-5)  # same decoder, no resize before the network's: the same input
    assert float(np.sum(a[1] * b[1])) > 0.999  # one resize against PIL's draft + thumbnail


@pytest.fixture
def jpeg_folder(tmp_path):
    """Zoom-2 tiles as JPEG, one as PNG, one truncated JPEG at (3, 3)."""
    for x in range(4):
        for y in range(4):
            path = tmp_path / "2" / str(x) / f"{y}.jpg"
            path.parent.mkdir(parents=True, exist_ok=True)
            img = render_tile(mercantile.Tile(x, y, 2), size=256)
            if (x, y) == (1, 2):
                img.save(path.with_suffix(".png"))
            else:
                path.write_bytes(_jpeg(img))
    bad = tmp_path / "2" / "3" / "3.jpg"
    bad.write_bytes(bad.read_bytes()[:400])
    return tmp_path


@pytest.mark.parametrize("processes", [0, 2])
def test_tiles_from_a_folder_encode_as_the_host_path_does(tiny_encoder, cpu_decodes, jpeg_folder, processes):
    from geoindex.models.tile_encoding import TileProcessPool, encode_tile_batches, read_tile_batches
    from geoindex.sources import DirectorySource

    source = DirectorySource(jpeg_folder)
    tiles = [mercantile.Tile(x, y, 2) for x in range(4) for y in range(4) if (x, y) != (3, 3)]
    device = tiny_encoder.with_precision("fp32", preprocessing="torch-nvjpeg")
    host = tiny_encoder.with_precision("fp32", preprocessing="torch")
    step = device.loader_step
    pool = TileProcessPool(source, step, processes) if processes else None
    try:
        loads = [load for _, batch in read_tile_batches(source, tiles, step, batch_size=8, pool=pool) for load in batch]
        on_device = [isinstance(load.pixels, torch.Tensor) and load.data is None for load in loads]
        assert on_device == [t != mercantile.Tile(1, 2, 2) for t in tiles]  # the PNG tile: decoded by the loader
        assert all(load.size == (256, 256) for load in loads)
        got = np.concatenate([b.emb for b in encode_tile_batches(source, tiles, device, batch_size=8, pool=pool)])
    finally:
        if pool is not None:
            pool.shutdown()
    want = np.concatenate([b.emb for b in encode_tile_batches(source, tiles, host, batch_size=8)])
    np.testing.assert_allclose(got, want, atol=1e-5)
    with pytest.raises(TileSourceError, match="damaged"):  # the truncated tile: refused as on the host path
        list(encode_tile_batches(source, [mercantile.Tile(3, 3, 2)], device, batch_size=8))


def test_gpu_benchmarks_decode_figures_run_on_cpu(cpu_decodes, jpeg_folder):
    """benchmarks/gpu.py's JPEG rows, on the CPU: the code path only (the GPU run measures)."""
    pytest.importorskip("benchmarks._common")
    from benchmarks.gpu import decode_figures

    (jpeg_folder / "2" / "3" / "3.jpg").unlink()  # the damaged tile: a build would stop there
    out = decode_figures(jpeg_folder, 2, "tiny", "cpu", 8, max_tiles=16, reps=1, seed=0)
    assert out["tiles"] == 15 and out["tile_pixels"]["decoded_on_device"] == 7  # the 8th of the batch is the PNG
    assert out["tile_pixels"]["max_abs_diff"] <= 2 and out["embedding_cosine_min"] > 0.9999
    assert all(v > 0 for v in [*out["tile_ms"].values(), *(ms for p in out["photo_ms"].values() for ms in p.values()),
                               out["encode_torch"]["tiles_per_s"], out["encode_torch-nvjpeg"]["tiles_per_s"]])


def test_search_reads_files_once_and_decodes_them_on_the_device(small_index, cpu_decodes, tmp_path):
    """geoindex.search with an encoder that decodes JPEGs on its device: files are read as bytes (their EXIF
    GPS read from them), arrays and PNGs decoded on the host; the answers are the host path's."""
    import geoindex

    index = geoindex.open_index(small_index)
    exif = Image.Exif()
    gps = exif.get_ifd(0x8825)
    gps.update({1: "N", 2: (10.0, 30.0, 0.0), 3: "E", 4: (20.0, 0.0, 0.0)})
    jpeg = tmp_path / "gps.jpg"
    jpeg.write_bytes(_jpeg(_photo(640, 480, seed=9), exif=exif.tobytes()))
    png = tmp_path / "p.png"
    _photo(320, 240, seed=2).save(png)
    photos = [jpeg, png, np.asarray(_photo(200, 150, seed=5))]
    index.photo_encoder = index.photo_encoder.with_precision("fp32", preprocessing="torch")
    want = index.search(photos, k=4)
    index.photo_encoder = index.photo_encoder.with_precision("fp32", preprocessing="torch-nvjpeg")
    got = index.search(photos, k=4)
    assert [(r.lat, r.lon) for r in got] == [(r.lat, r.lon) for r in want]
    assert got[0].exif is not None and abs(got[0].exif[0] - 10.5) < 1e-6 and got[0].exif == want[0].exif
    assert got[1].exif is None and got[2].exif is None
    with pytest.raises(Exception, match="missing.jpg"):
        index.search(tmp_path / "missing.jpg")


def test_a_byte_source_tile_that_is_not_jpeg_is_fetched_once(tiny_encoder, cpu_decodes):
    """A server's PNG tile is decoded on the host from the bytes the loader already fetched, not requested again."""
    from geoindex.imagery import decode_tile
    from geoindex.models.tile_encoding import read_tile

    class CountingServer:
        name = "counting"

        def __init__(self) -> None:
            self.requests = 0

        def fetch_bytes(self, tile):
            self.requests += 1
            buf = io.BytesIO()
            render_tile(tile, size=256).save(buf, "PNG")
            return buf.getvalue()

        def get(self, tile):
            return decode_tile(self.fetch_bytes(tile), what="counting")

    server = CountingServer()
    step = tiny_encoder.with_precision("fp32", preprocessing="torch-nvjpeg").loader_step
    load = read_tile(server, step, mercantile.Tile(1, 1, 2))
    assert server.requests == 1 and load.data is None and load.size == (256, 256)
    np.testing.assert_array_equal(load.pixels, np.asarray(render_tile(mercantile.Tile(1, 1, 2), size=256)))
