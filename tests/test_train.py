"""The training recipe on tiny encoders and generated photo/tile pairs: loss, overfitting, negatives, resume."""

from __future__ import annotations

import mercantile
import numpy as np
import pytest
import torch
from PIL import Image

from geoindex.errors import ConfigError
from geoindex.geometry.tiles import tile_center
from geoindex.models.encoders import load_map_encoder, mark_trainable
from geoindex.training.dataset import tile_codes
from geoindex.training.train import (
    TrainConfig,
    batch_targets,
    contrastive_loss,
    init_map_encoder,
    tile_accuracy,
    train_levels,
    train_step,
)
from tests.conftest import render_tile, write_tiles

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _photo(tile: mercantile.Tile) -> np.ndarray:
    """A 'photo' of a tile that looks nothing like it: another pattern, so the mapping must be learnt."""
    return np.asarray(render_tile(mercantile.Tile(tile.x + 7, tile.y + 3, 9)))


def _pairs(tiny_encoder, tiles):
    photos = tiny_encoder.encode([_photo(t) for t in tiles])
    pixels = torch.stack([tiny_encoder.preprocess(render_tile(t)) for t in tiles])
    return torch.from_numpy(photos), pixels


def _batch_loss(encoder, photo, pixels, target):
    with torch.no_grad():
        return float(contrastive_loss(photo, encoder.visual(pixels), target))


@pytest.fixture(scope="module")
def tiles8():
    return [mercantile.Tile(x, y, 2) for x, y in [(0, 0), (1, 0), (2, 1), (3, 1), (0, 2), (1, 3), (2, 2), (3, 3)]]


def test_one_step_lowers_the_loss(tiny_encoder, tiles8):
    photo, pixels = _pairs(tiny_encoder, tiles8)
    target = torch.arange(len(tiles8))
    enc = init_map_encoder(tiny_encoder, None)
    opt = torch.optim.Adam([p for p in enc.visual.parameters() if p.requires_grad], lr=1e-4)
    before = _batch_loss(enc, photo, pixels, target)
    reported = train_step(enc, opt, photo, pixels, target)
    assert reported == pytest.approx(before, rel=1e-5)
    assert _batch_loss(enc, photo, pixels, target) < before


def test_recipe_overfits_one_fixed_batch(tiny_encoder, tiles8):
    photo, pixels = _pairs(tiny_encoder, tiles8)
    target = torch.arange(len(tiles8))
    enc = init_map_encoder(tiny_encoder, None)
    opt = torch.optim.Adam([p for p in enc.visual.parameters() if p.requires_grad], lr=1e-3)
    losses = [train_step(enc, opt, photo, pixels, target) for _ in range(60)]
    final = _batch_loss(enc, photo, pixels, target)
    assert final < 0.1 * losses[0]
    with torch.no_grad():
        scores = photo @ torch.nn.functional.normalize(enc.visual(pixels), dim=-1).T
    assert scores.argmax(dim=1).tolist() == list(range(len(tiles8)))


def test_a_shared_tile_is_not_a_negative():
    unique, target = batch_targets([7, 3, 7, 9])
    assert unique.tolist() == [3, 7, 9] and target.tolist() == [1, 0, 1, 2]
    torch.manual_seed(0)
    photo = torch.nn.functional.normalize(torch.randn(4, 8), dim=-1)
    tiles = torch.nn.functional.normalize(torch.randn(3, 8), dim=-1)
    loss = contrastive_loss(photo, tiles, torch.from_numpy(target), logit_scale=10.0)
    # Hand computation: each photo's softmax runs over the three distinct tiles only.
    logits = 10.0 * photo @ tiles.T
    expected = -np.mean([float(torch.log_softmax(logits[i], 0)[t]) for i, t in enumerate(target)])
    assert float(loss) == pytest.approx(expected, rel=1e-6)
    # Had tile 7 appeared twice as a column, it would have been a negative for its own photos.
    dup = torch.cat([tiles, tiles[1:2]])
    naive = torch.nn.functional.cross_entropy(10.0 * photo @ dup.T, torch.tensor([1, 0, 3, 2]))
    assert float(naive) > float(loss) + 1e-4
    # Two photos of one tile: each is scored exactly as it would be alone.
    def alone(i: int, t: int) -> float:
        return float(contrastive_loss(photo[i : i + 1], tiles, torch.tensor([t]), logit_scale=10.0))

    pair = contrastive_loss(photo[[0, 0, 1]], tiles, torch.tensor([1, 1, 0]), logit_scale=10.0)
    assert float(pair) == pytest.approx((2 * alone(0, 1) + alone(1, 0)) / 3, rel=1e-5)


