"""ResizeCropNormalize computes what torchvision's eval pipelines compute, bit for bit, without torch threads."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T

from geoindex.models.encoders import create_encoder
from geoindex.models.families import FAMILIES
from geoindex.models.pixels import ResizeCropNormalize, fast_preprocess

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
# portrait, landscape, square, already the crop size, one pixel off, odd ratios, tiny and huge ratios
SIZES = [(480, 640), (640, 480), (256, 256), (224, 224), (225, 224), (224, 225), (223, 300), (1000, 333),
         (300, 301), (50, 60), (17, 900)]


def _torchvision(size: int, mean=MEAN, std=STD) -> T.Compose:
    return T.Compose([T.Resize(size, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(size),
                      T.ToTensor(), T.Normalize(mean, std)])


@pytest.mark.parametrize("hw", SIZES)
def test_identical_to_torchvision(hw):
    img = Image.fromarray(np.random.default_rng(sum(hw)).integers(0, 256, (*hw, 3), dtype=np.uint8))
    want = _torchvision(224)(img)
    got = ResizeCropNormalize(224, MEAN, STD)(img)
    assert got.dtype == torch.float32 and got.shape == want.shape == (3, 224, 224)
    assert torch.equal(got, want)


def test_every_byte_value_in_every_channel():
    """The per-channel table is right for all 256 values, with each channel's own mean and std, at the crop size
    (no resampling), so every value reaches the table unchanged."""
    rgb = ((np.arange(224 * 224)[:, None] + [0, 77, 155]) % 256).astype(np.uint8).reshape(224, 224, 3)
    img = Image.fromarray(rgb)
    for mean, std in ((MEAN, STD), ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))):
        assert torch.equal(ResizeCropNormalize(224, mean, std)(img), _torchvision(224, mean, std)(img))
    assert all(len(np.unique(rgb[..., c])) == 256 for c in range(3))


def test_encoder_pipelines_are_replaced_and_still_identical():
    """Both families' own pipelines (open_clip's has an RGB conversion step) are recognised and swapped."""
    rng = np.random.default_rng(1)
    for name in ("tiny", "efficientnet-lite0"):
        enc = create_encoder(name)
        assert isinstance(enc.preprocess, ResizeCropNormalize)
        _, original = FAMILIES[enc.spec.family].build(enc.spec, None)
        for hw in [(480, 640), (256, 256), (100, 37)]:
            for mode in ("RGB", "L", "RGBA"):
                img = Image.fromarray(rng.integers(0, 256, (*hw, 3), dtype=np.uint8)).convert(mode)
                if mode != "RGB" and enc.spec.family == "timm":
                    continue  # timm's pipeline has no RGB step: geoindex always hands it RGB
                assert torch.equal(enc.preprocess(img), original(img)), (name, hw, mode)


def test_other_pipelines_are_left_alone():
    bilinear = T.Compose([T.Resize(224), T.CenterCrop(224), T.ToTensor(), T.Normalize(MEAN, STD)])
    other_crop = T.Compose([T.Resize(256, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(224),
                            T.ToTensor(), T.Normalize(MEAN, STD)])
    extra = T.Compose([*_torchvision(224).transforms, T.RandomHorizontalFlip()])

    def plain(img):
        return torch.zeros(3)

    for p in (bilinear, other_crop, extra, plain):
        assert fast_preprocess(p) is p
    assert isinstance(fast_preprocess(_torchvision(64)), ResizeCropNormalize)


def test_torch_resize_is_bit_identical_without_resampling_and_within_a_grey_level_with_it():
    """``resize_crop_normalize`` (tensor operations, for the device): an image already S x S gives
    ResizeCropNormalize's tensor bit for bit; resized ones stay within PIL's rounding of it."""
    from geoindex.models.pixels import resize_crop_normalize

    rng = np.random.default_rng(3)
    prep = ResizeCropNormalize(224, MEAN, STD)
    # smooth images (as photos and tiles are): noise would measure only the two filters' rounding
    images = [np.asarray(Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)).resize(
        (w, h), Image.Resampling.BICUBIC)) for h, w in [(224, 224), (480, 640), (256, 256), (300, 223)]]
    got = resize_crop_normalize(images, 224, MEAN, STD)
    want = torch.stack([prep(Image.fromarray(im)) for im in images])
    assert got.shape == want.shape == (4, 3, 224, 224) and got.dtype == torch.float32
    assert torch.equal(got[0], want[0])
    levels = ((got[1:] - want[1:]).abs() * torch.tensor(STD).view(3, 1, 1) * 255.0).round()  # in grey levels
    assert float(levels.max()) <= 2 and float((levels > 0).float().mean()) < 0.01, (levels.max(), levels.mean())
    if torch.cuda.is_available():  # float32 resampling there
        on_gpu = resize_crop_normalize(images, 224, MEAN, STD, device="cuda").cpu()
        levels = ((on_gpu[1:] - want[1:]).abs() * torch.tensor(STD).view(3, 1, 1) * 255.0).round()
        assert float(levels.max()) <= 2 and float((levels > 0).float().mean()) < 0.3
    else:
        print("no CUDA here: the float32 resampling of GPUs is not compared with PIL")


def test_torch_preprocessing_is_part_of_the_encoder_identity(tiny_encoder):
    torch_enc = tiny_encoder.with_precision("fp32", preprocessing="torch")
    assert "preprocessing" not in tiny_encoder.identity  # indexes built before it was recorded keep theirs
    assert torch_enc.identity["preprocessing"] == "torch" and torch_enc.identity != tiny_encoder.identity
    photo = np.random.default_rng(4).integers(0, 256, (90, 120, 3), dtype=np.uint8)
    a, b = torch_enc.encode([photo]), tiny_encoder.encode([photo])
    assert float(np.sum(a * b)) > 0.999  # close, not equal: PIL's fixed-point filter against torch's float one
    with pytest.raises(Exception, match="preprocessing"):
        tiny_encoder.with_precision("fp32", preprocessing="gpu")


def test_a_leading_rgb_conversion_is_recognised_by_what_it_does():
    """open_clip's eval pipeline starts with an RGB conversion; any step that converts to RGB (and only such a
    step) is folded into ResizeCropNormalize, whatever its class."""
    import open_clip

    assert isinstance(fast_preprocess(open_clip.image_transform(224, is_train=False)), ResizeCropNormalize)
    to_rgb = T.Compose([T.Lambda(lambda im: im.convert("RGB")), *_torchvision(64).transforms])
    assert isinstance(fast_preprocess(to_rgb), ResizeCropNormalize)
    to_grey = T.Compose([T.Grayscale(num_output_channels=3), *_torchvision(64).transforms])
    assert fast_preprocess(to_grey) is to_grey
