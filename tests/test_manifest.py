"""The manifest's typed records: parsing, checks, and the JSON that earlier builds wrote."""

from __future__ import annotations

import copy
import json

import pytest

from geoindex.errors import IndexFormatError, IndexNotFoundError
from geoindex.geometry.tiles import LevelSchedule
from geoindex.storage.manifest import EncoderIdentity, FileInfo, LevelInfo, Manifest, short_id

BASE = "ab" * 32
CKPT = "cd" * 32

# A manifest as the build wrote it before the manifest had its own module (key order included).
WRITTEN = {
    "schedule": {"start": 1, "stop": 3, "step": 1},
    "dim": 64,
    "codec": "fp16",
    "photo_encoder": {"name": "tiny", "base_fingerprint": BASE, "checkpoint_sha256": None},
    "imagery": "xyz:tiles",
    "coverage": {"bboxes": [[-180.0, -85.0, 180.0, 85.0]], "polygons": []},
    "levels": [
        {"zoom": 1, "rows": 4,
         "encoder": {"name": "tiny", "base_fingerprint": BASE, "checkpoint_sha256": CKPT, "precision": "fp32",
                     "checkpoint": "ckpt/z1.pt"},
         "files": [{"name": "part-00000.parquet", "size": 10, "sha256": "0" * 64},
                   {"name": "index.faiss", "size": 20, "sha256": "1" * 64}]},
        {"zoom": 2, "rows": 16,
         "encoder": {"name": "tiny", "base_fingerprint": BASE, "checkpoint_sha256": None, "precision": "bf16",
                     "checkpoint": None},
         "files": [{"name": "index.faiss", "size": 30, "sha256": "2" * 64}]},
    ],
    "build_args": {"z1": {"shard_size": 8192}},
    "format_version": 1,
}


def test_manifest_written_before_reads_back_the_same():
    m = Manifest.from_dict(copy.deepcopy(WRITTEN))
    assert m.photo_encoder == EncoderIdentity("tiny", BASE)
    assert m.levels[0].encoder == EncoderIdentity("tiny", BASE, CKPT, "fp32", "ckpt/z1.pt")
    assert m.levels[1].files == (FileInfo("index.faiss", 30, "2" * 64),)
    expected = copy.deepcopy(WRITTEN)
    del expected["levels"][1]["encoder"]["checkpoint"]  # null and absent mean the same; None is not written
    assert m.to_dict() == expected
    assert json.dumps(m.to_dict()) == json.dumps(expected)  # key order too
    assert Manifest.from_dict(json.loads(json.dumps(m.to_dict()))) == m


def test_level_encoder_may_be_unset_or_partial():
    d = copy.deepcopy(WRITTEN)
    d["levels"][0]["encoder"] = {}  # finish_level's entry before the build records the encoder
    d["levels"][1]["encoder"] = {"name": "synthetic"}  # benchmarks' synthetic indexes
    m = Manifest.from_dict(d)
    assert m.levels[0].encoder is None and m.levels[1].encoder == EncoderIdentity("synthetic")
    assert m.to_dict()["levels"][0]["encoder"] == {}
    assert m.to_dict()["levels"][1]["encoder"] == {"name": "synthetic", "checkpoint_sha256": None}


def test_short_identity():
    assert EncoderIdentity("tiny", BASE).short == BASE[:12]
    assert EncoderIdentity("tiny", BASE, checkpoint_sha256=CKPT).short == CKPT[:12]
    assert short_id({"name": "tiny", "base_fingerprint": BASE, "checkpoint_sha256": None}) == BASE[:12]


@pytest.mark.parametrize(
    "edit,match",
    [
        (lambda d: d["levels"][0]["encoder"].update(precision=16), "'precision' is 16"),
        (lambda d: d["levels"][0]["encoder"].pop("name"), "'name' is missing"),
        (lambda d: d["levels"][0]["files"][0].update(name="../x"), "not a plain file name"),
        (lambda d: d["levels"][1].update(rows=-1), "negative"),
    ],
)
def test_bad_entries_name_the_file_and_key(edit, match):
    d = copy.deepcopy(WRITTEN)
    edit(d)
    with pytest.raises(IndexFormatError, match=match) as info:
        Manifest.from_dict(d, where="somewhere/manifest.json")
    assert str(info.value).startswith("somewhere/manifest.json: malformed manifest")


def test_imagery_spec_is_an_optional_text_entry():
    # issue 13: the source's spec, for maps; manifests written before it keep opening, unchanged
    assert Manifest.from_dict(copy.deepcopy(WRITTEN)).imagery_spec is None
    assert "imagery_spec" not in Manifest.from_dict(copy.deepcopy(WRITTEN)).to_dict()
    m = Manifest.from_dict({**copy.deepcopy(WRITTEN), "imagery_spec": "xyz:https://t/{z}/{x}/{y}.png"})
    assert m.imagery_spec == "xyz:https://t/{z}/{x}/{y}.png"
    assert Manifest.from_dict(m.to_dict()) == m
    with pytest.raises(IndexFormatError, match="'imagery_spec' is 5"):
        Manifest.from_dict({**copy.deepcopy(WRITTEN), "imagery_spec": 5})


def test_manifest_newer_version_and_missing(tmp_path):
    with pytest.raises(IndexNotFoundError, match="build_index"):
        Manifest.load(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"format_version": 99}))
    with pytest.raises(IndexFormatError, match="newer"):
        Manifest.load(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(IndexFormatError, match="unreadable"):
        Manifest.load(tmp_path)


def test_manifest_levels_must_follow_schedule():
    level = LevelInfo(zoom=6, rows=1, encoder=None, files=())
    with pytest.raises(IndexFormatError, match="prefix"):
        Manifest(schedule=LevelSchedule(), dim=4, codec="fp16", photo_encoder=EncoderIdentity("x"), imagery="x",
                 levels=(level,))


def test_with_level_drops_deeper_levels():
    infos = [LevelInfo(zoom=z, rows=1, encoder=None, files=()) for z in (4, 6, 8)]
    m = Manifest(schedule=LevelSchedule(), dim=4, codec="fp16", photo_encoder=EncoderIdentity("x"), imagery="x",
                 levels=tuple(infos))
    rebuilt = m.with_level(LevelInfo(zoom=6, rows=2, encoder=None, files=()))
    assert [lv.zoom for lv in rebuilt.levels] == [4, 6] and rebuilt.levels[1].rows == 2
