"""The map encoders shipped in the package: they load, match their recorded sha256, and reproduce their check top-1."""

from __future__ import annotations

import json
import shutil

import pytest

from geoindex.errors import EncoderMismatchError
from geoindex.models.encoders import create_encoder, load_map_encoder
from geoindex.sources import open_source
from geoindex.training.shipped import MANIFEST, SHIPPED_ROOT, check_top1, shipped_encoders

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def effnet():
    return create_encoder("efficientnet-lite0", precision="fp32")


def test_the_shipped_encoders_reproduce_their_recorded_check_top1(effnet):
    shipped = shipped_encoders(effnet)
    assert shipped is not None, f"the package ships EfficientNet-Lite0 map encoders in {SHIPPED_ROOT}"
    record = shipped.record
    start, stop, step = record["schedule"]
    assert sorted(shipped.checkpoints) == list(range(start, stop + 1, step))
    source = open_source(record["imagery"])
    for zoom, (check, recorded) in sorted(shipped.checks().items()):
        path = shipped.checkpoints[zoom]
        assert path.stat().st_size <= 4 * 2**20  # at most 4 MB per zoom
        encoder = load_map_encoder(effnet, path)
        assert encoder.zoom == zoom and encoder.head == record["head"]
        got = check_top1(effnet, encoder, source, check)
        # The same views and tiles on another CPU may round a near-tie the other way: one view of slack.
        assert got == pytest.approx(recorded, abs=1 / len(check.view_tiles) + 1e-9), f"z{zoom}"


def test_a_damaged_shipped_checkpoint_is_refused(tmp_path, effnet):
    folder = tmp_path / effnet.spec.name
    shutil.copytree(SHIPPED_ROOT / effnet.spec.name, folder)
    victim = sorted(folder.glob("z*.pt"))[0]
    data = bytearray(victim.read_bytes())
    data[-100] ^= 0xFF
    victim.write_bytes(bytes(data))
    with pytest.raises(EncoderMismatchError, match="sha256"):
        shipped_encoders(effnet, root=tmp_path)


def test_encoders_shipped_for_other_base_weights_are_not_used(tmp_path, effnet):
    folder = tmp_path / effnet.spec.name
    shutil.copytree(SHIPPED_ROOT / effnet.spec.name, folder)
    record = json.loads((folder / MANIFEST).read_text())
    record["base_fingerprint"] = "0" * 64
    (folder / MANIFEST).write_text(json.dumps(record))
    assert shipped_encoders(effnet, root=tmp_path) is None
    assert shipped_encoders(effnet, root=tmp_path / "nothing-here") is None
