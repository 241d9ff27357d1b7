"""One registry and one factory for the photo encoder and the per-zoom map encoders (CLIP vision towers).

The photo encoder is an unmodified CLIP ViT-B/32 image tower. A map encoder is the same tower
with only its last two residual blocks, ``ln_post`` and ``proj`` fine-tuned; its checkpoint
stores just those tensors, the base encoder's name and the sha256 fingerprint of the base
weights, so that loading it onto another base is refused. Constructors never touch the network:
weights come from an explicit file, the local caches, or a download that must be asked for.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import os
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from PIL import Image

from geoindex.errors import ConfigError, EncoderMismatchError, WeightsNotFoundError
from geoindex.imagery import ImageInput, load_image

__all__ = [
    "ENCODERS",
    "EncoderSpec",
    "ImageEncoder",
    "create_encoder",
    "find_cached_weights",
    "load_map_encoder",
    "mark_trainable",
    "resolve_weights",
    "save_map_checkpoint",
]

log = logging.getLogger(__name__)

_CONFIG_DIR = Path(__file__).parent / "model_configs"
CHECKPOINT_FORMAT = "geoindex-map-encoder/1"
WEIGHTS_ENV = "GEOINDEX_CLIP_WEIGHTS"


@dataclass(frozen=True)
class EncoderSpec:
    """A named encoder configuration: an open_clip architecture plus where its weights come from.

    Attributes:
        name: registry key, recorded in index manifests.
        open_clip_model: open_clip model config name (built-in or from ``model_configs/``).
        pretrained: open_clip pretrained tag (e.g. ``openai``); None means seeded random init,
            which is deterministic for a given torch version and seed.
        quick_gelu: activation used when the weights were trained (OpenAI CLIP uses QuickGELU).
        seed: torch seed for random init.
        description: one line for ``--help`` and error messages.
    """

    name: str
    open_clip_model: str
    pretrained: str | None
    quick_gelu: bool = False
    seed: int = 0
    description: str = ""


ENCODERS: dict[str, EncoderSpec] = {
    spec.name: spec
    for spec in (
        EncoderSpec(
            "clip-vit-b-32", "ViT-B-32", "openai", quick_gelu=True,
            description="the paper's encoder: OpenAI CLIP ViT-B/32 (needs its weights, about 600 MB)",
        ),
        EncoderSpec(
            "vit-b-32-random", "ViT-B-32", None, quick_gelu=True,
            description="ViT-B/32 architecture with seeded random weights: real cost, meaningless output",
        ),
        EncoderSpec(
            "tiny", "geoindex-tiny", None,
            description="a 3-block 64-px random-init ViT for tests and offline demos: meaningless output",
        ),
    )
}


class _DropRandomInitNotice(logging.Filter):
    """open_clip warns on the root logger when it initialises randomly; our random-init encoders mean to."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "No pretrained weights loaded" not in record.getMessage()


def _spec(name: str) -> EncoderSpec:
    try:
        return ENCODERS[name]
    except KeyError:
        raise ConfigError(f"unknown encoder {name!r}; choose one of {sorted(ENCODERS)}") from None


def find_cached_weights(spec: EncoderSpec) -> Path | None:
    """Weights for ``spec`` already on this machine (Hugging Face or open_clip caches), else None."""
    import open_clip

    cfg = open_clip.pretrained.get_pretrained_cfg(spec.open_clip_model, spec.pretrained or "")
    candidates: list[Path] = []
    hub = cfg.get("hf_hub", "")
    if hub:
        from huggingface_hub import try_to_load_from_cache

        repo_id, filename = os.path.split(hub.rstrip("/")) if not hub.endswith("/") else (hub.rstrip("/"), "")
        for fname in (filename,) if filename else ("open_clip_model.safetensors", "open_clip_pytorch_model.bin"):
            hit = try_to_load_from_cache(repo_id, fname)
            if isinstance(hit, str):
                candidates.append(Path(hit))
    url = cfg.get("url", "")
    if url:
        candidates.append(Path("~/.cache/clip").expanduser() / os.path.basename(url))
    return next((p for p in candidates if p.is_file()), None)


