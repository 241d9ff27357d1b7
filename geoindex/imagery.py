"""Images in, RGB out: photo loading and the decoding and checking of encoded tiles.

Tile sources, which use these to read their tiles, live in ``geoindex.sources``.
"""

from __future__ import annotations

import errno
import io
import logging
import os
import stat
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from geoindex.errors import ImageError, ImageTooLargeError

__all__ = [
    "TILE_MAX_SIDE",
    "ImageInput",
    "check_image_path",
    "decode_tile",
    "describe_os_error",
    "load_image",
    "read_image_bytes",
    "to_rgb",
]

log = logging.getLogger(__name__)

ImageInput = str | os.PathLike | bytes | Image.Image | np.ndarray
"""What the public API accepts as one image: a path, encoded bytes, a PIL image or an HxWxC array."""

DEFAULT_MAX_SIDE = 1024  # encoders see 224 px; decoding more only costs memory.
TILE_MAX_SIDE = 4096  # the largest tile side decoded: map tiles are 256-512 px, anything far larger is not a tile
# Pillow refuses images above 2 * MAX_IMAGE_PIXELS as decompression bombs; keep its default guard
# but make the limit explicit so that the error message can state it.
MAX_IMAGE_PIXELS = 178_956_970


def _describe(src: object) -> str:
    if isinstance(src, (str, os.PathLike)):
        return os.fspath(src)
    if isinstance(src, bytes):
        return f"<{len(src)} bytes>"
    return f"<{type(src).__name__}>"


def to_rgb(img: Image.Image) -> Image.Image:
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
        return _arrayto_rgb(src, name)
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
        rgb = to_rgb(img)
        return rgb.copy() if rgb is img else rgb
    except ImageError:
        raise
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise ImageError(f"{name}: cannot decode image ({e})") from e


def read_image_bytes(src: ImageInput) -> ImageInput:
    """A path's encoded bytes, read once (ImageError naming the file where it cannot be); any other input as it is."""
    if not isinstance(src, (str, os.PathLike)):
        return src
    path = Path(src)
    check_image_path(path)
    try:
        return path.read_bytes()
    except OSError as e:
        raise ImageError(f"{os.fspath(src)}: {describe_os_error(path, e)}") from e


def _arrayto_rgb(arr: np.ndarray, name: str) -> Image.Image:
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
    return to_rgb(Image.fromarray(np.ascontiguousarray(arr), mode))


def decode_tile(data: bytes, *, what: str = "tile") -> Image.Image:
    """Decode and fully validate encoded tile bytes; ImageError if they are not a complete image."""
    return load_image(data, max_side=TILE_MAX_SIDE) if data else _raise_empty(what)


def _raise_empty(what: str) -> Image.Image:
    raise ImageError(f"{what}: empty body")
