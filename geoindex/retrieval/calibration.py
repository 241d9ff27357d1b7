"""Calibrated probabilities, uncertainty radii and the "no confident match" test of an index's answers.

The scores of a level are cosines; how sharp their softmax should be depends on the encoder
(EfficientNet-Lite0's cosines live on another scale than CLIP's). A :class:`Calibration`, fitted
per index on queries with known positions (``geoindex.training.calibrate``), gives each level a temperature
``T`` and a bias ``c``: with ``d_i = s_i - max_j s_j`` (scores relative to the best kept tile), the
probability that the true tile is kept tile i is ``exp(d_i / T) / (sum_j exp(d_j / T) + exp(c))``,
and ``exp(c) / (...)`` is the probability that the beam lost it (the truth lies elsewhere). Scores
relative to the best keep the temperature about ranking: how high a query scores overall is the
out-of-domain test's business (:func:`ood_scores`). The pair minimises the negative log-likelihood
of the true tile; the fit is convex in ``(1 / T, c)`` and solved by Newton's method
(:func:`fit_temperature`).

The uncertainty radius around a prediction grows over the kept tiles by distance until it holds
a given probability (:func:`radii_km`); when the kept tiles hold less than that, it is
:data:`EVERYWHERE_KM`. Which mass the 50 % and 90 % radii hold is set on the calibration queries,
so that 50 % and 90 % of them fall inside (split conformal prediction); with a perfect fit the
masses are 0.5 and 0.9.

An index without calibration keeps the fixed temperature 0.01 (CLIP's logit scale) and no bias;
its answers say ``calibrated: false``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import logging
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mercantile
import numpy as np
import numpy.typing as npt

from geoindex.errors import ConfigError, IndexFormatError
from geoindex.geometry.metrics import great_circle_km
from geoindex.geometry.tiles import tile_center

__all__ = [
    "DEFAULT_TEMPERATURE",
    "EVERYWHERE_KM",
    "FIT_KINDS",
    "RADIUS_LEVELS",
    "Calibration",
    "describe_radius",
    "FitInfo",
    "LevelCalibration",
    "expected_calibration_error",
    "fit_temperature",
    "kept_probabilities",
    "EMBEDDINGS_FILE",
    "ood_scores",
    "read_embeddings",
    "radii_km",
    "required_mass",
]

log = logging.getLogger(__name__)

DEFAULT_TEMPERATURE = 0.01  # uncalibrated indexes: CLIP's logit scale of 100, whatever the encoder
EVERYWHERE_KM = 20_037.5  # half the Earth's circumference: a radius that holds every place
RADIUS_LEVELS = (0.5, 0.9)  # the coverage the two reported radii aim at
FIT_KINDS = ("views", "photos")  # what a calibration was fitted on
EMBEDDINGS_FILE = "calibration.npy"  # the calibration queries' embeddings (m, d) float16, in the index folder


@dataclass(frozen=True)
class LevelCalibration:
    """One level's temperature ``T`` (> 0) and the log-weight ``bias`` of "the true tile was not kept".

    The bias is relative to the best kept tile's weight (1): ``exp(bias)`` to 1 are the odds of
    "elsewhere" against the best tile.
    """

    zoom: int
    temperature: float
    bias: float

    def __post_init__(self) -> None:
        if not (self.temperature > 0 and math.isfinite(self.temperature) and math.isfinite(self.bias)):
            raise ConfigError(f"calibration of z{self.zoom}: temperature {self.temperature} must be > 0 and "
                              f"bias {self.bias} finite")


@dataclass(frozen=True)
class FitInfo:
    """What a calibration was fitted on.

    Attributes:
        kind: ``views`` (rendered from the index's imagery) or ``photos`` (a CSV of photos).
        count: queries used. seed: the views' seed (None for photos). k: the beam width of the fit.
        source: the imagery spec the views came from, or the photo CSV's path.
        zoom: the zoom whose tiles the views were made from (None for photos).
    """

    kind: str
    count: int
    seed: int | None
    k: int
    source: str
    zoom: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in FIT_KINDS:
            raise ConfigError(f"calibration kind {self.kind!r}: choose one of {list(FIT_KINDS)}")
        if self.count < 1 or self.k < 1:
            raise ConfigError(f"calibration count {self.count} and k {self.k} must be >= 1")


@dataclass(frozen=True)
class Calibration:
    """An index's calibration, as ``manifest.json`` records it under ``calibration``.

    Attributes:
        levels: one :class:`LevelCalibration` per built level, coarsest first.
        radius_mass: the calibrated probability the 50 % and 90 % radii hold (set so that those
            fractions of the calibration queries fell inside).
        ood_threshold: answers whose :func:`ood_scores` (against the calibration queries'
            embeddings, :data:`EMBEDDINGS_FILE`) is below it are "no confident match".
        ood_quantile: the fraction of calibration queries below ``ood_threshold`` (each scored
            against the others).
        ood_neighbours: the nearest calibration queries :func:`ood_scores` averages.
        embeddings_sha256: sha256 of :data:`EMBEDDINGS_FILE`, checked when the index opens.
        fitted_on: what the fit used.
    """

    levels: tuple[LevelCalibration, ...]
    radius_mass: tuple[float, float]
    ood_threshold: float
    ood_quantile: float
    ood_neighbours: int
    embeddings_sha256: str
    fitted_on: FitInfo

    def __post_init__(self) -> None:
        if not self.levels:
            raise ConfigError("a calibration needs at least one level")
        lo, hi = self.radius_mass
        if not 0 < lo <= hi <= 1:
            raise ConfigError(f"radius masses {self.radius_mass} must satisfy 0 < m50 <= m90 <= 1")
        if not (math.isfinite(self.ood_threshold) and 0 < self.ood_quantile < 1 and self.ood_neighbours >= 1):
            raise ConfigError(f"confidence test out of range: threshold {self.ood_threshold}, quantile "
                              f"{self.ood_quantile}, neighbours {self.ood_neighbours}")

    def level(self, zoom: int) -> LevelCalibration | None:
        return next((lv for lv in self.levels if lv.zoom == zoom), None)

    def to_dict(self) -> dict[str, Any]:
        return {
            "levels": [{"zoom": lv.zoom, "temperature": lv.temperature, "bias": lv.bias} for lv in self.levels],
            "radius_mass": list(self.radius_mass),
            "ood_threshold": self.ood_threshold,
            "ood_quantile": self.ood_quantile,
            "ood_neighbours": self.ood_neighbours,
            "embeddings_sha256": self.embeddings_sha256,
            "fitted_on": dataclasses.asdict(self.fitted_on),
        }

    @classmethod
    def from_dict(cls, d: Any) -> Calibration:
        """Raises KeyError / TypeError / ConfigError naming the bad entry (the manifest names the file)."""
        if not isinstance(d, Mapping):
            raise TypeError(f"'calibration' is {type(d).__name__}, not an object")
        levels = tuple(LevelCalibration(int(lv["zoom"]), float(lv["temperature"]), float(lv["bias"]))
                       for lv in d["levels"])
        f = d["fitted_on"]
        fitted = FitInfo(str(f["kind"]), int(f["count"]), None if f.get("seed") is None else int(f["seed"]),
                         int(f["k"]), str(f["source"]), None if f.get("zoom") is None else int(f["zoom"]))
        lo, hi = (float(m) for m in d["radius_mass"])
        return cls(levels, (lo, hi), float(d["ood_threshold"]), float(d["ood_quantile"]), int(d["ood_neighbours"]),
                   str(d["embeddings_sha256"]), fitted)


def kept_probabilities(scores: npt.ArrayLike, *, temperature: float, bias: float | None) -> npt.NDArray[np.float64]:
    """Probabilities (k,) that each kept tile holds the truth; they sum to 1 minus the mass left elsewhere.

    Args:
        scores: the k kept tiles' scores (cosines), any order.
        temperature: softmax temperature in score units.
        bias: log-weight of "the true tile was not kept", against 0 for the best kept tile;
            None: no such outcome (they sum to 1).
    """
    s = np.asarray(scores, dtype=np.float64)
    if s.size == 0:
        return s
    e = np.exp((s - s.max()) / temperature)
    total = e.sum() + (0.0 if bias is None else math.exp(bias))
    return np.asarray(e / total)


def describe_radius(km: float) -> str:
    """A radius for people: ``"1,234 km"``, or ``"anywhere"`` for :data:`EVERYWHERE_KM`."""
    if not math.isfinite(km):
        return "unknown"
    return "anywhere" if km >= EVERYWHERE_KM else f"{km:,.0f} km"


def _half_diagonal_km(tile: mercantile.Tile) -> float:
    b = mercantile.bounds(tile)
    lat, lon = tile_center(tile)
    return float(great_circle_km(lat, lon, b.north, b.west))


def radii_km(
    lat: float, lon: float, tiles: Sequence[mercantile.Tile], probabilities: npt.ArrayLike,
    masses: Sequence[float],
) -> tuple[float, ...]:
    """Radii (km) around (lat, lon) holding each of ``masses`` of probability, one per mass.

    The disc grows over the kept tiles in order of their farthest point (centre distance plus
    half-diagonal), so a tile counts once the disc covers all of it. A mass the kept tiles do not
    reach gives :data:`EVERYWHERE_KM`. Monotone: a larger mass never gives a smaller radius.
    """
    p = np.asarray(probabilities, dtype=np.float64)
    if not tiles:
        return tuple(EVERYWHERE_KM for _ in masses)
    centres = np.array([tile_center(t) for t in tiles])
    reach = great_circle_km(lat, lon, centres[:, 0], centres[:, 1]) + np.array([_half_diagonal_km(t) for t in tiles])
    order = np.argsort(reach, kind="stable")
    held = np.cumsum(p[order])
    out = []
    for m in masses:
        j = int(np.searchsorted(held, m - 1e-12))  # first tile at which the disc holds m
        out.append(float(min(reach[order][j], EVERYWHERE_KM)) if j < len(held) else EVERYWHERE_KM)
    return tuple(out)


def required_mass(
    lat: float, lon: float, tiles: Sequence[mercantile.Tile], probabilities: npt.ArrayLike,
    truth: tuple[float, float],
) -> float:
    """The smallest mass whose :func:`radii_km` radius reaches ``truth``; 1.0 when only "everywhere" does.

    Its quantiles over calibration queries are the masses that make radii cover those fractions
    of them (split conformal prediction).
    """
    if not tiles:
        return 1.0
    p = np.asarray(probabilities, dtype=np.float64)
    centres = np.array([tile_center(t) for t in tiles])
    reach = great_circle_km(lat, lon, centres[:, 0], centres[:, 1]) + np.array([_half_diagonal_km(t) for t in tiles])
    order = np.argsort(reach, kind="stable")
    distance = float(great_circle_km(lat, lon, *truth))
    inside = np.nonzero(reach[order] >= distance)[0]
    return float(np.cumsum(p[order])[inside[0]]) if inside.size else 1.0


def read_embeddings(index_dir: str | os.PathLike, calibration: Calibration, *, dim: int) -> npt.NDArray[np.float16]:
    """The calibration queries' embeddings (m, dim) float16 of an index, checked against the manifest's sha256.

    Raises:
        IndexFormatError: the file is missing, damaged or not the one the calibration was fitted with.
    """
    path = Path(index_dir) / EMBEDDINGS_FILE
    refit = f"refit with `python -m pipelines.build_index --calibrate --index {index_dir}`"
    try:
        data = path.read_bytes()
    except OSError as e:
        raise IndexFormatError(f"{path}: the calibration's query embeddings cannot be read ({e}); {refit}") from e
    if hashlib.sha256(data).hexdigest() != calibration.embeddings_sha256:
        raise IndexFormatError(f"{path}: not the file the manifest's calibration was fitted with (sha256); {refit}")
    array = np.load(io.BytesIO(data), allow_pickle=False)
    if array.ndim != 2 or array.shape[1] != dim or array.shape[0] < 2:
        raise IndexFormatError(f"{path}: shape {array.shape}, expected (m >= 2, {dim}); {refit}")
    return np.asarray(array, dtype=np.float16)


def ood_scores(xq: npt.ArrayLike, reference: npt.ArrayLike, *, neighbours: int,
               exclude_self: bool = False) -> npt.NDArray[np.float64]:
    """How much each query resembles the calibration queries: the mean cosine of its nearest ones.

    Args:
        xq: (n, d) float32 L2-normalised query embeddings.
        reference: (m, d) the calibration queries' embeddings (any float dtype).
        neighbours: how many nearest reference queries to average (at most m, or m - 1).
        exclude_self: ``xq`` is ``reference`` itself; leave each query's own row out.

    Returns:
        (n,) float64; low for queries unlike anything the index was calibrated on (a ground photo
        for an index of satellite views, a flat grey image).
    """
    q = np.atleast_2d(np.asarray(xq, dtype=np.float32))
    ref = np.asarray(reference, dtype=np.float32)
    sims = q @ ref.T
    if exclude_self:
        np.fill_diagonal(sims, -np.inf)
    k = max(1, min(neighbours, ref.shape[0] - (1 if exclude_self else 0)))
    top = np.partition(sims, sims.shape[1] - k, axis=1)[:, -k:]
    return np.asarray(top.mean(axis=1), dtype=np.float64)


def fit_temperature(
    D: npt.ArrayLike, labels: npt.ArrayLike, *, ridge: float = 1e-3, iterations: int = 100,
    min_inverse: float = 1.0,
) -> tuple[float, float]:
    """Fit (temperature, bias) minimising the NLL of the true tile among the kept ones.

    Args:
        D: (n, k) float scores of the kept tiles; NaN (or -inf) where fewer than k were kept.
        labels: (n,) int, the column of the true tile in ``D``, or -1 when it was not kept.
        ridge: a small L2 penalty on the bias that keeps it finite when no query (or every
            query) lost its true tile; 1 / T gets 1e-6 of it (finite when the true tile is always first).
        iterations: Newton steps at most.

    Returns:
        ``(temperature, bias)``: ``p_i = exp(d_i / T) / (sum_j exp(d_j / T) + exp(bias))`` with
        ``d_i = D_i - max_j D_j`` (see :func:`kept_probabilities`).

    The NLL is convex in ``theta = (a, c) = (1 / T, bias)``: logits are linear in theta (feature
    ``(d_i, 0)`` for tile i, ``(0, 1)`` for "elsewhere"), so Newton's method with a backtracking
    line search converges. Where the scores do not rank the true tile above the others (``a``
    would be <= ``min_inverse``), ``a`` stays at ``min_inverse`` (nearly uniform over the kept
    tiles) and only the bias is fitted; a warning says so.
    """
    S = np.asarray(D, dtype=np.float64)
    y = np.asarray(labels, dtype=np.int64)
    if S.ndim != 2 or y.shape != (S.shape[0],) or S.shape[0] == 0:
        raise ConfigError(f"fit_temperature needs scores (n, k) and labels (n,), got {S.shape} and {y.shape}")
    valid = np.isfinite(S)
    if np.any((y >= 0) & ~valid[np.arange(len(y)), np.clip(y, 0, S.shape[1] - 1)]):
        raise ConfigError("a label points at a padded (missing) score")
    n, k = S.shape
    best = np.where(valid, S, -np.inf).max(axis=1, keepdims=True)
    feats = np.zeros((n, k + 1, 2))
    feats[:, :k, 0] = np.where(valid, S - best, 0.0)
    feats[:, k, 1] = 1.0
    mask = np.concatenate([valid, np.ones((n, 1), bool)], axis=1)
    target = np.where(y >= 0, y, k)
    chosen = feats[np.arange(n), target]  # (n, 2)
    penalty = np.array([ridge * 1e-6, ridge])

    def objective(theta: npt.NDArray[np.float64]) -> tuple[float, npt.NDArray[np.float64], npt.NDArray[np.float64]]:
        logits = np.where(mask, feats @ theta, -np.inf)
        top = logits.max(axis=1, keepdims=True)
        e = np.exp(logits - top)
        z = e.sum(axis=1, keepdims=True)
        p = e / z
        lse = (top + np.log(z))[:, 0]
        nll = float(np.mean(lse - chosen @ theta)) + float(penalty @ theta**2) / 2
        mean_f = np.einsum("nk,nkd->nd", p, feats)
        grad = (mean_f - chosen).mean(axis=0) + penalty * theta
        second = np.einsum("nk,nkd,nke->de", p, feats, feats) / n
        hess = second - np.einsum("nd,ne->de", mean_f, mean_f) / n + np.diag(penalty)
        return nll, grad, hess

    def newton(theta: npt.NDArray[np.float64], free: npt.NDArray[np.bool_]) -> npt.NDArray[np.float64]:
        value, grad, hess = objective(theta)
        for _ in range(iterations):
            step = np.zeros(2)
            step[free] = -np.linalg.solve(hess[np.ix_(free, free)], grad[free])
            t = 1.0
            while True:
                candidate = theta + t * step
                new_value, new_grad, new_hess = objective(candidate)
                if new_value <= value + 1e-4 * t * float(grad @ step) or t < 1e-8:
                    break
                t /= 2
            converged = abs(value - new_value) < 1e-12
            theta, value, grad, hess = candidate, new_value, new_grad, new_hess
            if converged or float(np.abs(grad[free]).max()) < 1e-9:
                break
        return theta

    theta = newton(np.array([1.0 / DEFAULT_TEMPERATURE, 0.0]), np.array([True, True]))
    if theta[0] < min_inverse and valid.sum(axis=1).max() > 1:  # one kept tile per query: nothing to rank
        log.warning("calibration: the scores do not rank the true tile above the other kept tiles (1/T = %.3g); "
                    "the kept tiles get nearly equal probabilities (T = %.3g)", theta[0], 1 / min_inverse)
    if theta[0] < min_inverse:
        theta = newton(np.array([min_inverse, theta[1]]), np.array([False, True]))
    return 1.0 / float(theta[0]), float(theta[1])


def expected_calibration_error(confidence: npt.ArrayLike, correct: npt.ArrayLike, *, bins: int = 10) -> float:
    """Expected calibration error over ``bins`` equal-width confidence bins (weighted by their counts)."""
    p = np.asarray(confidence, dtype=np.float64)
    ok = np.asarray(correct, dtype=np.float64)
    if p.size == 0:
        return float("nan")
    which = np.minimum((p * bins).astype(np.int64), bins - 1)
    total = 0.0
    for b in range(bins):
        sel = which == b
        if sel.any():
            total += sel.sum() * abs(float(p[sel].mean()) - float(ok[sel].mean()))
    return total / p.size
