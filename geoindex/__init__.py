"""geoindex: photo geolocation by hierarchical retrieval over precomputed satellite map-tile indexes.

    >>> import geoindex
    >>> result = geoindex.search("photo.jpg", k=64)      # reads indexes/default or $GEOINDEX_INDEX
    >>> result.lat, result.lon, result.tile

See ``help(geoindex.search)`` for the fields of a result.
"""

from geoindex.api import GeoIndex, OnTheFlySearcher, open_index, search
from geoindex.coverage import Coverage
from geoindex.encoders import ENCODERS, ImageEncoder, create_encoder, load_map_encoder
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
from geoindex.results import Candidate, LevelTrace, SearchResult
from geoindex.tiles import LevelSchedule

__version__ = "0.1.0"

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
