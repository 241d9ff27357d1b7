"""Codecs of the IVF levels, one module each, found by name in :data:`REGISTRY`.

A codec says how a level's FAISS index encodes its vectors (:class:`~geoindex.codecs.base.Codec`):
the IVF factory, its training sample, its code size, whether the FAISS file gives the float16
embeddings back exactly, and for a lossy code the finer product quantizer that re-ranks its
candidates. The manifest, the store, the build, the search and the benchmarks all read this
registry; nothing else names a codec.

To add a codec: one module in this package that defines ``CODEC = Codec(...)`` (it is found and
registered on import), plus its test. Modules import FAISS inside their factories, so that naming
the codecs (``--help``, the manifest) does not load it.
"""

from __future__ import annotations

import importlib
import pkgutil

from geoindex.codecs.base import Codec
from geoindex.errors import ConfigError

__all__ = ["CODEC_NAMES", "REGISTRY", "Codec", "get_codec", "register"]

REGISTRY: dict[str, Codec] = {}
_ORDER = ("fp16", "flat", "sq8", "pq", "pq_small")  # how help texts list the shipped codecs: default first


def register(codec: Codec) -> Codec:
    """Add ``codec`` to the registry (a test or a plug-in may add its own); returns it."""
    if codec.name in REGISTRY and REGISTRY[codec.name] is not codec:
        raise ConfigError(f"a codec named {codec.name!r} is registered already")
    REGISTRY[codec.name] = codec
    return codec


def get_codec(name: str) -> Codec:
    """The registered codec ``name``; ConfigError naming the choices otherwise."""
    try:
        return REGISTRY[name]
    except (KeyError, TypeError):
        raise ConfigError(f"unknown codec {name!r}; choose one of {list(REGISTRY)} (--codec)") from None


def _discover() -> None:
    found = {}
    for module in pkgutil.iter_modules(__path__):
        if module.name != "base" and not module.name.startswith("_"):
            found[module.name] = importlib.import_module(f"{__name__}.{module.name}").CODEC
    for name in sorted(found, key=lambda n: (_ORDER.index(n) if n in _ORDER else len(_ORDER), n)):
        register(found[name])


_discover()
CODEC_NAMES: tuple[str, ...] = tuple(REGISTRY)
"""The codecs shipped with geoindex, default first (``--codec`` choices)."""
