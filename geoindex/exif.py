"""GPS coordinates from a photo's EXIF tags (Pillow only): where the camera says the photo was taken.

The GPS IFD stores latitude and longitude as three rationals (degrees, minutes, seconds) plus a
reference letter (N/S, E/W). Writers vary: some store decimal degrees in the first rational,
some omit the reference, some write zero denominators or 0/0 when the receiver had no fix.
``read_gps`` turns every such case into either a valid (lat, lon) or None, never an exception.
"""

from __future__ import annotations

import io
import logging
import math
import os
from collections.abc import Sequence
from typing import Any

from PIL import ExifTags, Image, UnidentifiedImageError

from geoindex.errors import ImageError

__all__ = ["GpsSource", "read_gps"]

log = logging.getLogger(__name__)

GpsSource = str | os.PathLike | bytes | Image.Image
"""What ``read_gps`` accepts: a path, the encoded bytes of an image, or an opened PIL image."""

_LAT_REF, _LAT, _LON_REF, _LON = 1, 2, 3, 4  # GPS IFD tag numbers (EXIF 2.3, table 15)


def _number(value: Any) -> float:
    """One EXIF rational (IFDRational, (num, den) tuple, int or float) as a float; NaN if undefined."""
    if isinstance(value, tuple) and len(value) == 2:
        num, den = value
        return float(num) / float(den) if float(den) else math.nan
    return float(value)  # IFDRational with a zero denominator is already NaN


def _degrees(value: Any) -> float:
    """Degrees from (d, m, s), (d, m), (d,) or a bare number; NaN if malformed."""
    try:
        parts: Sequence[Any] = value if isinstance(value, (tuple, list)) else (value,)
        if not 1 <= len(parts) <= 3:
            return math.nan
        nums = [_number(p) for p in parts]
    except (TypeError, ValueError, ZeroDivisionError):
        return math.nan
    if len(nums) > 1 and any(n < 0 or n >= 60 for n in nums[1:]):
        return math.nan  # minutes and seconds must be in [0, 60)
    return sum(n / 60.0**i for i, n in enumerate(nums))


def _ref(value: Any) -> str:
    if isinstance(value, bytes):
        value = value.decode("ascii", "replace")
    return str(value).strip("\x00 ").upper()[:1] if value is not None else ""


def _signed(degrees: float, ref: str, negative: str, positive: str) -> float:
    if ref == negative:
        return -abs(degrees)
    if ref == positive:
        return abs(degrees)
    return degrees  # no (or an unknown) reference: keep the sign as written


def _open(src: str | os.PathLike | bytes) -> Image.Image:
    name = f"<{len(src)} bytes>" if isinstance(src, bytes) else os.fspath(src)
    try:
        return Image.open(io.BytesIO(src) if isinstance(src, bytes) else os.fspath(src))
    except (UnidentifiedImageError, OSError) as e:
        raise ImageError(f"{name}: cannot read EXIF, not a readable image ({e})") from e


def read_gps(src: GpsSource) -> tuple[float, float] | None:
    """The (lat, lon) in degrees that a photo's EXIF GPS tags record, or None.

    None means the photo carries no usable position: no EXIF, no GPS IFD, a missing latitude or
    longitude, malformed or undefined rationals (zero denominators), values out of range, or
    exactly (0, 0), which receivers write when they have no fix.

    Args:
        src: a path, the encoded bytes of an image, or an opened ``PIL.Image``.

    Raises:
        ImageError: ``src`` is not a readable image at all (missing file, not an image).
    """
    img = src if isinstance(src, Image.Image) else _open(src)
    try:
        if img.format == "PNG" and "exif" not in img.info and img is not src:
            # Pillow's PNG getexif() decodes every pixel looking for an eXIf chunk after the image
            # data (a 9,400 x 9,400 PNG: 265 MB). Writers, Pillow included, put it before the data.
            return None
        try:
            gps = img.getexif().get_ifd(ExifTags.IFD.GPSInfo)
        except Exception as e:  # Pillow raises many types on corrupt EXIF blocks; all mean "no GPS"
            log.debug("unreadable EXIF in %s: %s", getattr(img, "filename", "<image>"), e)
            return None
        if _LAT not in gps or _LON not in gps:
            return None
        lat = _signed(_degrees(gps[_LAT]), _ref(gps.get(_LAT_REF)), "S", "N")
        lon = _signed(_degrees(gps[_LON]), _ref(gps.get(_LON_REF)), "W", "E")
    finally:
        if img is not src:
            img.close()
    if not (math.isfinite(lat) and math.isfinite(lon) and abs(lat) <= 90.0 and abs(lon) <= 180.0):
        log.debug("EXIF GPS out of range or undefined: lat %r lon %r", lat, lon)
        return None
    if lat == 0.0 and lon == 0.0:
        return None
    return lat, lon
