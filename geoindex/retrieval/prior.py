"""GeoCLIP (Vivanco et al., NeurIPS 2023) as a location prior for the beam search: photo -> belief over GPS points.

GeoCLIP embeds a photo (frozen CLIP ViT-L/14 image tower + a small MLP head) and a GPS point
(random-Fourier-feature location encoder) into one space; a softmax over its gallery of 100k GPS
points is its belief about where the photo was taken. The paper attaches it at inference (its
Table 3): at each level the tile holding GeoCLIP's top-1 point joins the kept tiles. The search
side of that lives in :mod:`geoindex.retrieval.beam` (``PriorOptions``, ``beam_search(prior=...)``); this
module turns photos into a :class:`GalleryBelief`, which answers the two questions the search asks:
the tile of the top-1 point at a zoom, and the probability mass inside given tiles.

The ``geoclip`` package (``pip install -e '.[geoclip]'`` in the checkout) is imported only when a prior is
loaded. It ships the head, the location encoder and the gallery; the ViT-L/14 backbone comes from
a local Hugging Face folder, the local hub cache, or a download that must be asked for. The
gallery's location embeddings are slow to compute on a CPU (GeoCLIP's own ``predict`` recomputes
them on every call); they are computed once and kept on disk.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from PIL import Image

from geoindex.errors import ConfigError, WeightsNotFoundError
from geoindex.files import CACHE_ENV, atomic_path, default_cache_dir
from geoindex.geometry.tiles import tile_code_array, tile_of_array
from geoindex.imagery import ImageInput, load_image

__all__ = [
    "BACKBONE_ENV",
    "BACKBONE_REPO",
    "CACHE_ENV",
    "FEATURE_DIM",
    "INPUT_SIZE",
    "PRIORS",
    "GalleryBelief",
    "GeoCLIPPrior",
    "GpsGallery",
    "get_prior",
    "load_geoclip_prior",
    "shipped_gallery",
]

log = logging.getLogger(__name__)

BACKBONE_REPO = "openai/clip-vit-large-patch14"  # what GeoCLIP's ImageEncoder loads by default
BACKBONE_ENV = "GEOINDEX_GEOCLIP_BACKBONE"
FEATURE_DIM = 768  # ViT-L/14's projected image feature: the input of GeoCLIP's head
INPUT_SIZE = 224  # ViT-L/14's input side
INSTALL_HINT = "pip install -e '.[geoclip]' in the geoindex checkout"
_GALLERY_BATCH = 10_000

Backbone = Callable[[torch.Tensor], torch.Tensor]


def _geoclip() -> Any:
    """The geoclip package, imported on first use; ConfigError naming the extra when it is missing."""
    try:
        import geoclip
        import geoclip.model.misc
    except ImportError as e:
        raise ConfigError(
            f"the GeoCLIP prior needs the optional package geoclip: {INSTALL_HINT} "
            f"(geoclip 1.3 needs Python >= 3.11); import failed: {e}"
        ) from e
    return geoclip


def _geoclip_file(*parts: str) -> Path:
    return Path(_geoclip().model.misc.file_dir).joinpath(*parts)


# ------------------------------------------------------------------------------------ gallery


@dataclass(frozen=True, eq=False)
class GpsGallery:
    """GPS points a belief is defined over: lat, lon (G,) float64 degrees.

    Tile lookups sort the points' tile codes once per zoom and reuse them for every query.
    """

    lat: npt.NDArray[np.float64]
    lon: npt.NDArray[np.float64]
    _codes: dict[int, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        lat = np.asarray(self.lat, dtype=np.float64)
        lon = np.asarray(self.lon, dtype=np.float64)
        if lat.ndim != 1 or lat.shape != lon.shape or not len(lat):
            raise ConfigError(f"a GPS gallery needs equal-length 1-d lat/lon, got {lat.shape} and {lon.shape}")
        if not (np.isfinite(lat).all() and np.isfinite(lon).all() and (np.abs(lat) <= 90).all()):
            raise ConfigError("a GPS gallery needs finite latitudes in [-90, 90] and finite longitudes")
        object.__setattr__(self, "lat", lat)
        object.__setattr__(self, "lon", lon)

    def __len__(self) -> int:
        return len(self.lat)

    def sorted_codes(self, zoom: int) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
        """(order, codes): gallery indices sorted by tile code ``y << zoom | x``, and those codes."""
        hit = self._codes.get(zoom)
        if hit is None:
            x, y = tile_of_array(self.lat, self.lon, zoom=zoom)
            codes = tile_code_array(x, y, zoom=zoom)
            order = np.argsort(codes, kind="stable")
            hit = self._codes[zoom] = (order, codes[order])  # benign race: both threads store the same
        return hit


def shipped_gallery() -> tuple[torch.Tensor, GpsGallery]:
    """GeoCLIP's own 100k-point gallery: a float32 (G, 2) tensor (what its encoder sees) and a GpsGallery."""
    gps = _geoclip().model.misc.load_gps_data(str(_geoclip_file("gps_gallery", "coordinates_100K.csv")))
    gps = gps.to(torch.float32)
    return gps, GpsGallery(gps[:, 0].double().numpy(), gps[:, 1].double().numpy())