def test_batch_loader_dedupes_tiles(tiny_encoder, rendered_source):
    from geoindex.training.train_batches import TileBatches

    codes = np.array([5, 5, 6, 9], dtype=np.int64)
    ds = TileBatches([np.arange(4)], codes, rendered_source, tiny_encoder.preprocess, zoom=2)
    batch = ds[0]
    assert batch.pixels.shape[0] == 3 and batch.target.tolist() == [0, 0, 1, 2] and batch.missing == 0
    assert batch.codes.tolist() == [5, 6, 9] and batch.loaded.all()


def test_batch_loader_adds_level_negatives_and_skips_cached_tiles(tiny_encoder, rendered_source):
    from geoindex.training.train_batches import TileBatches

    codes = np.array([5, 5, 6], dtype=np.int64)
    pool = np.arange(16, dtype=np.int64)  # every zoom-2 tile
    ds = TileBatches([np.arange(3)], codes, rendered_source, tiny_encoder.preprocess, zoom=2, negatives=5,
                  pool=pool, seed=[0, 2, 0], cached={5})
    batch = ds[0]
    assert batch.codes[:2].tolist() == [5, 6] and len(batch.codes) == 7
    negatives = batch.codes[2:]
    assert len(set(negatives.tolist())) == 5 and not {5, 6} & set(negatives.tolist())
    assert batch.loaded.tolist() == [False] + [True] * 6 and batch.pixels.shape[0] == 6
    assert batch.target.tolist() == [0, 0, 1]
    again = TileBatches([np.arange(3)], codes, rendered_source, tiny_encoder.preprocess, zoom=2, negatives=5,
                     pool=pool, seed=[0, 2, 0])[0]
    assert again.codes.tolist() == batch.codes.tolist()  # seeded per step: a resumed run draws the same


