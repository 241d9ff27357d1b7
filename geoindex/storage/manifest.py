"""The index manifest (``<index>/manifest.json``) as frozen dataclasses, parsed and checked in one place.

The manifest is written last and read before any search (README: "The index on disk"). ``Manifest.from_dict``
turns the JSON into typed records and names the file and the bad key when it cannot;
``Manifest.to_dict`` writes the same keys back, so manifests of earlier builds keep opening.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from geoindex.errors import ConfigError, IndexFormatError, IndexNotFoundError
from geoindex.files import atomic_write_bytes
from geoindex.geometry.tiles import LevelSchedule
from geoindex.retrieval.calibration import Calibration
from geoindex.storage.codecs import CODEC_NAMES, get_codec

__all__ = [
    "CODECS",
    "DEFAULT_INDEX",
    "FORMAT_VERSION",
    "INDEX_ENV",
    "MANIFEST",
    "EncoderIdentity",
    "FileInfo",
    "LevelInfo",
    "Manifest",
    "short_id",
]

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
CODECS = CODEC_NAMES  # the shipped codecs, from their registry (geoindex.storage.codecs), default first
# Where an index is looked for by default.
INDEX_ENV = "GEOINDEX_INDEX"
DEFAULT_INDEX = Path("indexes") / "default"
_REBUILD = "rebuild the index with `python -m pipelines.build_index`"
_OPTIONAL_TEXT = "str | None"  # fields annotated so are optional strings: absent or null on disk, None here


def short_id(identity: Mapping[str, Any]) -> str:
    """The first 12 hex digits of an encoder identity's checkpoint sha256, else of its base weights.

    For messages; ``identity`` is a dict as ``ImageEncoder.identity`` returns it (or as a build
    recorded it), which may come from a file and lack either key.
    """
    return str(identity.get("checkpoint_sha256") or identity.get("base_fingerprint"))[:12]


def _expect(d: Mapping[str, Any], key: str, kind: type) -> None:
    """TypeError naming ``key`` unless ``d[key]`` is a ``kind`` (bool is not an int here)."""
    if key not in d:
        raise KeyError(f"{key!r} is missing")
    value = d[key]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise TypeError(f"{key!r} is {value!r}, expected {kind.__name__}")


def _optional_text(d: Mapping[str, Any], key: str) -> str | None:
    """``d[key]`` if it is a string, None if absent or null; TypeError naming ``key`` otherwise."""
    value = d.get(key)
    if value is not None and not isinstance(value, str):
        raise TypeError(f"{key!r} is {value!r}, expected a string or null")
    return value


def _optional_text_fields(cls: type) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(cls) if f.type == _OPTIONAL_TEXT)


def _without_unset(record: Any, *, always: tuple[str, ...] = ()) -> dict[str, Any]:
    """A record's fields (not converted), leaving out optional strings that are None unless named in ``always``.

    Absent and null mean the same to the reader; leaving them out keeps the manifests of builds
    that never knew a field byte for byte as they were.
    """
    unset = set(_optional_text_fields(type(record))) - set(always)
    return {f.name: getattr(record, f.name) for f in dataclasses.fields(record)
            if not (f.name in unset and getattr(record, f.name) is None)}


@dataclass(frozen=True)
class EncoderIdentity:
    """Which encoder made embeddings (``ImageEncoder.identity``), as the manifest records it.

    Attributes:
        name: the registry name (``geoindex.models.encoders.ENCODERS``).
        base_fingerprint: sha256 of the base weights. Always set for the photo encoder; a
            level's record may lack it (synthetic benchmark indexes).
        checkpoint_sha256: sha256 of the map-encoder checkpoint applied; None for the base itself.
        precision: the arithmetic the level was encoded at (fp32, bf16, fp16, int8); None when
            not recorded (the photo encoder, earlier builds).
        checkpoint: the map-encoder checkpoint path the build was given, for reloading it.
        preprocessing: where tiles were resized when not PIL's bicubic on the host (``torch``: on
            the device, not bit-identical); None for PIL's (every index built before it was recorded).
    """

    name: str
    base_fingerprint: str | None = None
    checkpoint_sha256: str | None = None
    precision: str | None = None
    checkpoint: str | None = None
    preprocessing: str | None = None

    @property
    def short(self) -> str:
        """The first 12 hex digits of the checkpoint's sha256, else of the base weights: for messages."""
        return short_id(dataclasses.asdict(self))

    def to_dict(self) -> dict[str, Any]:
        return _without_unset(self, always=("checkpoint_sha256",))  # builds always wrote it, null for a base

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> EncoderIdentity:
        """Raises KeyError / TypeError naming the bad key (``Manifest.from_dict`` names the file)."""
        _expect(d, "name", str)
        return cls(d["name"], **{key: _optional_text(d, key) for key in _optional_text_fields(cls)})


