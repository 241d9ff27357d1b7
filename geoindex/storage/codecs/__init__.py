"""Codecs of the IVF levels, one module each, found by name in :data:`REGISTRY`.

A codec says how a level's FAISS index encodes its vectors (:class:`~geoindex.storage.codecs.base.Codec`):
the IVF factory, its training sample, its code size, whether the FAISS file gives the float16
embeddings back exactly, and for a lossy code the finer product quantizer that re-ranks its
candidates. The manifest, the store, the build, the search and the benchmarks all read this
registry; nothing else names a codec.

To add a codec: one module in this package that defines ``CODEC = Codec(...)`` (it is found and
registered on import), plus its test. Modules import FAISS inside their factories, so that naming
the codecs (``--help``, the manifest) does not load it.
"""

from __future__ import annotations

from geoindex.registry import Registry, discover
from geoindex.storage.codecs.base import Codec

__all__ = ["CODEC_NAMES", "REGISTRY", "Codec", "get_codec", "register"]

REGISTRY: Registry[Codec] = Registry("a codec", option="--codec")
register = REGISTRY.register
get_codec = REGISTRY.named
REGISTRY.register_all(discover(__name__, __path__, "CODEC", skip={"base"}).values(),
                      first=("fp16", "flat", "sq8", "pq", "pq_small"))  # help texts list the default first
CODEC_NAMES: tuple[str, ...] = tuple(REGISTRY)
"""The codecs shipped with geoindex, default first (``--codec`` choices)."""
