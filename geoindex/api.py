"""The public entry points: open an index and geolocate photos, or run the paper's on-the-fly search."""

from __future__ import annotations

import dataclasses
import os
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal, cast, overload

import numpy as np
import numpy.typing as npt
import torch

from geoindex.errors import ConfigError, EncoderMismatchError, GeoIndexError, ImageError
from geoindex.exif import read_gps
from geoindex.geometry.coverage import Coverage
from geoindex.geometry.tiles import LevelSchedule
from geoindex.imagery import ImageInput, load_image, read_image_bytes
from geoindex.models.encoders import ImageEncoder, create_encoder, load_map_encoder
from geoindex.retrieval.beam import PriorMode, PriorOptions, TilePrior, beam_search, beam_width
from geoindex.retrieval.calibration import Calibration, ood_scores, read_embeddings
from geoindex.retrieval.levels import Level
from geoindex.retrieval.levels.device import TorchLevel
from geoindex.retrieval.levels.lazy import LazyLevel, open_lazy_levels
from geoindex.retrieval.levels.onthefly import OnTheFlyLevel
from geoindex.retrieval.levels.stored import FaissLevel
from geoindex.retrieval.prior import GeoCLIPPrior, get_prior
from geoindex.retrieval.results import SearchResult, make_results
from geoindex.sources import TileSource
from geoindex.storage.manifest import DEFAULT_INDEX, INDEX_ENV, Manifest, short_id
from geoindex.storage.store import StoredLevel, level_embeddings, open_store

__all__ = ["DEFAULT_INDEX", "GeoIndex", "OnTheFlySearcher", "RegionSearcher", "open_index", "search"]

OnError = Literal["raise", "return"]


def _name(image: ImageInput) -> str | None:
    return os.fspath(image) if isinstance(image, (str, os.PathLike)) else None


def _with_exif(result: SearchResult, image: Any) -> SearchResult:
    """``result`` with the EXIF GPS position of the photo's decoded image (``load_image`` keeps the EXIF
    block; an array's image has none) or of the bytes the encoder decoded, so the file is not opened a
    second time."""
    gps = read_gps(image)  # never raises for an opened image: a bad EXIF block means "no position"
    return dataclasses.replace(result, exif=gps) if gps is not None else result


