"""Geolocation evaluation: accuracy at 1/25/200/750/2500 km, median error, per-level beam recall, time per image.

Arrays in, arrays out: :func:`error_summary` scores great-circle errors, :func:`level_stats`
scores the per-level hits of a beam search against the true tiles, and :func:`evaluate`
runs a searcher (an opened index or the on-the-fly searcher) over photos with known
coordinates for one or more beam widths k, as in the paper's Table 1.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from geoindex.errors import ConfigError
from geoindex.geometry.metrics import THRESHOLDS_KM, accuracy_at, great_circle_km
from geoindex.geometry.tiles import tile_center_array, tile_of_array
from geoindex.models.encoders import ImageEncoder
from geoindex.retrieval.beam import PriorOptions, beam_search, check_k
from geoindex.retrieval.levels import Level, LevelHits
from geoindex.training.dataset import PhotoTable, embed_photos

__all__ = [
    "EvalReport",
    "KResult",
    "Predictions",
    "Searcher",
    "error_summary",
    "evaluate",
    "level_stats",
    "predict",
]

log = logging.getLogger(__name__)


class Searcher(Protocol):
    """What evaluation needs of a searcher (``GeoIndex``, ``OnTheFlySearcher``): a photo encoder and levels."""

    photo_encoder: ImageEncoder
    levels: Sequence[Level]


def error_summary(errors_km: npt.ArrayLike, thresholds_km: Sequence[float] = THRESHOLDS_KM) -> dict[str, Any]:
    """Accuracy within each threshold (inclusive), median and mean error of great-circle errors in km."""
    e = np.asarray(errors_km, dtype=np.float64)
    return {
        "n": int(e.size),
        "accuracy": accuracy_at(e, tuple(thresholds_km)),
        "median_km": float(np.median(e)) if e.size else float("nan"),
        "mean_km": float(np.mean(e)) if e.size else float("nan"),
    }


def level_stats(
    hits: Sequence[LevelHits], lat: npt.ArrayLike, lon: npt.ArrayLike
) -> tuple[dict[int, float], dict[int, float]]:
    """Per level: how often the true tile was ranked first (top-1) and how often it was kept (beam recall).

    Args:
        hits: one LevelHits per level with x, y, I of shape (n, k) (I = -1 marks empty slots).
        lat, lon: (n,) true coordinates in degrees.

    Returns:
        (top1, recall), each ``{zoom: fraction of the n queries}``.
    """
    top1: dict[int, float] = {}
    recall: dict[int, float] = {}
    for h in hits:
        tx, ty = tile_of_array(lat, lon, zoom=h.zoom)
        match = (h.x == tx[:, None]) & (h.y == ty[:, None]) & (h.I >= 0)
        top1[h.zoom] = float(np.mean(match[:, 0])) if len(match) else float("nan")
        recall[h.zoom] = float(np.mean(match.any(axis=1))) if len(match) else float("nan")
    return top1, recall


@dataclass(frozen=True)
class Predictions:
    """Predicted final tile and its centre per query (the deepest level that found any tile)."""

    zoom: npt.NDArray[np.int64]
    x: npt.NDArray[np.int64]
    y: npt.NDArray[np.int64]
    lat: npt.NDArray[np.float64]
    lon: npt.NDArray[np.float64]


def predict(hits: Sequence[LevelHits]) -> Predictions:
    """The best tile of the deepest level with a hit, per query, as ``make_results`` picks it."""
    n = hits[0].I.shape[0]
    zoom = np.full(n, -1, dtype=np.int64)
    x = np.full(n, -1, dtype=np.int64)
    y = np.full(n, -1, dtype=np.int64)
    for h in hits:  # coarsest first: deeper levels overwrite where they found something
        found = h.I[:, 0] >= 0
        zoom[found], x[found], y[found] = h.zoom, h.x[found, 0], h.y[found, 0]
    if (zoom < 0).any():
        raise ConfigError("the search found no tile at any level for some query: the index is empty there")
    lat = np.empty(n)
    lon = np.empty(n)
    for z in np.unique(zoom).tolist():
        m = zoom == z
        lat[m], lon[m] = tile_center_array(x[m], y[m], zoom=int(z))
    return Predictions(zoom, x, y, lat, lon)


@dataclass(frozen=True)
class KResult:
    """Scores and timings at one beam width k."""

    k: int
    n: int
    accuracy: dict[float, float]
    median_km: float
    mean_km: float
    tile_top1: dict[int, float]
    beam_recall: dict[int, float]
    embed_ms_per_image: float
    search_ms_per_image: float
    tiles_encoded_per_image: float | None = None

    @property
    def ms_per_image(self) -> float:
        return self.embed_ms_per_image + self.search_ms_per_image


@dataclass(frozen=True)
class EvalReport:
    """An evaluation: what was searched, how many photos, and one KResult per k."""

    mode: str
    index: str
    photos: int
    unreadable: int
    zooms: tuple[int, ...]
    results: tuple[KResult, ...]
    meta: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "mode": self.mode, "index": self.index, "photos": self.photos, "unreadable": self.unreadable,
            "zooms": list(self.zooms), **self.meta,
            "results": [
                {
                    "k": r.k, "n": r.n,
                    "accuracy": {f"{t:g}km": v for t, v in r.accuracy.items()},
                    "median_km": r.median_km, "mean_km": r.mean_km,
                    "tile_top1": {f"z{z:02d}": v for z, v in r.tile_top1.items()},
                    "beam_recall": {f"z{z:02d}": v for z, v in r.beam_recall.items()},
                    "embed_ms_per_image": r.embed_ms_per_image,
                    "search_ms_per_image": r.search_ms_per_image,
                    "ms_per_image": r.ms_per_image,
                    "tiles_encoded_per_image": r.tiles_encoded_per_image,
                }
                for r in self.results
            ],
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> EvalReport:
        """The report that :meth:`to_json` wrote (``ms_per_image`` is derived again).

        Raises:
            KeyError, TypeError, ValueError: ``data`` is not such a report.
        """
        known = {"mode", "index", "photos", "unreadable", "zooms", "results"}
        results = tuple(
            KResult(
                k=int(r["k"]), n=int(r["n"]),
                accuracy={float(t.removesuffix("km")): float(v) for t, v in r["accuracy"].items()},
                median_km=float(r["median_km"]), mean_km=float(r["mean_km"]),
                tile_top1={int(z.removeprefix("z")): float(v) for z, v in r["tile_top1"].items()},
                beam_recall={int(z.removeprefix("z")): float(v) for z, v in r["beam_recall"].items()},
                embed_ms_per_image=float(r["embed_ms_per_image"]),
                search_ms_per_image=float(r["search_ms_per_image"]),
                tiles_encoded_per_image=r.get("tiles_encoded_per_image"),
            )
            for r in data["results"]
        )
        return cls(str(data["mode"]), str(data["index"]), int(data["photos"]), int(data["unreadable"]),
                   tuple(int(z) for z in data["zooms"]), results,
                   meta={k: v for k, v in data.items() if k not in known})

    def to_markdown(self) -> str:
        """The paper's Table 1 layout (accuracy and time per k), then per-level top-1 and beam recall."""
        thresholds = list(self.results[0].accuracy) if self.results else list(THRESHOLDS_KM)
        lines = [
            f"Geolocation of {self.photos} photos ({self.mode} search over {self.index}; "
            f"levels {', '.join(f'z{z}' for z in self.zooms)}"
            + (f"; {self.unreadable} unreadable photos left out" if self.unreadable else "") + ").",
            "",
            "| k | " + " | ".join(f"{t:g} km" for t in thresholds) + " | median km | time / image |",
            "|---:|" + "---:|" * (len(thresholds) + 2),
        ]
        for r in self.results:
            lines.append(f"| {r.k} | " + " | ".join(f"{100 * r.accuracy[t]:.1f} %" for t in thresholds)
                         + f" | {r.median_km:,.0f} | {_ms(r.ms_per_image)} |")
        for title, attr in (("Tile top-1 per level (true tile ranked first)", "tile_top1"),
                            ("Beam recall per level (true tile among the k kept)", "beam_recall")):
            lines += ["", title + ":", "",
                      "| k | " + " | ".join(f"z{z:02d}" for z in self.zooms) + " |",
                      "|---:|" + "---:|" * len(self.zooms)]
            for r in self.results:
                values = getattr(r, attr)
                lines.append(f"| {r.k} | " + " | ".join(f"{100 * values[z]:.1f} %" for z in self.zooms) + " |")
        lines += ["", "Time per image = photo embedding "
                  + (f"({_ms(self.results[0].embed_ms_per_image)})" if self.results else "")
                  + " + search; on-the-fly search includes encoding the candidate tiles."]
        return "\n".join(lines) + "\n"


