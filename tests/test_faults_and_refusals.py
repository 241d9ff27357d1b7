"""Bad input gets a clear error, faults lose nothing, wrong indexes are refused, searches are thread-safe."""

from __future__ import annotations

import dataclasses
import io
import json
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import mercantile
import numpy as np
import pytest
from PIL import Image

import geoindex
from geoindex.errors import (
    ConfigError,
    EncoderMismatchError,
    GeoIndexError,
    ImageError,
    IndexFormatError,
    IndexNotFoundError,
)
from geoindex.geometry.tiles import LevelSchedule
from geoindex.models.encoders import ENCODERS
from geoindex.sources import DirectorySource
from geoindex.storage.build import BuildIncompleteError, build_level
from tests.conftest import png_claiming, render_tile, write_tiles

ROOT = Path(__file__).resolve().parents[1]


def _inputs(tmp: Path) -> tuple[dict[str, Path], dict[str, Path]]:
    """(good, bad) images by name, written to tmp."""
    tile = render_tile(mercantile.Tile(5, 2, 3))
    good: dict[str, Path] = {}
    bad: dict[str, Path] = {}

    def save(name: str, img: Image.Image, **kw) -> None:
        good[name] = tmp / name
        img.save(good[name], **kw)

    save("one_pixel.png", Image.new("RGB", (1, 1), (10, 20, 30)))
    save("cmyk.jpg", tile.convert("CMYK"), format="JPEG")
    save("sixteen_bit.png", Image.fromarray(np.asarray(tile.convert("L"), dtype=np.uint16) * 257))
    palette = tile.convert("P")
    palette.info["transparency"] = 0
    save("palette_alpha.png", palette, transparency=0)
    frames = [tile, tile.rotate(90)]
    good["animated.gif"] = tmp / "animated.gif"
    frames[0].save(good["animated.gif"], save_all=True, append_images=frames[1:])
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees when displayed
    save("portrait_exif.jpg", tile.resize((64, 32)), format="JPEG", exif=exif)
    save("grayscale.png", tile.convert("L"))

    for name, data in {
        "empty.jpg": b"",
        "random.jpg": np.random.default_rng(0).bytes(2048),
        "page.png": b"<!doctype html><html><body>404 Not Found</body></html>",
        "bomb.png": png_claiming(30000, 30000),
    }.items():
        bad[name] = tmp / name
        bad[name].write_bytes(data)
    buf = io.BytesIO()
    tile.resize((256, 256)).save(buf, "JPEG")
    bad["truncated.jpg"] = tmp / "truncated.jpg"
    bad["truncated.jpg"].write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    bad["folder"] = tmp / "folder"
    bad["folder"].mkdir()
    bad["missing.jpg"] = tmp / "missing.jpg"
    return good, bad


def test_bad_images_in_a_batch_are_reported_and_the_rest_answered(small_index, tmp_path):
    good, bad = _inputs(tmp_path)
    index = geoindex.open_index(small_index)
    names = list(good) + list(bad)
    paths = [good.get(n) or bad[n] for n in names]
    results = index.search(paths, k=4, on_error="return")
    for name, path, result in zip(names, paths, results):
        if name in good:
            assert isinstance(result, geoindex.SearchResult), (name, result)
            assert result.image == str(path)
        else:
            assert isinstance(result, ImageError), name
            assert str(path) in str(result)
    # one by one through the public function: good ones work, bad ones raise a typed error
    for path in bad.values():
        with pytest.raises(GeoIndexError, match=str(path).replace(".", r"\.")):
            geoindex.search(path, k=4, index=small_index)
    assert geoindex.search(good["portrait_exif.jpg"], k=4, index=small_index).tile.z == 3


def test_exif_rotation_is_applied_before_encoding(small_index, tmp_path):
    tile = render_tile(mercantile.Tile(1, 1, 3)).resize((64, 32))
    exif = Image.Exif()
    exif[0x0112] = 6
    tagged = tmp_path / "tagged.jpg"
    tile.save(tagged, format="JPEG", exif=exif, quality=95)
    upright = tmp_path / "upright.jpg"
    tile.transpose(Image.Transpose.ROTATE_270).save(upright, format="JPEG", quality=95)
    index = geoindex.open_index(small_index)
    a, b = index.embed([tagged, upright])
    assert float(a @ b) > 0.999


def test_build_with_a_damaged_tile_keeps_other_shards_and_resumes(tmp_path, tiny_encoder, world):
    tiles = write_tiles(tmp_path / "tiles", (1,))
    broken = tiles / "1" / "1" / "1.png"
    good_bytes = broken.read_bytes()
    broken.write_bytes(good_bytes[:40])  # truncated
    source = DirectorySource(tiles)
    schedule = LevelSchedule(1, 3, 1)
    index = tmp_path / "index"
    with pytest.raises(BuildIncompleteError, match="rerun"):
        build_level(index, 1, source=source, encoder=tiny_encoder, coverage=world, schedule=schedule,
                    shard_size=1)
    assert len(list((index / "z01").glob("part-*.parquet"))) == 3  # all but the damaged tile's shard
    assert not (index / "manifest.json").exists()  # the level is not published
    broken.write_bytes(good_bytes)
    summary = build_level(index, 1, source=source, encoder=tiny_encoder, coverage=world, schedule=schedule,
                          shard_size=1)
    assert summary.shards_written == 1 and summary.shards_reused == 3 and summary.rows == 4


