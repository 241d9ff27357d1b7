"""Geolocation error metrics: great-circle distance and accuracy within distance thresholds."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from geoindex.geometry.tiles import tile_center_array

__all__ = [
    "EARTH_RADIUS_KM", "THRESHOLDS_KM", "accuracy_at", "circle_points", "great_circle_km", "random_tile_errors_km",
]

EARTH_RADIUS_KM = 6371.0088  # mean Earth radius (IUGG)
THRESHOLDS_KM = (1.0, 25.0, 200.0, 750.0, 2500.0)  # street, city, region, country, continent


def great_circle_km(
    lat1: npt.ArrayLike, lon1: npt.ArrayLike, lat2: npt.ArrayLike, lon2: npt.ArrayLike
) -> npt.NDArray[np.float64]:
    """Haversine distance in km between points given in degrees; broadcasts like numpy."""
    p1, p2 = np.radians(np.asarray(lat1, dtype=np.float64)), np.radians(np.asarray(lat2, dtype=np.float64))
    dlat = p2 - p1
    dlon = np.radians(np.asarray(lon2, dtype=np.float64) - np.asarray(lon1, dtype=np.float64))
    h = np.sin(dlat / 2) ** 2 + np.cos(p1) * np.cos(p2) * np.sin(dlon / 2) ** 2
    return 2 * EARTH_RADIUS_KM * np.arcsin(np.sqrt(np.clip(h, 0.0, 1.0)))


def accuracy_at(errors_km: npt.ArrayLike, thresholds_km: tuple[float, ...] = THRESHOLDS_KM) -> dict[float, float]:
    """Fraction of errors at or below each threshold."""
    e = np.asarray(errors_km, dtype=np.float64)
    return {t: float(np.mean(e <= t)) if e.size else float("nan") for t in thresholds_km}


def circle_points(lat: float, lon: float, radius_km: float, *, n: int = 72) -> npt.NDArray[np.float64]:
    """(n + 1, 2) (lat, lon) points, degrees, of the geodesic circle of ``radius_km`` around (lat, lon), closed.

    Longitudes are unwrapped around ``lon`` (they may leave -180..180), so that a circle across the
    antimeridian stays one ring; latitudes stop at the poles' +-90.
    """
    bearing = np.radians(np.linspace(0.0, 360.0, n + 1))
    d = min(radius_km, np.pi * EARTH_RADIUS_KM) / EARTH_RADIUS_KM
    p1 = np.radians(lat)
    p2 = np.arcsin(np.clip(np.sin(p1) * np.cos(d) + np.cos(p1) * np.sin(d) * np.cos(bearing), -1.0, 1.0))
    dl = np.arctan2(np.sin(bearing) * np.sin(d) * np.cos(p1), np.cos(d) - np.sin(p1) * np.sin(p2))
    out = np.stack([np.degrees(p2), lon + np.degrees(dl)], axis=1)
    out[-1] = out[0]
    return out


def random_tile_errors_km(lat: npt.ArrayLike, lon: npt.ArrayLike, *, zoom: int) -> npt.NDArray[np.float64]:
    """The errors of a guess that knows nothing: for each query (lat, lon), the distance to the centre of
    every tile of ``zoom``, each tile equally likely. Shape (n_queries, 4**zoom); its median is the
    random-guess baseline a geolocator has to beat (tiles, not areas, are uniform: polar tiles are small)."""
    n = 1 << zoom
    ys, xs = np.divmod(np.arange(n * n), n)
    tlat, tlon = tile_center_array(xs, ys, zoom=zoom)
    qlat, qlon = np.atleast_1d(np.asarray(lat, dtype=np.float64)), np.atleast_1d(np.asarray(lon, dtype=np.float64))
    return great_circle_km(qlat[:, None], qlon[:, None], tlat[None, :], tlon[None, :])
