"""`geoindex locate`: inputs, formats, exit codes, EXIF, maps; and region-restricted search against exact search."""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
from pathlib import Path

import mercantile
import numpy as np
import pytest
from PIL import ExifTags, Image
from PIL.TiffImagePlugin import IFDRational as R

import geoindex
from geoindex.errors import ConfigError
from geoindex.geometry.coverage import Coverage
from geoindex.geometry.metrics import great_circle_km
from geoindex.interfaces.cli import expand_inputs, main
from geoindex.storage.store import list_shards, read_embeddings, read_level_columns
from tests.conftest import render_tile

T = mercantile.Tile
REPO = Path(__file__).resolve().parents[1]


def _save(tile: mercantile.Tile, path: Path, *, gps: tuple[float, float] | None = None) -> Path:
    """An exact rendering of an indexed tile (so the search finds that tile), optionally with EXIF GPS."""
    img = render_tile(tile, size=64)
    if gps is None:
        img.save(path)
        return path
    lat, lon = gps
    exif = Image.Exif()
    exif[ExifTags.IFD.GPSInfo] = {1: "N" if lat >= 0 else "S", 2: (R(round(abs(lat) * 1e6), 10**6),),
                                  3: "E" if lon >= 0 else "W", 4: (R(round(abs(lon) * 1e6), 10**6),)}
    img.save(path, "JPEG", quality=100, subsampling=0, exif=exif)
    return path


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture()
def photos(tmp_path) -> Path:
    folder = tmp_path / "photos"
    (folder / "sub").mkdir(parents=True)
    _save(T(5, 2, 3), folder / "a.png")
    _save(T(1, 6, 3), folder / "sub" / "b.png")
    (folder / "notes.txt").write_text("not an image, and not picked up from a folder")
    return folder


# -- inputs ------------------------------------------------------------------------------------


def test_expand_inputs_files_folders_globs(photos, tmp_path):
    found, failed = expand_inputs([str(photos), str(photos / "a.png"), str(tmp_path / "*" / "*.png"),
                                   str(tmp_path / "nothing-*.jpg"), str(tmp_path / "missing.jpg")])
    assert found == [str(photos / "a.png"), str(photos / "sub" / "b.png"), str(tmp_path / "missing.jpg")]
    assert [f.image for f in failed] == [str(tmp_path / "nothing-*.jpg")]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert expand_inputs([str(empty)])[1][0].reason.startswith("folder holds no images")


# -- locate ------------------------------------------------------------------------------------


def test_locate_table(capsys, small_index, photos):
    code, out, err = _run(capsys, "locate", str(photos / "a.png"), "--index", str(small_index), "-k", "8",
                          "--top-n", "3", "--device", "cpu")
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split()[:4] == ["image", "#", "lat", "lon"]
    assert len(lines) == 1 + 3 + 1  # header, 3 candidates, and the line saying the index is uncalibrated
    assert "3/5/2" in lines[1] and lines[1].split()[0].endswith("/photos/a.png")
    assert "uncalibrated index" in lines[4]
    assert "1 of 1 images located" in err and "on cpu" in err and "images/s" in err


def test_locate_batch_with_bad_files_reports_them_and_answers_the_rest(capsys, small_index, photos, tmp_path):
    broken = photos / "broken.jpg"
    broken.write_bytes(b"definitely not a JPEG")
    missing = tmp_path / "missing.jpg"
    code, out, err = _run(capsys, "locate", str(photos), str(missing), "--index", str(small_index), "-k", "8",
                          "--format", "json", "--batch-size", "2", "--device", "cpu")
    assert code == 1
    items = {Path(d["image"]).name: d for d in json.loads(out)}
    assert set(items) == {"a.png", "b.png", "broken.jpg", "missing.jpg"}
    assert items["a.png"]["tile"] == [3, 5, 2] and items["b.png"]["tile"] == [3, 1, 6]
    assert "not a readable image" in items["broken.jpg"]["error"]
    assert "no such file" in items["missing.jpg"]["error"]
    assert f"error: {broken}: " in err and f"error: {missing}: no such file" in err
    assert "2 of 4 images located" in err and "2 failed" in err
    probs = [c["probability"] for c in items["a.png"]["candidates"]]
    assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1 + 1e-9