class _Searcher:
    """Embeds photos with the photo encoder and runs the beam search over ``self.levels``."""

    photo_encoder: ImageEncoder
    levels: Sequence[Level]
    calibration: Calibration | None = None  # the index's (manifest), else uncalibrated probabilities
    ood_reference: npt.NDArray[np.float16] | None = None  # the calibration queries' embeddings (m, d)

    def embed(self, images: Sequence[ImageInput], *, batch_size: int = 64) -> npt.NDArray[np.float32]:
        """Photo embeddings (n, d) float32, L2-normalised."""
        return self.photo_encoder.encode(images, batch_size=batch_size)

    def search_embeddings(
        self,
        xq: npt.ArrayLike,
        k: int = 64,
        *,
        top_n: int = 5,
        names: Sequence[str | None] | None = None,
        prior: TilePrior | None = None,
        prior_options: PriorOptions | None = None,
    ) -> list[SearchResult]:
        """Beam search for precomputed photo embeddings ``xq`` (n, d); one result per row.

        ``prior`` is a belief for the same n photos (``GeoCLIPPrior.predict`` or ``.belief``).
        """
        xq = np.atleast_2d(np.asarray(xq, dtype=np.float32))
        if xq.shape[1] != self.photo_encoder.dim:
            raise ConfigError(f"query embeddings have dimension {xq.shape[1]}, the index has {self.photo_encoder.dim}")
        hits = beam_search(xq, self.levels, k, prior=prior, prior_options=prior_options)
        # rerank replaces the cosines by combined scores, on which the calibration was not fitted
        calibration = self.calibration if prior_options is None or prior_options.mode != "rerank" else None
        scores = None
        if calibration is not None and self.ood_reference is not None:
            scores = ood_scores(xq, self.ood_reference, neighbours=calibration.ood_neighbours).tolist()
        return make_results(hits, top_n=top_n, names=names, calibration=calibration, ood_scores=scores)

    @overload
    def search(
        self, images: ImageInput, k: int = 64, *, top_n: int = 5, on_error: Literal["raise"] = "raise",
        prior: str | GeoCLIPPrior | None = None, prior_mode: PriorMode = "inject", prior_weight: float = 0.5,
        read_exif: bool = True,
    ) -> SearchResult: ...

    @overload
    def search(
        self, images: list[Any] | tuple[Any, ...], k: int = 64, *, top_n: int = 5,
        on_error: Literal["raise"] = "raise", prior: str | GeoCLIPPrior | None = None,
        prior_mode: PriorMode = "inject", prior_weight: float = 0.5,
        read_exif: bool = True,
    ) -> list[SearchResult]: ...

    @overload
    def search(
        self, images: ImageInput, k: int = 64, *, top_n: int = 5, on_error: OnError,
        prior: str | GeoCLIPPrior | None = None, prior_mode: PriorMode = "inject", prior_weight: float = 0.5,
        read_exif: bool = True,
    ) -> SearchResult | GeoIndexError: ...

    @overload
    def search(
        self, images: list[Any] | tuple[Any, ...], k: int = 64, *, top_n: int = 5,
        on_error: OnError, prior: str | GeoCLIPPrior | None = None, prior_mode: PriorMode = "inject",
        prior_weight: float = 0.5, read_exif: bool = True,
    ) -> list[SearchResult | GeoIndexError]: ...

    def search(
        self,
        images: ImageInput | Sequence[ImageInput],
        k: int = 64,
        *,
        top_n: int = 5,
        on_error: OnError = "raise",
        prior: str | GeoCLIPPrior | None = None,
        prior_mode: PriorMode = "inject",
        prior_weight: float = 0.5,
        read_exif: bool = True,
    ) -> SearchResult | GeoIndexError | list[SearchResult] | list[SearchResult | GeoIndexError]:
        """Geolocate one photo, or a batch: one encoder batch, then one FAISS call per level.

        As :func:`geoindex.search`: one image in, one result out; a list (or tuple) in, a list out.

        Args:
            images: one image, or a list or tuple of them (paths, bytes, PIL images, HxWxC uint8 arrays).
            k: beam width, as in the paper: tiles kept per level (each level scores up to
                16 * k children).
            top_n: final candidates reported per photo.
            on_error: ``raise`` the first unreadable image's ImageError, or ``return`` it in that
                image's place so that the rest of the batch is still answered.
            prior: ``"geoclip"`` or a loaded ``GeoCLIPPrior``: GeoCLIP's belief joins the search.
            prior_mode, prior_weight: how (:class:`geoindex.retrieval.beam.PriorOptions`).
            read_exif: read each photo's EXIF GPS into ``SearchResult.exif`` (paths, bytes and PIL
                images; arrays have none), so that ``error_km`` says how far the answer is.

        Returns:
            For one image its SearchResult; for a list, one SearchResult per image, in order. With
            ``on_error="return"`` an unreadable image's ImageError stands in place of its result.
        """
        k = beam_width(k)  # before decoding any photo; checked once per call
        options = PriorOptions(prior_mode, prior_weight) if prior is not None else None
        loaded = get_prior(prior) if prior is not None else None
        batch = cast(list[ImageInput], [images] if not isinstance(images, (list, tuple)) else list(images))
        # decoded once: the prior and the EXIF position read the same PIL images as the encoder
        batch_in, pixels = self._preprocess(batch, on_error, decode=loaded is not None or read_exif,
                                            prior=loaded is not None)
        good = [i for i, p in enumerate(pixels) if isinstance(p, torch.Tensor)]
        out: list[SearchResult | GeoIndexError | None] = [
            p if isinstance(p, GeoIndexError) else None for p in pixels
        ]
        if good:
            xq = self.photo_encoder.encode_tensor(torch.stack([pixels[i] for i in good]))  # type: ignore[misc]
            belief = loaded.predict([cast(ImageInput, batch_in[i]) for i in good]) if loaded is not None else None
            results = self.search_embeddings(xq, k, top_n=top_n, names=[_name(batch[i]) for i in good],
                                             prior=belief, prior_options=options)
            for i, r in zip(good, results):
                out[i] = _with_exif(r, batch_in[i]) if read_exif else r
        return out if isinstance(images, (list, tuple)) else out[0]  # type: ignore[return-value]  # all filled

    def _preprocess(
        self, batch: list[ImageInput], on_error: OnError, *, decode: bool, prior: bool = False
    ) -> tuple[list[ImageInput | GeoIndexError], list[torch.Tensor | GeoIndexError]]:
        """Each image as the encoder's input, or the error that made it unreadable (``on_error="raise"``:
        raised). ``decode``: open them first (for the prior and the EXIF position) and return those;
        where the encoder decodes JPEGs on its device and no ``prior`` needs PIL images, files are
        only read (their bytes carry the EXIF block) and the device decodes them."""
        def attempt(step: Callable[[Any], Any], item: Any) -> Any:
            if isinstance(item, GeoIndexError):
                return item
            try:
                return step(item)
            except GeoIndexError as e:
                if on_error == "raise":
                    raise
                return e

        if decode and not prior and self.photo_encoder.decodes_jpeg_on_device:
            batch_in = [attempt(read_image_bytes if isinstance(image, (str, os.PathLike, bytes)) else load_image, image)
                        for image in batch]
        else:
            batch_in = [attempt(load_image, image) for image in batch] if decode else list(batch)
        def prepare(pair: tuple[Any, str | None]) -> torch.Tensor:
            item, name = pair
            try:
                return self.photo_encoder.preprocess_images([item])[0]
            except ImageError as e:  # bytes read from a file above: name the file
                if name is None or not isinstance(item, bytes):
                    raise
                raise ImageError(f"{name}: {e}") from e

        pixels = [attempt(prepare, (item, _name(image))) if not isinstance(item, GeoIndexError) else item
                  for item, image in zip(batch_in, batch)]
        return batch_in, pixels


