"""Typed errors: every failure a user can meet is a GeoIndexError subclass with an actionable message."""

from __future__ import annotations


class GeoIndexError(Exception):
    """Root of every error raised by geoindex."""


class ConfigError(GeoIndexError, ValueError):
    """An argument or configuration value is out of range or inconsistent."""


class ImageError(GeoIndexError, ValueError):
    """An input image cannot be read or decoded; the message names the file."""


class ImageTooLargeError(ImageError):
    """An image has more pixels than the configured limit (a decompression bomb, or just too big)."""


class TileNotFoundError(GeoIndexError, KeyError):
    """A tile source does not have the requested tile."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable.
        return str(self.args[0]) if self.args else ""


class TileSourceError(GeoIndexError, OSError):
    """A tile source failed (network, disk or decoding) for a reason other than absence."""


class WeightsNotFoundError(GeoIndexError, FileNotFoundError):
    """Model weights are not available locally and downloading was not allowed."""


class IndexMismatchError(GeoIndexError, ValueError):
    """An existing index was built with other settings (codec, schedule, imagery, coverage) than a build asks for."""


class EncoderMismatchError(IndexMismatchError):
    """A checkpoint or index was made with a different encoder than the one supplied."""


class IndexNotFoundError(GeoIndexError, FileNotFoundError):
    """No index (or no manifest, or a missing level file) at the given path."""


class IndexFormatError(GeoIndexError, ValueError):
    """An index on disk is damaged, partial, or of an unsupported format version."""


class IndexBusyError(GeoIndexError, BlockingIOError):
    """Another process holds an index's write lock (a build or a compaction is running)."""


class IndexWriteError(GeoIndexError, OSError):
    """The operating system refused a write to an index (read-only, full, over a size limit); nothing was lost."""


class BuildIncompleteError(GeoIndexError, RuntimeError):
    """Some tiles failed to load; their shards were not written. Fix the source and rerun to resume."""


class BadTilesError(GeoIndexError, ValueError):
    """Tiles of a shard could not be read; the message lists every one of them."""


class LazyLevelError(GeoIndexError, RuntimeError):
    """A lazy level could not encode the tiles a query needs (the tile source failed); nothing was stored."""


class SourceNotReopenableError(ConfigError):
    """A tile source's spec names imagery that cannot be opened from a string (an in-memory source)."""