@dataclass(frozen=True, eq=False)
class GalleryBelief:
    """GeoCLIP's belief for a batch of n photos: probabilities (n, G) float32 over ``gallery``'s points.

    Implements the ``TilePrior`` protocol of :mod:`geoindex.retrieval.beam`.
    """

    gallery: GpsGallery
    prob: npt.NDArray[np.float32]

    def __post_init__(self) -> None:
        if self.prob.ndim != 2 or self.prob.shape[1] != len(self.gallery):
            raise ConfigError(f"belief has shape {self.prob.shape}, expected (n, {len(self.gallery)})")

    def __len__(self) -> int:
        return self.prob.shape[0]

    def __getitem__(self, rows: slice | npt.NDArray[np.int64] | Sequence[int]) -> GalleryBelief:
        """The belief of some photos (a slice or row indices), e.g. one query batch of an evaluation."""
        return GalleryBelief(self.gallery, np.atleast_2d(self.prob[rows]))

    def top_location(self) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
        """GeoCLIP's own answer per photo: the most probable gallery point, (lat (n,), lon (n,))."""
        best = np.argmax(self.prob, axis=1)
        return self.gallery.lat[best], self.gallery.lon[best]

    def top_tile(self, *, zoom: int) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
        """The tile at ``zoom`` holding each photo's top-1 point: (x (n,), y (n,)) int64."""
        lat, lon = self.top_location()
        return tile_of_array(lat, lon, zoom=zoom)

    def tile_mass(
        self, x: npt.NDArray[np.int64], y: npt.NDArray[np.int64], *, zoom: int
    ) -> npt.NDArray[np.float64]:
        """Probability that each photo was taken inside tile (x, y): sum over gallery points in it.

        Args:
            x, y: tiles per photo, (n, m) int64; -1 (no tile) gets mass 0.

        Returns:
            (n, m) float64 in [0, 1].
        """
        x = np.asarray(x, dtype=np.int64)
        y = np.asarray(y, dtype=np.int64)
        if x.shape != y.shape or x.ndim != 2 or x.shape[0] != len(self):
            raise ConfigError(f"tile_mass needs (n={len(self)}, m) tile arrays, got {x.shape} and {y.shape}")
        order, codes = self.gallery.sorted_codes(zoom)
        query = np.where(x >= 0, tile_code_array(x, y, zoom=zoom), -1)
        start = np.searchsorted(codes, query, side="left")
        end = np.searchsorted(codes, query, side="right")
        # Prefix sums over the points in tile order: a tile's mass is one difference.
        cum = np.zeros((len(self), len(order) + 1), dtype=np.float64)
        np.cumsum(self.prob[:, order], axis=1, out=cum[:, 1:])
        rows = np.arange(len(self))[:, None]
        mass = cum[rows, end] - cum[rows, start]
        return np.clip(mass, 0.0, 1.0)


# ------------------------------------------------------------------------------------ the prior