class GeoIndex(_Searcher):
    """An index opened for search: manifest checked, FAISS files memory-mapped, photo encoder loaded.

    Thread-safe for concurrent searches. Use :func:`open_index` to create one. Lazy levels
    (``geoindex.retrieval.levels.lazy``) follow the built ones: ``lazy_source`` overrides the tile source named in
    ``lazy.json``; ``read_only`` never writes to the index (missing tiles are then encoded on the
    fly, and each result's trace says so); ``retry_missing`` asks the source again for tiles it
    lacked before (else that happens after lazy.json's ``retry_missing_after_s``).

    ``search_backend``: ``faiss`` searches the levels with FAISS on the CPU; ``torch`` holds each
    level's embeddings as a tensor on ``device`` and scores the kept tiles' children with one batched
    matmul per level (fp16 and flat codecs; the same tiles and scores); ``faiss-gpu`` searches the
    kept tiles' children with ``faiss.knn_gpu`` where faiss has GPU support (the ``gpu`` extra), else
    runs the torch search, and each result's trace says which ran; ``auto``: torch when ``device`` is
    a GPU and the codec allows, else FAISS.
    """

    def __init__(self, path: str | os.PathLike, *, weights: str | os.PathLike | None = None,
                 download: bool = False, device: str = "cpu", verify: bool | None = None,
                 precision: str = "auto", lazy_source: TileSource | None = None,
                 read_only: bool = False, resident: bool | str = "auto", retry_missing: bool = False,
                 search_backend: str = "auto") -> None:
        self.path = Path(path)
        self.manifest: Manifest
        self.stored: list[StoredLevel]
        self.manifest, self.stored = open_store(self.path, verify=verify, resident=resident)
        self.calibration = self.manifest.calibration
        if self.calibration is not None:
            self.ood_reference = read_embeddings(self.path, self.calibration, dim=self.manifest.dim)
        spec = self.manifest.photo_encoder
        self.photo_encoder = create_encoder(spec.name, weights=weights, download=download, device=device,
                                            precision=precision)
        if self.photo_encoder.base_fingerprint != spec.base_fingerprint:
            raise EncoderMismatchError(
                f"{self.path}: built for photo encoder {spec.name!r} with weights {spec.short}, but the loaded "
                f"weights are {short_id(self.photo_encoder.identity)}; pass the weights the index was built with"
            )
        self.search_backend = _search_backend(search_backend, device, self.manifest.codec)
        self.device = device
        faiss_levels = [self.level(s) for s in self.stored]
        # Deep levels declared lazy (lazy.json) are encoded on first use and appended to the index.
        self.lazy: list[LazyLevel] = open_lazy_levels(self.path, self.manifest, self.photo_encoder,
                                                      faiss_levels[-1].tiles, source=lazy_source,
                                                      writable=not read_only, retry_missing=retry_missing)
        self.levels = [*faiss_levels, *self.lazy]

    @property
    def zooms(self) -> tuple[int, ...]:
        return tuple(s.zoom for s in self.stored)

    def level(self, stored: StoredLevel, allowed: npt.NDArray[np.bool_] | None = None) -> FaissLevel:
        """The searcher of one stored level on this index's backend (``allowed``: a region's rows)."""
        if self.search_backend in ("torch", "faiss-gpu"):
            emb, parent_row = level_embeddings(self.path, stored.zoom, opened=stored)
            return TorchLevel(stored, emb, parent_row, device=self.device, allowed=allowed,
                              faiss_gpu=self.search_backend == "faiss-gpu")
        return FaissLevel(stored, allowed=allowed)

    def within(self, region: Coverage) -> RegionSearcher:
        """This index restricted, at query time, to the tiles that meet ``region`` (bbox or polygons).

        The result searches exactly as this index would if it held only those tiles.
        """
        return RegionSearcher(self, region)

    def __repr__(self) -> str:
        rows = ", ".join([f"z{s.zoom}: {s.rows}" for s in self.stored] + [f"z{lv.zoom}: lazy" for lv in self.lazy])
        return f"GeoIndex({str(self.path)!r}, encoder={self.manifest.photo_encoder.name!r}, rows={{{rows}}})"