@dataclass(frozen=True)
class FileInfo:
    """A file of a level, as the manifest records it: name, size in bytes, sha256."""

    name: str
    size: int
    sha256: str

    @classmethod
    def from_dict(cls, d: Any, *, where: str) -> FileInfo:
        if not (isinstance(d, dict) and isinstance(d.get("name"), str) and isinstance(d.get("size"), int)
                and isinstance(d.get("sha256"), str)):
            raise TypeError(f"{where}: file entry {d!r} needs name, size and sha256")
        if d["name"] != Path(d["name"]).name or d["name"] in ("", ".", ".."):
            raise TypeError(f"{where}: file name {d['name']!r} is not a plain file name")
        return cls(d["name"], d["size"], d["sha256"])


@dataclass(frozen=True)
class LevelInfo:
    """One complete level: its zoom, row count, the map encoder that embedded it, and its files.

    ``encoder`` is None until the build records it (``{}`` on disk).
    """

    zoom: int
    rows: int
    encoder: EncoderIdentity | None
    files: tuple[FileInfo, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"zoom": self.zoom, "rows": self.rows, "encoder": self.encoder.to_dict() if self.encoder else {},
                "files": [dataclasses.asdict(f) for f in self.files]}

    @classmethod
    def from_dict(cls, d: Any) -> LevelInfo:
        """Raises KeyError / TypeError naming the bad key (``Manifest.from_dict`` names the file)."""
        if not isinstance(d, dict):
            raise TypeError(f"a level is {type(d).__name__}, not an object")
        for key, kind in (("zoom", int), ("rows", int), ("encoder", dict), ("files", list)):
            _expect(d, key, kind)
        files = tuple(FileInfo.from_dict(f, where=f"level z{d['zoom']}") for f in d["files"])
        if d["rows"] < 0:
            raise TypeError(f"level z{d['zoom']}: rows {d['rows']} is negative")
        encoder = EncoderIdentity.from_dict(d["encoder"]) if d["encoder"] else None
        return cls(d["zoom"], d["rows"], encoder, files)


