"""GeoCLIP as a prior: its real head, location encoder and gallery on stand-in backbones; inject, rerank. Offline."""

from __future__ import annotations

import subprocess
import sys

import mercantile
import numpy as np
import pytest
import torch
from PIL import Image

import geoindex
from geoindex.api import OnTheFlySearcher
from geoindex.errors import ConfigError, WeightsNotFoundError
from geoindex.geometry.tiles import tile_of
from geoindex.retrieval import prior as gp
from geoindex.retrieval.beam import PriorOptions
from tests.conftest import render_tile
from tests.test_search import random_queries

GALLERY_STRIDE = 100  # every 100th of GeoCLIP's 100k points: 1,000 real points, embedded in about a second


class PooledPixels(torch.nn.Module):
    """Stand-in for CLIP ViT-L/14: 14x14 average pooling of 3x224x224 pixels is exactly 768 features."""

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.avg_pool2d(pixels, 14).flatten(1) * 10.0


class FixedFeatures(torch.nn.Module):
    """Stand-in whose features are one fixed vector, whatever the photo: one GeoCLIP answer for all."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        self.register_buffer("v", torch.randn(1, gp.FEATURE_DIM, generator=torch.Generator().manual_seed(seed)))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.v.expand(len(pixels), -1)


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv(gp.BACKBONE_ENV, raising=False)


@pytest.fixture(scope="session")
def gallery_subset():
    pytest.importorskip("geoclip")
    gps, _ = gp.shipped_gallery()
    return gps[::GALLERY_STRIDE].clone()


@pytest.fixture(scope="session")
def fixed_prior(gallery_subset):
    return gp.load_geoclip_prior(FixedFeatures(), gps=gallery_subset, cache_dir=None)


@pytest.fixture(scope="session")
def pooled_prior(gallery_subset, fixed_prior):
    prior = gp.load_geoclip_prior(PooledPixels(), gps=gallery_subset, cache_dir=None)
    prior._gallery_features = fixed_prior.gallery_features()  # same encoder and gallery: embed once
    return prior


class TilePriorAt:
    """A TilePrior with all its mass on one tile of zoom ``at`` (a hand-made belief for exact tests)."""

    def __init__(self, tile: mercantile.Tile, n: int) -> None:
        self.tile, self.n = tile, n

    def __len__(self) -> int:
        return self.n

    def top_tile(self, *, zoom: int):
        shift = self.tile.z - zoom  # zooms at or above the tile's
        x, y = self.tile.x >> shift, self.tile.y >> shift
        return np.full(self.n, x, np.int64), np.full(self.n, y, np.int64)

    def tile_mass(self, x, y, *, zoom: int):
        shift = self.tile.z - zoom
        return ((x == self.tile.x >> shift) & (y == self.tile.y >> shift)).astype(np.float64)


# --------------------------------------------------------------------------- packaging and errors


def test_importing_geoindex_does_not_import_geoclip():
    code = ("import sys, geoindex, geoindex.retrieval.prior, geoindex.api; "
            "assert 'geoclip' not in sys.modules, 'geoclip'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_missing_package_is_a_config_error_naming_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "geoclip", None)  # makes `import geoclip` raise ImportError
    with pytest.raises(ConfigError, match=r"pip install -e '\.\[geoclip\]'"):
        gp.load_geoclip_prior(PooledPixels())


def test_offline_without_vit_l14_names_how_to_supply_it(monkeypatch, small_index, tmp_path):
    pytest.importorskip("geoclip")
    monkeypatch.setattr(gp, "_is_cached", lambda repo_id: False)  # as on a machine that never downloaded it
    for kwargs in ({}, {"download": True}):
        with pytest.raises(WeightsNotFoundError) as e:
            gp.load_geoclip_prior(**kwargs)
        msg = str(e.value)
        for hint in ("--geoclip-backbone PATH", gp.BACKBONE_ENV, "hf download openai/clip-vit-large-patch14",
                     "download=True"):
            assert hint in msg
    with pytest.raises(WeightsNotFoundError, match="does not exist"):
        gp.load_geoclip_prior(tmp_path / "nowhere")
    monkeypatch.setitem(gp._loaded, "geoclip", None)
    gp._loaded.pop("geoclip")
    with pytest.raises(WeightsNotFoundError, match="--geoclip-backbone"):
        geoindex.search(render_tile(mercantile.Tile(1, 1, 3)), k=2, index=small_index, prior="geoclip")


def test_bad_prior_options_fail_before_loading(small_index):
    image = render_tile(mercantile.Tile(1, 1, 3))
    with pytest.raises(ConfigError, match="prior mode"):
        geoindex.search(image, k=2, index=small_index, prior="geoclip", prior_mode="boost")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="prior weight"):
        geoindex.search(image, k=2, index=small_index, prior="geoclip", prior_mode="rerank", prior_weight=1.5)
    with pytest.raises(ConfigError, match="unknown prior"):
        geoindex.search(image, k=2, index=small_index, prior="im2gps")
    with pytest.raises(ConfigError, match="pool"):
        PriorOptions("rerank", pool=0)


def test_local_backbone_folder_loads_offline(tmp_path, gallery_subset):
    """A Hugging Face CLIP folder (here a tiny random one with ViT-L/14's 768-d projection) loads offline."""
    pytest.importorskip("geoclip")
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    config = CLIPConfig(
        projection_dim=768,
        text_config=dict(hidden_size=32, intermediate_size=64, num_attention_heads=2, num_hidden_layers=1,
                         projection_dim=768),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_attention_heads=2, num_hidden_layers=1,
                           patch_size=56, image_size=224, projection_dim=768),
    )
    CLIPModel(config).save_pretrained(tmp_path)
    CLIPImageProcessor().save_pretrained(tmp_path)
    prior = gp.load_geoclip_prior(tmp_path, gps=gallery_subset[:50], cache_dir=None)
    belief = prior.predict([render_tile(mercantile.Tile(0, 0, 1), size=300), np.zeros((90, 160, 3), np.uint8)])
    assert belief.prob.shape == (2, 50)
    np.testing.assert_allclose(belief.prob.sum(axis=1), 1.0, rtol=1e-5)


