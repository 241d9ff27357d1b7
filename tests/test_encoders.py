"""Encoder registry, factory, map-encoder checkpoints and weight resolution (no network)."""

from __future__ import annotations

import dataclasses
import functools
import http.server
import threading

import numpy as np
import open_clip
import pytest
import torch

from geoindex.errors import ConfigError, EncoderMismatchError, WeightsNotFoundError
from geoindex.models import encoders
from geoindex.models.encoders import (
    ENCODERS,
    create_encoder,
    load_map_encoder,
    mark_trainable,
    save_map_checkpoint,
)


def test_unknown_encoder_names_choices():
    with pytest.raises(ConfigError, match="clip-vit-b-32"):
        create_encoder("vit-huge")


def test_tiny_is_deterministic_and_normalised(tiny_encoder):
    again = create_encoder("tiny")
    assert again.base_fingerprint == tiny_encoder.base_fingerprint
    images = [np.full((40, 30, 3), v, dtype=np.uint8) for v in (0, 128, 255)]
    emb = tiny_encoder.encode(images)
    assert emb.shape == (3, tiny_encoder.dim) and emb.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(again.encode(images), emb, rtol=1e-6)


def test_only_last_two_blocks_ln_post_proj_train(tiny_encoder):
    enc = create_encoder("tiny")
    names = mark_trainable(enc)
    blocks = len(enc.visual.transformer.resblocks)
    assert "proj" in names and "ln_post.weight" in names
    assert {n.split(".")[2] for n in names if n.startswith("transformer.resblocks.")} == {
        str(blocks - 2), str(blocks - 1)}
    frozen = [n for n, p in enc.visual.named_parameters() if not p.requires_grad]
    assert any(n.startswith("conv1") for n in frozen)
    assert any(n.startswith("transformer.resblocks.0.") for n in frozen)


def test_checkpoint_round_trip(tmp_path, tiny_encoder):
    enc = create_encoder("tiny")
    mark_trainable(enc)
    with torch.no_grad():
        for p in enc.visual.parameters():
            if p.requires_grad:
                p.add_(0.05)
    sha = save_map_checkpoint(enc, tmp_path / "z6.pt", zoom=6)
    payload = torch.load(tmp_path / "z6.pt", weights_only=True)
    assert set(payload["state_dict"]) == set(mark_trainable(create_encoder("tiny")))
    full = sum(p.numel() for p in enc.visual.parameters())
    stored = sum(t.numel() for t in payload["state_dict"].values())
    assert stored < full
    loaded = load_map_encoder(tiny_encoder, tmp_path / "z6.pt")
    assert loaded.checkpoint_sha256 == sha and loaded.zoom == 6
    x = [np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)]
    np.testing.assert_allclose(loaded.encode(x), enc.encode(x), rtol=1e-5, atol=1e-6)
    assert not np.allclose(loaded.encode(x), tiny_encoder.encode(x))
    assert load_map_encoder(tiny_encoder, None) is tiny_encoder


def test_checkpoint_on_other_base_is_refused(tmp_path, monkeypatch, tiny_encoder):
    monkeypatch.setitem(ENCODERS, "tiny-seed1", dataclasses.replace(ENCODERS["tiny"], name="tiny-seed1", seed=1))
    other = create_encoder("tiny-seed1")
    save_map_checkpoint(other, tmp_path / "other.pt", zoom=4)
    with pytest.raises(EncoderMismatchError, match="trained on base"):
        load_map_encoder(tiny_encoder, tmp_path / "other.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(EncoderMismatchError, match="not a geoindex"):
        load_map_encoder(tiny_encoder, tmp_path / "junk.pt")
    with pytest.raises(WeightsNotFoundError):
        load_map_encoder(tiny_encoder, tmp_path / "absent.pt")


def test_offline_openai_fails_fast_naming_the_option(monkeypatch):
    monkeypatch.setattr(encoders, "find_cached_weights", lambda spec: None)
    monkeypatch.delenv(encoders.WEIGHTS_ENV, raising=False)
    with pytest.raises(WeightsNotFoundError, match="--weights PATH"):
        create_encoder("clip-vit-b-32")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(WeightsNotFoundError, match="HF_HUB_OFFLINE"):
        create_encoder("clip-vit-b-32", download=True)
    with pytest.raises(WeightsNotFoundError, match="does not exist"):
        create_encoder("clip-vit-b-32", weights="/nonexistent/ViT-B-32.pt")


@pytest.fixture
def weights_server(tmp_path):
    """Serves a full tiny CLIP state dict over HTTP on 127.0.0.1, counting requests."""
    torch.manual_seed(3)
    model = open_clip.create_model("geoindex-tiny")
    served = tmp_path / "srv"
    served.mkdir()
    torch.save(model.state_dict(), served / "tiny.pt")
    hits = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):
            hits.append(self.path)
            super().do_GET()

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=served))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/tiny.pt", hits, model
    server.shutdown()