def _ms(ms: float) -> str:
    return f"{ms:.2f} ms" if ms < 100 else f"{ms / 1000:.1f} s" if ms < 60_000 else f"{ms / 60_000:.1f} min"


def _embed(searcher: Searcher, paths: Sequence[str], batch_size: int,
           progress: Callable[[int], None] | None) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.bool_], float]:
    """Photo embeddings (n, d), readable mask (n,), and seconds spent (loading + encoding)."""
    started = time.perf_counter()
    emb, ok = embed_photos(searcher.photo_encoder, paths, batch_size=batch_size, progress=progress)
    return emb, ok, time.perf_counter() - started


def evaluate(
    searcher: Searcher,
    photos: PhotoTable,
    ks: Sequence[int] = (64,),
    *,
    query_batch: int = 256,
    embed_batch: int = 64,
    progress: Callable[[int], None] | None = None,
    on_predictions: Callable[[int, npt.NDArray[np.int64], Predictions, npt.NDArray[np.float64]], None] | None = None,
    mode: str = "indexed",
    index: str = "",
    prior: Any = None,
    prior_options: PriorOptions | None = None,
) -> EvalReport:
    """Geolocate every photo at each beam width k and score against the true coordinates.

    Args:
        searcher: a ``GeoIndex`` or an ``OnTheFlySearcher``.
        photos: paths and true coordinates.
        ks: beam widths to sweep (the paper: 16, 32, 64).
        query_batch: photos per beam-search call (on the fly, 1 gives the paper's per-photo cost).
        progress: called with the number of photos handled (embedding, then each k's search).
        on_predictions: called per k with (k, rows of the readable photos, predictions, errors km).
        prior, prior_options: a loaded ``geoindex.retrieval.prior.GeoCLIPPrior`` and how it joins the search
            (inject or rerank); its image features are computed once and reused for every k.

    Returns:
        An EvalReport; time per image = embedding time + search time, divided by readable photos.
    """
    ks = [check_k(k) for k in ks]
    if query_batch < 1:
        raise ConfigError(f"query_batch must be >= 1, got {query_batch}")
    emb, ok, embed_s = _embed(searcher, photos.paths, embed_batch, progress)
    rows = np.flatnonzero(ok)
    if not len(rows):
        raise ConfigError(f"none of the {len(photos)} photos could be read")
    xq, lat, lon = emb[rows], photos.lat[rows], photos.lon[rows]
    if prior is not None:
        started = time.perf_counter()
        prior_features = prior.embed([photos.paths[i] for i in rows])
        embed_s += time.perf_counter() - started  # part of each photo's cost, like the photo embedding
    results = []
    for k in ks:
        encoded_before = sum(lv.tiles_encoded for lv in searcher.levels)
        search_s = 0.0
        per_batch: list[list[LevelHits]] = []
        for s in range(0, len(rows), query_batch):
            t0 = time.perf_counter()
            belief = prior.belief(prior_features[s : s + query_batch]) if prior is not None else None
            per_batch.append(beam_search(xq[s : s + query_batch], searcher.levels, k, prior=belief,
                                          prior_options=prior_options))
            search_s += time.perf_counter() - t0
            if progress:
                progress(min(s + query_batch, len(rows)) - s)
        hits = [
            LevelHits(parts[0].zoom, *(np.concatenate([getattr(p, a) for p in parts]) for a in ("D", "I", "x", "y")))
            for parts in zip(*per_batch)
        ]
        pred = predict(hits)
        errors = great_circle_km(lat, lon, pred.lat, pred.lon)
        summary = error_summary(errors)
        top1, recall = level_stats(hits, lat, lon)
        encoded = sum(lv.tiles_encoded for lv in searcher.levels)
        results.append(KResult(
            k=k, n=len(rows), accuracy=summary["accuracy"], median_km=summary["median_km"],
            mean_km=summary["mean_km"], tile_top1=top1, beam_recall=recall,
            embed_ms_per_image=1e3 * embed_s / len(rows), search_ms_per_image=1e3 * search_s / len(rows),
            tiles_encoded_per_image=(encoded - encoded_before) / len(rows),
        ))
        if on_predictions:
            on_predictions(k, rows, pred, errors)
        log.info("k=%d: median error %.0f km, accuracy %s, %.2f ms/image", k, summary["median_km"],
                 {f"{t:g}km": round(v, 3) for t, v in summary["accuracy"].items()}, results[-1].ms_per_image)
    zooms = tuple(int(lv.zoom) for lv in searcher.levels)
    return EvalReport(mode, index, len(photos), int((~ok).sum()), zooms, tuple(results))