# --------------------------------------------------------------------------- GeoCLIP itself


def test_matches_geoclip_forward(monkeypatch, gallery_subset, pooled_prior):
    """Our prior computes GeoCLIP's own forward + softmax: the package's GeoCLIP on the same stand-in backbone."""
    import geoclip.model.image_encoder as ie
    from transformers import CLIPImageProcessor

    class StandInCLIP(torch.nn.Module):
        @classmethod
        def from_pretrained(cls, name):
            return cls()

        def get_image_features(self, pixel_values):
            return PooledPixels()(pixel_values)

    class StandInProcessor:
        @classmethod
        def from_pretrained(cls, name):
            return CLIPImageProcessor()

    monkeypatch.setattr(ie, "CLIPModel", StandInCLIP)
    monkeypatch.setattr(ie, "AutoProcessor", StandInProcessor)
    model = __import__("geoclip").GeoCLIP(clip_path="stand-in").eval()  # loads the shipped weights
    images = [render_tile(mercantile.Tile(x, 3, 3), size=256) for x in range(4)]
    pixels = pooled_prior.preprocess_images(images)
    with torch.no_grad():
        theirs = model(pixels, gallery_subset).softmax(dim=-1).numpy()
    ours = pooled_prior.predict(images).prob
    np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-7)
    assert len(gp.shipped_gallery()[1]) == 100_000


def test_gallery_embeddings_are_computed_once_and_cached_on_disk(tmp_path, gallery_subset, monkeypatch):
    gps = gallery_subset[:200]
    first = gp.load_geoclip_prior(FixedFeatures(), gps=gps, cache_dir=tmp_path)
    feats = first.gallery_features()
    assert first.gallery_features() is feats
    assert [p.suffix for p in tmp_path.iterdir()] == [".npy"]
    second = gp.load_geoclip_prior(FixedFeatures(), gps=gps, cache_dir=tmp_path)

    def boom(*args):
        raise AssertionError("recomputed the gallery embeddings")

    monkeypatch.setattr(second.location_encoder, "forward", boom)
    torch.testing.assert_close(second.gallery_features(), feats)
    other = gp.load_geoclip_prior(FixedFeatures(), gps=gallery_subset[200:300], cache_dir=tmp_path)
    assert other.gallery_key() != second.gallery_key()  # another gallery never reads this cache


