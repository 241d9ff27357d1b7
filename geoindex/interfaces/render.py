"""PNG maps of a search result: per level, the kept tiles coloured by probability over the imagery.

The output format that saves these pictures (``map``) and the registry of every format live in
:mod:`geoindex.interfaces.outputs`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import mercantile
import numpy as np
import numpy.typing as npt
from PIL import Image, ImageDraw, ImageFont

from geoindex.errors import GeoIndexError, TileNotFoundError, TileSourceError
from geoindex.geometry.metrics import circle_points, great_circle_km
from geoindex.geometry.tiles import merc_xy_array, tile_merc_bounds_array
from geoindex.imagery import ImageInput, load_image
from geoindex.retrieval.calibration import EVERYWHERE_KM, describe_radius
from geoindex.retrieval.results import LevelTrace, SearchResult
from geoindex.sources import TileSource

__all__ = ["FailFastSource", "basemap_tile", "colormap", "draw_map"]

log = logging.getLogger(__name__)

LatLon = tuple[float, float]
_RADIUS_COLOURS = ((255, 255, 255), (0, 200, 255))  # the 50 % and 90 % radii


# A perceptual dark-blue -> yellow ramp (viridis, 5 stops), so that no plotting library is needed.
_RAMP = np.array([[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]], dtype=float)


def colormap(w: float) -> tuple[int, int, int]:
    """w in [0, 1] -> an RGB colour of the ramp."""
    pos = min(max(w, 0.0), 1.0) * (len(_RAMP) - 1)
    i = min(int(pos), len(_RAMP) - 2)
    c = _RAMP[i] + (_RAMP[i + 1] - _RAMP[i]) * (pos - i)
    return int(c[0]), int(c[1]), int(c[2])


def _merc(lat: float, lon: float) -> tuple[float, float]:
    """(lat, lon) -> normalised Web-Mercator (fx, fy) in [0, 1], y from the north."""
    fx, fy = merc_xy_array(lat, lon)
    return float(fx), float(fy)


@dataclass(frozen=True)
class _View:
    """A square window of the normalised Mercator plane drawn on ``size`` x ``size`` pixels."""

    fx0: float
    fy0: float
    span: float
    size: int

    @classmethod
    def around(cls, boxes: list[tuple[float, float, float, float]], size: int, margin: float = 0.15) -> _View:
        x0 = min(b[0] for b in boxes)
        y0 = min(b[1] for b in boxes)
        x1 = max(b[2] for b in boxes)
        y1 = max(b[3] for b in boxes)
        span = min(max(x1 - x0, y1 - y0) * (1 + 2 * margin), 1.0)
        cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
        fx0 = min(max(cx - span / 2, 0.0), 1.0 - span)
        fy0 = min(max(cy - span / 2, 0.0), 1.0 - span)
        return cls(fx0, fy0, span, size)

    def px(self, fx: float, fy: float) -> tuple[float, float]:
        return (fx - self.fx0) / self.span * self.size, (fy - self.fy0) / self.span * self.size

    def tile_box(self, t: mercantile.Tile) -> tuple[float, float, float, float]:
        n = float(1 << t.z)
        x0, y0 = self.px(t.x / n, t.y / n)
        x1, y1 = self.px((t.x + 1) / n, (t.y + 1) / n)
        return x0, y0, x1, y1


_NEIGHBOURHOOD = 4  # tiles either side of the path tile that a deeper panel frames


def _tile_norm_box(t: mercantile.Tile) -> tuple[float, float, float, float]:
    x0, y0, x1, y1 = tile_merc_bounds_array(t.x, t.y, zoom=t.z)
    return float(x0), float(y0), float(x1), float(y1)


class FailFastSource:
    """A tile source that stops asking after ``max_failures`` failures in a row.

    A map asks for about 17 tiles and falls back to up to 6 ancestors of each; against a dead
    server every one of those requests would wait out its own retries (minutes in all). After
    the breaker opens, every request fails at once and the map is drawn with what it has.
    """

    def __init__(self, source: TileSource, *, max_failures: int = 2) -> None:
        self.source = source
        self.max_failures = max_failures
        self.failures = 0
        self.last = ""

    @property
    def name(self) -> str:
        return str(getattr(self.source, "name", ""))

    @property
    def broken(self) -> bool:
        return self.failures >= self.max_failures

    def get(self, tile: mercantile.Tile) -> Image.Image:
        if self.broken:
            raise TileSourceError(f"{self.name}: not asked for tile {tuple(tile)} after {self.failures} failures "
                                  f"in a row (last: {self.last})")
        try:
            img = self.source.get(tile)
        except TileSourceError as e:
            self.failures += 1
            self.last = str(e)
            raise
        self.failures = 0
        return img


def basemap_tile(
    source: TileSource, tile: mercantile.Tile, tile_px: int = 256, fallback: int = 6
) -> Image.Image | None:
    """A tile's RGB image, ``tile_px`` square; where the source lacks it, the matching part of an ancestor, upscaled.

    Args:
        source: the imagery.
        tile: the tile wanted.
        tile_px: the side of the returned image in pixels.
        fallback: how many zoom levels up to look for an ancestor when the tile itself is missing
            (an index built at zoom 2, 4, 6 has no zoom-5 tiles: their zoom-4 parents stand in).

    Returns:
        The image, or None when neither the tile nor any of those ancestors can be read.
    """
    for up in range(0, min(fallback, tile.z) + 1):
        anc = mercantile.parent(tile, zoom=tile.z - up) if up else tile
        try:
            img = source.get(anc).convert("RGB")
        except (TileNotFoundError, TileSourceError):
            continue
        if up:
            f = 1 << up
            w, h = img.size
            ox, oy = tile.x - (anc.x << up), tile.y - (anc.y << up)
            img = img.crop((ox * w // f, oy * h // f, (ox + 1) * w // f, (oy + 1) * h // f))
        return img.resize((tile_px, tile_px), Image.Resampling.BILINEAR)
    return None


def _basemap(source: TileSource, view: _View, max_zoom: int) -> Image.Image:
    """The view's area rendered from tiles of the zoom whose pixels best match the panel's."""
    zoom = int(min(max(math.ceil(math.log2(view.size / (256.0 * view.span))), 0), max_zoom))
    n = 1 << zoom
    tile_px = 256
    tx0, ty0 = int(view.fx0 * n), int(view.fy0 * n)
    tx1 = min(int(math.ceil((view.fx0 + view.span) * n)), n)
    ty1 = min(int(math.ceil((view.fy0 + view.span) * n)), n)
    canvas = Image.new("RGB", ((tx1 - tx0) * tile_px, (ty1 - ty0) * tile_px), (90, 90, 90))
    for tx in range(tx0, tx1):
        for ty in range(ty0, ty1):
            img = basemap_tile(source, mercantile.Tile(tx, ty, zoom), tile_px)
            if img is not None:
                canvas.paste(img, ((tx - tx0) * tile_px, (ty - ty0) * tile_px))
    left = (view.fx0 * n - tx0) * tile_px
    top = (view.fy0 * n - ty0) * tile_px
    side = view.span * n * tile_px
    return canvas.resize((view.size, view.size), Image.Resampling.BILINEAR,
                         box=(left, top, left + side, top + side))


def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def _marker(draw: ImageDraw.ImageDraw, xy: tuple[float, float], colour: tuple[int, int, int]) -> None:
    r = 7
    x, y = xy
    draw.ellipse((x - r, y - r, x + r, y + r), outline=(255, 255, 255), width=4)
    draw.ellipse((x - r, y - r, x + r, y + r), outline=colour, width=2)
    draw.line((x - r - 4, y, x + r + 4, y), fill=colour, width=1)
    draw.line((x, y - r - 4, x, y + r + 4), fill=colour, width=1)


def _panel(
    source: TileSource,
    level: LevelTrace,
    view: _View,
    *,
    max_zoom: int,
    next_box: tuple[float, float, float, float] | None,
    points: list[tuple[LatLon, tuple[int, int, int]]],
    path: mercantile.Tile,
    rings: Sequence[tuple[npt.NDArray[np.float64], tuple[int, int, int]]] = (),
) -> Image.Image:
    base = _basemap(source, view, max_zoom).convert("RGBA")
    overlay = Image.new("RGBA", base.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(overlay)
    probs = np.asarray(level.probabilities, dtype=np.float64)
    pmax = float(probs.max()) if probs.size else 1.0
    for t, p in reversed(list(zip(level.tiles, probs, strict=True))):  # best drawn last, on top
        w = float(p) / pmax
        colour = colormap(w)
        draw.rectangle(view.tile_box(t), fill=(*colour, int(50 + 120 * w)), outline=(*colour, 255), width=1)
    if level.tiles and level.tiles[0] != path:
        draw.rectangle(view.tile_box(level.tiles[0]), outline=(255, 150, 0, 255), width=2)
    draw.rectangle(view.tile_box(path), outline=(228, 26, 28, 255), width=3)
    if next_box is not None:
        x0, y0 = view.px(next_box[0], next_box[1])
        x1, y1 = view.px(next_box[2], next_box[3])
        draw.rectangle((x0, y0, x1, y1), outline=(255, 255, 255, 230), width=2)
    for ring, colour in rings:
        fx, fy = merc_xy_array(ring[:, 0], ring[:, 1])
        draw.line([view.px(float(a), float(b)) for a, b in zip(fx, fy)], fill=(*colour, 255), width=2)
    for (lat, lon), colour in points:
        _marker(draw, view.px(*_merc(lat, lon)), colour)
    return Image.alpha_composite(base, overlay).convert("RGB")


def draw_map(
    result: SearchResult,
    source: TileSource,
    *,
    truth: LatLon | None = None,
    photo: ImageInput | None = None,
    panel_size: int = 360,
    max_zoom: int = 18,
    attribution: str | None = None,
) -> Image.Image:
    """A picture of one result: per level, the kept tiles coloured by probability over the imagery.

    Panels run coarse to fine; each shows its level's kept tiles (yellow = most probable,
    the best outlined in red) and, as a white frame, the area the next panel zooms into. The
    prediction is a red marker, the EXIF position (``truth``) a green one. An optional thumbnail
    of the photo comes first.

    Args:
        source: tiles for the background (the index's own imagery or ``RasterSource()``); tiles it
            lacks are drawn from coarser tiles, else left grey.
        truth: the photo's known (lat, lon), drawn and used for the error in the caption.
        photo: the query image, shown as a thumbnail.
        panel_size: side of each panel in pixels.
        max_zoom: the deepest zoom requested from ``source``.

    Returns:
        An RGB ``PIL.Image``.
    """
    levels = [lv for lv in result.trace if lv.tiles and lv.zoom <= result.tile.z]
    # The prediction's ancestor at each level was necessarily kept there (only children of kept
    # tiles are searched), so following it gives panels that zoom into one another.
    paths = [mercantile.parent(result.tile, zoom=lv.zoom) if lv.zoom < result.tile.z else result.tile
             for lv in levels]
    views = []
    for i, lv in enumerate(levels):
        if i == 0:  # the first panel gives the context: every kept tile, and the truth
            boxes = [_tile_norm_box(t) for t in lv.tiles]
            if truth is not None:
                fx, fy = _merc(*truth)
                boxes.append((fx, fy, fx, fy))
        else:  # deeper kept tiles may lie far apart: frame the path tile's neighbourhood
            p = paths[i]
            boxes = [_tile_norm_box(p)] + [_tile_norm_box(t) for t in lv.tiles
                                           if abs(t.x - p.x) <= _NEIGHBOURHOOD and abs(t.y - p.y) <= _NEIGHBOURHOOD]
        views.append(_View.around(boxes, panel_size))
    guarded = source if isinstance(source, FailFastSource) else FailFastSource(source)
    source = guarded
    predicted = ((result.lat, result.lon), (228, 26, 28))
    rings = [(circle_points(result.lat, result.lon, r), colour)  # the uncertainty radii; "anywhere" is not drawn
             for r, colour in zip(result.radius_km, _RADIUS_COLOURS, strict=True) if r < EVERYWHERE_KM]
    marks = [predicted] + ([(truth, (77, 175, 74))] if truth is not None else [])
    panels = []
    for i, (lv, view) in enumerate(zip(levels, views, strict=True)):
        nxt = views[i + 1] if i + 1 < len(views) else None
        next_box = (nxt.fx0, nxt.fy0, nxt.fx0 + nxt.span, nxt.fy0 + nxt.span) if nxt else None
        panels.append(_panel(source, lv, view, max_zoom=max_zoom,
                             next_box=next_box, points=marks, path=paths[i], rings=rings))
    if guarded.broken:
        log.warning("the map's imagery %s failed %d times in a row and was not asked again (last: %s); tiles it "
                    "did not give are grey. Check the server or choose other imagery (--map-source)",
                    guarded.name, guarded.failures, guarded.last)
    return _compose(result, levels, panels, truth=truth, photo=photo, panel_size=panel_size,
                    attribution=attribution or guarded.name)


def _compose(
    result: SearchResult,
    levels: list[LevelTrace],
    panels: list[Image.Image],
    *,
    truth: LatLon | None,
    photo: ImageInput | None,
    panel_size: int,
    attribution: str,
) -> Image.Image:
    gap, header, caption, footer = 8, 54, 36, 22
    thumb = None
    if photo is not None:
        try:
            thumb = load_image(photo, max_side=panel_size)
        except GeoIndexError as e:  # the map is still useful without the thumbnail
            log.warning("no thumbnail in the map: %s", e)
    cols = len(panels) + (thumb is not None)
    width = gap + cols * (panel_size + gap)
    height = header + panel_size + caption + footer
    out = Image.new("RGB", (width, height), (24, 24, 28))
    draw = ImageDraw.Draw(out)
    big, small = _font(16), _font(12)
    p = result.candidates[0].probability
    t = result.tile
    r50, r90 = result.radius_km
    title = (f"{result.image or 'photo'}: {result.lat:.5f}, {result.lon:.5f}  tile {t.z}/{t.x}/{t.y}  "
             f"score {result.score:.3f}  p {p:.2f}{'' if result.calibrated else ' (uncalibrated)'}  "
             f"radius 50 %: {describe_radius(r50)}, 90 %: {describe_radius(r90)}")
    if result.confident is False:
        title = "NO CONFIDENT MATCH  " + title
    draw.text((gap, 8), title, fill=(255, 120, 100) if result.confident is False else (240, 240, 240), font=big)
    sub = "red: prediction and its tile at each zoom; white / blue circle: 50 % / 90 % radius"
    if truth is not None:
        err = float(great_circle_km(truth[0], truth[1], result.lat, result.lon))
        sub += f"   green: EXIF GPS {truth[0]:.5f}, {truth[1]:.5f} ({err:,.1f} km away)"
    sub += "   tiles: kept per level, yellow = most probable, orange = level's best   white frame: next panel"
    draw.text((gap, 30), sub, fill=(190, 190, 190), font=small)
    x = gap
    if thumb is not None:
        out.paste(thumb, (x + (panel_size - thumb.width) // 2, header + (panel_size - thumb.height) // 2))
        draw.text((x, header + panel_size + 6), "query photo", fill=(220, 220, 220), font=small)
        x += panel_size + gap
    for lv, panel in zip(levels, panels, strict=True):
        out.paste(panel, (x, header))
        lo, hi = min(lv.scores), max(lv.scores)
        draw.text((x, header + panel_size + 6), f"zoom {lv.zoom}: {len(lv.tiles)} kept tiles",
                  fill=(220, 220, 220), font=small)
        draw.text((x, header + panel_size + 20), f"scores {lo:.3f} .. {hi:.3f}",
                  fill=(170, 170, 170), font=small)
        x += panel_size + gap
    draw.text((gap, height - footer + 4), f"imagery: {attribution}", fill=(150, 150, 150), font=small)
    return out