def test_trunk_cache_gives_the_features_of_the_whole_network(tiny_encoder, rendered_source):
    """Head over cached trunk outputs == the full network on the tiles, in any mix of cached and fresh."""
    from geoindex.training.train_batches import TileBatches, TrunkCache

    enc = init_map_encoder(tiny_encoder, None)
    trunk, head = enc.split()
    cache = TrunkCache(enc, budget_bytes=1e9)
    codes = np.array([1, 2, 3, 7], dtype=np.int64)
    for cached in (set(), {2, 7}):
        batch = TileBatches([np.arange(4)], codes, rendered_source, enc.preprocess, zoom=2, cached=cached)[0]
        with torch.no_grad():
            got = head(cache.features(batch, amp=False))
            want = enc.visual(torch.stack([enc.preprocess(render_tile(mercantile.Tile(c % 4, c // 4, 2)))
                                           for c in codes.tolist()]))
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert cache.codes == {1, 2, 3, 7}
    small = TrunkCache(enc, budget_bytes=1)  # nothing fits: features still come back, none kept
    batch = TileBatches([np.arange(4)], codes, rendered_source, enc.preprocess, zoom=2)[0]
    assert small.features(batch, amp=False).shape[0] == 4 and not small.codes


# ----------------------------------------------------------------------------- whole levels


def _dataset(tiny_encoder, zoom=3, per_tile=2):
    """Photos at random points of 16 zoom-3 tiles, each a pattern unlike its tile."""
    rng = np.random.default_rng(0)
    tiles = [mercantile.Tile(x, y, zoom) for x in range(2, 6) for y in range(2, 6)]
    lat, lon, images = [], [], []
    for t in tiles:
        b = mercantile.bounds(t)
        for _ in range(per_tile):
            lat.append(rng.uniform(b.south + 0.1, b.north - 0.1))
            lon.append(rng.uniform(b.west + 0.1, b.east - 0.1))
            images.append(_photo(t))
    return tiny_encoder.encode(images), np.array(lat), np.array(lon)


def _train(tmp_path, tiny_encoder, rendered_source, data, *, zooms=(3,), cfg=None, **kw):
    emb, lat, lon = data
    n = len(lat)
    return train_levels(
        tiny_encoder, zooms, photo_emb=emb, lat=lat, lon=lon, train_rows=np.arange(n),
        val_rows=np.arange(0, n, 2), source=rendered_source, out_dir=tmp_path,
        cfg=cfg or TrainConfig(epochs=2, batch_size=8, lr=1e-3, checkpoint_every=1), run_key="t", **kw,
    )


@pytest.fixture(scope="module")
def data(tiny_encoder):
    return _dataset(tiny_encoder)


def test_level_negatives_push_away_tiles_no_batch_holds(tmp_path, tiny_encoder, rendered_source, data):
    """Negatives from the whole level train against the 48 zoom-3 tiles no photo is in: the true tile
    outranks them more often than after in-batch training alone."""
    emb, lat, lon = data
    pool = np.arange(64, dtype=np.int64)  # every zoom-3 tile; the photos lie in 16 of them

    def top1_among_all(result):
        enc = load_map_encoder(tiny_encoder, result.checkpoint)
        tiles = enc.encode([render_tile(mercantile.Tile(c % 8, c // 8, 3)) for c in pool.tolist()])
        truth = (np.array([mercantile.tile(o, a, 3).y for a, o in zip(lat, lon)]) << 3) + np.array(
            [mercantile.tile(o, a, 3).x for a, o in zip(lat, lon)])
        return float(np.mean((emb @ tiles.T).argmax(axis=1) == truth))

    base = dict(epochs=4, batch_size=8, lr=1e-3)
    in_batch = _train(tmp_path / "in-batch", tiny_encoder, rendered_source, data, cfg=TrainConfig(**base))[0]
    level = _train(tmp_path / "level", tiny_encoder, rendered_source, data, negative_pools={3: pool},
                   cfg=TrainConfig(**base, negatives=32, cache_trunk_gb=0.1))[0]
    assert top1_among_all(level) > top1_among_all(in_batch)
    with pytest.raises(ConfigError, match="negative_pool"):
        _train(tmp_path / "nopool", tiny_encoder, rendered_source, data, cfg=TrainConfig(**base, negatives=8))


def test_only_intended_parameters_change(tmp_path, tiny_encoder, rendered_source, data):
    fingerprint = tiny_encoder.base_fingerprint
    base_state = {k: v.clone() for k, v in tiny_encoder.visual.state_dict().items()}
    (result,) = _train(tmp_path, tiny_encoder, rendered_source, data)
    trained = load_map_encoder(tiny_encoder, result.checkpoint)
    intended = set(mark_trainable(init_map_encoder(tiny_encoder, None)))
    changed = {k for k, v in trained.visual.state_dict().items() if not torch.equal(v, base_state[k])}
    assert changed and changed <= intended
    assert any(k.startswith("transformer.resblocks.") for k in changed) and "proj" in changed
    # The photo encoder is frozen: untouched by training.
    from geoindex.models.encoders import state_fingerprint

    assert state_fingerprint(tiny_encoder.visual) == fingerprint
    assert all(torch.equal(v, base_state[k]) for k, v in tiny_encoder.visual.state_dict().items())
    hist = result.history
    assert [h.epoch for h in hist] == [0, 1, 2] and hist[0].loss is None and hist[1].loss is not None
    assert all(0.0 <= h.val_top1 <= h.val_top5 <= 1.0 for h in hist)


def test_levels_train_finest_first_each_from_the_previous(tmp_path, tiny_encoder, rendered_source, data):
    results = _train(tmp_path, tiny_encoder, rendered_source, data, zooms=(2, 3),
                     cfg=TrainConfig(epochs=1, batch_size=8, lr=1e-3))
    assert [r.zoom for r in results] == [3, 2]
    assert results[0].init_from == "base:tiny" and results[1].init_from.startswith("z03.pt:")
    assert (tmp_path / "z03.pt").is_file() and (tmp_path / "z02.pt").is_file()
    assert (tmp_path / "train.json").is_file()
    # z02 started from z03: had it started from the base with the same steps it would differ.
    fresh = tmp_path / "fresh"
    (other,) = _train(fresh, tiny_encoder, rendered_source, data, zooms=(2,),
                      cfg=TrainConfig(epochs=1, batch_size=8, lr=1e-3))
    a = load_map_encoder(tiny_encoder, results[1].checkpoint).visual.state_dict()
    b = load_map_encoder(tiny_encoder, other.checkpoint).visual.state_dict()
    assert not torch.equal(a["proj"], b["proj"])
    # A finished run is skipped when started again.
    again = _train(tmp_path, tiny_encoder, rendered_source, data, zooms=(2, 3),
                   cfg=TrainConfig(epochs=1, batch_size=8, lr=1e-3))
    assert all(r.skipped for r in again)


class _Stop(Exception):
    pass


def test_resumed_run_continues_from_its_checkpoint(tmp_path, tiny_encoder, rendered_source, data, caplog):
    whole = _train(tmp_path / "whole", tiny_encoder, rendered_source, data)[0]
    steps = []

    def interrupt(loss: float) -> None:
        steps.append(loss)
        if len(steps) == 5:  # mid second epoch (4 batches per epoch); state saved after step 4
            raise _Stop

    with pytest.raises(_Stop):
        _train(tmp_path / "cut", tiny_encoder, rendered_source, data, on_step=interrupt)
    assert not (tmp_path / "cut" / "z03.pt").exists()
    resumed_steps = []
    caplog.set_level("INFO", logger="geoindex")
    (resumed,) = _train(tmp_path / "cut", tiny_encoder, rendered_source, data, on_step=resumed_steps.append)
    assert "resuming at epoch 2, step 0" in caplog.text
    assert len(resumed_steps) == 4  # only the second epoch's 4 steps, not all 8
    assert resumed_steps[0] == pytest.approx(steps[4], rel=1e-5)
    a = load_map_encoder(tiny_encoder, whole.checkpoint).visual.state_dict()
    b = load_map_encoder(tiny_encoder, resumed.checkpoint).visual.state_dict()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
    assert [h.epoch for h in resumed.history] == [0, 1, 2]


def test_state_of_another_run_is_refused(tmp_path, tiny_encoder, rendered_source, data):
    with pytest.raises(_Stop):
        _train(tmp_path, tiny_encoder, rendered_source, data, on_step=lambda loss: (_ for _ in ()).throw(_Stop))
    with pytest.raises(ConfigError, match="another --out"):
        _train(tmp_path, tiny_encoder, rendered_source, data, cfg=TrainConfig(epochs=2, batch_size=4, lr=1e-3))


def test_tile_accuracy_counts_ties_and_missing_tiles(tiny_encoder, rendered_source):
    tiles = [mercantile.Tile(x, 1, 2) for x in range(4)]
    emb = tiny_encoder.encode([render_tile(t) for t in tiles])
    lat, lon = zip(*(tile_center(t) for t in tiles))
    codes = tile_codes(lat, lon, zoom=2)
    top1, top5, n, m = tile_accuracy(tiny_encoder, emb, codes, source=rendered_source, zoom=2)
    assert (top1, top5, n, m) == (1.0, 1.0, 4, 4)


def test_config_is_validated():
    with pytest.raises(ConfigError, match="batch_size >= 2"):
        TrainConfig(batch_size=1)
    assert TrainConfig() == TrainConfig(epochs=5, batch_size=64, lr=1e-4)


def test_train_pipeline_end_to_end(tmp_path, tiny_encoder, caplog):
    from geoindex.training.dataset import PhotoTable, read_photo_csv, write_photo_csv
    from pipelines import train as train_pipeline

    tiles_dir = write_tiles(tmp_path / "tiles", (1, 2))
    rng = np.random.default_rng(1)
    paths, lat, lon = [], [], []
    for i in range(36):
        t = mercantile.Tile(int(rng.integers(4)), int(rng.integers(4)), 2)
        b = mercantile.bounds(t)
        p = tmp_path / "photos" / f"{i}.png"
        p.parent.mkdir(exist_ok=True)
        Image.fromarray(_photo(t)).save(p)
        paths.append(str(p))
        lat.append((b.south + b.north) / 2)
        lon.append((b.west + b.east) / 2)
    write_photo_csv(tmp_path / "photos.csv", PhotoTable(tuple(paths), np.array(lat), np.array(lon)),
                    relative_to=tmp_path)
    out = tmp_path / "run"
    argv = ["--photos", str(tmp_path / "photos.csv"), "--source", str(tiles_dir), "--out", str(out),
            "--zooms", "1", "2", "--encoder", "tiny", "--epochs", "1", "--batch-size", "8", "--workers", "0",
            "--quiet"]
    assert train_pipeline.main(argv) == 0
    assert (out / "z02.pt").is_file() and (out / "z01.pt").is_file()
    splits = {s: read_photo_csv(out / "splits" / f"{s}.csv") for s in ("train", "val", "test")}
    assert [len(splits[s]) for s in ("train", "val", "test")] == [30, 3, 3]
    assert sorted(sum((list(t.paths) for t in splits.values()), [])) == sorted(paths)
    caplog.set_level("INFO", logger="geoindex")
    assert train_pipeline.main(argv[:-1]) == 0  # a rerun resumes: nothing left to train
    assert "z02 already trained" in caplog.text


def test_the_projection_head_trains_only_the_output_layers(tmp_path, tiny_encoder, rendered_source, data):
    base_state = {k: v.clone() for k, v in tiny_encoder.visual.state_dict().items()}
    cfg = TrainConfig(epochs=2, batch_size=8, lr=1e-3, head="projection", cache_trunk_gb=0.1)
    (result,) = _train(tmp_path, tiny_encoder, rendered_source, data, cfg=cfg)
    payload = torch.load(result.checkpoint, weights_only=True)
    assert payload["head"] == "projection" and set(payload["state_dict"]) == {
        "ln_post.weight", "ln_post.bias", "proj"}
    trained = load_map_encoder(tiny_encoder, result.checkpoint)
    assert trained.head == "projection"
    changed = {k for k, v in trained.visual.state_dict().items() if not torch.equal(v, base_state[k])}
    assert "proj" in changed and changed <= {"ln_post.weight", "ln_post.bias", "proj"}
    # The split is where the head starts: its trunk output is what the whole network pools and projects.
    trunk, head = trained.split()
    pixels = torch.stack([trained.preprocess(render_tile(mercantile.Tile(1, 2, 3)))])
    with torch.no_grad():
        torch.testing.assert_close(head(trunk(pixels)), trained.visual(pixels), rtol=1e-5, atol=1e-6)
    with pytest.raises(ConfigError, match="same --head"):  # a coarser level must continue the same head
        init_map_encoder(tiny_encoder, result.checkpoint, head="stages")


def test_l2sp_keeps_the_weights_closer_to_their_start(tiny_encoder, tiles8):
    photo, pixels = _pairs(tiny_encoder, tiles8)
    target = torch.arange(len(tiles8))

    def drift(l2sp: float) -> float:
        enc = init_map_encoder(tiny_encoder, None, head="projection")
        params = [p for p in enc.visual.parameters() if p.requires_grad]
        start = [p.detach().clone() for p in params]
        opt = torch.optim.SGD(params, lr=0.05)
        for _ in range(20):
            train_step(enc, opt, photo, pixels, target, l2sp=l2sp, anchor=start)
        return float(sum(((p - s) ** 2).sum() for p, s in zip(params, start)))

    assert drift(5.0) < 0.5 * drift(0.0)


def test_an_unknown_head_is_refused():
    with pytest.raises(ConfigError, match="--head"):
        TrainConfig(head="everything")


def test_a_level_with_one_tile_is_refused_before_any_level_trains(tmp_path, tiny_encoder, rendered_source):
    emb = tiny_encoder.encode([_photo(mercantile.Tile(2, 2, 3))] * 4)
    lat, lon = np.array([10.0, 11.0, 40.0, 41.0]), np.array([10.0, 11.0, 100.0, 101.0])  # 2 z3 tiles, 1 z0 tile
    with pytest.raises(ConfigError, match=r"z0: .*at least 2 distinct tiles.*\(all in tile \(0, 0, 0\)\)"):
        train_levels(tiny_encoder, (0, 3), photo_emb=emb, lat=lat, lon=lon, train_rows=np.arange(4), val_rows=None,
                     source=rendered_source, out_dir=tmp_path, cfg=TrainConfig(epochs=1, batch_size=4))
    assert not list(tmp_path.glob("z*.pt"))  # z3 (trained first) was not trained either