class GeoCLIPPrior:
    """GeoCLIP's inference with its gallery embeddings computed once: photos -> :class:`GalleryBelief`.

    Use :func:`load_geoclip_prior` to create one; the constructor only stores its parts.
    Thread-safe for concurrent ``predict`` calls.

    Args:
        backbone: pixels (n, 3, 224, 224) float32 -> features (n, 768): CLIP ViT-L/14's projected
            image features (``CLIPModel.get_image_features``), or a stand-in of that shape.
        head: GeoCLIP's image MLP, 768 -> 512.
        location_encoder: GeoCLIP's location encoder, (G, 2) lat/lon -> (G, 512).
        logit_scale: log of GeoCLIP's logit scale (its ``logit_scale`` parameter).
        gps: the gallery as GeoCLIP's encoder sees it, (G, 2) float32 degrees.
        preprocess: PIL images -> pixels (n, 3, 224, 224); CLIP's processor when None.
        cache_dir: where the gallery embeddings are kept between processes; None keeps them in memory only.
        backbone_id: a name for the backbone, for messages and repr.
    """

    name = "geoclip"

    def __init__(
        self,
        backbone: Backbone,
        head: torch.nn.Module,
        location_encoder: torch.nn.Module,
        logit_scale: float,
        gps: torch.Tensor,
        *,
        preprocess: Callable[[Sequence[Image.Image]], torch.Tensor] | None = None,
        cache_dir: str | os.PathLike | None = None,
        backbone_id: str = "custom",
        device: str | torch.device = "cpu",
    ) -> None:
        if gps.ndim != 2 or gps.shape[1] != 2:
            raise ConfigError(f"gallery must be (G, 2) lat/lon, got shape {tuple(gps.shape)}")
        self.device = torch.device(device)
        self.backbone = backbone
        self.head = head.eval().to(self.device)
        self.location_encoder = location_encoder.eval().to(self.device)
        self.logit_scale = float(logit_scale)
        self.gps = gps.to(torch.float32)
        self.gallery = GpsGallery(self.gps[:, 0].double().numpy(), self.gps[:, 1].double().numpy())
        self.preprocess = preprocess
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir is not None else None
        self.backbone_id = backbone_id
        self._gallery_features: torch.Tensor | None = None
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"GeoCLIPPrior(backbone={self.backbone_id!r}, gallery={len(self.gallery)} points)"

    # -- gallery embeddings, once

    def gallery_key(self) -> str:
        """sha256 over the location encoder's tensors and the gallery: names the on-disk cache."""
        h = hashlib.sha256()
        for name, t in sorted(self.location_encoder.state_dict().items()):
            h.update(name.encode())
            h.update(t.detach().cpu().contiguous().numpy().tobytes())
        h.update(self.gps.numpy().tobytes())
        return h.hexdigest()

    def _cache_path(self) -> Path | None:
        if self.cache_dir is None:
            return None
        return self.cache_dir / f"geoclip-gallery-{self.gallery_key()[:20]}.npy"

    def gallery_features(self) -> torch.Tensor:
        """L2-normalised location embeddings of the gallery, (G, 512) float32: from memory, disk, or computed."""
        if self._gallery_features is not None:
            return self._gallery_features
        with self._lock:
            if self._gallery_features is not None:
                return self._gallery_features
            path = self._cache_path()
            feats: torch.Tensor | None = None
            if path is not None and path.is_file():
                try:
                    arr = np.load(path)
                    if arr.shape == (len(self.gallery), 512) and arr.dtype == np.float32:
                        feats = torch.from_numpy(arr)
                except (OSError, ValueError) as e:  # a damaged cache is recomputed, never trusted
                    log.warning("ignoring unreadable GeoCLIP gallery cache %s: %s", path, e)
            if feats is None:
                log.info("embedding GeoCLIP's %d gallery points (once; about 90 s on 2 CPU cores)", len(self.gallery))
                with torch.inference_mode():
                    parts = [
                        self.location_encoder(self.gps[i : i + _GALLERY_BATCH].to(self.device)).float().cpu()
                        for i in range(0, len(self.gps), _GALLERY_BATCH)
                    ]
                feats = torch.nn.functional.normalize(torch.cat(parts), dim=1).contiguous()
                if path is not None:
                    _atomic_save_npy(path, feats.numpy())
            self._gallery_features = feats.to(self.device)
            return self._gallery_features

    # -- photos

    def preprocess_images(self, images: Sequence[ImageInput]) -> torch.Tensor:
        """Load (EXIF-oriented RGB) and preprocess images: (n, 3, 224, 224) float32."""
        pil = [load_image(im) for im in images]
        if self.preprocess is None:
            from transformers import CLIPImageProcessor  # geoclip depends on transformers

            self.preprocess = _hf_preprocess(CLIPImageProcessor())  # == ViT-L/14's preprocessor_config
        return self.preprocess(pil)

    @torch.inference_mode()
    def embed_pixels(self, pixels: torch.Tensor) -> npt.NDArray[np.float32]:
        """GeoCLIP image embeddings of preprocessed pixels: (n, 512) float32, L2-normalised."""
        feats = self.backbone(pixels.to(self.device))
        if feats.ndim != 2 or feats.shape[1] != FEATURE_DIM:
            raise ConfigError(
                f"GeoCLIP backbone {self.backbone_id!r} returned features of shape {tuple(feats.shape)}; "
                f"GeoCLIP's head needs (n, {FEATURE_DIM}) (CLIP ViT-L/14's projected image features)"
            )
        out = torch.nn.functional.normalize(self.head(feats.float()), dim=1)
        return out.cpu().numpy().astype(np.float32, copy=False)

    def embed(self, images: Sequence[ImageInput], *, batch_size: int = 16) -> npt.NDArray[np.float32]:
        """GeoCLIP image embeddings of photos: (n, 512) float32; cache these like photo embeddings."""
        out = np.empty((len(images), 512), dtype=np.float32)
        for s in range(0, len(images), batch_size):
            batch = images[s : s + batch_size]
            out[s : s + len(batch)] = self.embed_pixels(self.preprocess_images(batch))
        return out

    @torch.inference_mode()
    def belief(self, features: npt.ArrayLike) -> GalleryBelief:
        """Softmax over the gallery for image embeddings (n, 512), as GeoCLIP's ``forward`` + softmax."""
        f = torch.as_tensor(np.atleast_2d(np.asarray(features, dtype=np.float32)), device=self.device)
        logits = np.exp(self.logit_scale) * (f @ self.gallery_features().T)
        prob = torch.softmax(logits, dim=1).cpu().numpy().astype(np.float32, copy=False)
        return GalleryBelief(self.gallery, prob)

    def predict(self, images: Sequence[ImageInput], *, batch_size: int = 16) -> GalleryBelief:
        """Photos -> GeoCLIP's belief over its gallery, (n, G)."""
        return self.belief(self.embed(images, batch_size=batch_size))


