"""Training batches of the map encoders: photos, their tiles read from a source, and cached trunk outputs.

A batch holds photos; its tiles are the distinct tiles of those photos (plus optional extra
negatives), read through :func:`geoindex.models.tile_encoding.load_tile`. :class:`TrunkCache` keeps the
frozen trunk's output of each tile within a memory budget, so a later step runs only the head.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence, Set
from dataclasses import KW_ONLY, dataclass
from typing import Any, NamedTuple

import numpy as np
import numpy.typing as npt
import torch

from geoindex.geometry.tiles import tile_of_code
from geoindex.models.encoders import ImageEncoder
from geoindex.models.tile_encoding import load_tile
from geoindex.sources import TileSource

__all__ = ["TileBatches", "TrunkCache", "batch_targets"]


def batch_targets(codes: npt.ArrayLike) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """The distinct tiles of a batch and each photo's class: ``unique[target[i]] == codes[i]``.

    Args:
        codes: tile code of each photo of the batch, shape (B,).

    Returns:
        unique tile codes (U,) and target (B,) int64 indices into them.
    """
    unique, target = np.unique(np.asarray(codes, dtype=np.int64), return_inverse=True)
    return unique, target.reshape(-1).astype(np.int64)



class _Batch(NamedTuple):
    """One step's input: photos, the tiles they are scored against, and each photo's class.

    ``codes`` holds the batch's distinct tiles first, then the extra negatives; ``pixels`` holds the
    preprocessed tiles for the rows of ``codes`` where ``loaded`` is set (the others are cached).
    """

    rows: torch.Tensor
    codes: npt.NDArray[np.int64]
    pixels: torch.Tensor
    loaded: npt.NDArray[np.bool_]
    target: torch.Tensor
    missing: int


@dataclass(eq=False)
class TileBatches(torch.utils.data.Dataset):
    """Batch i of an epoch (see ``_Batch``). Photos whose tile the source lacks are left out of their
    batch (and counted); missing negatives are dropped. Tiles whose code is in ``cached`` are not loaded.
    """

    batches: list[npt.NDArray[np.int64]]
    codes: npt.NDArray[np.int64]
    source: TileSource
    preprocess: Callable[[Any], torch.Tensor]
    zoom: int
    _: KW_ONLY
    negatives: int = 0
    pool: npt.NDArray[np.int64] | None = None
    seed: Sequence[int] = ()
    cached: Set[int] = frozenset()

    def __len__(self) -> int:
        return len(self.batches)

    def _negatives(self, i: int, positives: npt.NDArray[np.int64]) -> npt.NDArray[np.int64]:
        if not self.negatives or self.pool is None:
            return np.zeros(0, np.int64)
        rng = np.random.default_rng([*self.seed, i])  # seeded per step: a resumed run draws the same
        draw = self.pool[rng.choice(len(self.pool), min(len(self.pool), self.negatives + len(positives)),
                                    replace=False)]
        return draw[~np.isin(draw, positives)][: self.negatives]

    def __getitem__(self, i: int) -> _Batch:
        rows = self.batches[i]
        unique, target = batch_targets(self.codes[rows])
        all_codes = np.concatenate([unique, self._negatives(i, unique)])
        pixels, found = [], np.ones(len(all_codes), dtype=bool)
        loaded = np.zeros(len(all_codes), dtype=bool)
        for j, c in enumerate(all_codes.tolist()):
            if c in self.cached:
                continue
            load = load_tile(self.source, self.preprocess, tile_of_code(c, zoom=self.zoom))
            if load.error is not None:
                raise load.error
            if load.tensor is None:
                found[j] = False
            else:
                pixels.append(load.tensor)
                loaded[j] = True
        missing = int((~found[: len(unique)]).sum())
        if missing:
            keep = found[target]
            rows, target = rows[keep], (np.cumsum(found) - 1)[target[keep]]
        stacked = torch.stack(pixels) if pixels else torch.zeros(0)
        return _Batch(torch.from_numpy(rows), all_codes[found], stacked, loaded[found],
                      torch.from_numpy(target), missing)


class TrunkCache:
    """Frozen-trunk outputs per tile code, up to a memory budget; a step's tiles in, their features out."""

    def __init__(self, encoder: ImageEncoder, budget_bytes: float) -> None:
        self.encoder = encoder
        self.trunk = encoder.split()[0]
        self.budget = budget_bytes
        self.used = 0
        self.store: dict[int, torch.Tensor] = {}
        self.codes: set[int] = set()  # what TileBatches need not load (a set, unlike store.keys(), pickles for workers)

    def features(self, batch: _Batch, amp: bool) -> torch.Tensor:
        fresh = None
        if len(batch.pixels):
            device = self.encoder.device
            with torch.no_grad(), torch.autocast(device_type=device.type, dtype=torch.float16, enabled=amp):
                fresh = self.trunk(self.encoder.to_device(batch.pixels))
        if batch.loaded.all() and fresh is not None and self.budget <= 0:
            return fresh
        parts, k = [], 0
        for code, loaded in zip(batch.codes.tolist(), batch.loaded.tolist()):
            if loaded:
                assert fresh is not None
                f = fresh[k]
                k += 1
                if self.used + f.numel() * f.element_size() <= self.budget:
                    self.store[code] = f.clone()
                    self.codes.add(code)
                    self.used += f.numel() * f.element_size()
            else:
                f = self.store[code]
            parts.append(f)
        return torch.stack(parts)

