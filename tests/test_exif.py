"""EXIF GPS parsing: JPEGs written here with Pillow's Exif API, and the real photos when present."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import pytest
from PIL import ExifTags, Image
from PIL.TiffImagePlugin import IFDRational as R

from geoindex.errors import ImageError
from geoindex.exif import read_gps


def _jpeg(gps: dict | None, path: Path | None = None) -> bytes:
    """A small JPEG whose EXIF carries ``gps`` as its GPS IFD (no EXIF at all when None)."""
    img = Image.new("RGB", (16, 12), (120, 80, 40))
    buf = io.BytesIO()
    if gps is None:
        img.save(buf, "JPEG")
    else:
        exif = Image.Exif()
        exif[ExifTags.IFD.GPSInfo] = gps
        img.save(buf, "JPEG", exif=exif)
    if path is not None:
        path.write_bytes(buf.getvalue())
    return buf.getvalue()


def _dms(deg: int, minutes: int, seconds: float) -> tuple[R, R, R]:
    return R(deg, 1), R(minutes, 1), R(round(seconds * 1000), 1000)


SYDNEY = (-33.85678, 151.21528)  # 33 51' 24.408" S, 151 12' 55.008" E


@pytest.mark.parametrize(
    ("lat_ref", "lon_ref", "sign"),
    [("N", "E", (1, 1)), ("S", "E", (-1, 1)), ("N", "W", (1, -1)), ("S", "W", (-1, -1))],
)
def test_hemisphere_references(lat_ref, lon_ref, sign):
    data = _jpeg({1: lat_ref, 2: _dms(33, 51, 24.408), 3: lon_ref, 4: _dms(151, 12, 55.008)})
    lat, lon = read_gps(data)
    assert lat == pytest.approx(sign[0] * 33.85678, abs=1e-6)
    assert lon == pytest.approx(sign[1] * 151.21528, abs=1e-6)


def test_path_bytes_and_pil_image_agree(tmp_path):
    path = tmp_path / "sydney.jpg"
    data = _jpeg({1: "S", 2: _dms(33, 51, 24.408), 3: "E", 4: _dms(151, 12, 55.008)}, path)
    with Image.open(path) as img:
        from_image = read_gps(img)
    assert read_gps(path) == read_gps(str(path)) == read_gps(data) == from_image
    assert read_gps(path) == pytest.approx(SYDNEY, abs=1e-6)


def test_decimal_degrees_in_one_rational_and_lowercase_refs():
    data = _jpeg({1: "s", 2: (R(3385678, 100000),), 3: "w", 4: (R(15121528, 100000),)})
    assert read_gps(data) == pytest.approx((-33.85678, -151.21528), abs=1e-9)


def test_missing_reference_keeps_the_written_sign():
    data = _jpeg({2: _dms(10, 30, 0), 4: _dms(20, 15, 0)})
    assert read_gps(data) == pytest.approx((10.5, 20.25))


@pytest.mark.parametrize(
    "gps",
    [
        None,  # no EXIF at all
        {},  # an empty GPS IFD
        {1: "N", 2: _dms(10, 0, 0)},  # latitude without longitude
        {3: "E", 4: _dms(10, 0, 0)},  # longitude without latitude
        {1: "N", 2: (R(10, 1), R(0, 0), R(0, 1)), 3: "E", 4: _dms(20, 0, 0)},  # zero denominator
        {1: "N", 2: _dms(95, 0, 0), 3: "E", 4: _dms(20, 0, 0)},  # latitude out of range
        {1: "N", 2: _dms(10, 0, 0), 3: "E", 4: _dms(200, 0, 0)},  # longitude out of range
        {1: "N", 2: (R(10, 1), R(75, 1), R(0, 1)), 3: "E", 4: _dms(20, 0, 0)},  # 75 minutes
        {1: "N", 2: (R(0, 1), R(0, 1), R(0, 1)), 3: "E", 4: (R(0, 1), R(0, 1), R(0, 1))},  # 0/0: no fix
    ],
    ids=["no-exif", "empty-ifd", "no-lon", "no-lat", "zero-denominator", "lat-range", "lon-range",
         "minutes-range", "null-island"],
)
def test_missing_or_broken_tags_give_none(gps):
    assert read_gps(_jpeg(gps)) is None


@pytest.mark.filterwarnings("ignore:Corrupt EXIF data")
@pytest.mark.parametrize("block", [b"Exif\x00\x00II*\x00\xff\xff\xff\x7f", b"Exif\x00\x00MM\x00*" + b"\x00" * 3])
def test_corrupt_exif_block_gives_none(block):
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, "JPEG", exif=block)
    assert read_gps(buf.getvalue()) is None


def test_png_without_exif_gives_none(tmp_path):
    path = tmp_path / "plain.png"
    Image.new("RGB", (8, 8)).save(path)
    assert read_gps(path) is None


def test_unreadable_files_raise_image_error(tmp_path):
    bad = tmp_path / "notes.jpg"
    bad.write_text("not an image")
    with pytest.raises(ImageError, match="notes.jpg"):
        read_gps(bad)
    with pytest.raises(ImageError, match="missing.jpg"):
        read_gps(tmp_path / "missing.jpg")


def test_real_photos_match_their_csv(shared_data):
    rows = list(csv.DictReader((shared_data / "photos" / "photos.csv").open()))
    assert len(rows) >= 10
    for row in rows:
        got = read_gps(shared_data / "photos" / row["file"])
        assert got is not None, row["file"]
        # photos.csv rounds to 5 decimals (about 1 m)
        assert got == pytest.approx((float(row["lat"]), float(row["lon"])), abs=1e-5), row["file"]
