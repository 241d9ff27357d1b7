"""Image -> network input: resize the shorter side, centre-crop, scale to [0, 1], normalise.

Both encoder families preprocess with torchvision's ``Resize(S, bicubic) -> CenterCrop(S) ->
ToTensor -> Normalize``. ``ResizeCropNormalize`` computes the same tensor bit for bit: PIL does
the resize and the crop, as torchvision does, and the arithmetic is a per-channel table of the 256
possible values, computed by numpy in torchvision's order and in float32. It runs no torch
operator: torch's element-wise kernels start OpenMP threads whose spin-wait afterwards takes the
cores from the ONNX Runtime forward pass that follows.
``fast_preprocess`` swaps it in for a torchvision pipeline of exactly that shape and leaves any
other pipeline as it is.

Its two halves also run apart: tile loaders stop at the uint8 crop (``ResizeCropNormalize.crop``)
and the encoder normalises a batch on its device (``normalize_pixels``, the same tensor bit for
bit). ``resize_crop_normalize`` does the whole of it as tensor operations on a device, resize
included (not bit-identical to PIL; an encoder's ``preprocessing="torch"``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from PIL import Image

from geoindex.errors import ConfigError

__all__ = ["ResizeCropNormalize", "as_uint8_tensor", "fast_preprocess", "normalize_pixels", "output_size",
           "resize_crop_normalize"]


class ResizeCropNormalize:
    """PIL image -> float32 tensor (3, S, S), identical to torchvision's
    ``Compose([Resize(S, BICUBIC), CenterCrop(S), (convert to RGB), ToTensor(), Normalize(mean, std)])``.

    Args:
        size: S, the shorter side after resizing and the side of the square crop.
        mean, std: per-channel normalisation of the [0, 1] pixels.
    """

    def __init__(self, size: int, mean: Sequence[float], std: Sequence[float]) -> None:
        self.size = int(size)
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        # Every uint8 value's result, per channel, from the same float32 operations in the same order
        # as ToTensor + Normalize ((v / 255 - mean) / std): one gather per pixel instead of four passes.
        v = np.arange(256, dtype=np.float32) / np.float32(255)
        mean_, std_ = np.asarray(self.mean, dtype=np.float32), np.asarray(self.std, dtype=np.float32)
        self._table = np.ascontiguousarray((v[None, :] - mean_[:, None]) / std_[:, None])  # (3, 256)

    def __repr__(self) -> str:
        return f"ResizeCropNormalize(size={self.size}, mean={self.mean}, std={self.std})"

    def crop(self, img: Image.Image) -> npt.NDArray[np.uint8]:
        """The resized, centre-cropped RGB pixels, uint8 (S, S, 3): what a tile loader hands the encoder."""
        s = self.size
        w, h = img.size
        new_w, new_h = output_size(w, h, s)  # torchvision's _compute_resized_output_size
        if (new_w, new_h) != (w, h):
            img = img.resize((new_w, new_h), Image.Resampling.BICUBIC)
        top, left = int(round((new_h - s) / 2.0)), int(round((new_w - s) / 2.0))
        img = img.crop((left, top, left + s, top + s))
        if img.mode != "RGB":
            img = img.convert("RGB")
        return np.asarray(img)

    def __call__(self, img: Image.Image) -> torch.Tensor:
        return torch.from_numpy(self.normalize(self.crop(img)[None])[0])

    def normalize(self, rgb: npt.NDArray[np.uint8]) -> npt.NDArray[np.float32]:
        """uint8 crops (n, S, S, 3) -> float32 (n, 3, S, S), ToTensor + Normalize by the table (one gather a value)."""
        x = np.empty((rgb.shape[0], 3, *rgb.shape[1:3]), dtype=np.float32)
        for c in range(3):
            np.take(self._table[c], rgb[..., c], out=x[:, c])
        return x


def normalize_pixels(pixels: torch.Tensor, mean: Sequence[float], std: Sequence[float], *,
                     device: torch.device | str | None = None) -> torch.Tensor:
    """uint8 pixels (n, H, W, 3) -> float32 (n, 3, H, W), ``(v / 255 - mean) / std`` as tensor operations.

    The arithmetic is ToTensor's and Normalize's, in float32 and in their order, so the result equals
    ``ResizeCropNormalize``'s table bit for bit (tests/test_pixels.py). The uint8 batch travels to
    ``device`` (a quarter of float32's bytes; from pinned memory on CUDA, without waiting) and is
    converted there.
    """
    if pixels.dtype != torch.uint8 or pixels.dim() != 4 or pixels.shape[-1] != 3:
        raise ConfigError(f"pixels must be uint8 (n, H, W, 3); got {pixels.dtype} {tuple(pixels.shape)}")
    target = torch.device(device) if device is not None else pixels.device
    if target.type == "cuda" and pixels.device.type == "cpu":
        pixels = pixels.pin_memory()
    x = pixels.to(target, non_blocking=True).permute(0, 3, 1, 2).float()
    m = torch.tensor(mean, dtype=torch.float32, device=target).view(1, 3, 1, 1)
    sd = torch.tensor(std, dtype=torch.float32, device=target).view(1, 3, 1, 1)
    return x.div_(255.0).sub_(m).div_(sd)


def as_uint8_tensor(image: npt.NDArray[np.uint8] | torch.Tensor, device: torch.device) -> torch.Tensor:
    """An image's uint8 pixels as a tensor on ``device``: a tensor moved, an array copied (PIL's are read-only)."""
    if isinstance(image, torch.Tensor):
        return image.to(device)
    return torch.from_numpy(np.array(image, copy=True)).to(device)


def output_size(w: int, h: int, size: int) -> tuple[int, int]:
    """(width, height) after resizing the shorter side of a w x h image to ``size``, as torchvision does
    (the longer side truncated, not rounded)."""
    short, long = (w, h) if w <= h else (h, w)
    return (size, int(size * long / short)) if w <= h else (int(size * long / short), size)


def resize_crop_normalize(
    images: Sequence[npt.NDArray[np.uint8] | torch.Tensor], size: int, mean: Sequence[float], std: Sequence[float],
    *, device: torch.device | str = "cpu",
) -> torch.Tensor:
    """uint8 RGB images (H, W, 3), of any sizes -> float32 (n, 3, S, S) on ``device``, all in tensor operations.

    The shorter side is resized to S with antialiased bicubic interpolation
    (``torch.nn.functional.interpolate(antialias=True)``, the filter PIL uses: on a CPU torch's uint8
    kernel, on a GPU in float32 rounded to uint8 values as PIL's output is), centre-cropped and
    normalised (:func:`normalize_pixels`). Images of one shape are resized together; the uint8 bytes
    cross to the device (pinned on CUDA), never floats. An image already S x S is not resampled, so it
    gives ``ResizeCropNormalize``'s tensor bit for bit; others differ from PIL's by one or two grey
    levels (in about 0.4 % of pixels on a CPU, 16 % in float32), checked in tests/test_pixels.py;
    benchmarks/precision.py measures what that does to the answers.
    """
    target = torch.device(device)
    out = torch.empty((len(images), 3, size, size), dtype=torch.float32, device=target)
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, im in enumerate(images):
        if im.dtype not in (np.uint8, torch.uint8) or im.ndim != 3 or im.shape[-1] != 3:
            raise ConfigError(f"image {i}: expected uint8 (H, W, 3) RGB, got {im.dtype} {tuple(im.shape)}")
        groups.setdefault(tuple(im.shape), []).append(i)
    for (h, w, _), members in groups.items():
        group = [images[i] for i in members]
        if any(isinstance(im, torch.Tensor) for im in group):  # JPEGs decoded on the device, maybe beside arrays
            batch = torch.stack([as_uint8_tensor(im, target) for im in group])
        else:
            batch = torch.from_numpy(np.stack(group))  # one copy: PIL's arrays are read-only
        if target.type == "cuda" and batch.device.type == "cpu":
            batch = batch.pin_memory()
        x = batch.to(target, non_blocking=True).permute(0, 3, 1, 2)
        new_w, new_h = output_size(w, h, size)
        if (new_w, new_h) != (w, h) and target.type == "cpu":  # torch's uint8 kernel: PIL's fixed-point filter
            x = torch.nn.functional.interpolate(x.contiguous(memory_format=torch.channels_last), size=(new_h, new_w),
                                                mode="bicubic", antialias=True, align_corners=False)
        elif (new_w, new_h) != (w, h):  # GPUs resample floats: rounded to uint8 values as PIL's output is
            x = torch.nn.functional.interpolate(x.float(), size=(new_h, new_w), mode="bicubic", antialias=True,
                                                align_corners=False).round_().clamp_(0, 255)
        top, left = int(round((new_h - size) / 2.0)), int(round((new_w - size) / 2.0))
        x = x[:, :, top : top + size, left : left + size]
        m = torch.tensor(mean, dtype=torch.float32, device=target).view(1, 3, 1, 1)
        sd = torch.tensor(std, dtype=torch.float32, device=target).view(1, 3, 1, 1)
        out[members] = x.float().div_(255.0).sub_(m).div_(sd)
    return out


def _converts_to_rgb(step: Any) -> bool:
    """Whether a pipeline step is a conversion to RGB (open_clip puts one before ``Resize``): judged by
    what it does to two small probes, so no transform class is named here."""
    grey, colour = Image.new("L", (2, 2), 77), Image.new("RGB", (2, 2), (200, 40, 90))
    try:
        converted, kept = step(grey), step(colour)
        return (isinstance(converted, Image.Image) and converted.mode == "RGB"
                and converted.tobytes() == grey.convert("RGB").tobytes()
                and isinstance(kept, Image.Image) and kept.mode == "RGB" and kept.tobytes() == colour.tobytes())
    except Exception:  # a step that cannot take a PIL image is no conversion
        return False


def fast_preprocess(preprocess: Callable[[Image.Image], torch.Tensor]) -> Callable[[Image.Image], torch.Tensor]:
    """``ResizeCropNormalize`` in place of a torchvision ``Compose`` that does exactly what it does
    (open_clip's and timm's eval transforms); any other callable is returned unchanged."""
    from torchvision import transforms as T

    if not isinstance(preprocess, T.Compose):
        return preprocess
    steps: list[Any] = [t for t in preprocess.transforms if not _converts_to_rgb(t)]  # done at the same point
    if [type(t) for t in steps[:2]] != [T.Resize, T.CenterCrop] or len(steps) != 4 \
            or not isinstance(steps[2], T.ToTensor) or type(steps[3]) is not T.Normalize:
        return preprocess
    resize, crop, _, norm = steps
    size = resize.size[0] if isinstance(resize.size, (list, tuple)) and len(resize.size) == 1 else resize.size
    if (not isinstance(size, int) or resize.interpolation != T.InterpolationMode.BICUBIC
            or resize.max_size is not None or tuple(crop.size) != (size, size)):
        return preprocess
    return ResizeCropNormalize(size, norm.mean, norm.std)