def test_locate_csv(capsys, small_index, photos):
    code, out, _ = _run(capsys, "locate", str(photos), "--index", str(small_index), "-k", "8", "--top-n", "2",
                        "--format", "csv", "--device", "cpu")
    assert code == 0
    rows = list(csv.DictReader(io.StringIO(out)))
    assert len(rows) == 4 and [r["rank"] for r in rows] == ["1", "2", "1", "2"]
    assert (rows[0]["zoom"], rows[0]["x"], rows[0]["y"]) == ("3", "5", "2")
    assert float(rows[0]["area_probability"]) >= float(rows[0]["probability"])


def test_locate_shows_exif_gps_and_distance_unless_ignored(capsys, small_index, tmp_path):
    path = _save(T(5, 2, 3), tmp_path / "gps.jpg", gps=(-33.85678, 151.21528))
    code, out, _ = _run(capsys, "locate", str(path), "--index", str(small_index), "-k", "8",
                        "--format", "json", "--device", "cpu")
    assert code == 0
    d = json.loads(out)[0]
    assert d["exif"]["lat"] == pytest.approx(-33.85678) and d["exif"]["lon"] == pytest.approx(151.21528)
    expected = float(great_circle_km(-33.85678, 151.21528, d["lat"], d["lon"]))
    assert d["exif"]["error_km"] == pytest.approx(expected)
    code, out, _ = _run(capsys, "locate", str(path), "--index", str(small_index), "-k", "8", "--device", "cpu")
    assert "-33.85678,151.21528" in out and f"{expected:,.1f}" in out
    code, out, _ = _run(capsys, "locate", str(path), "--index", str(small_index), "-k", "8", "--ignore-exif",
                        "--format", "json", "--device", "cpu")
    assert "exif" not in json.loads(out)[0]


def test_python_result_carries_what_the_json_has(small_index, tmp_path):
    """One result type for every output: probability, areas and EXIF are fields of SearchResult, and the JSON is
    made from them (result_to_dict needs no EXIF of its own)."""
    from geoindex.interfaces.outputs import result_to_dict

    path = _save(T(5, 2, 3), tmp_path / "gps.jpg", gps=(-33.85678, 151.21528))
    index = geoindex.open_index(small_index, device="cpu")
    result = index.search(path, k=8)
    assert result.exif == pytest.approx((-33.85678, 151.21528))
    assert result.error_km == pytest.approx(float(great_circle_km(-33.85678, 151.21528, result.lat, result.lon)))
    assert result.inside_radius == (result.error_km <= result.radius_km[0], result.error_km <= result.radius_km[1])
    d = result_to_dict(result)
    assert d["exif"]["error_km"] == pytest.approx(result.error_km)
    assert d["probability"] == result.probability == result.candidates[0].probability
    assert d["area_probability"] == result.area_probability >= result.probability
    assert [a["probability"] for a in d["areas"]] == [a.probability for a in result.areas]
    # from bytes too; not read when asked not to, and arrays carry none
    assert index.search(path.read_bytes(), k=8).exif == pytest.approx(result.exif)
    assert index.search(path, k=8, read_exif=False).exif is None
    assert index.search(np.asarray(Image.open(path)), k=8).error_km is None
    assert "exif" not in result_to_dict(index.search(path, k=8, read_exif=False))