class RegionSearcher(_Searcher):
    """A GeoIndex seen through a region: each level returns only rows whose tile meets the region.

    Raises:
        ConfigError: no tile of the first level meets the region.
    """

    def __init__(self, index: GeoIndex, region: Coverage) -> None:
        self.index = index
        self.region = region
        self.photo_encoder = index.photo_encoder
        self.calibration = index.calibration
        self.ood_reference = index.ood_reference
        masks = [region.intersects(s.x, s.y, zoom=s.zoom) for s in index.stored]
        if not masks[0].any():
            raise ConfigError(
                f"the region (bboxes {[list(b) for b in region.bboxes]}, {len(region.polygons)} polygons) "
                f"contains no tile of the index {index.path}; "
                "check the --bbox W S E N order or the index's coverage"
            )
        self.levels = [index.level(s, m) for s, m in zip(index.stored, masks, strict=True)]
        self.tiles_per_level = {s.zoom: int(m.sum()) for s, m in zip(index.stored, masks, strict=True)}


SEARCH_BACKENDS = ("auto", "faiss", "torch", "faiss-gpu")
_TORCH_CODECS = ("fp16", "flat")  # codecs whose FAISS scores are plain float inner products of the stored rows


def _search_backend(backend: str, device: str, codec: str) -> str:
    """What ``search_backend`` means for this device and codec (see :class:`GeoIndex`)."""
    if backend not in SEARCH_BACKENDS:
        raise ConfigError(f"unknown search_backend {backend!r}; choose one of {', '.join(SEARCH_BACKENDS)}")
    if backend == "auto":
        return "torch" if torch.device(device).type == "cuda" and codec in _TORCH_CODECS else "faiss"
    if backend in ("torch", "faiss-gpu") and codec not in _TORCH_CODECS:
        raise ConfigError(f"search_backend {backend!r} needs an index of codec {' or '.join(_TORCH_CODECS)}; this one "
                          f"is {codec!r}: use search_backend='faiss'")
    return backend


def open_index(path: str | os.PathLike | None = None, **kwargs: object) -> GeoIndex:
    """Open an index directory (default: ``$GEOINDEX_INDEX``, else ``indexes/default``).

    Keyword arguments go to :class:`GeoIndex`: ``weights``, ``download``, ``device``, ``verify``,
    ``resident`` (FAISS files read into RAM: ``auto`` = the upper levels that fit, True, False),
    ``precision`` (the photo encoder's arithmetic; ``auto``: fp16 on CUDA, fp32 on CPUs, see
    ``encoders.resolve_precision``; any precision searches an index built at another).
    """
    return GeoIndex(path or os.environ.get(INDEX_ENV) or DEFAULT_INDEX, **kwargs)  # type: ignore[arg-type]


_opened: dict[Path, GeoIndex] = {}
_opened_lock = threading.Lock()


