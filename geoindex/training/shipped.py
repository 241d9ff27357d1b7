"""Trained map encoders that ship inside the package, with what they were trained on and how well they do.

``geoindex/checkpoints/<encoder>/`` holds one ``zNN.pt`` per zoom (``projection`` heads: about
1.7 MB each for EfficientNet-Lite0) and ``shipped.json``: the command that made them, each file's
sha256, the figures measured on places never trained on, and a small fixed check set per zoom
whose top-1 a test reproduces. ``pipelines.ship_encoders`` writes them; the demo builds with them.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mercantile
import numpy as np

from geoindex.errors import EncoderMismatchError
from geoindex.files import file_sha256
from geoindex.models.encoders import ImageEncoder
from geoindex.sources import TileSource
from geoindex.training.views import random_views

__all__ = ["SHIPPED_ROOT", "CheckSet", "ShippedEncoders", "check_top1", "shipped_encoders"]

log = logging.getLogger(__name__)

SHIPPED_ROOT = Path(__file__).parents[1] / "checkpoints"
MANIFEST = "shipped.json"


@dataclass(frozen=True)
class CheckSet:
    """A small fixed retrieval task: views of ``view_tiles`` (seeded) against the ``candidates`` of one zoom."""

    zoom: int
    view_tiles: tuple[mercantile.Tile, ...]
    seed: int
    candidates: tuple[mercantile.Tile, ...]

    def to_json(self) -> dict[str, Any]:
        return {"zoom": self.zoom, "seed": self.seed, "view_tiles": [list(t) for t in self.view_tiles],
                "candidates": [list(t) for t in self.candidates]}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> CheckSet:
        return cls(int(data["zoom"]), tuple(mercantile.Tile(*t) for t in data["view_tiles"]), int(data["seed"]),
                   tuple(mercantile.Tile(*t) for t in data["candidates"]))


def check_top1(photo_encoder: ImageEncoder, map_encoder: ImageEncoder, source: TileSource, check: CheckSet) -> float:
    """Share of the check set's views whose true tile at ``check.zoom`` scores highest among its candidates."""
    views = random_views(source, check.view_tiles, seed=check.seed)
    queries = photo_encoder.encode([v.image for v in views])
    tiles = map_encoder.encode([source.get(t) for t in check.candidates])
    truth = [check.candidates.index(mercantile.tile(v.lon, v.lat, check.zoom)) for v in views]
    return float(np.mean((queries @ tiles.T).argmax(axis=1) == np.asarray(truth)))


@dataclass(frozen=True)
class ShippedEncoders:
    """The shipped map encoders of one base encoder: checkpoint paths by zoom, and their record."""

    folder: Path
    checkpoints: dict[int, Path]
    record: dict[str, Any]

    def checks(self) -> dict[int, tuple[CheckSet, float]]:
        """Each zoom's check set and the top-1 recorded for it."""
        return {int(z): (CheckSet.from_json(c["set"]), float(c["top1"])) for z, c in self.record["checks"].items()}


def shipped_encoders(photo_encoder: ImageEncoder, *, root: Path = SHIPPED_ROOT) -> ShippedEncoders | None:
    """The map encoders shipped for ``photo_encoder``'s base (same name and weights), or None.

    Raises:
        EncoderMismatchError: a shipped file does not match its recorded sha256 (a damaged install).
    """
    folder = root / photo_encoder.spec.name
    manifest = folder / MANIFEST
    if not manifest.is_file():
        return None
    record = json.loads(manifest.read_text())
    if record.get("base_fingerprint") != photo_encoder.base_fingerprint:
        log.info("shipped map encoders in %s were trained on other %s weights: not used",
                 folder, photo_encoder.spec.name)
        return None
    checkpoints = {}
    for zoom, entry in record["files"].items():
        path = folder / entry["file"]
        if not path.is_file() or file_sha256(path) != entry["sha256"]:
            raise EncoderMismatchError(f"{path} is missing or does not match its sha256 in {manifest}; "
                                       "reinstall geoindex (pip install -e .)")
        checkpoints[int(zoom)] = path
    return ShippedEncoders(folder, checkpoints, record)