def resolve_weights(spec: EncoderSpec, weights: str | os.PathLike | None, download: bool) -> Path | None:
    """Where the weights of ``spec`` come from: explicit path, env var, cache, or an asked-for download.

    None for random-init specs. Raises WeightsNotFoundError naming the options when there are none.
    """
    if spec.pretrained is None:
        if weights is not None:
            raise ConfigError(f"encoder {spec.name!r} is random-init by definition; drop weights={weights!r}")
        return None
    explicit = weights if weights is not None else os.environ.get(WEIGHTS_ENV)
    if explicit:
        path = Path(explicit).expanduser()
        if not path.is_file():
            raise WeightsNotFoundError(f"weights file {path} for encoder {spec.name!r} does not exist")
        return path
    cached = find_cached_weights(spec)
    if cached is not None:
        return cached
    if not download or os.environ.get("HF_HUB_OFFLINE") == "1":
        raise WeightsNotFoundError(
            f"no local weights for encoder {spec.name!r} (open_clip {spec.open_clip_model}/{spec.pretrained}). "
            f"Pass a local file with weights=PATH (CLI: --weights PATH) or set {WEIGHTS_ENV}; "
            "or allow the download with download=True (CLI: --download) on a machine with internet"
            + (" and without HF_HUB_OFFLINE=1" if os.environ.get("HF_HUB_OFFLINE") == "1" else "")
        )
    import open_clip

    cfg = open_clip.pretrained.get_pretrained_cfg(spec.open_clip_model, spec.pretrained)
    log.info("downloading %s weights", spec.name)
    try:
        return Path(open_clip.pretrained.download_pretrained(cfg))
    except Exception as e:  # urllib / hub errors come in many types; all mean the same here
        raise WeightsNotFoundError(f"downloading weights for encoder {spec.name!r} failed: {e}") from e


def _state_fingerprint(module: torch.nn.Module) -> str:
    """sha256 over a module's tensors (names, shapes, dtypes, bytes): identifies a set of weights."""
    h = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().to("cpu").contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _trainable_prefixes(visual: torch.nn.Module) -> tuple[str, ...]:
    blocks = len(visual.transformer.resblocks)  # type: ignore[union-attr,arg-type]
    if blocks < 2:
        raise ConfigError(f"a map encoder needs at least 2 transformer blocks, the base has {blocks}")
    return (
        f"transformer.resblocks.{blocks - 2}.",
        f"transformer.resblocks.{blocks - 1}.",
        "ln_post.",
        "proj",
    )


def _is_trainable(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p) for p in prefixes)


class ImageEncoder:
    """A CLIP vision tower plus its preprocessing: images -> L2-normalised float32 embeddings.

    Attributes:
        spec: the registry entry it was built from.
        visual: the open_clip vision tower (``torch.nn.Module``).
        base_fingerprint: sha256 of the base weights before any map-encoder checkpoint.
        checkpoint_sha256: sha256 of the map-encoder checkpoint file applied, or None.
        zoom: the zoom level of a map encoder's checkpoint, or None.
    """

    def __init__(
        self,
        spec: EncoderSpec,
        visual: torch.nn.Module,
        preprocess: Callable[[Image.Image], torch.Tensor],
        base_fingerprint: str,
        *,
        checkpoint_sha256: str | None = None,
        zoom: int | None = None,
    ) -> None:
        self.spec = spec
        self.visual = visual.eval()
        self.preprocess = preprocess
        self.base_fingerprint = base_fingerprint
        self.checkpoint_sha256 = checkpoint_sha256
        self.zoom = zoom

    @property
    def dim(self) -> int:
        """Embedding dimension d."""
        return int(self.visual.output_dim)  # type: ignore[arg-type]

    @property
    def device(self) -> torch.device:
        return next(self.visual.parameters()).device

    @property
    def identity(self) -> dict[str, Any]:
        """What a manifest records to recognise this exact encoder later."""
        return {
            "name": self.spec.name,
            "base_fingerprint": self.base_fingerprint,
            "checkpoint_sha256": self.checkpoint_sha256,
        }

    def to(self, device: str | torch.device) -> ImageEncoder:
        self.visual.to(device)
        return self

    def preprocess_images(self, images: Sequence[ImageInput]) -> torch.Tensor:
        """Load and preprocess images into a float tensor of shape (n, 3, S, S)."""
        return torch.stack([self.preprocess(load_image(im)) for im in images])

    @torch.inference_mode()
    def encode_tensor(self, pixels: torch.Tensor) -> npt.NDArray[np.float32]:
        """Preprocessed pixels (n, 3, S, S) -> L2-normalised embeddings (n, d) float32."""
        features = self.visual(pixels.to(self.device))
        features = torch.nn.functional.normalize(features.float(), dim=-1)
        return features.cpu().numpy().astype(np.float32, copy=False)

    def encode(self, images: Sequence[ImageInput], *, batch_size: int = 64) -> npt.NDArray[np.float32]:
        """Images (paths, bytes, PIL or arrays) -> L2-normalised embeddings of shape (n, d), float32."""
        out = np.empty((len(images), self.dim), dtype=np.float32)
        for start in range(0, len(images), batch_size):
            batch = images[start : start + batch_size]
            out[start : start + len(batch)] = self.encode_tensor(self.preprocess_images(batch))
        return out