def test_locate_map_and_geojson(capsys, small_index, photos, tmp_path):
    png, gj = tmp_path / "map.png", tmp_path / "out.geojson"
    code, _, err = _run(capsys, "locate", str(photos / "a.png"), "--index", str(small_index), "-k", "6",
                        "--map", str(png), "--geojson", str(gj), "--map-source", "bluemarble", "--device", "cpu")
    assert code == 0, err
    with Image.open(png) as img:
        assert img.format == "PNG" and img.width > img.height > 100
    fc = json.loads(gj.read_text())
    cands = [f for f in fc["features"] if f["properties"]["kind"] == "candidate"]
    assert len(cands) == 6 and sum(f["properties"]["probability"] for f in cands) == pytest.approx(1.0)
    assert f"wrote {png}" in err and f"wrote {gj}" in err


def test_map_of_several_photos_draws_one_png_per_photo_named_after_it(capsys, small_index, photos, tmp_path):
    (photos / "sub" / "a.png").write_bytes((photos / "a.png").read_bytes())  # two photos named a.png
    code, _, err = _run(capsys, "locate", str(photos), "--index", str(small_index), "-k", "4", "--map",
                        str(tmp_path / "m.png"), "--map-source", "bluemarble", "--device", "cpu")
    assert code == 0, err
    drawn = sorted(p.name for p in tmp_path.glob("m-*.png"))
    assert drawn == ["m-a-2.png", "m-a.png", "m-b.png"] and not (tmp_path / "m.png").exists()
    for name in drawn:
        with Image.open(tmp_path / name) as img:
            assert img.format == "PNG" and img.width > 100
    assert f"wrote {tmp_path / 'm-b.png'}" in err and str(photos / "sub" / "b.png") in err


@pytest.mark.parametrize("fmt", ["table", "csv"])
def test_trace_with_a_format_that_cannot_hold_it_is_refused(capsys, small_index, photos, fmt):
    code, out, err = _run(capsys, "locate", str(photos / "a.png"), "--index", str(small_index), "--trace",
                          "--format", fmt)
    assert code == 2 and out == ""
    assert "--trace is written in --format json only" in err and "--format json --trace" in err


@pytest.mark.parametrize(("name", "start", "end"), [
    ("holiday-" + "x" * 40 + "-berlin-dom.png", "holiday-", "-berlin-dom.png"),  # a long name: both its ends
    ("berlin.png", None, "/berlin.png"),                                          # a long folder: the whole name
])
def test_table_cuts_long_file_names_in_the_middle(capsys, small_index, tmp_path, name, start, end):
    folder = tmp_path / ("f" * 40)
    folder.mkdir()
    _save(T(5, 2, 3), folder / name)
    code, out, _ = _run(capsys, "locate", str(folder / name), "--index", str(small_index), "--device", "cpu",
                        "--top-n", "1")
    shown = out.splitlines()[1][:32]
    assert code == 0 and "..." in shown and shown.endswith(end)
    assert shown.startswith(start or str(tmp_path)[:5])


def test_clip_keeps_short_names_and_fits_the_width():
    from geoindex.interfaces.outputs import clip as _clip

    assert _clip("a.png", 32) == "a.png"
    for text in ("/very/long/folder/name/that/goes/on/and/on/photo.jpg", "x" * 100, "/" + "y" * 100):
        assert len(_clip(text, 32)) == 32


def test_no_index_points_at_the_demo_not_at_a_planet_build(capsys, photos, tmp_path):
    code, _, err = _run(capsys, "locate", str(photos / "a.png"), "--index", str(tmp_path / "nope"))
    assert code == 2 and "make demo" in err and "--index indexes/demo" in err and "--bbox" in err


def test_help_and_bare_import_load_no_heavy_library():
    """`geoindex --help` must answer at once: torch, FAISS, fastapi, timm, open_clip, onnx load only when used."""
    heavy = ["torch", "faiss", "fastapi", "timm", "open_clip", "onnx", "onnxruntime", "pyarrow", "requests"]
    code = ("import sys, io, contextlib\n"
            "import geoindex, geoindex.interfaces.cli\n"
            "with contextlib.redirect_stdout(io.StringIO()) as out:\n"
            "    try:\n        geoindex.interfaces.cli.main(['--help'])\n    except SystemExit:\n        pass\n"
            "assert 'locate' in out.getvalue()\n"
            f"print([m for m in {heavy!r} if m in sys.modules])")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_public_names_still_resolve_lazily():
    for name in geoindex.__all__:
        assert getattr(geoindex, name) is not None
    assert geoindex.SearchResult.__module__ == "geoindex.retrieval.results"