@overload
def search(
    image: ImageInput, k: int = 64, *, index: str | os.PathLike | GeoIndex | None = None, top_n: int = 5,
    prior: str | GeoCLIPPrior | None = None, prior_mode: PriorMode = "inject", prior_weight: float = 0.5,
    read_exif: bool = True,
) -> SearchResult: ...


@overload
def search(
    image: list[ImageInput] | tuple[ImageInput, ...], k: int = 64, *,
    index: str | os.PathLike | GeoIndex | None = None, top_n: int = 5,
    prior: str | GeoCLIPPrior | None = None, prior_mode: PriorMode = "inject", prior_weight: float = 0.5,
    read_exif: bool = True,
) -> list[SearchResult]: ...


def search(
    image: ImageInput | Sequence[ImageInput],
    k: int = 64,
    *,
    index: str | os.PathLike | GeoIndex | None = None,
    top_n: int = 5,
    prior: str | GeoCLIPPrior | None = None,
    prior_mode: PriorMode = "inject",
    prior_weight: float = 0.5,
    read_exif: bool = True,
) -> SearchResult | list[SearchResult]:
    """Geolocate one photo (or a list of photos) by hierarchical retrieval over a map-tile index.

    Args:
        image: a path, bytes, PIL image or HxWxC uint8 array; or a list of them.
        k: beam width, as in the paper: the number of tiles kept at each zoom level. Each
            deeper level scores only the 16 children of each kept tile (up to 16 * k), so cost
            grows linearly with k and recall with it. Must be in 1..2048.
        index: an opened GeoIndex or an index directory; default ``$GEOINDEX_INDEX``, else
            ``indexes/default``. Directories are opened once and cached.
        top_n: number of final candidates to report.
        prior: ``"geoclip"`` (needs ``pip install -e '.[geoclip]'`` in the checkout and a local CLIP ViT-L/14,
            see ``geoindex.retrieval.prior.load_geoclip_prior``) or a loaded ``GeoCLIPPrior``: GeoCLIP's
            belief about the photo's location joins the search. None: retrieval only.
        prior_mode: ``inject`` (the paper's Table 3: the tile holding GeoCLIP's top-1 location
            joins the k kept tiles at every level, so up to k + 1 descend) or ``rerank`` (each
            level ranks its candidates by ``(1 - w) * score + w * 0.01 * log(mass + 1e-6)``,
            ``mass`` = GeoCLIP's probability of the tile's area; scores in the result are then
            these combined scores). See ``geoindex.retrieval.beam.PriorOptions``.
        prior_weight: ``w`` of ``rerank`` in [0, 1]; 0 equals no prior. Untuned default 0.5.
        read_exif: read the photo's EXIF GPS position into ``exif`` (see Returns).

    Returns:
        A SearchResult (a list of them for a list input) with fields:
        ``lat``, ``lon`` (centre of the best final tile, degrees), ``tile`` (z, x, y),
        ``bbox`` (west, south, east, north), ``score`` (cosine similarity), ``candidates``
        (top-n final tiles with ``probability``: calibrated where the index is, else a softmax
        over the final scores), ``calibrated``, ``radius_km`` (50 % and 90 % radii),
        ``confident`` and ``reason`` ("no confident match"), ``trace``
        (per level: the kept tiles and their scores), ``image`` (the path, if any), ``exif``
        (the photo's own GPS position, if it has one) and, derived as in the JSON output,
        ``probability``, ``areas``, ``area_probability``, ``error_km`` and ``inside_radius``.

    Raises:
        ImageError: an image cannot be read. IndexNotFoundError / IndexFormatError: no usable
        index. EncoderMismatchError: the index was built for other encoder weights.
        ConfigError: k or top_n out of range, an unknown prior or mode, or the geoclip package
        is missing. WeightsNotFoundError: ``prior="geoclip"`` without a local ViT-L/14.
    """
    k = beam_width(k)  # the one check of this call: before opening anything
    if prior is not None:
        PriorOptions(prior_mode, prior_weight)  # fail on bad options before loading anything
    if isinstance(index, GeoIndex):
        opened = index
    else:
        key = Path(index or os.environ.get(INDEX_ENV) or DEFAULT_INDEX).resolve()
        with _opened_lock:
            if key not in _opened:
                _opened[key] = GeoIndex(key)
            opened = _opened[key]
    # one image or a list: the method's overloads say which comes back, as this function's do
    return opened.search(cast(Any, image), k, top_n=top_n, on_error="raise", prior=prior, prior_mode=prior_mode,
                         prior_weight=prior_weight, read_exif=read_exif)


