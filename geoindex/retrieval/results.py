"""What a search returns: per query, the final tiles with probabilities and the trace of every level.

``make_results`` turns the per-level hits of :func:`geoindex.retrieval.beam.beam_search` (arrays) into
``SearchResult`` values (tiles, centres, scores); output formats (``geoindex.interfaces.outputs``) and the
API build on these.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import mercantile
import numpy as np

from geoindex.errors import ConfigError
from geoindex.geometry.metrics import great_circle_km
from geoindex.geometry.tiles import tile_center
from geoindex.retrieval.calibration import (
    DEFAULT_TEMPERATURE,
    RADIUS_LEVELS,
    Calibration,
    kept_probabilities,
    radii_km,
)
from geoindex.retrieval.levels import LevelHits

__all__ = [
    "UNCALIBRATED_REASON", "Area", "Candidate", "LatLon", "LevelTrace", "SearchResult", "areas", "final_level",
    "make_results", "no_match_reason", "tile_probabilities",
]

LatLon = tuple[float, float]


@dataclass(frozen=True)
class Candidate:
    """One final-level tile: its centre, similarity score and probability (see ``SearchResult``)."""

    tile: mercantile.Tile
    lat: float
    lon: float
    score: float
    probability: float


@dataclass(frozen=True)
class LevelTrace:
    """The tiles one level kept (best first) with their scores and probabilities, and how the level answered.

    ``probabilities`` are the level's (calibrated, where the index is) probabilities that each kept
    tile holds the truth; left out, they are the uncalibrated softmax of ``scores`` at temperature 0.01.
    """

    zoom: int
    tiles: tuple[mercantile.Tile, ...]
    scores: tuple[float, ...]
    note: str | None = None  # e.g. a lazy level: "lazy: encoded 16 new tiles ...", or "on-the-fly: ..."
    probabilities: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        if not self.probabilities and self.scores:
            p = kept_probabilities(self.scores, temperature=DEFAULT_TEMPERATURE, bias=None)
            object.__setattr__(self, "probabilities", tuple(p.tolist()))
        if len(self.probabilities) != len(self.scores):
            raise ConfigError(f"z{self.zoom}: {len(self.probabilities)} probabilities for {len(self.scores)} tiles")


@dataclass(frozen=True)
class SearchResult:
    """Where a photo was taken, by hierarchical retrieval.

    Attributes:
        lat, lon: centre of the best tile of the deepest level that found any tile (degrees).
        tile: that tile, ``mercantile.Tile(x, y, z)``.
        bbox: its bounds, ``mercantile.LngLatBbox(west, south, east, north)``.
        score: its cosine similarity with the photo.
        candidates: the top-n tiles of that level with probabilities, best first. Calibrated
            (``calibrated``): the probability that the tile holds the photo's position, fitted
            on queries with known positions; the kept tiles' probabilities then sum to less than
            1, the rest being the chance that the truth lies elsewhere. Uncalibrated: a softmax
            over the k kept tiles' scores at temperature 0.01, which says little.
        trace: per level, coarsest first, the k tiles kept, their scores and probabilities.
        image: a name for the query image (its path where it had one), or None.
        calibrated: whether the index holds a calibration (``build_index --calibrate``).
        radius_km: radii (km) around (lat, lon) that hold the truth with 50 % and 90 %
            probability (:func:`geoindex.retrieval.calibration.radii_km`); 20,037.5 km means anywhere.
        confident: False when the photo does not resemble what the index can match (its
            ``ood_score`` is below the threshold set on the calibration queries); None when the
            index is uncalibrated. ``reason`` then says why in words.
        ood_score: the mean cosine of the photo's embedding to its nearest calibration queries
            (:func:`geoindex.retrieval.calibration.ood_scores`; higher: more alike); NaN uncalibrated.
        exif: the photo's own GPS position (lat, lon) from its EXIF, where it has one and it was read
            (``search(..., read_exif=True)``, the default); ``error_km`` is then the distance to it.

    Derived, as in the JSON output: ``probability`` (the best tile's), ``areas`` and
    ``area_probability`` (touching tiles merged), ``error_km`` and ``inside_radius`` (with EXIF).
    """

    lat: float
    lon: float
    tile: mercantile.Tile
    bbox: mercantile.LngLatBbox
    score: float
    candidates: tuple[Candidate, ...]
    trace: tuple[LevelTrace, ...]
    image: str | None = None
    calibrated: bool = False
    radius_km: tuple[float, float] = (float("nan"), float("nan"))
    confident: bool | None = None
    reason: str | None = None
    ood_score: float = float("nan")
    exif: LatLon | None = None

    @property
    def probability(self) -> float:
        """The best tile's probability (``candidates[0].probability``)."""
        return self.candidates[0].probability

    @functools.cached_property
    def areas(self) -> tuple[Area, ...]:
        """The final level's kept tiles merged into areas of touching tiles, most probable first (:func:`areas`)."""
        return tuple(areas(self))

    @property
    def area_probability(self) -> float:
        """The summed probability of the area holding the best tile: the confidence a user wants."""
        return next(a.probability for a in self.areas if self.tile in a.tiles)

    @property
    def error_km(self) -> float | None:
        """Great-circle distance (km) from the photo's EXIF position to (lat, lon); None without EXIF GPS."""
        return None if self.exif is None else float(great_circle_km(*self.exif, self.lat, self.lon))

    @property
    def inside_radius(self) -> tuple[bool, bool] | None:
        """Whether the EXIF position lies inside the 50 % and the 90 % radius; None without EXIF GPS."""
        error = self.error_km
        return None if error is None else (error <= self.radius_km[0], error <= self.radius_km[1])


def final_level(result: SearchResult) -> LevelTrace:
    """The trace level the prediction comes from (the deepest level that kept any tile)."""
    return next(t for t in reversed(result.trace) if t.zoom == result.tile.z)



def tile_probabilities(result: SearchResult) -> list[tuple[mercantile.Tile, float, float]]:
    """Every tile the final level kept, best first, as (tile, score, probability).

    The probabilities are those of ``result.candidates`` (over all kept tiles, not just the
    top-n): they sum to 1 uncalibrated, to 1 minus the chance that the truth lies elsewhere calibrated.
    """
    level = final_level(result)
    return [(t, float(s), float(p)) for t, s, p in zip(level.tiles, level.scores, level.probabilities, strict=True)]


@dataclass(frozen=True)
class Area:
    """Touching final-level tiles merged into one area, with their summed probability.

    Attributes:
        tiles: the member tiles, most probable first.
        probability: the sum of the members' probabilities.
        best: the most probable member; lat, lon: its centre (degrees).
        bbox: (west, south, east, north) of the members' union, degrees.
    """

    tiles: tuple[mercantile.Tile, ...]
    probability: float
    best: mercantile.Tile
    lat: float
    lon: float
    bbox: tuple[float, float, float, float]


def areas(result: SearchResult) -> list[Area]:
    """Group the final level's kept tiles into areas of touching tiles; most probable area first."""
    scored = tile_probabilities(result)
    if not scored:
        return []
    index = {(t.x, t.y): i for i, (t, _, _) in enumerate(scored)}
    parent = list(range(len(scored)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    n = 1 << scored[0][0].z
    for (x, y), i in index.items():
        for dx in (-1, 0, 1):
            for dy in (-1, 0, 1):
                j = index.get(((x + dx) % n, y + dy))
                if j is not None:
                    parent[root(i)] = root(j)
    groups: dict[int, list[int]] = {}
    for i in range(len(scored)):  # scored is best first, so each group's members are too
        groups.setdefault(root(i), []).append(i)
    out = []
    for members in groups.values():
        tiles = tuple(scored[i][0] for i in members)
        bounds = np.array([mercantile.bounds(t) for t in tiles])
        bbox = (float(bounds[:, 0].min()), float(bounds[:, 1].min()),
                float(bounds[:, 2].max()), float(bounds[:, 3].max()))
        lat, lon = tile_center(tiles[0])
        out.append(Area(tiles, float(sum(scored[i][2] for i in members)), tiles[0], lat, lon, bbox))
    return sorted(out, key=lambda a: -a.probability)


UNCALIBRATED_REASON = ("uncalibrated index: the probabilities are an uncalibrated softmax and no confidence test "
                       "applies; fit one with `python -m pipelines.build_index --calibrate --index INDEX`")


# tuple.__new__ for tiles the index holds (valid by construction), mapped in C: numpy scalars and
# mercantile's validating Tile() were most of a query's search time
_new_tile = functools.partial(tuple.__new__, mercantile.Tile)


def _level_trace(h: LevelHits, q: int, calibration: Calibration | None) -> LevelTrace:
    ok = h.I[q] >= 0
    xs, ys, scores = (h.x[q], h.y[q], h.D[q]) if ok.all() else (h.x[q][ok], h.y[q][ok], h.D[q][ok])
    tiles = tuple(map(_new_tile, zip(xs.tolist(), ys.tolist(), itertools.repeat(h.zoom))))
    fitted = calibration.level(h.zoom) if calibration is not None else None
    probs = (kept_probabilities(scores, temperature=fitted.temperature, bias=fitted.bias) if fitted is not None
             else kept_probabilities(scores, temperature=DEFAULT_TEMPERATURE, bias=None))
    return LevelTrace(h.zoom, tiles, tuple(scores.tolist()), h.note, tuple(probs.tolist()))


def no_match_reason(score: float, calibration: Calibration) -> str:
    """Why an answer is "no confident match", in words: its score against the calibration's threshold."""
    f = calibration.fitted_on
    what = "views rendered from the index's own imagery" if f.kind == "views" else "calibration photos"
    return (f"no confident match: the photo does not resemble what this index can match (similarity "
            f"{score:.3f} to its {calibration.ood_neighbours} nearest {what} is below {calibration.ood_threshold:.3f}, "
            f"which {100 * (1 - calibration.ood_quantile):.0f} % of the {f.count} calibration queries exceed); "
            "the candidates are shown but are likely wrong")


def make_results(
    hits: Sequence[LevelHits],
    *,
    top_n: int = 5,
    calibration: Calibration | None = None,
    ood_scores: Sequence[float] | None = None,
    names: Sequence[str | None] | None = None,
) -> list[SearchResult]:
    """Turn per-level hits for a batch into one SearchResult per query.

    Without ``calibration`` the probabilities are a softmax at temperature 0.01 (CLIP's logit
    scale of 100) and the results say ``calibrated=False``. ``ood_scores`` (n,), from
    :func:`geoindex.retrieval.calibration.ood_scores`, decide ``confident``; without them it is None.
    """
    if top_n < 1:
        raise ConfigError(f"top_n must be >= 1, got {top_n}")
    n = hits[0].D.shape[0]
    masses = calibration.radius_mass if calibration is not None else RADIUS_LEVELS
    results = []
    for q in range(n):
        trace = tuple(_level_trace(h, q, calibration) for h in hits)
        final = next((t for t in reversed(trace) if t.tiles), None)
        if final is None:
            raise ConfigError("the search found no tile at any level: the index is empty for this query")
        candidates = tuple(
            Candidate(t, *tile_center(t), float(s), float(p))
            for t, s, p in zip(final.tiles[:top_n], final.scores[:top_n], final.probabilities[:top_n])
        )
        best = candidates[0]
        r50, r90 = radii_km(best.lat, best.lon, final.tiles, final.probabilities, masses)
        score = float(ood_scores[q]) if ood_scores is not None else float("nan")
        if calibration is None:
            confident, reason = None, UNCALIBRATED_REASON
        elif ood_scores is None:
            confident, reason = None, None
        elif score < calibration.ood_threshold:
            confident, reason = False, no_match_reason(score, calibration)
        else:
            confident, reason = True, None
        results.append(
            SearchResult(
                lat=best.lat, lon=best.lon, tile=best.tile, bbox=mercantile.bounds(best.tile),
                score=best.score, candidates=candidates, trace=trace,
                image=names[q] if names is not None else None, calibrated=calibration is not None,
                radius_km=(r50, r90), confident=confident, reason=reason, ood_score=score,
            )
        )
    return results