def test_download_only_when_asked(weights_server, monkeypatch, tmp_path):
    url, hits, model = weights_server
    create_encoder("tiny")  # registers geoindex's model configs with open_clip
    spec = dataclasses.replace(ENCODERS["tiny"], name="tiny-hub", pretrained="hubtag")
    monkeypatch.setitem(ENCODERS, "tiny-hub", spec)
    monkeypatch.setenv("HOME", str(tmp_path))  # open_clip caches URL downloads in ~/.cache/clip
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv(encoders.WEIGHTS_ENV, raising=False)
    real_cfg = open_clip.pretrained.get_pretrained_cfg
    monkeypatch.setattr(open_clip.pretrained, "get_pretrained_cfg",
                        lambda m, t: {"url": url} if t == "hubtag" else real_cfg(m, t))

    with pytest.raises(WeightsNotFoundError, match="download=True"):
        create_encoder("tiny-hub")
    assert hits == []  # nothing was fetched without asking
    enc = create_encoder("tiny-hub", download=True)
    assert hits == ["/tiny.pt"]
    expected = encoders.state_fingerprint(model.visual)
    assert enc.base_fingerprint == expected
    again = create_encoder("tiny-hub")  # now found in the cache, no request
    assert again.base_fingerprint == expected and hits == ["/tiny.pt"]


def test_random_init_is_quiet_but_other_warnings_pass(caplog):
    """A random-init encoder is intended: open_clip's 'no pretrained weights' notice is dropped, only then."""
    import logging

    with caplog.at_level(logging.WARNING):
        create_encoder("tiny")
        logging.getLogger().warning("something else")
    messages = [r.getMessage() for r in caplog.records]
    assert not any("No pretrained weights loaded" in m for m in messages)
    assert "something else" in messages
    assert not any(isinstance(f, encoders._DropRandomInitNotice) for f in logging.getLogger().filters)


def test_precision_auto_and_errors(monkeypatch):
    spec = ENCODERS["tiny"]
    assert encoders.resolve_precision("auto", "cpu", spec) == "fp32"  # no encoder is measured safe in bf16 yet
    assert encoders.resolve_precision("auto", "cuda", spec) == "fp16"
    bf16_ok = dataclasses.replace(spec, cpu_bf16=True)
    monkeypatch.setattr(encoders, "_cpu_has_native_bf16", lambda: True)
    assert encoders.resolve_precision("auto", "cpu", bf16_ok) == "bf16"
    monkeypatch.setattr(encoders, "_cpu_has_native_bf16", lambda: False)
    assert encoders.resolve_precision("auto", "cpu", bf16_ok) == "fp32"  # emulated bf16 is slower than fp32
    with pytest.raises(ConfigError, match="fp16 is for CUDA"):
        encoders.resolve_precision("fp16", "cpu")
    with pytest.raises(ConfigError, match="--precision"):
        create_encoder("tiny", precision="fp8")