KeepFn = Callable[[np.ndarray, np.ndarray], np.ndarray]


def _at_zoom(keep: Callable[[np.ndarray, np.ndarray, int], np.ndarray], zoom: int) -> KeepFn:
    """A coverage filter (x, y, zoom) -> bool bound to one zoom."""
    return lambda x, y: keep(x, y, zoom)


class OnTheFlySearcher(_Searcher):
    """The paper's inference: the same beam search, encoding candidate tiles at query time.

    With the same encoders, imagery and coverage it returns the tiles an fp16 index returns.

    Args:
        source: the tile source to encode from.
        photo_encoder: the photo encoder.
        map_encoders: zoom -> map encoder; a missing zoom uses ``photo_encoder`` (untrained).
        schedule: the zoom levels.
        first_tiles: (x, y) arrays of the first level's candidate tiles; default all tiles.
        keep: optional coverage filter (x, y, zoom) -> bool array for later levels.
    """

    def __init__(
        self,
        source: TileSource,
        photo_encoder: ImageEncoder,
        *,
        map_encoders: dict[int, ImageEncoder] | None = None,
        schedule: LevelSchedule = LevelSchedule(),
        first_tiles: tuple[np.ndarray, np.ndarray] | None = None,
        keep: Callable[[np.ndarray, np.ndarray, int], np.ndarray] | None = None,
        round_to: type[np.floating] | None = np.float16,
        batch_size: int = 64,
    ) -> None:
        self.photo_encoder = photo_encoder
        map_encoders = map_encoders or {}
        if first_tiles is None:
            side = np.arange(1 << schedule.start, dtype=np.int64)
            gx, gy = np.meshgrid(side, side, indexing="ij")
            first_tiles = (gx.ravel(), gy.ravel())
        self.levels = [
            OnTheFlyLevel(
                z,
                map_encoders.get(z, photo_encoder),
                source,
                step=schedule.step,
                first_tiles=first_tiles if i == 0 else None,
                keep=_at_zoom(keep, z) if keep is not None else None,
                round_to=round_to,
                batch_size=batch_size,
            )
            for i, z in enumerate(schedule.zooms)
        ]

    @property
    def tiles_encoded(self) -> int:
        """Tiles encoded so far, over all levels and queries."""
        return sum(lv.tiles_encoded for lv in self.levels)

    @classmethod
    def for_index(cls, index: GeoIndex, source: TileSource, **kwargs: object) -> OnTheFlySearcher:
        """An on-the-fly searcher over exactly an index's tiles, encoders and schedule.

        Tiles are encoded at the precision and with the preprocessing each level was built with, so
        that the two searches agree.
        """
        first = index.stored[0]
        map_encoders = {}
        for level in index.manifest.levels:
            recorded = level.encoder
            encoder = load_map_encoder(index.photo_encoder, recorded.checkpoint if recorded else None)
            map_encoders[level.zoom] = encoder.with_precision(
                (recorded.precision if recorded else None) or "fp32",
                preprocessing=(recorded.preprocessing if recorded else None) or "pil")
        zooms = index.zooms
        schedule = LevelSchedule(zooms[0], zooms[-1], index.manifest.schedule.step)
        rows = {s.zoom: set(zip(s.x.tolist(), s.y.tolist())) for s in index.stored}

        def keep(x: np.ndarray, y: np.ndarray, zoom: int) -> np.ndarray:
            have = rows[zoom]
            return np.fromiter(((a, b) in have for a, b in zip(x.ravel().tolist(), y.ravel().tolist())),
                               dtype=bool, count=x.size).reshape(x.shape)

        searcher = cls(source, index.photo_encoder, map_encoders=map_encoders, schedule=schedule,
                       first_tiles=(first.x.astype(np.int64), first.y.astype(np.int64)), keep=keep,
                       **kwargs)  # type: ignore[arg-type]
        searcher.calibration = index.calibration  # the same scores, so the same calibration
        searcher.ood_reference = index.ood_reference
        return searcher
