"""``map``: a picture of one result over the imagery: per level, the kept tiles coloured by probability.

``geoindex locate --map FILE`` draws one file per photo (PNG, JPEG or WebP by the file's extension);
the service's ``include_map`` adds it to the answer as a PNG data URL, ``map_png``. The drawing
itself is :func:`geoindex.interfaces.render.draw_map`.
"""

from __future__ import annotations

import io
from collections.abc import Sequence

from PIL import Image

from geoindex.imagery import ImageInput
from geoindex.interfaces.outputs.base import Encoded, FileInputs, OutputFormat
from geoindex.interfaces.render import draw_map
from geoindex.retrieval.results import LatLon, SearchResult
from geoindex.sources import TileSource

__all__ = ["FORMAT", "encode_map"]


def encode_map(
    result: SearchResult,
    source: TileSource,
    *,
    image_format: str = "PNG",
    truth: LatLon | None = None,
    photo: ImageInput | None = None,
) -> tuple[bytes, tuple[int, int]]:
    """A map of one result in bytes (:func:`~geoindex.interfaces.render.draw_map`) as a Pillow format, and its size."""
    picture = draw_map(result, source, truth=truth, photo=photo)
    buf = io.BytesIO()
    picture.save(buf, format=image_format)
    return buf.getvalue(), picture.size


def _encode(results: Sequence[SearchResult], inputs: FileInputs) -> Encoded:
    (result,) = results  # per_result: one map per file
    Image.init()
    image_format = Image.registered_extensions()[(inputs.suffix or ".png").lower()]
    data, (width, height) = encode_map(result, inputs.source("map"), image_format=image_format,
                                       truth=inputs.truth(0, result), photo=inputs.photo(0))
    return Encoded(data, f"{width}x{height}")


FORMAT = OutputFormat(
    "map", "the map (PNG)", "image/png", ".png", encode=_encode, per_result=True, needs_imagery=True,
    field="map_png", metavar="PNG", download="-map.png",
    help="draw the answer and its per-level trace (PNG, JPEG or WebP by the file's extension)",
)