def test_slow_loading_is_announced_on_stderr(capsys):
    import time

    from geoindex.interfaces.cli import loading_notice

    with loading_notice("the thing", quiet=False, after=0.05):
        time.sleep(0.3)
    with loading_notice("the quick thing", quiet=False, after=5.0):
        pass
    with loading_notice("the quiet thing", quiet=True, after=0.05):
        time.sleep(0.2)
    err = capsys.readouterr().err
    assert err == "loading the thing ...\n"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["-k", "0"], "1..2048"),
        (["--top-n", "0"], "--top-n must be >= 1"),
        (["--bbox", "10", "50", "5", "40"], "south 50.0 must be less than north 40.0"),
    ],
)
def test_bad_arguments_exit_2(capsys, small_index, photos, args, message):
    code, _, err = _run(capsys, "locate", str(photos / "a.png"), "--index", str(small_index), *args)
    assert code == 2 and message in err


def test_missing_index_exits_2_with_the_fix(capsys, photos, tmp_path):
    code, out, err = _run(capsys, "locate", str(photos / "a.png"), "--index", str(tmp_path / "nope"))
    assert code == 2 and out == ""
    assert "no index at" in err and "build_index" in err


def test_no_images_exits_2(capsys, small_index, tmp_path):
    code, _, err = _run(capsys, "locate", str(tmp_path / "*.jpg"), "--index", str(small_index))
    assert code == 2 and "no image file matches" in err and "no input images" in err


def test_python_dash_m_geoindex(small_index, photos):
    proc = subprocess.run(
        [sys.executable, "-m", "geoindex", "locate", str(photos / "a.png"), "--index", str(small_index),
         "-k", "4", "--format", "json", "--device", "cpu", "-q"],
        capture_output=True, text=True, timeout=120, cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)[0]["tile"] == [3, 5, 2]


# -- regions -----------------------------------------------------------------------------------

BBOX = (-100.0, -10.0, 60.0, 70.0)


