"""Geolocation error metrics: great-circle distance and accuracy within distance thresholds."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

__all__ = ["EARTH_RADIUS_KM", "THRESHOLDS_KM", "accuracy_at", "great_circle_km"]

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