def create_encoder(
    name: str = "clip-vit-b-32",
    *,
    weights: str | os.PathLike | None = None,
    download: bool = False,
    device: str | torch.device = "cpu",
) -> ImageEncoder:
    """Build a registered encoder: the photo encoder, and the base of every map encoder.

    Args:
        name: a key of ``ENCODERS`` (``clip-vit-b-32``, ``vit-b-32-random``, ``tiny``).
        weights: a local weights file (open_clip/Hugging Face state dict); default: the
            ``GEOINDEX_CLIP_WEIGHTS`` environment variable, then the local caches.
        download: fetch missing weights from the model hub; never done otherwise.
        device: torch device to place the model on.

    Raises:
        ConfigError: unknown name. WeightsNotFoundError: weights needed but not available.
    """
    import open_clip

    spec = _spec(name)
    if str(_CONFIG_DIR) not in map(str, open_clip.factory._MODEL_CONFIG_PATHS):
        open_clip.add_model_config(_CONFIG_DIR)
    path = resolve_weights(spec, weights, download)
    quiet = _DropRandomInitNotice()
    root = logging.getLogger()
    if path is None:
        root.addFilter(quiet)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        try:
            model, _, preprocess = open_clip.create_model_and_transforms(
                spec.open_clip_model,
                pretrained=str(path) if path else None,
                force_quick_gelu=spec.quick_gelu,
            )
        except RuntimeError as e:
            raise WeightsNotFoundError(f"cannot load weights {path} into {spec.open_clip_model}: {e}") from e
        finally:
            root.removeFilter(quiet)
    visual = model.visual
    del model  # the text tower is never used
    visual.requires_grad_(False)
    encoder = ImageEncoder(spec, visual, preprocess, _state_fingerprint(visual))
    return encoder.to(device)


def mark_trainable(encoder: ImageEncoder) -> list[str]:
    """Freeze everything but the last two blocks, ``ln_post`` and ``proj``; return the trainable names."""
    prefixes = _trainable_prefixes(encoder.visual)
    names = []
    for name, param in encoder.visual.named_parameters():
        param.requires_grad_(_is_trainable(name, prefixes))
        if param.requires_grad:
            names.append(name)
    return names


def save_map_checkpoint(encoder: ImageEncoder, path: str | os.PathLike, *, zoom: int) -> str:
    """Write the fine-tuned tensors of a map encoder atomically; returns the file's sha256."""
    prefixes = _trainable_prefixes(encoder.visual)
    tensors = {
        k: v.detach().cpu().clone()
        for k, v in encoder.visual.state_dict().items()
        if _is_trainable(k, prefixes)
    }
    payload = {
        "format": CHECKPOINT_FORMAT,
        "base": encoder.spec.name,
        "base_fingerprint": encoder.base_fingerprint,
        "zoom": zoom,
        "state_dict": tensors,
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(payload, f)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return _file_sha256(path)


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def load_map_encoder(base: ImageEncoder, checkpoint: str | os.PathLike | None) -> ImageEncoder:
    """The map encoder = ``base`` with a checkpoint's fine-tuned tensors; ``base`` itself if None.

    Raises:
        WeightsNotFoundError: the checkpoint file is missing.
        EncoderMismatchError: the checkpoint was made on another base encoder or other weights.
    """
    if checkpoint is None:
        return base
    path = Path(checkpoint)
    if not path.is_file():
        raise WeightsNotFoundError(f"map-encoder checkpoint {path} does not exist")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise EncoderMismatchError(f"{path}: not a geoindex map-encoder checkpoint ({e})") from e
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise EncoderMismatchError(f"{path}: not a geoindex map-encoder checkpoint (format {CHECKPOINT_FORMAT})")
    if payload["base"] != base.spec.name or payload["base_fingerprint"] != base.base_fingerprint:
        raise EncoderMismatchError(
            f"{path} was trained on base encoder {payload['base']!r} "
            f"(weights {payload['base_fingerprint'][:12]}), not on {base.spec.name!r} "
            f"(weights {base.base_fingerprint[:12]}); pass the base it was trained on"
        )
    prefixes = _trainable_prefixes(base.visual)
    expected = {k for k in base.visual.state_dict() if _is_trainable(k, prefixes)}
    if set(payload["state_dict"]) != expected:
        raise EncoderMismatchError(f"{path}: tensors do not match the fine-tuned part of {base.spec.name!r}")
    visual = copy.deepcopy(base.visual)
    visual.load_state_dict(payload["state_dict"], strict=False)
    return ImageEncoder(
        base.spec, visual, base.preprocess, base.base_fingerprint,
        checkpoint_sha256=_file_sha256(path), zoom=int(payload["zoom"]),
    )
