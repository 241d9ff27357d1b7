"""The paper's recipe for the per-zoom map encoders: contrastive, in-batch negatives, finest to coarsest.

For every photo and zoom level the target is the tile that contains the photo. A batch holds
photos; its tiles are the distinct tiles of those photos, each encoded once by the level's map
encoder. Each photo's (frozen, cached) embedding is scored against every tile of the batch by
cosine similarity times a fixed logit scale, and cross-entropy takes the photo's own tile as the
class. Because tiles are deduplicated, a tile shared by two photos of a batch is the positive of
both and a negative of neither. Only the map encoder's head trains (``ImageEncoder.split``):
``stages``, the paper's choice (the ViT's last two blocks, ``ln_post`` and ``proj``; EfficientNet's
last two stages and head conv), or ``projection`` (only ``ln_post`` and ``proj``; the head conv and
its BatchNorm). Trained on views of a few tiles, ``stages`` memorises them and makes every other
place worse; ``projection`` trained on views of every tile of a level also improves tiles it never
saw (benchmarks/RESULTS.md, "training experiment"). ``l2sp`` pulls the weights towards their start.

In-batch negatives alone leave every tile no photo of the batch lies in untrained, and at search
time those tiles are the distractors. ``negatives=N`` adds N tiles per step drawn at random from
the whole level (``negative_pool``). The frozen trunk's output of each tile never changes, so with
``cache_trunk_gb`` it is computed once per tile and kept: a step then runs only the head.

Levels train from the finest zoom to the coarsest: the finest starts from the base encoder,
each coarser one from the checkpoint of the level before. A level's state (weights, optimizer,
epoch and step) is saved atomically every few steps and at each epoch's end, so a killed run
resumes where it stopped; the finished level is ``<out>/zNN.pt`` (``save_map_checkpoint``),
which ``build_index --map-checkpoints <out>`` reads.
"""

from __future__ import annotations

import copy
import dataclasses
import io
import json
import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypedDict

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F

from geoindex.errors import ConfigError
from geoindex.files import atomic_write_bytes, file_sha256
from geoindex.geometry.tiles import tile_of_code
from geoindex.models.encoders import (
    HEADS,
    ImageEncoder,
    load_map_encoder,
    mark_trainable,
    save_map_checkpoint,
)
from geoindex.models.tile_encoding import embed_tiles
from geoindex.sources import TileSource
from geoindex.training.dataset import tile_codes
from geoindex.training.train_batches import TileBatches, TrunkCache, batch_targets

if TYPE_CHECKING:
    from typing_extensions import Unpack

__all__ = [
    "EpochRecord",
    "LevelData",
    "LevelResult",
    "TrainConfig",
    "batch_targets",
    "contrastive_loss",
    "init_map_encoder",
    "tile_accuracy",
    "train_level",
    "train_step",
    "train_levels",
]

log = logging.getLogger(__name__)

STATE_FORMAT = "geoindex-train-state/1"


@dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters of the recipe; the defaults are the paper's.

    Attributes:
        epochs: passes over the training photos per level (paper: 5).
        batch_size: photos per batch (paper: 64).
        lr: Adam learning rate (paper: 1e-4).
        logit_scale: multiplies cosine similarities before the softmax (CLIP's trained value, 100).
        seed: seeds the photo order of every (level, epoch); a resumed run replays it exactly.
        device: torch device. amp: float16 autocast + gradient scaling, used only on CUDA.
        workers: DataLoader worker processes that read and preprocess tiles (0: in-process).
        checkpoint_every: steps between saved states (and at every epoch's end).
        max_val_photos: validation photos scored per epoch (a seeded subset); None for all.
        val_batch_size: tiles per forward pass during validation.
        negatives: tiles per step drawn at random from the whole level (``negative_pool``) as extra
            negatives, beside the batch's own tiles; 0 is the paper's in-batch recipe.
        cache_trunk_gb: memory for frozen-trunk outputs of tiles, kept across steps (0: no cache).
        head: what the map encoder fine-tunes (``encoders.HEADS``): ``stages`` (the paper's last two
            blocks) or ``projection`` (the output layers only, which carries over to unseen tiles).
        l2sp: weight of the L2-SP penalty ``sum((w - w0)**2)`` that keeps the trained weights near
            the level's starting weights ``w0``; 0 turns it off.
    """

    epochs: int = 5
    batch_size: int = 64
    lr: float = 1e-4
    logit_scale: float = 100.0
    seed: int = 0
    device: str = "cpu"
    amp: bool = True
    workers: int = 0
    checkpoint_every: int = 200
    max_val_photos: int | None = 10_000
    val_batch_size: int = 256
    negatives: int = 0
    cache_trunk_gb: float = 0.0
    head: str = "stages"
    l2sp: float = 0.0

    def __post_init__(self) -> None:
        finite = 0 < self.lr < float("inf") and 0 < self.logit_scale < float("inf")  # refuses nan too
        if self.epochs < 0 or self.batch_size < 2 or not finite:
            raise ConfigError(
                f"need epochs >= 0, batch_size >= 2 (in-batch negatives), finite lr > 0 and logit_scale > 0 "
                "(--epochs, --batch-size, --lr, --logit-scale); "
                f"got epochs={self.epochs} batch_size={self.batch_size} lr={self.lr} "
                f"logit_scale={self.logit_scale}"
            )
        if self.checkpoint_every < 1 or self.workers < 0 or self.val_batch_size < 1:
            raise ConfigError("checkpoint_every and val_batch_size must be >= 1 and workers >= 0")
        if self.max_val_photos is not None and self.max_val_photos < 1:
            raise ConfigError(f"max_val_photos must be >= 1 or None, got {self.max_val_photos}")
        if self.negatives < 0 or self.cache_trunk_gb < 0 or not self.l2sp >= 0:
            raise ConfigError(f"negatives, cache_trunk_gb and l2sp must be >= 0, got {self.negatives}, "
                              f"{self.cache_trunk_gb} and {self.l2sp}")
        if self.head not in HEADS:
            raise ConfigError(f"unknown map-encoder head {self.head!r}; choose one of {', '.join(HEADS)} (--head)")

    def identity(self) -> dict[str, Any]:
        """What decides the trained weights; a resumed state must match it."""
        return {"batch_size": self.batch_size, "lr": self.lr, "logit_scale": self.logit_scale,
                "seed": self.seed, "negatives": self.negatives, "head": self.head, "l2sp": self.l2sp}


@dataclass(frozen=True)
class EpochRecord:
    """One epoch of a level: mean loss, validation tile accuracy, seconds (epoch 0: before training)."""

    zoom: int
    epoch: int
    loss: float | None
    val_top1: float | None
    val_top5: float | None
    val_photos: int
    val_tiles: int
    seconds: float


@dataclass(frozen=True)
class LevelResult:
    """A trained level: its checkpoint, where it started from, and its per-epoch history."""

    zoom: int
    checkpoint: Path
    init_from: str
    history: tuple[EpochRecord, ...] = field(default_factory=tuple)
    skipped: bool = False
    dropped_photos: int = 0


class LevelData(TypedDict):
    """What every level trains on: keyword arguments of :func:`train_level` and :func:`train_levels`.

    Attributes:
        photo_emb: (n, d) float32 photo embeddings from the base encoder (see ``dataset.photo_embeddings``).
        lat, lon: (n,) true coordinates of the photos, degrees.
        train_rows, val_rows: rows of ``photo_emb`` to train and to validate on (``val_rows`` None: none).
        source: tile images.
    """

    photo_emb: npt.NDArray[np.float32]
    lat: npt.ArrayLike
    lon: npt.ArrayLike
    train_rows: npt.ArrayLike
    val_rows: npt.ArrayLike | None
    source: TileSource


# ------------------------------------------------------------------------------------- the loss


def contrastive_loss(
    photo: torch.Tensor, tiles: torch.Tensor, target: torch.Tensor, *, logit_scale: float = 100.0
) -> torch.Tensor:
    """Cross-entropy of each photo over the batch's distinct tiles, its own tile being the class.

    Args:
        photo: photo embeddings (B, d), L2-normalised.
        tiles: map-encoder outputs of the distinct tiles (U, d); normalised here.
        target: (B,) int64, the row of ``tiles`` that contains each photo. Photos sharing a
            tile share a row, so that tile is never a negative for them.
        logit_scale: similarity scale before the softmax.

    Returns:
        The mean loss, a scalar tensor.
    """
    tiles = F.normalize(tiles.float(), dim=-1)
    logits = logit_scale * photo.float() @ tiles.T
    return F.cross_entropy(logits, target)


# --------------------------------------------------------------------------------------- data


def _epoch_batches(n: int, codes: npt.NDArray[np.int64], cfg: TrainConfig, zoom: int, epoch: int
                   ) -> list[npt.NDArray[np.int64]]:
    """The seeded photo order of one epoch cut into batches; batches with one distinct tile are dropped
    (they have no negative, so their loss is 0 and Adam's momentum would still move the weights)."""
    order = np.random.default_rng([cfg.seed, zoom, epoch]).permutation(n)
    batches = [order[s : s + cfg.batch_size] for s in range(0, n, cfg.batch_size)]
    return [b for b in batches if len(np.unique(codes[b])) >= 2]


# --------------------------------------------------------------------------------- validation


def tile_accuracy(
    encoder: ImageEncoder, photo_emb: npt.NDArray[np.float32], codes: npt.NDArray[np.int64], *,
    source: TileSource, zoom: int, batch_size: int = 256,
) -> tuple[float, float, int, int]:
    """Top-1 and top-5 tile accuracy of photos among the distinct tiles of the same photos.

    Photos whose tile the source lacks are left out.

    Args:
        encoder: the level's map encoder. photo_emb: (n, d) photo embeddings.
        codes: (n,) true tile code of each photo at ``zoom``.

    Returns:
        (top-1, top-5, photos scored, candidate tiles).
    """
    unique, target = batch_targets(codes)
    was_training = encoder.visual.training
    encoder.visual.eval()
    with torch.inference_mode():
        found, emb = embed_tiles(source, encoder, unique, zoom=zoom, batch_size=batch_size)
    tiles = emb[found]
    encoder.visual.train(was_training)
    keep = found[target]
    if not keep.any():
        return float("nan"), float("nan"), 0, int(found.sum())
    target = (np.cumsum(found) - 1)[target[keep]]
    scores = photo_emb[keep] @ tiles.T
    own = scores[np.arange(len(target)), target]
    rank = (scores > own[:, None]).sum(axis=1)  # ties count in the photo's favour
    return float(np.mean(rank < 1)), float(np.mean(rank < 5)), int(keep.sum()), int(found.sum())


# ------------------------------------------------------------------------------------ training


def init_map_encoder(base: ImageEncoder, previous: str | os.PathLike | None, *, head: str = "stages"
                     ) -> ImageEncoder:
    """A trainable map encoder: a copy of ``base``, or of the previous (finer) level's checkpoint.

    Raises:
        ConfigError: ``previous`` fine-tuned another head than ``head``.
    """
    if previous is None:
        enc = ImageEncoder(base.spec, copy.deepcopy(base.visual), base.preprocess, base.base_fingerprint,
                           precision=base.precision, head=head)
    else:
        enc = load_map_encoder(base, previous)
        if enc.head != head:
            raise ConfigError(f"{previous} fine-tuned the {enc.head!r} head, this level trains {head!r}: "
                              "train every level with the same --head")
    enc.to(base.device)
    mark_trainable(enc)
    return enc


def train_step(
    encoder: ImageEncoder,
    optimizer: torch.optim.Optimizer,
    photo: torch.Tensor,
    pixels: torch.Tensor,
    target: torch.Tensor,
    *,
    logit_scale: float = 100.0,
    scaler: torch.amp.GradScaler | None = None,
    from_trunk: bool = False,
    l2sp: float = 0.0,
    anchor: Sequence[torch.Tensor] = (),
) -> float:
    """One optimizer step of the recipe on one batch; returns the batch's contrastive loss before the step.

    Args:
        encoder: the trainable map encoder. optimizer: over its trainable parameters.
        photo: (B, d) float32 photo embeddings. pixels: (U, 3, S, S) the batch's tiles, preprocessed,
            or with ``from_trunk`` their frozen-trunk outputs. target: (B,) int64, each photo's row
            in ``pixels``; rows no photo points at are extra negatives.
        scaler: a CUDA GradScaler for mixed precision; autocast is on when it is enabled.
        l2sp, anchor: adds ``l2sp * sum((w - w0)**2)`` over the trainable parameters ``w`` (in the
            order of ``encoder.visual.parameters()``) and their starting values ``anchor``.
    """
    device = encoder.device
    amp = scaler is not None and scaler.is_enabled()
    with torch.autocast(device_type=device.type, dtype=torch.float16, enabled=amp):
        network = encoder.split()[1] if from_trunk else encoder.visual
        tiles = network(encoder.to_device(pixels))
    loss = contrastive_loss(photo.to(device), tiles, target.to(device), logit_scale=logit_scale)
    reported = loss
    if l2sp:
        trainable = [p for p in encoder.visual.parameters() if p.requires_grad]
        loss = loss + l2sp * sum(((w - w0) ** 2).sum() for w, w0 in zip(trainable, anchor, strict=True))
    optimizer.zero_grad(set_to_none=True)
    if scaler is not None and amp:
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    else:
        loss.backward()
        optimizer.step()
    return float(reported.detach())


def _state_path(out_dir: Path, zoom: int) -> Path:
    return out_dir / f"z{zoom:02d}.state.pt"


def checkpoint_path(out_dir: str | os.PathLike, zoom: int) -> Path:
    """Where level ``zoom``'s finished map encoder goes: ``<out>/zNN.pt`` (build_index reads it)."""
    return Path(out_dir) / f"z{zoom:02d}.pt"


def _save_state(path: Path, payload: dict[str, Any]) -> None:
    buf = io.BytesIO()
    torch.save(payload, buf)
    atomic_write_bytes(path, buf.getvalue())


def _trainable_state(encoder: ImageEncoder) -> dict[str, torch.Tensor]:
    names = {n for n, p in encoder.visual.named_parameters() if p.requires_grad}
    return {k: v.detach().cpu().clone() for k, v in encoder.visual.state_dict().items() if k in names}


def train_level(
    base: ImageEncoder,
    zoom: int,
    *,
    out_dir: str | os.PathLike,
    cfg: TrainConfig = TrainConfig(),
    init_from: str | os.PathLike | None = None,
    run_key: str = "",
    on_epoch: Callable[[int, int, int, int], None] | None = None,
    on_step: Callable[[float], None] | None = None,
    negative_pool: npt.ArrayLike | None = None,
    **data: Unpack[LevelData],
) -> LevelResult:
    """Train the map encoder of one zoom level; resume from ``<out>/zNN.state.pt`` if present.

    Args:
        base: the frozen photo encoder; its weights are never changed.
        data: the photos, their split and the tile images (``photo_emb``, ``lat``, ``lon``,
            ``train_rows``, ``val_rows``, ``source``; see :class:`LevelData`).
        out_dir: where the state and the finished checkpoint ``zNN.pt`` are written.
        init_from: the finer level's checkpoint to start from; None starts from ``base``.
        run_key: identifies the photos and split; a state from another run is refused.
        on_epoch: called as (zoom, epoch, steps in epoch, steps already done) when an epoch starts.
        on_step: called with the loss after every optimizer step.
        negative_pool: (m,) tile codes ``y * 2**zoom + x`` of the level that ``cfg.negatives`` are
            drawn from (e.g. every tile of the index's coverage); needed when ``cfg.negatives > 0``.

    Raises:
        ConfigError: ``out_dir`` holds a state of another run, no photo has a tile, or negatives
            are asked for without a pool.
    """
    out = Path(out_dir)
    final = checkpoint_path(out, zoom)
    state_file = _state_path(out, zoom)
    init_name = (f"base:{base.spec.name}" if init_from is None
                 else f"{Path(init_from).name}:{file_sha256(init_from)[:16]}")
    identity = {"zoom": zoom, "config": cfg.identity(), "run": run_key, "init": init_name,
                "base_fingerprint": base.base_fingerprint}
    state = _read_state(state_file, identity)
    if state is not None and state.get("done") and final.is_file():
        finished = tuple(EpochRecord(**r) for r in state["history"])
        log.info("z%02d already trained (%s); skipping", zoom, final)
        return LevelResult(zoom, final, init_name, finished, skipped=True, dropped_photos=int(state.get("dropped", 0)))

    rows = _LevelRows.of(zoom, cfg, data, negative_pool)
    run = _Run.start(base, init_from, cfg, state)
    if state is not None:
        log.info("z%02d: resuming at epoch %d, step %d from %s", zoom, run.epoch + 1, run.step, state_file)

    def validate(epoch: int, loss: float | None, seconds: float) -> None:
        top1 = top5 = None
        n_photos = n_tiles = 0
        if len(rows.val):
            top1, top5, n_photos, n_tiles = tile_accuracy(
                run.encoder, data["photo_emb"][rows.val], rows.codes[rows.val], source=data["source"], zoom=zoom,
                batch_size=cfg.val_batch_size)
        run.history.append(EpochRecord(zoom, epoch, loss, top1, top5, n_photos, n_tiles, seconds))
        log.info("z%02d epoch %d/%d: loss %s, val tile top-1 %s top-5 %s (%d photos, %d tiles), %.1f s",
                 zoom, epoch, cfg.epochs, f"{loss:.4f}" if loss is not None else "-",
                 f"{top1:.3f}" if top1 is not None else "-", f"{top5:.3f}" if top5 is not None else "-",
                 n_photos, n_tiles, seconds)

    if not run.history:  # epoch 0: the starting point, before any step
        t0 = time.perf_counter()
        validate(0, None, 0.0)
        run.history[-1] = dataclasses.replace(run.history[-1], seconds=time.perf_counter() - t0)
        _save_state(state_file, run.state(identity))

    photo_all = torch.from_numpy(np.ascontiguousarray(data["photo_emb"], dtype=np.float32))
    trunk_cache = TrunkCache(run.encoder, cfg.cache_trunk_gb * 2**30)
    while run.epoch < cfg.epochs:
        started = time.perf_counter()
        _train_epoch(run, rows, photo_all, data["source"], trunk_cache, cfg, zoom,
                     save=lambda: _save_state(state_file, run.state(identity)), on_epoch=on_epoch, on_step=on_step)
        mean_loss = run.end_epoch()
        validate(run.epoch, mean_loss, time.perf_counter() - started)
        _save_state(state_file, run.state(identity))
    save_map_checkpoint(run.encoder, final, zoom=zoom)
    _save_state(state_file, run.state(identity, done=True))
    return LevelResult(zoom, final, init_name, tuple(run.history), dropped_photos=run.dropped)


def _train_epoch(
    run: _Run, rows: _LevelRows, photo_all: torch.Tensor, source: TileSource, trunk_cache: TrunkCache,
    cfg: TrainConfig, zoom: int, *, save: Callable[[], None],
    on_epoch: Callable[[int, int, int, int], None] | None, on_step: Callable[[float], None] | None,
) -> None:
    """The steps of one epoch from ``run.step`` on, saving the state every ``cfg.checkpoint_every`` steps."""
    batches = [rows.train[b] for b in _epoch_batches(len(rows.train), rows.codes[rows.train], cfg, zoom, run.epoch)]
    if on_epoch:
        on_epoch(zoom, run.epoch + 1, len(batches), run.step)
    dataset = TileBatches(batches, rows.codes, source, run.encoder.preprocess, zoom, negatives=cfg.negatives,
                       pool=rows.pool, seed=[cfg.seed, zoom, run.epoch], cached=trunk_cache.codes)
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, range(run.step, len(batches))),
                                         batch_size=None, shuffle=False, num_workers=cfg.workers)
    run.encoder.train_head()
    for batch in loader:
        if run.epoch == 0:
            run.dropped += len(batches[run.step]) - len(batch.rows)
        if len(batch.codes) < 2 or not len(batch.rows):  # its tiles are missing from the source
            run.step += 1
            continue
        value = train_step(run.encoder, run.optimizer, photo_all[batch.rows], trunk_cache.features(batch, run.amp),
                           batch.target, logit_scale=cfg.logit_scale, scaler=run.scaler, from_trunk=True,
                           l2sp=cfg.l2sp, anchor=run.anchor)
        run.step += 1
        run.loss_sum += value
        run.loss_n += 1
        if on_step:
            on_step(value)
        if run.step % cfg.checkpoint_every == 0 and run.step < len(batches):
            save()
    run.encoder.train_head(False)


def _read_state(state_file: Path, identity: dict[str, Any]) -> dict[str, Any] | None:
    """A level's saved state, if there is one; one of another run is refused."""
    if not state_file.is_file():
        return None
    state: dict[str, Any] = torch.load(state_file, map_location="cpu", weights_only=True)
    if state.get("format") != STATE_FORMAT or state.get("identity") != identity:
        raise ConfigError(
            f"{state_file} belongs to a run with other photos, split, settings or starting point; "
            "use another --out folder, or delete it (and its zNN.pt) to start this level again"
        )
    return state


@dataclass(frozen=True)
class _LevelRows:
    """What a level trains and validates on: the photos' tile codes at this zoom, the training and
    validation rows, and the tiles extra negatives are drawn from."""

    codes: npt.NDArray[np.int64]
    train: npt.NDArray[np.int64]
    val: npt.NDArray[np.int64]
    pool: npt.NDArray[np.int64] | None

    @classmethod
    def of(cls, zoom: int, cfg: TrainConfig, data: LevelData, negative_pool: npt.ArrayLike | None) -> _LevelRows:
        if cfg.negatives and negative_pool is None:
            raise ConfigError(f"z{zoom}: negatives={cfg.negatives} needs the level's tiles (negative_pool)")
        pool = None if negative_pool is None else np.unique(np.asarray(negative_pool, dtype=np.int64))
        lat = np.asarray(data["lat"], dtype=np.float64)
        lon = np.asarray(data["lon"], dtype=np.float64)
        codes = tile_codes(lat, lon, zoom=zoom)
        train = np.asarray(data["train_rows"], dtype=np.int64)
        if len(np.unique(codes[train])) < 2:
            raise ConfigError(
                f"z{zoom}: training needs photos in at least 2 distinct tiles, got {len(train)} photos")
        val = np.asarray(data["val_rows"] if data["val_rows"] is not None else [], dtype=np.int64)
        if cfg.max_val_photos is not None and len(val) > cfg.max_val_photos:
            val = np.sort(np.random.default_rng([cfg.seed, zoom]).choice(val, cfg.max_val_photos, replace=False))
        return cls(codes, train, val, pool)


@dataclass
class _Run:
    """A level's training in progress: the encoder and optimiser, and the counters its state file keeps."""

    encoder: ImageEncoder
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    anchor: list[torch.Tensor]  # the level's starting weights (L2-SP), before any resume
    amp: bool
    history: list[EpochRecord] = field(default_factory=list)
    epoch: int = 0
    step: int = 0
    dropped: int = 0  # training photos whose tile the source lacks (counted in the first epoch)
    loss_sum: float = 0.0
    loss_n: int = 0

    @classmethod
    def start(cls, base: ImageEncoder, init_from: str | os.PathLike | None, cfg: TrainConfig,
              state: dict[str, Any] | None) -> _Run:
        device = torch.device(cfg.device)
        encoder = init_map_encoder(base, init_from, head=cfg.head)
        encoder.to(device)
        params = [p for p in encoder.visual.parameters() if p.requires_grad]
        amp = cfg.amp and device.type == "cuda"
        run = cls(encoder, torch.optim.Adam(params, lr=cfg.lr), torch.amp.GradScaler("cuda", enabled=amp),
                  [p.detach().clone() for p in params], amp)
        if state is not None:
            encoder.visual.load_state_dict(state["weights"], strict=False)
            run.optimizer.load_state_dict(state["optimizer"])
            run.scaler.load_state_dict(state["scaler"])
            run.epoch, run.step = int(state["epoch"]), int(state["step"])
            run.dropped = int(state.get("dropped", 0))
            run.history = [EpochRecord(**r) for r in state["history"]]
            run.loss_sum, run.loss_n = float(state["loss_sum"]), int(state["loss_n"])
        return run

    def end_epoch(self) -> float | None:
        """Close an epoch: the next starts at step 0; returns this one's mean loss (None: no step)."""
        mean = self.loss_sum / self.loss_n if self.loss_n else None
        self.epoch, self.step, self.loss_sum, self.loss_n = self.epoch + 1, 0, 0.0, 0
        return mean

    def state(self, identity: dict[str, Any], *, done: bool = False) -> dict[str, Any]:
        """What the state file holds: enough to resume at this step."""
        return {
            "format": STATE_FORMAT, "identity": identity, "weights": _trainable_state(self.encoder),
            "optimizer": self.optimizer.state_dict(), "scaler": self.scaler.state_dict(), "epoch": self.epoch,
            "step": self.step, "history": [dataclasses.asdict(r) for r in self.history], "done": done,
            "dropped": self.dropped, "loss_sum": self.loss_sum, "loss_n": self.loss_n,
        }


def train_levels(
    base: ImageEncoder,
    zooms: Sequence[int],
    *,
    out_dir: str | os.PathLike,
    cfg: TrainConfig = TrainConfig(),
    run_key: str = "",
    on_epoch: Callable[[int, int, int, int], None] | None = None,
    on_step: Callable[[float], None] | None = None,
    negative_pools: Mapping[int, npt.ArrayLike] | None = None,
    **data: Unpack[LevelData],
) -> list[LevelResult]:
    """Train every level, finest zoom first; each coarser level starts from the finer one's checkpoint.

    Writes ``<out>/zNN.pt`` per level and ``<out>/train.json`` (settings and history) after each level.
    Arguments are those of :func:`train_level`; ``negative_pools`` maps zoom -> that level's pool.
    """
    if not zooms:
        raise ConfigError("no zoom levels to train")
    if len(set(zooms)) != len(zooms):
        raise ConfigError(f"zoom levels repeat: {list(zooms)}")
    train_rows = np.asarray(data["train_rows"], dtype=np.int64)
    for zoom in zooms:  # refuse before any level trains, not after the finer ones did
        codes = np.unique(tile_codes(np.asarray(data["lat"])[train_rows], np.asarray(data["lon"])[train_rows],
                                     zoom=zoom))
        if len(codes) < 2:
            where = f" (all in tile {tuple(tile_of_code(int(codes[0]), zoom=zoom))})" if len(codes) else ""
            raise ConfigError(
                f"z{zoom}: training needs photos in at least 2 distinct tiles, got {len(train_rows)} photos{where}; "
                f"drop zoom {zoom} from --zooms/--schedule or add photos from elsewhere")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    results: list[LevelResult] = []
    previous: Path | None = None
    for zoom in sorted(zooms, reverse=True):
        result = train_level(
            base, zoom, out_dir=out, cfg=cfg, init_from=previous, run_key=run_key, on_epoch=on_epoch,
            on_step=on_step, negative_pool=None if negative_pools is None else negative_pools.get(zoom), **data,
        )
        results.append(result)
        previous = result.checkpoint
        summary = {
            "config": dataclasses.asdict(cfg),
            "base": {"name": base.spec.name, "base_fingerprint": base.base_fingerprint},
            "run": run_key,
            "levels": [
                {"zoom": r.zoom, "checkpoint": r.checkpoint.name, "init_from": r.init_from,
                 "dropped_photos": r.dropped_photos, "history": [dataclasses.asdict(h) for h in r.history]}
                for r in results
            ],
        }
        atomic_write_bytes(out / "train.json", json.dumps(summary, indent=2).encode())
    return results