@pytest.fixture
def index_copy(small_index, tmp_path) -> Path:
    dst = tmp_path / "copy"
    shutil.copytree(small_index, dst)
    return dst


def test_other_photo_encoder_weights_are_refused(index_copy, monkeypatch):
    manifest = json.loads((index_copy / "manifest.json").read_text())
    manifest["photo_encoder"]["base_fingerprint"] = "0" * 64
    (index_copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(EncoderMismatchError, match="weights"):
        geoindex.open_index(index_copy)


def test_mismatched_map_checkpoint_is_refused(index_copy, tmp_path, monkeypatch):
    from geoindex.models.encoders import create_encoder, save_map_checkpoint

    monkeypatch.setitem(ENCODERS, "tiny-seed9", dataclasses.replace(ENCODERS["tiny"], name="tiny-seed9", seed=9))
    ckpt = tmp_path / "z02.pt"
    save_map_checkpoint(create_encoder("tiny-seed9"), ckpt, zoom=2)
    manifest = json.loads((index_copy / "manifest.json").read_text())
    manifest["levels"][1]["encoder"]["checkpoint"] = str(ckpt)
    (index_copy / "manifest.json").write_text(json.dumps(manifest))
    index = geoindex.open_index(index_copy)
    with pytest.raises(EncoderMismatchError, match="trained on base"):
        geoindex.OnTheFlySearcher.for_index(index, source=None)  # type: ignore[arg-type]


def test_missing_level_is_refused(index_copy):
    shutil.rmtree(index_copy / "z02")
    with pytest.raises(IndexFormatError, match="z02|missing"):
        geoindex.open_index(index_copy)


@pytest.mark.parametrize("what", ["faiss", "parquet"])
def test_truncated_files_are_refused(index_copy, what):
    path = next((index_copy / "z03").glob("index.faiss" if what == "faiss" else "part-*.parquet"))
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(IndexFormatError, match="partial"):
        geoindex.open_index(index_copy)


@pytest.mark.parametrize("what", ["faiss", "parquet"])
def test_corrupted_files_are_refused_by_default_on_small_indexes(index_copy, what):
    """Same size, flipped bytes: small indexes are checksummed on open, so no silently wrong answer."""
    path = next((index_copy / "z03").glob("index.faiss" if what == "faiss" else "part-*.parquet"))
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(IndexFormatError, match="checksum"):
        geoindex.open_index(index_copy)


def test_newer_format_and_no_index(index_copy, tmp_path):
    with pytest.raises(IndexNotFoundError, match="build_index"):
        geoindex.open_index(tmp_path / "nothing")
    manifest = json.loads((index_copy / "manifest.json").read_text())
    manifest["format_version"] = 99
    (index_copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(IndexFormatError, match="newer"):
        geoindex.open_index(index_copy)


def test_threads_share_one_index(small_index):
    index = geoindex.open_index(small_index)
    rng = np.random.default_rng(0)
    xq = rng.standard_normal((100, index.photo_encoder.dim)).astype(np.float32)
    xq /= np.linalg.norm(xq, axis=1, keepdims=True)
    ks = [1 + (i % 7) for i in range(100)]  # different beam widths at once
    serial = [index.search_embeddings(xq[i : i + 1], k=ks[i])[0] for i in range(100)]

    def worker(_: int) -> list:
        return [index.search_embeddings(xq[i : i + 1], k=ks[i])[0] for i in range(100)]

    with ThreadPoolExecutor(8) as pool:
        for results in pool.map(worker, range(8)):
            assert [r.trace for r in results] == [r.trace for r in serial]


def test_two_processes_search_one_index(small_index, tmp_path):
    query = tmp_path / "q.png"
    render_tile(mercantile.Tile(2, 6, 3)).save(query)
    code = (
        "import sys, geoindex; r = geoindex.search(sys.argv[1], k=4, index=sys.argv[2]); "
        "print(r.tile.x, r.tile.y, r.tile.z)"
    )
    procs = [subprocess.Popen([sys.executable, "-c", code, str(query), str(small_index)], cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1] for o in outs]
    expected = geoindex.search(query, k=4, index=small_index).tile
    assert [o[0].split() for o in outs] == [[str(expected.x), str(expected.y), str(expected.z)]] * 2


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: geoindex.create_encoder("resnet"), "choose one of"),
        (lambda: LevelSchedule(4, 16, 5), "step"),
        (lambda: LevelSchedule().index_of(5), r"\[4, 6, 8"),
        (lambda: geoindex.search(np.zeros((8, 8, 3), np.uint8), k=0), "1..2048"),
    ],
)
def test_bad_arguments_name_the_valid_range(call, match):
    with pytest.raises(ConfigError, match=match):
        call()


@pytest.mark.parametrize("bbox", [(10, 5, 10, 6), (0, 10, 5, 0), (0, 86, 5, 89), (0, -95, 5, 0)])
def test_bad_bboxes(bbox):
    from geoindex.geometry.coverage import Coverage

    with pytest.raises(ConfigError):
        Coverage.from_bbox(*bbox)