def test_reduced_precisions_stay_close_and_are_recorded(tiny_encoder):
    images = [np.random.default_rng(i).integers(0, 255, (64, 64, 3), dtype=np.uint8) for i in range(4)]
    fp32 = tiny_encoder.with_precision("fp32")
    for precision in ("bf16", "int8"):
        enc = fp32.with_precision(precision)
        assert enc.identity["precision"] == precision and enc.visual is fp32.visual
        cosine = np.sum(enc.encode(images) * fp32.encode(images), axis=1)
        assert cosine.min() > 0.98, precision
        assert not np.array_equal(enc.encode(images), fp32.encode(images))  # it really ran another arithmetic


def test_levels_record_the_precision_they_were_encoded_at(tmp_path, tiny_encoder, rendered_source, world):
    from geoindex.geometry.tiles import LevelSchedule
    from geoindex.storage.build import build_level
    from geoindex.storage.manifest import Manifest

    schedule = LevelSchedule(1, 2, 1)
    build_level(tmp_path, 1, source=rendered_source, encoder=tiny_encoder.with_precision("bf16"), coverage=world,
                schedule=schedule)
    build_level(tmp_path, 2, source=rendered_source, encoder=tiny_encoder.with_precision("fp32"), coverage=world,
                schedule=schedule)
    assert [lv.encoder.precision for lv in Manifest.load(tmp_path).levels] == ["bf16", "fp32"]


def test_query_threads_are_one_unless_asked():
    import faiss

    from geoindex.models.threads import configure_query_threads

    before = torch.get_num_threads()
    try:
        assert configure_query_threads(apply=False) == 1
        assert configure_query_threads(2) == 2 and (torch.get_num_threads(), faiss.omp_get_max_threads()) == (2, 2)
        assert configure_query_threads() == 1 and (torch.get_num_threads(), faiss.omp_get_max_threads()) == (1, 1)
    finally:
        configure_query_threads(before)


def test_build_threads_use_every_core_and_are_restored(monkeypatch):
    import faiss

    from geoindex.models import threads
    from geoindex.models.threads import build_threads, configure_query_threads, loader_threads

    before = torch.get_num_threads()
    try:
        configure_query_threads(1)
        monkeypatch.setattr(threads, "cpu_cores", lambda: 3)
        with build_threads() as n:
            assert n == 3 and (torch.get_num_threads(), faiss.omp_get_max_threads()) == (3, 3)
        assert (torch.get_num_threads(), faiss.omp_get_max_threads()) == (1, 1)  # a build leaves no trace
        with build_threads(2) as n:
            assert n == 2 and torch.get_num_threads() == 2
        assert torch.get_num_threads() == 1
    finally:
        configure_query_threads(before)
    assert [loader_threads(n) for n in (1, 2, 8)] == [2, 2, 8]


_OPEN_AND_ENCODE = """
import json, sys
import numpy as np
from geoindex.models.encoders import create_encoder
enc = create_encoder("efficientnet-lite0")
image = (np.arange(90 * 120 * 3) % 251).astype(np.uint8).reshape(90, 120, 3)
emb = enc.encode([image])[0]
print(json.dumps({"timm": "timm" in sys.modules, "runtime": enc.runtime, "dim": enc.dim,
                  "fingerprint": enc.base_fingerprint, "emb": emb.tolist()}))
"""


