"""make_dataset (EXIF GPS -> CSV), the photo CSV reader, seeded splits and the photo-embedding cache."""

from __future__ import annotations

import csv

import numpy as np
import pytest
from PIL import ExifTags, Image

from geoindex.errors import ConfigError
from geoindex.training.dataset import (
    PhotoTable,
    photo_embeddings,
    read_photo_csv,
    split_photos,
    table_splits,
    write_photo_csv,
)
from pipelines import make_dataset


def _jpeg_with_gps(path, lat, lon):
    exif = Image.Exif()
    gps = {
        ExifTags.GPS.GPSLatitudeRef: "N" if lat >= 0 else "S",
        ExifTags.GPS.GPSLatitude: _dms(abs(lat)),
        ExifTags.GPS.GPSLongitudeRef: "E" if lon >= 0 else "W",
        ExifTags.GPS.GPSLongitude: _dms(abs(lon)),
    }
    exif[ExifTags.IFD.GPSInfo] = gps
    Image.new("RGB", (32, 24), (90, 120, 30)).save(path, exif=exif)


def _dms(value):
    d = int(value)
    m = int((value - d) * 60)
    s = round(((value - d) * 60 - m) * 60, 4)
    return (float(d), float(m), float(s))


def test_make_dataset_writes_gps_photos_and_reports_the_rest(tmp_path, caplog):
    photos = tmp_path / "photos"
    (photos / "trip").mkdir(parents=True)
    _jpeg_with_gps(photos / "a.jpg", 48.8583, 2.2945)
    _jpeg_with_gps(photos / "trip" / "b.JPG", -33.8568, -70.6483)  # southern and western
    Image.new("RGB", (8, 8)).save(photos / "no_gps.jpg")
    (photos / "broken.jpg").write_bytes(b"nope")
    (photos / "notes.txt").write_text("not a photo")
    out = tmp_path / "data" / "photos.csv"
    caplog.set_level("INFO", logger="pipelines")
    summary = make_dataset.run(make_dataset.parse_args(
        [str(photos), "--out", str(out), "--missing", str(tmp_path / "missing.txt"), "--quiet"]))
    assert len(summary.table) == 2
    assert [p.endswith(n) for p, n in zip(summary.without_gps, ["no_gps.jpg"])] == [True]
    assert len(summary.unreadable) == 1 and summary.unreadable[0].endswith("broken.jpg")
    assert "1 photos have no EXIF GPS" in caplog.text
    table = read_photo_csv(out)
    assert sorted(np.round(table.lat, 4).tolist()) == [-33.8568, 48.8583]
    assert sorted(np.round(table.lon, 4).tolist()) == [-70.6483, 2.2945]
    assert all(p.startswith(str(photos)) for p in table.paths)
    assert open(out).read().count("../photos/") == 2  # stored relative to the CSV's folder
    assert Image.open(table.paths[0]).size == (32, 24)  # paths resolve from the CSV's folder
    with open(out) as f:
        assert next(csv.reader(f)) == ["path", "lat", "lon"]
    assert "no_gps.jpg\tno GPS" in (tmp_path / "missing.txt").read_text()


def test_make_dataset_reads_the_shared_photos(tmp_path, shared_data):
    folder = shared_data / "photos"
    if not (folder / "photos.csv").is_file():
        pytest.skip(f"{folder}/photos.csv not present")
    summary = make_dataset.run(make_dataset.parse_args([str(folder), "--out", str(tmp_path / "p.csv"), "--quiet"]))
    expected = {}
    with open(folder / "photos.csv", newline="") as f:
        for row in csv.DictReader(f):
            expected[row["file"]] = (float(row["lat"]), float(row["lon"]))
    got = {p.split("/")[-1]: (la, lo) for p, la, lo in zip(summary.table.paths, summary.table.lat, summary.table.lon)}
    assert set(got) == set(expected)
    for name, (lat, lon) in expected.items():
        assert got[name] == pytest.approx((lat, lon), abs=2e-5), name