def test_tile_mass_is_the_probability_of_the_tiles_area(pooled_prior):
    belief = pooled_prior.predict([render_tile(mercantile.Tile(x, 0, 2), size=224) for x in range(3)])
    lat, lon = belief.gallery.lat, belief.gallery.lon
    zoom = 3
    side = 1 << zoom
    gx, gy = np.meshgrid(np.arange(side), np.arange(side), indexing="ij")
    x = np.broadcast_to(gx.ravel(), (3, side * side))
    y = np.broadcast_to(gy.ravel(), (3, side * side))
    mass = belief.tile_mass(x, y, zoom=zoom)
    np.testing.assert_allclose(mass.sum(axis=1), 1.0, rtol=1e-5)  # the tiles of a zoom partition the world
    t = tile_of(float(lat[7]), float(lon[7]), zoom=zoom)
    inside = [i for i in range(len(lat)) if tile_of(float(lat[i]), float(lon[i]), zoom=zoom) == t]
    got = belief.tile_mass(np.full((3, 2), [t.x, -1]), np.full((3, 2), [t.y, -1]), zoom=zoom)
    np.testing.assert_allclose(got[:, 0], belief.prob[:, inside].sum(axis=1), rtol=1e-5)
    assert (got[:, 1] == 0).all()
    part = belief[1:]
    assert len(part) == 2 and part.tile_mass(x[1:], y[1:], zoom=zoom).shape == (2, side * side)
    np.testing.assert_array_equal(belief[[2]].prob, belief.prob[2:])
    top_lat, top_lon = belief.top_location()
    assert [tile_of(a, b, zoom=zoom) for a, b in zip(top_lat, top_lon)] == [
        mercantile.Tile(int(a), int(b), zoom) for a, b in zip(*belief.top_tile(zoom=zoom))
    ]


# --------------------------------------------------------------------------- inject


def test_inject_puts_geoclips_tile_in_the_beam_at_every_level(small_index, fixed_prior):
    index = geoindex.open_index(small_index)
    queries = random_queries(12, zoom=3, seed=11)
    plain = index.search(queries, k=1)
    injected = index.search(queries, k=1, prior=fixed_prior, prior_mode="inject")
    lat, lon = fixed_prior.predict(queries[:1]).top_location()
    missing_without = 0
    for p, r in zip(plain, injected):
        for level, plain_level in zip(r.trace, p.trace):
            target = tile_of(float(lat[0]), float(lon[0]), zoom=level.zoom)
            assert target in level.tiles
            assert 1 <= len(level.tiles) <= 2  # k kept + the injected one
            assert list(level.scores) == sorted(level.scores, reverse=True)
            missing_without += target not in plain_level.tiles
        # every tile descends from a tile kept above it
        for upper, lower in zip(r.trace, r.trace[1:]):
            assert all(mercantile.parent(t) in upper.tiles for t in lower.tiles)
    assert missing_without > 0  # the tile really was brought in, not found anyway


def test_injected_tile_carries_its_true_score(small_index, tiny_encoder, rendered_source):
    index = geoindex.open_index(small_index)
    queries = random_queries(6, zoom=3, seed=12)
    xq = index.embed(queries)
    target = mercantile.Tile(7, 6, 3)
    results = index.search_embeddings(xq, k=1, prior=TilePriorAt(target, len(xq)))
    emb = tiny_encoder.encode([rendered_source.get(mercantile.parent(target, zoom=1))])
    emb = emb.astype(np.float16).astype(np.float32)
    for q, r in enumerate(results):
        first = r.trace[0]
        i = first.tiles.index(mercantile.parent(target, zoom=1))
        np.testing.assert_allclose(first.scores[i], float(xq[q] @ emb[0]), atol=2e-3)
        assert target in r.trace[2].tiles


def test_inject_indexed_equals_on_the_fly(small_index, rendered_source, fixed_prior):
    index = geoindex.open_index(small_index)
    otf = OnTheFlySearcher.for_index(index, rendered_source)
    queries = random_queries(8, zoom=3, seed=13)
    for a, b in zip(index.search(queries, k=2, prior=fixed_prior), otf.search(queries, k=2, prior=fixed_prior)):
        assert [t.tiles for t in a.trace] == [t.tiles for t in b.trace]