@dataclass(frozen=True)
class Manifest:
    """What an index holds; written last, checked before any search.

    Attributes:
        schedule: the zoom levels the index is built for (not all need to be built yet).
        dim: embedding dimension d. codec: FAISS codec of levels after the first.
        photo_encoder: identity of the photo encoder queries must be embedded with.
        imagery: the tile source the levels were encoded from. coverage: the covered area.
        levels: complete levels, coarsest first, contiguous from ``schedule.start``.
        build_args: the arguments of the build, for reproduction.
        imagery_spec: the source's spec (``geoindex.sources.open_source`` reopens it), so maps
            can draw over the imagery; None in indexes built before it was recorded.
        calibration: the fitted probabilities, radii and confidence threshold
            (``geoindex.training.calibrate``); None for an uncalibrated index, whose answers say so.

    A field annotated ``str | None`` with default None is an optional entry: read when present,
    written only when set. Adding one is that one line; manifests without it keep opening.
    """

    schedule: LevelSchedule
    dim: int
    codec: str
    photo_encoder: EncoderIdentity
    imagery: str
    coverage: dict[str, Any] = field(default_factory=dict)
    levels: tuple[LevelInfo, ...] = ()
    build_args: dict[str, Any] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION
    imagery_spec: str | None = None
    calibration: Calibration | None = None

    def __post_init__(self) -> None:
        get_codec(self.codec)  # ConfigError naming the registered codecs
        if self.dim < 1:
            raise ConfigError(f"embedding dimension must be positive, got {self.dim}")
        zooms = tuple(level.zoom for level in self.levels)
        if zooms != self.schedule.zooms[: len(zooms)]:
            raise IndexFormatError(
                f"levels {list(zooms)} are not a prefix of the schedule {list(self.schedule.zooms)}"
            )

    def level(self, zoom: int) -> LevelInfo | None:
        return next((lv for lv in self.levels if lv.zoom == zoom), None)

    def with_level(self, info: LevelInfo) -> Manifest:
        """A copy with ``info`` added, replacing any level of the same zoom and dropping deeper ones.

        The calibration is dropped: it was fitted on the scores of the levels as they were.
        """
        kept = tuple(lv for lv in self.levels if lv.zoom < info.zoom)
        return dataclasses.replace(self, levels=kept + (info,), calibration=None)

    def to_dict(self) -> dict[str, Any]:
        """The JSON object of ``manifest.json``."""
        d = _without_unset(self)  # the typed entries are replaced in place, keeping the key order
        d["schedule"] = {"start": self.schedule.start, "stop": self.schedule.stop, "step": self.schedule.step}
        d["photo_encoder"] = self.photo_encoder.to_dict()
        d["levels"] = [lv.to_dict() for lv in self.levels]
        if self.calibration is None:
            del d["calibration"]  # absent, as in manifests written before calibration existed
        else:
            d["calibration"] = self.calibration.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: Any, *, where: str = "manifest") -> Manifest:
        """Parse and check a manifest's JSON object.

        Raises:
            IndexFormatError: naming ``where`` and the bad key: not an object, a missing or
                mistyped entry, a format version that is not a positive integer or newer than this
                geoindex reads, or levels that do not follow the schedule.
        """
        if not isinstance(d, dict):
            raise IndexFormatError(
                f"{where}: malformed manifest (a JSON object was expected, got {type(d).__name__}); {_REBUILD}"
            )
        version = d.get("format_version")
        if isinstance(version, bool) or not isinstance(version, int) or version < 1:
            raise IndexFormatError(
                f"{where}: malformed manifest (format_version {version!r} is not a positive integer); {_REBUILD}"
            )
        if version > FORMAT_VERSION:
            raise IndexFormatError(
                f"{where}: format version {version!r} is newer than this geoindex reads "
                f"({FORMAT_VERSION}); upgrade geoindex or rebuild the index"
            )
        try:
            for key, kind in (("dim", int), ("codec", str), ("imagery", str), ("schedule", dict),
                              ("photo_encoder", dict), ("levels", list)):
                _expect(d, key, kind)
            _expect(d["photo_encoder"], "name", str)
            _expect(d["photo_encoder"], "base_fingerprint", str)
            return cls(
                schedule=LevelSchedule(**d["schedule"]),
                dim=d["dim"],
                codec=d["codec"],
                photo_encoder=EncoderIdentity.from_dict(d["photo_encoder"]),
                imagery=d["imagery"],
                coverage=dict(d.get("coverage") or {}),
                levels=tuple(LevelInfo.from_dict(lv) for lv in d["levels"]),
                build_args=dict(d.get("build_args") or {}),
                format_version=version,
                calibration=Calibration.from_dict(d["calibration"]) if d.get("calibration") is not None else None,
                **{key: _optional_text(d, key) for key in _optional_text_fields(cls)},
            )
        except (KeyError, TypeError, ValueError, ConfigError) as e:
            if isinstance(e, IndexFormatError):
                raise
            raise IndexFormatError(f"{where}: malformed manifest ({e}); {_REBUILD}") from e

    def save(self, index_dir: Path) -> None:
        atomic_write_bytes(Path(index_dir) / MANIFEST, json.dumps(self.to_dict(), indent=2).encode())

    @classmethod
    def load(cls, index_dir: Path) -> Manifest:
        path = Path(index_dir) / MANIFEST
        if not path.is_file():
            raise IndexNotFoundError(
                f"no index at {index_dir} ({MANIFEST} missing). To try geoindex, `make demo` builds a small "
                "offline world index at indexes/demo in a few minutes; then pass --index indexes/demo (index= in "
                f"Python, or set ${INDEX_ENV}). To build your own over an area: `python -m pipelines.build_index "
                f"--index {index_dir} --all --source TILES --bbox W S E N` (README, 'Building an index')"
            )
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise IndexFormatError(f"{path}: unreadable manifest ({e})") from e
        return cls.from_dict(data, where=str(path))