def _level_arrays(index_dir: Path, zoom: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    cols = read_level_columns(index_dir, zoom, ("x", "y", "parent_row"))
    emb = np.concatenate([read_embeddings(s) for s in list_shards(index_dir, zoom)]).astype(np.float32)
    return cols["x"].astype(np.int64), cols["y"].astype(np.int64), cols["parent_row"], emb


def _reference_beam(index: geoindex.GeoIndex, region: Coverage, q: np.ndarray, k: int) -> list[list[T]]:
    """The beam search written out with numpy over the parquet embeddings, filtered by the region."""
    kept_rows: np.ndarray | None = None
    trace = []
    for zoom in index.zooms:
        x, y, parent, emb = _level_arrays(index.path, zoom)
        ok = region.intersects(x, y, zoom=zoom)
        if kept_rows is not None:
            ok &= np.isin(parent, kept_rows)
        rows = np.flatnonzero(ok)
        scores = emb[rows] @ q
        kept_rows = rows[np.argsort(-scores, kind="stable")[:k]]
        trace.append([T(int(x[r]), int(y[r]), zoom) for r in kept_rows])
    return trace


@pytest.mark.parametrize("region", [Coverage.from_bbox(*BBOX),
                                    Coverage(polygons=((((-30.0, -40.0), (80.0, 10.0), (10.0, 60.0)),),))],
                         ids=["bbox", "polygon"])
def test_wide_region_search_equals_brute_force_over_the_region(small_index, region):
    index = geoindex.open_index(small_index)
    queries = [render_tile(T(x, y, 3)) for x, y in ((1, 1), (4, 3), (6, 5), (2, 2), (7, 7), (3, 4))]
    xq = index.embed(queries)
    results = index.within(region).search_embeddings(xq, k=64)
    x, y, _, emb = _level_arrays(small_index, 3)
    inside = np.flatnonzero(region.intersects(x, y, zoom=3))
    assert 0 < len(inside) < 64
    best = inside[np.argmax(xq @ emb[inside].T, axis=1)]
    assert [r.tile for r in results] == [T(int(x[b]), int(y[b]), 3) for b in best]
    for r in results:
        for level in r.trace:
            assert region.intersects([t.x for t in level.tiles], [t.y for t in level.tiles], zoom=level.zoom).all()


def test_narrow_region_search_equals_the_reference_beam(small_index):
    index = geoindex.open_index(small_index)
    region = Coverage.from_bbox(*BBOX)
    queries = [render_tile(T(x, y, 3)) for x, y in ((0, 0), (5, 2), (6, 6), (3, 3))]
    xq = index.embed(queries)
    for q, r in zip(xq, index.within(region).search_embeddings(xq, k=2), strict=True):
        assert [list(level.tiles) for level in r.trace] == _reference_beam(index, region, q, 2)


def test_region_outside_the_index_is_a_clear_error(tmp_path, tiny_encoder, rendered_source):
    from geoindex.geometry.tiles import LevelSchedule
    from geoindex.storage.build import build_level

    schedule = LevelSchedule(1, 2, 1)
    for zoom in schedule.zooms:
        build_level(tmp_path, zoom, source=rendered_source, encoder=tiny_encoder,
                    coverage=Coverage.from_bbox(0.0, 0.0, 90.0, 60.0), schedule=schedule)
    index = geoindex.open_index(tmp_path)
    with pytest.raises(ConfigError, match="contains no tile of the index"):
        index.within(Coverage.from_bbox(-120.0, -50.0, -60.0, -10.0))


def test_locate_with_bbox_and_region_file(capsys, small_index, photos, tmp_path):
    region_file = tmp_path / "region.geojson"
    w, s, e, n = BBOX
    region_file.write_text(json.dumps({"type": "Feature", "properties": {}, "geometry": {
        "type": "Polygon", "coordinates": [[[w, s], [e, s], [e, n], [w, n], [w, s]]]}}))
    # b.png shows tile 3/1/6 (southern hemisphere, west): outside the region, so another tile wins
    outputs = []
    for flag in (["--bbox", *map(str, BBOX)], ["--region", str(region_file)]):
        code, out, err = _run(capsys, "locate", str(photos / "sub" / "b.png"), "--index", str(small_index),
                              "-k", "4", "--format", "json", "--trace", "--device", "cpu", *flag)
        assert code == 0, err
        d = json.loads(out)[0]
        assert d["tile"] != [3, 1, 6]
        region = Coverage.from_bbox(*BBOX)
        for level in d["trace"]:
            tiles = np.array(level["tiles"])
            assert region.intersects(tiles[:, 1], tiles[:, 2], zoom=level["zoom"]).all()
        assert "within the region" in err
        outputs.append(d["tile"])
    assert outputs[0] == outputs[1]


def test_prior_without_geoclip_backbone_fails_clearly(small_index, tmp_path, capsys, monkeypatch):
    """--prior geoclip offline: exit 2 and a message naming how to supply GeoCLIP or its backbone."""
    from geoindex.interfaces.cli import main

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("GEOINDEX_GEOCLIP_BACKBONE", raising=False)
    image = tmp_path / "q.png"
    render_tile(mercantile.Tile(1, 2, 3)).save(image)
    code = main(["locate", str(image), "--index", str(small_index), "-k", "4", "--prior", "geoclip", "--quiet"])
    assert code == 2
    err = capsys.readouterr().err
    assert ".[geoclip]" in err or "--geoclip-backbone" in err