def _hf_preprocess(processor: Any) -> Callable[[Sequence[Image.Image]], torch.Tensor]:
    def run(images: Sequence[Image.Image]) -> torch.Tensor:
        return processor(images=list(images), return_tensors="pt")["pixel_values"]

    return run


def _atomic_save_npy(path: Path, arr: np.ndarray) -> None:
    try:
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            np.save(f, arr)
    except OSError as e:  # a read-only cache dir costs time, not correctness
        log.warning("could not cache GeoCLIP gallery embeddings at %s: %s", path, e)


# ------------------------------------------------------------------------------------ loading


class _HFVision(torch.nn.Module):
    """A transformers CLIP vision tower with projection: pixels -> (n, 768) ``image_embeds``."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=pixels).image_embeds


def _missing_backbone(what: str) -> WeightsNotFoundError:
    return WeightsNotFoundError(
        f"GeoCLIP's CLIP ViT-L/14 backbone is not available locally ({what}). Supply a local Hugging Face "
        f"folder of {BACKBONE_REPO} (config.json, model.safetensors, preprocessor_config.json) with "
        f"backbone=PATH (CLI: --geoclip-backbone PATH) or ${BACKBONE_ENV}=PATH; make one on a machine with "
        f"internet with `hf download {BACKBONE_REPO} --local-dir PATH`. Or allow the download (about 1.7 GB) "
        "with download=True (CLI: --download) without HF_HUB_OFFLINE=1"
    )


def _is_cached(repo_id: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    have = [isinstance(try_to_load_from_cache(repo_id, f), str) for f in ("config.json", "model.safetensors")]
    return all(have)


def _load_backbone(spec: str | os.PathLike, *, download: bool) -> tuple[Backbone, Callable[..., torch.Tensor], str]:
    """A transformers CLIP vision tower from a local folder, the hub cache, or an asked-for download."""
    from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection
    from transformers.utils import logging as hf_logging

    path = Path(spec).expanduser()
    text = os.fspath(spec)
    if path.is_dir():
        source, local = str(path), True
        if not (path / "config.json").is_file():
            raise _missing_backbone(f"{path} has no config.json")
    elif isinstance(spec, os.PathLike) or path.is_absolute() or text.startswith((".", "~")):
        raise _missing_backbone(f"{path} does not exist")
    else:  # a hub repo id
        source = text
        local = _is_cached(text)
        offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")
        if not local and (not download or offline):
            reason = "HF_HUB_OFFLINE is set" if offline and download else "download=False"
            raise _missing_backbone(f"{text!r} is not in the Hugging Face cache and {reason}")
    hf_logging.set_verbosity_error()  # the vision-only load reports every unused text-tower tensor
    try:
        model = CLIPVisionModelWithProjection.from_pretrained(source, local_files_only=local).eval()
        try:
            processor = CLIPImageProcessor.from_pretrained(source, local_files_only=True)
        except OSError:
            processor = CLIPImageProcessor()  # the defaults are ViT-L/14's preprocessor_config
    except OSError as e:
        raise _missing_backbone(f"loading {source!r} failed: {e}") from e
    except (RuntimeError, ValueError) as e:  # mismatched or damaged tensors
        raise ConfigError(f"{source}: not a loadable CLIP ViT-L/14 vision tower ({e})") from e
    if model.config.projection_dim != FEATURE_DIM:
        raise ConfigError(
            f"{source}: projection_dim {model.config.projection_dim}, GeoCLIP's head needs {FEATURE_DIM} "
            f"(use {BACKBONE_REPO})"
        )
    for p in model.parameters():
        p.requires_grad_(False)
    return _HFVision(model), _hf_preprocess(processor), source


def load_geoclip_prior(
    backbone: str | os.PathLike | Backbone | None = None,
    *,
    download: bool = False,
    device: str = "cpu",
    gps: torch.Tensor | npt.ArrayLike | None = None,
    cache_dir: str | os.PathLike | None | bool = True,
) -> GeoCLIPPrior:
    """GeoCLIP's shipped head, location encoder and gallery on a CLIP ViT-L/14 backbone.

    Args:
        backbone: a local Hugging Face folder of ``openai/clip-vit-large-patch14``, a hub repo id,
            or a callable/module mapping pixels (n, 3, 224, 224) to features (n, 768) (a stand-in,
            for tests). Default ``$GEOINDEX_GEOCLIP_BACKBONE``, else the hub id, from the local cache.
        download: allow downloading the backbone (about 1.7 GB) when it is not cached.
        device: torch device.
        gps: the gallery, (G, 2) lat/lon degrees; default GeoCLIP's 100k points.
        cache_dir: where the gallery's location embeddings are kept: True for
            ``$GEOINDEX_CACHE_DIR`` or ``~/.cache/geoindex``, a path, or None/False for memory only.

    Raises:
        ConfigError: the geoclip package is missing (``pip install -e '.[geoclip]'`` in the checkout).
        WeightsNotFoundError: no local backbone and no download allowed; the message says how to supply one.
    """
    geoclip = _geoclip()
    if backbone is None:
        backbone = os.environ.get(BACKBONE_ENV) or BACKBONE_REPO
    preprocess = None
    if isinstance(backbone, (str, os.PathLike)):
        model, preprocess, backbone_id = _load_backbone(backbone, download=download)
    elif callable(backbone):
        model, backbone_id = backbone, type(backbone).__name__
    else:
        raise ConfigError(f"backbone must be a path, a hub id or a callable, got {type(backbone).__name__}")
    if isinstance(model, torch.nn.Module):
        model.eval().to(device)
    head = torch.nn.Sequential(
        torch.nn.Linear(FEATURE_DIM, FEATURE_DIM), torch.nn.ReLU(), torch.nn.Linear(FEATURE_DIM, 512)
    )
    head.load_state_dict(_torch_load(_geoclip_file("weights", "image_encoder_mlp_weights.pth")))
    location_encoder = geoclip.LocationEncoder()  # loads the shipped weights itself
    logit_scale = float(_torch_load(_geoclip_file("weights", "logit_scale_weights.pth")))
    if gps is None:
        gps_t, _ = shipped_gallery()
    else:
        gps_t = torch.as_tensor(np.asarray(gps, dtype=np.float32))
    if cache_dir is True:
        cache: Path | None = default_cache_dir()
    elif cache_dir is False or cache_dir is None:
        cache = None
    else:
        cache = Path(cache_dir)
    return GeoCLIPPrior(model, head, location_encoder, logit_scale, gps_t, preprocess=preprocess,
                        cache_dir=cache, backbone_id=backbone_id, device=device)


def _torch_load(path: Path) -> Any:
    return torch.load(path, map_location="cpu", weights_only=True)


PRIORS: dict[str, Callable[..., GeoCLIPPrior]] = {"geoclip": load_geoclip_prior}
_loaded: dict[str, GeoCLIPPrior] = {}
_loaded_lock = threading.Lock()


def get_prior(prior: str | GeoCLIPPrior, **kwargs: Any) -> GeoCLIPPrior:
    """A prior by registry name (loaded once per process with default arguments) or the object itself."""
    if isinstance(prior, GeoCLIPPrior):
        return prior
    if prior not in PRIORS:
        raise ConfigError(f"unknown prior {prior!r}; choose one of {sorted(PRIORS)}")
    if kwargs:
        return PRIORS[prior](**kwargs)
    with _loaded_lock:
        if prior not in _loaded:
            _loaded[prior] = PRIORS[prior]()
        return _loaded[prior]
