"""JPEG bytes -> uint8 RGB pixels on the encoder's device: nvjpeg on CUDA (``torchvision.io.decode_jpeg``).

An encoder with ``preprocessing="torch-nvjpeg"`` on a CUDA device hands the JPEG tiles of a folder,
an MBTiles archive or a server, and JPEG photos, to the GPU still encoded: the loaders only read
bytes, and one batched call decodes them where the resize happens next. The result is what the
host path gives (``imagery.load_image``, then ``np.asarray``): uint8 (H, W, 3), EXIF orientation
applied, the longer side at most ``max_side`` (PIL's thumbnail size, reached by one antialiased
bicubic resize on the device). nvjpeg's inverse DCT and chroma upsampling are not libjpeg-turbo's,
so pixels may differ by a few grey levels: hence a preprocessing of its own in the manifest.

Everything else stays on the host, decoded by PIL: bytes that are not JPEG, CMYK or 4-channel
JPEGs, ones without their end-of-image marker (truncated: PIL refuses them, nvjpeg may not),
ones above ``max_pixels``, any nvjpeg error, and machines whose torchvision lacks nvjpeg
(:func:`can_decode_on`). With ``device="cpu"`` the same code runs torchvision's CPU decoder
(libjpeg-turbo, PIL's pixels), which is how the tests check it without a GPU.
"""

from __future__ import annotations

import functools
import io
import logging
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import torch
from PIL import Image

from geoindex.errors import ImageError
from geoindex.imagery import DEFAULT_MAX_SIDE, MAX_IMAGE_PIXELS, ImageInput, read_image_bytes

__all__ = ["JpegHeader", "KeepJpeg", "can_decode_on", "decode_jpegs", "decode_photos", "is_jpeg",
           "orient", "read_header", "thumbnail_size"]

log = logging.getLogger(__name__)

_SOI = b"\xff\xd8\xff"  # start of image + the first marker's prefix
_EOI = b"\xff\xd9"
_ORIENTATION = 0x0112


def is_jpeg(data: bytes) -> bool:
    """True for bytes that start as a JPEG file does."""
    return data[:3] == _SOI


@dataclass(frozen=True)
class JpegHeader:
    """What decoding needs from a JPEG's header: the stored size, EXIF orientation (1-8) and the size
    PIL's reduced-size decoding would give (``draft``)."""

    width: int
    height: int
    orientation: int
    draft_size: tuple[int, int]


def read_header(data: bytes, *, max_side: int) -> JpegHeader | None:
    """The header of JPEG bytes the device can decode (RGB or greyscale, complete), else None.

    Reads no pixels: PIL parses the markers lazily.
    """
    if not is_jpeg(data) or not data.rstrip(b"\x00").endswith(_EOI):
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a decompression bomb goes to the host path, which names it
            img = Image.open(io.BytesIO(data))
            if img.format != "JPEG" or img.mode not in ("RGB", "L"):
                return None
            width, height = img.size
            try:
                orientation = int(img.getexif().get(_ORIENTATION, 1))
            except Exception:  # Pillow raises many types on corrupt EXIF: the host path decides
                return None
            img.draft("RGB", (max_side, max_side))
            draft = img.size
    except Exception:  # not a JPEG PIL can read: the host path reports why
        return None
    return JpegHeader(width, height, orientation if 1 <= orientation <= 8 else 1, draft)


def thumbnail_size(width: int, height: int, max_side: int) -> tuple[int, int] | None:
    """(width, height) that ``PIL.Image.thumbnail((max_side, max_side))`` gives a width x height image,
    or None where it leaves the image as it is (Pillow's arithmetic)."""
    if max_side >= width and max_side >= height:
        return None
    aspect = width / height
    x = y = max_side

    def round_aspect(number: float, key: object) -> int:
        return max(min(math.floor(number), math.ceil(number), key=key), 1)  # type: ignore[call-overload]

    if x / y >= aspect:
        x = round_aspect(y * aspect, key=lambda n: abs(aspect - n / y))
    else:
        y = round_aspect(x / aspect, key=lambda n: 0 if n == 0 else abs(aspect - x / n))
    return x, y


def orient(pixels: torch.Tensor, orientation: int) -> torch.Tensor:
    """uint8 (H, W, C) turned as ``PIL.ImageOps.exif_transpose`` turns an image of that EXIF orientation."""
    if orientation == 2:
        return pixels.flip(1)
    if orientation == 3:
        return pixels.flip(0).flip(1)
    if orientation == 4:
        return pixels.flip(0)
    if orientation == 5:
        return pixels.transpose(0, 1)
    if orientation == 6:
        return torch.rot90(pixels, -1, (0, 1))
    if orientation == 7:
        return pixels.transpose(0, 1).flip(0).flip(1)
    if orientation == 8:
        return torch.rot90(pixels, 1, (0, 1))
    return pixels


