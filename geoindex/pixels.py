"""Image -> network input: resize the shorter side, centre-crop, scale to [0, 1], normalise.

Both encoder families preprocess with torchvision's ``Resize(S, bicubic) -> CenterCrop(S) ->
ToTensor -> Normalize``. ``ResizeCropNormalize`` computes the same tensor bit for bit: PIL does
the resize and the crop, as torchvision does, and the arithmetic is a per-channel table of the 256
possible values, computed by numpy in torchvision's order and in float32. It runs no torch
operator: torch's element-wise kernels start OpenMP threads whose spin-wait afterwards takes the
cores from the ONNX Runtime forward pass that follows.
``fast_preprocess`` swaps it in for a torchvision pipeline of exactly that shape and leaves any
other pipeline as it is.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image

__all__ = ["ResizeCropNormalize", "fast_preprocess"]


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

    def __call__(self, img: Image.Image) -> torch.Tensor:
        s = self.size
        w, h = img.size
        # torchvision's _compute_resized_output_size: the longer side is truncated, not rounded
        short, long = (w, h) if w <= h else (h, w)
        new_w, new_h = (s, int(s * long / short)) if w <= h else (int(s * long / short), s)
        if (new_w, new_h) != (w, h):
            img = img.resize((new_w, new_h), Image.Resampling.BICUBIC)
        top, left = int(round((new_h - s) / 2.0)), int(round((new_w - s) / 2.0))
        img = img.crop((left, top, left + s, top + s))
        if img.mode != "RGB":
            img = img.convert("RGB")
        rgb = np.asarray(img)
        x = np.empty((3, s, s), dtype=np.float32)
        for c in range(3):
            np.take(self._table[c], rgb[:, :, c], out=x[c])
        return torch.from_numpy(x)


def fast_preprocess(preprocess: Callable[[Image.Image], torch.Tensor]) -> Callable[[Image.Image], torch.Tensor]:
    """``ResizeCropNormalize`` in place of a torchvision ``Compose`` that does exactly what it does
    (open_clip's and timm's eval transforms); any other callable is returned unchanged."""
    from torchvision import transforms as T

    if not isinstance(preprocess, T.Compose):
        return preprocess
    steps: list[Any] = [t for t in preprocess.transforms  # open_clip's RGB conversion: done at the same point
                        if not (type(t).__name__ == "MaybeConvertMode" and getattr(t, "mode", None) == "RGB")]
    if [type(t) for t in steps[:2]] != [T.Resize, T.CenterCrop] or len(steps) != 4 \
            or not isinstance(steps[2], T.ToTensor) or type(steps[3]) is not T.Normalize:
        return preprocess
    resize, crop, _, norm = steps
    size = resize.size[0] if isinstance(resize.size, (list, tuple)) and len(resize.size) == 1 else resize.size
    if (not isinstance(size, int) or resize.interpolation != T.InterpolationMode.BICUBIC
            or resize.max_size is not None or tuple(crop.size) != (size, size)):
        return preprocess
    return ResizeCropNormalize(size, norm.mean, norm.std)
