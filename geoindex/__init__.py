"""geoindex: photo geolocation by hierarchical retrieval over precomputed satellite map-tile indexes.

    >>> import geoindex
    >>> result = geoindex.search("photo.jpg", k=64)      # reads indexes/default or $GEOINDEX_INDEX
    >>> result.lat, result.lon, result.tile

See ``help(geoindex.search)`` for the fields of a result.

The names below are imported on first use (PEP 562): ``import geoindex`` and ``geoindex --help``
do not load torch, FAISS or an encoder library, which take seconds on a small machine.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from geoindex.errors import (
    ConfigError,
    EncoderMismatchError,
    GeoIndexError,
    ImageError,
    ImageTooLargeError,
    IndexFormatError,
    IndexMismatchError,
    IndexNotFoundError,
    TileNotFoundError,
    TileSourceError,
    WeightsNotFoundError,
)

if TYPE_CHECKING:
    from geoindex.api import GeoIndex, OnTheFlySearcher, open_index, search
    from geoindex.geometry.coverage import Coverage
    from geoindex.geometry.tiles import LevelSchedule
    from geoindex.models.encoders import ENCODERS, ImageEncoder, create_encoder, load_map_encoder
    from geoindex.retrieval.results import Candidate, LevelTrace, SearchResult

__version__ = "0.2.0"

# public name -> the module that defines it, imported when the name is first read
_LAZY = {
    "GeoIndex": "geoindex.api",
    "OnTheFlySearcher": "geoindex.api",
    "open_index": "geoindex.api",
    "search": "geoindex.api",
    "Coverage": "geoindex.geometry.coverage",
    "ENCODERS": "geoindex.models.encoders",
    "ImageEncoder": "geoindex.models.encoders",
    "create_encoder": "geoindex.models.encoders",
    "load_map_encoder": "geoindex.models.encoders",
    "Candidate": "geoindex.retrieval.results",
    "LevelTrace": "geoindex.retrieval.results",
    "SearchResult": "geoindex.retrieval.results",
    "LevelSchedule": "geoindex.geometry.tiles",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'geoindex' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later reads skip this function
    return value


def __dir__() -> list[str]:
    return sorted(__all__)


__all__ = [
    "ENCODERS",
    "Candidate",
    "ConfigError",
    "Coverage",
    "EncoderMismatchError",
    "GeoIndex",
    "GeoIndexError",
    "ImageEncoder",
    "ImageError",
    "ImageTooLargeError",
    "IndexFormatError",
    "IndexMismatchError",
    "IndexNotFoundError",
    "LevelSchedule",
    "LevelTrace",
    "OnTheFlySearcher",
    "SearchResult",
    "TileNotFoundError",
    "TileSourceError",
    "WeightsNotFoundError",
    "__version__",
    "create_encoder",
    "load_map_encoder",
    "open_index",
    "search",
]