@functools.cache
def _nvjpeg_works(device: str) -> bool:
    """Whether this torchvision decodes JPEGs on ``device`` (built with nvjpeg): one tiny image, tried once."""
    try:
        buf = io.BytesIO()
        Image.new("RGB", (16, 16), (200, 40, 10)).save(buf, "JPEG")
        out = _decode_batch([buf.getvalue()], torch.device(device))
        return out[0].shape == (3, 16, 16)
    except Exception as e:  # no nvjpeg, no driver, no torchvision.io: the host decodes
        log.debug("JPEG decoding on %s unavailable: %s", device, e)
        return False


def can_decode_on(device: torch.device | str) -> bool:
    """True where JPEGs can be decoded on ``device``: a CUDA device whose torchvision has nvjpeg."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return False
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _nvjpeg_works(f"cuda:{index}")


def _decode_batch(datas: Sequence[bytes], device: torch.device) -> list[torch.Tensor]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torchvision 0.29 points to TorchCodec
        from torchvision.io import ImageReadMode, decode_jpeg

        raw = [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in datas]
        out = decode_jpeg(raw, mode=ImageReadMode.RGB, device=device)
    return list(out) if isinstance(out, (list, tuple)) else [out]


def _resize(pixels: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """uint8 (H, W, 3) -> uint8 (h, w, 3) = size (w, h), antialiased bicubic (PIL's filter), rounded."""
    x = pixels.permute(2, 0, 1).unsqueeze(0).float()
    x = torch.nn.functional.interpolate(x, size=(size[1], size[0]), mode="bicubic", antialias=True,
                                        align_corners=False)
    return x.round_().clamp_(0, 255).to(torch.uint8)[0].permute(1, 2, 0)


def decode_jpegs(datas: Sequence[bytes], device: torch.device | str, *, max_side: int,
                 max_pixels: int) -> list[torch.Tensor | None]:
    """Each JPEG as uint8 RGB (H, W, 3) on ``device``, as ``imagery.load_image`` would give it (EXIF
    orientation applied, longer side at most ``max_side``); None for one left to the host (see the module).

    One batched decode where it can; if the batch fails, each image alone, so one bad file does
    not send the others to the host.
    """
    device = torch.device(device)
    headers = [read_header(d, max_side=max_side) for d in datas]
    todo = [i for i, h in enumerate(headers) if h is not None and h.width * h.height <= max_pixels]
    out: list[torch.Tensor | None] = [None] * len(datas)
    if not todo:
        return out
    try:
        decoded: list[torch.Tensor | None] = list(_decode_batch([datas[i] for i in todo], device))
    except Exception as e:
        log.debug("batched JPEG decoding on %s failed (%s); decoding one by one", device, e)
        decoded = []
        for i in todo:
            try:
                decoded.append(_decode_batch([datas[i]], device)[0])
            except Exception as e1:  # this one goes to the host, which names what is wrong with it
                log.debug("JPEG decoding on %s failed for image %d: %s", device, i, e1)
                decoded.append(None)
    for i, chw in zip(todo, decoded):
        header = headers[i]
        assert header is not None
        if chw is None:
            continue
        hwc = orient(chw.permute(1, 2, 0), header.orientation)
        w, h = header.draft_size if header.orientation < 5 else header.draft_size[::-1]
        size = thumbnail_size(w, h, max_side) if max(w, h) > max_side else None
        if size is None and (w, h) != (hwc.shape[1], hwc.shape[0]):
            size = (w, h)  # PIL decoded at a reduced scale (draft) and kept that size
        out[i] = _resize(hwc, size) if size is not None else hwc
    return out


def decode_photos(images: Sequence[ImageInput], device: torch.device | str) -> list[torch.Tensor | None]:
    """The JPEG photos among ``images`` (paths or bytes) decoded on ``device`` as ``imagery.load_image``
    decodes them (:func:`decode_jpegs`); None for the rest (PIL images, arrays, other formats, files
    that cannot be read: the host path decodes them or names what is wrong)."""
    datas: list[bytes] = []
    where: list[int] = []
    for i, im in enumerate(images):
        try:
            data = read_image_bytes(im)
        except ImageError:
            continue  # the host path names what is wrong with the file
        if isinstance(data, bytes) and is_jpeg(data):
            datas.append(data)
            where.append(i)
    out: list[torch.Tensor | None] = [None] * len(images)
    for i, pixels in zip(where, decode_jpegs(datas, device, max_side=DEFAULT_MAX_SIDE, max_pixels=MAX_IMAGE_PIXELS)):
        out[i] = pixels
    return out


@dataclass(frozen=True)
class KeepJpeg:
    """A tile loader's step (``ImageEncoder.loader_step``) for an encoder that decodes JPEGs on ``device``:
    loaders hand JPEG tiles back still encoded (``tile_encoding.read_tile``), to be decoded in one
    batch there (:func:`decode_jpegs`); any other tile is decoded on the host and, called with its
    RGB image, this gives its uint8 pixels, as the ``torch`` preprocessing's loaders do."""

    device: torch.device

    def __call__(self, img: Image.Image) -> npt.NDArray[np.uint8]:
        return np.asarray(img)