def test_photo_encoder_opens_from_its_exported_graph_without_building_the_network(tmp_path, monkeypatch):
    """A second process encodes through the ONNX graph the first exported, without importing timm (seconds on
    2 cores), and gets the same embeddings; with the graph gone it builds the network again."""
    import json
    import subprocess
    import sys

    pytest.importorskip("onnxruntime")
    env = {**__import__("os").environ, "GEOINDEX_CACHE_DIR": str(tmp_path)}
    env.pop("GEOINDEX_RUNTIME", None)

    def run() -> dict:
        done = subprocess.run([sys.executable, "-c", _OPEN_AND_ENCODE], env=env, capture_output=True, text=True,
                              check=True)
        return json.loads(done.stdout.strip().splitlines()[-1])

    first, second = run(), run()
    assert first["runtime"] == second["runtime"] == "onnxruntime"
    assert first["timm"] and not second["timm"]
    assert second["fingerprint"] == first["fingerprint"] and second["dim"] == first["dim"] == 1280
    np.testing.assert_array_equal(second["emb"], first["emb"])
    for graph in (tmp_path / "onnx").glob("*.onnx"):
        graph.unlink()
    third = run()
    assert third["timm"] and third["fingerprint"] == first["fingerprint"]
    np.testing.assert_allclose(third["emb"], first["emb"], atol=1e-6)

    # in this process: the network is built when asked for, and torch computes the same function
    monkeypatch.setenv("GEOINDEX_CACHE_DIR", str(tmp_path))
    lazy = create_encoder("efficientnet-lite0")
    image = (np.arange(90 * 120 * 3) % 251).astype(np.uint8).reshape(90, 120, 3)
    np.testing.assert_array_equal(lazy.encode([image])[0], np.float32(first["emb"]))
    # threads changed after the first use (a build's build_threads): the session is made again at the new count
    assert lazy._inference_network().threads == torch.get_num_threads()
    torch.set_num_threads(torch.get_num_threads() + 1)  # the autouse fixture restores it
    assert lazy._inference_network().threads == torch.get_num_threads()
    np.testing.assert_allclose(lazy.encode([image])[0], first["emb"], atol=1e-6)
    # the network built on first use inside encode (inference mode) is an ordinary, trainable network
    built_in_encode = create_encoder("efficientnet-lite0").with_precision("fp32", runtime="torch")
    np.testing.assert_allclose(built_in_encode.encode([image])[0], first["emb"], atol=1e-4)
    assert not any(p.is_inference() for p in built_in_encode.visual.parameters())
    assert lazy.device.type == "cpu" and lazy.head_prefixes  # builds the network
    torch_emb = lazy.with_precision("fp32", runtime="torch").encode([image])[0]
    np.testing.assert_allclose(torch_emb, first["emb"], atol=1e-4)


def test_cuda_graph_wrapper_runs_the_network_as_is_where_it_cannot_capture(tiny_encoder, monkeypatch):
    """On a CPU the wrapper is a pass-through; where a capture fails it runs that shape eagerly, and does not
    try again."""
    from geoindex.models.cuda_graphs import GraphedNetwork

    x = torch.randn(1, 3, 64, 64)
    network = tiny_encoder.visual
    graphed = GraphedNetwork(network)
    assert not graphed.captures(x)
    with torch.inference_mode():
        want = network(x)
        assert torch.equal(graphed(x), want) and graphed.captured == 0
        tries = []

        def broken_capture(inp):
            tries.append(inp.shape)
            raise RuntimeError("operation not permitted when stream is capturing")

        monkeypatch.setattr(graphed, "captures", lambda inp: True)
        monkeypatch.setattr(graphed, "_capture", broken_capture)
        assert torch.equal(graphed(x), want) and torch.equal(graphed(x), want)
    assert len(tries) == 1 and graphed.captured == 0


def test_one_photo_on_cuda_replays_a_captured_graph_with_the_eager_answer():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device here: graph capture is checked where one is (the CPU fallback is tested above)")
    from geoindex.models.cuda_graphs import GraphedNetwork

    enc = create_encoder("tiny", device="cuda", precision="fp32")
    photo = np.random.default_rng(0).integers(0, 256, (96, 128, 3), dtype=np.uint8)
    first, again = enc.encode([photo]), enc.encode([photo])
    network = enc._inference_network()
    assert isinstance(network, GraphedNetwork) and network.captured == 1
    eager = enc.with_precision("fp32")
    eager._inference_network = lambda: eager.visual  # type: ignore[method-assign]
    np.testing.assert_allclose(first, eager.encode([photo]), atol=1e-5)
    assert np.array_equal(first, again)