def test_inject_skips_tiles_outside_a_region(small_index):
    from geoindex.geometry.coverage import Coverage

    index = geoindex.open_index(small_index)
    west = index.within(Coverage.from_bbox(-180, -85, -1, 85))
    xq = index.embed(random_queries(4, zoom=3, seed=14))
    east_tile = mercantile.Tile(6, 3, 3)
    for r in west.search_embeddings(xq, k=1, prior=TilePriorAt(east_tile, len(xq))):
        assert all(t.x < (1 << t.z) // 2 for level in r.trace for t in level.tiles)


# --------------------------------------------------------------------------- rerank


def test_rerank_with_weight_zero_equals_plain_search(small_index, pooled_prior):
    index = geoindex.open_index(small_index)
    queries = random_queries(10, zoom=3, seed=15)
    for k in (1, 3):
        plain = index.search(queries, k=k)
        reranked = index.search(queries, k=k, prior=pooled_prior, prior_mode="rerank", prior_weight=0.0)
        for a, b in zip(plain, reranked):
            assert [t.tiles for t in a.trace] == [t.tiles for t in b.trace]
            assert [t.scores for t in a.trace] == [t.scores for t in b.trace]


def test_rerank_with_a_wide_beam_equals_the_exact_combined_ranking(small_index, pooled_prior, tiny_encoder,
                                                                    rendered_source):
    index = geoindex.open_index(small_index)
    queries = random_queries(6, zoom=3, seed=16)
    xq = index.embed(queries)
    belief = pooled_prior.predict(queries)
    options = PriorOptions("rerank", weight=0.3)
    results = index.search_embeddings(xq, k=64, prior=belief, prior_options=options)
    level = index.stored[-1]
    tiles = [mercantile.Tile(int(x), int(y), 3) for x, y in zip(level.x, level.y)]
    emb = tiny_encoder.encode([rendered_source.get(t) for t in tiles]).astype(np.float16).astype(np.float32)
    x = np.broadcast_to(level.x.astype(np.int64), (len(xq), level.rows))
    y = np.broadcast_to(level.y.astype(np.int64), (len(xq), level.rows))
    combined = 0.7 * (xq @ emb.T) + 0.3 * 0.01 * np.log(belief.tile_mass(x, y, zoom=3) + 1e-6)
    best = np.argmax(combined, axis=1)
    for q, r in enumerate(results):
        assert r.tile == tiles[best[q]]
        np.testing.assert_allclose(r.score, combined[q, best[q]], atol=2e-3)


def test_rerank_with_weight_one_follows_the_prior(small_index):
    index = geoindex.open_index(small_index)
    xq = index.embed(random_queries(5, zoom=3, seed=17))
    target = mercantile.Tile(2, 5, 3)
    for r in index.search_embeddings(xq, k=2, prior=TilePriorAt(target, len(xq)),
                                     prior_options=PriorOptions("rerank", weight=1.0, pool=4)):
        assert r.tile == target


def test_search_api_with_a_loaded_prior(small_index, pooled_prior, tmp_path):
    path = tmp_path / "q.png"
    render_tile(mercantile.Tile(5, 2, 3)).save(path)
    for mode in ("inject", "rerank"):
        result = geoindex.search(path, k=2, index=small_index, prior=pooled_prior, prior_mode=mode)
        assert result.image == str(path) and result.tile.z == 3
        assert all(len(level.tiles) <= (3 if mode == "inject" else 2) for level in result.trace)
    with pytest.raises(ConfigError, match="covers 2 queries"):
        geoindex.open_index(small_index).search_embeddings(
            np.zeros((1, 64), np.float32), k=1, prior=TilePriorAt(mercantile.Tile(0, 0, 1), 2))


# --------------------------------------------------------------------------- evaluation with a prior


def test_evaluate_with_prior(small_index, pooled_prior, tmp_path):
    """evaluate(prior=...): rerank with weight 0 scores exactly like no prior; inject runs every k."""
    from geoindex.geometry.tiles import tile_center
    from geoindex.retrieval.beam import PriorOptions
    from geoindex.training.dataset import PhotoTable
    from geoindex.training.evaluate import evaluate

    paths, lat, lon = [], [], []
    for i, img in enumerate(random_queries(6, zoom=3, seed=11)):
        p = tmp_path / f"q{i}.png"
        Image.fromarray(img).save(p)
        paths.append(str(p))
        c = tile_center(mercantile.Tile(i, i, 3))
        lat.append(c[0])
        lon.append(c[1])
    photos = PhotoTable(tuple(paths), np.array(lat), np.array(lon))
    index = geoindex.open_index(small_index)
    plain = evaluate(index, photos, (2, 4))
    zero = evaluate(index, photos, (2, 4), prior=pooled_prior, prior_options=PriorOptions("rerank", 0.0))
    for a, b in zip(plain.results, zero.results):
        assert (a.accuracy, a.median_km, a.tile_top1, a.beam_recall) == (b.accuracy, b.median_km, b.tile_top1,
                                                                          b.beam_recall)
    injected = evaluate(index, photos, (2, 4), prior=pooled_prior, prior_options=PriorOptions("inject"))
    assert [r.n for r in injected.results] == [6, 6]


def test_evaluate_pipeline_prior_offline_fails_clearly(small_index, tmp_path, capsys):
    from pipelines import evaluate as evaluate_pipeline

    csv = tmp_path / "p.csv"
    csv.write_text("path,lat,lon\nq.png,0,0\n")
    code = evaluate_pipeline.main(["--photos", str(csv), "--index", str(small_index), "--prior", "geoclip",
                                   "--out", str(tmp_path / "r"), "--quiet"])
    assert code == 2
    err = capsys.readouterr().err
    assert ".[geoclip]" in err or "--geoclip-backbone" in err