def test_csv_reader_accepts_mp16_columns_and_image_root(tmp_path):
    (tmp_path / "mp16.csv").write_text("IMG_ID,AUTHOR,LAT,LON\n"
                                       "e1/3e/1.jpg,x,51.5,-0.12\n\n"
                                       "e1/3e/2.jpg,y,-89.9,179.99\n")
    table = read_photo_csv(tmp_path / "mp16.csv", image_root=tmp_path / "images")
    assert table.paths == (str(tmp_path / "images/e1/3e/1.jpg"), str(tmp_path / "images/e1/3e/2.jpg"))
    assert table.lat.tolist() == [51.5, -89.9] and table.lon.tolist() == [-0.12, 179.99]
    assert table.split is None


@pytest.mark.parametrize(("text", "match"), [
    ("name,lat,lon\na.jpg,1,2\n", "photo path"),
    ("path,lat,lon\na.jpg,91,2\n", "invalid coordinates"),
    ("path,lat,lon\na.jpg,north,2\n", ":2: cannot read"),
    ("path,lat,lon,split\na.jpg,1,2,holdout\n", "unknown split"),
])
def test_csv_reader_errors_name_the_problem(tmp_path, text, match):
    (tmp_path / "p.csv").write_text(text)
    with pytest.raises(ConfigError, match=match):
        read_photo_csv(tmp_path / "p.csv")


def test_split_is_seeded_disjoint_and_10_1_1():
    s = split_photos(1200, seed=3)
    assert [len(s[k]) for k in ("train", "val", "test")] == [1000, 100, 100]
    assert np.array_equal(np.sort(np.concatenate(list(s.values()))), np.arange(1200))
    again = split_photos(1200, seed=3)
    assert all(np.array_equal(s[k], again[k]) for k in s)
    assert not np.array_equal(s["val"], split_photos(1200, seed=4)["val"])


def test_split_column_overrides_the_seeded_split(tmp_path):
    table = PhotoTable(("a", "b", "c"), np.zeros(3), np.zeros(3), ("train", "test", "train"))
    write_photo_csv(tmp_path / "s.csv", table)
    back = read_photo_csv(tmp_path / "s.csv")
    s = table_splits(back)
    assert s["train"].tolist() == [0, 2] and s["test"].tolist() == [1] and s["val"].tolist() == []


def test_photo_embeddings_are_cached_and_resumed(tmp_path, tiny_encoder, monkeypatch):
    paths = []
    for i in range(7):
        p = tmp_path / f"{i}.png"
        Image.new("RGB", (40, 30), (30 * i, 200 - 20 * i, 7 * i)).save(p)
        paths.append(str(p))
    paths.append(str(tmp_path / "missing.png"))
    table = PhotoTable(tuple(paths), np.zeros(8), np.zeros(8))
    emb, ok = photo_embeddings(table, tiny_encoder, tmp_path / "cache", chunk_size=3, batch_size=2)
    assert ok.tolist() == [True] * 7 + [False] and emb.shape == (8, tiny_encoder.dim)
    np.testing.assert_allclose(emb[:7], tiny_encoder.encode(paths[:7]), atol=2e-3)  # stored as fp16
    assert not emb[7].any()
    # A rerun reads everything from the cache: the encoder is never called.
    chunks = sorted((tmp_path / "cache").rglob("chunk-*.npz"))
    assert len(chunks) == 3
    chunks[1].unlink()  # as if killed before the second chunk was written
    calls = []
    real = tiny_encoder.encode_tensor
    monkeypatch.setattr(tiny_encoder, "encode_tensor", lambda x: calls.append(len(x)) or real(x))
    again, ok2 = photo_embeddings(table, tiny_encoder, tmp_path / "cache", chunk_size=3, batch_size=2)
    assert sum(calls) == 3 and np.array_equal(again, emb) and np.array_equal(ok2, ok)
    # Another photo list is another cache entry.
    photo_embeddings(table.subset([0, 1]), tiny_encoder, tmp_path / "cache", chunk_size=3)
    assert len(list((tmp_path / "cache").iterdir())) == 2
