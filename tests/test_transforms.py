"""CLIP preprocessing and the train augmentation against hand-derived sizes/boxes and float64 references."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from promptkd.data.transforms import (
    CLIP_MEAN,
    CLIP_STD,
    Preprocess,
    TrainAugment,
    center_crop_box,
    normalize,
    random_resized_crop_params,
    resized_size,
    to_tensor,
)
from promptkd.models.backbones import ImageSpec


def _noise_image(width: int, height: int, seed: int = 0, mode: str = "RGB") -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), "RGB").convert(mode)


def _np_reference(img: Image.Image, mean=CLIP_MEAN, std=CLIP_STD) -> np.ndarray:
    """float64 numpy: uint8 HWC -> [0, 1] CHW -> (x - mean) / std."""
    x = np.asarray(img.convert("RGB"), dtype=np.float64).transpose(2, 0, 1) / 255.0
    return (x - np.asarray(mean, dtype=np.float64)[:, None, None]) / np.asarray(std, dtype=np.float64)[:, None, None]


# (width, height, size) -> hand-computed resized (w, h) and crop (left, top)
SIZE_CASES = [
    (300, 200, 224, (336, 224), (56, 0)),  # 224*300/200 = 336; (336-224)/2 = 56
    (225, 1000, 224, (224, 995), (0, 386)),  # int(995.55) = 995; round(385.5) = 386 (half to even)
    (224, 997, 224, (224, 997), (0, 386)),  # already short side 224; round(386.5) = 386 (half to even)
    (33, 50, 32, (32, 48), (0, 8)),  # int(32*50/33) = int(48.48) = 48
    (51, 32, 32, (51, 32), (10, 0)),  # round(9.5) = 10 (half to even)
    (49, 32, 32, (49, 32), (8, 0)),  # round(8.5) = 8 (half to even)
    (64, 64, 32, (32, 32), (0, 0)),
    (7, 5, 32, (44, 32), (6, 0)),  # up-sampling: int(32*7/5) = int(44.8) = 44
]


@pytest.mark.parametrize("w, h, size, resized, corner", SIZE_CASES)
def test_resize_and_crop_arithmetic(w, h, size, resized, corner):
    assert resized_size(w, h, size) == resized
    left, top = corner
    assert center_crop_box(*resized, size) == (left, top, left + size, top + size)


@pytest.mark.parametrize("w, h, size, resized, corner", SIZE_CASES[:6])
def test_preprocess_equals_pil_resize_crop_and_float64_normalisation(w, h, size, resized, corner):
    img = _noise_image(w, h, seed=w * h)
    out = Preprocess(size)(img)
    assert out.shape == (3, size, size) and out.dtype == torch.float32
    left, top = corner
    expected_img = img.resize(resized, Image.Resampling.BICUBIC).crop((left, top, left + size, top + size))
    np.testing.assert_allclose(out.numpy(), _np_reference(expected_img), rtol=0, atol=2e-6)


def test_normalize_and_to_tensor_against_float64():
    img = _noise_image(19, 11, seed=3)
    x = to_tensor(img)
    assert x.shape == (3, 11, 19) and float(x.min()) >= 0 and float(x.max()) <= 1
    np.testing.assert_allclose(x.numpy(), np.asarray(img, dtype=np.float64).transpose(2, 0, 1) / 255, atol=1e-7)
    mean, std = (0.1, 0.5, 0.9), (0.2, 0.3, 0.4)
    np.testing.assert_allclose(normalize(x, mean, std).numpy(), _np_reference(img, mean, std), atol=2e-6)
    batch = torch.stack([x, x.flip(-1)])
    assert normalize(batch).shape == batch.shape
    with pytest.raises(ValueError, match="channels"):
        normalize(x[:2])


def test_bicubic_is_pils_own_resize():
    img = _noise_image(97, 61, seed=1)
    t = Preprocess(48)
    assert t.resize_and_crop(img).tobytes() == img.resize((76, 48), Image.Resampling.BICUBIC).crop((14, 0, 62, 48)).tobytes()


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "CMYK", "1"])
def test_non_rgb_images_become_rgb(mode):
    img = _noise_image(40, 30, seed=2, mode=mode)
    out = Preprocess(32)(img)
    assert out.shape == (3, 32, 32)
    assert torch.equal(out, Preprocess(32)(img.convert("RGB")))
    g = torch.Generator().manual_seed(0)
    assert TrainAugment(32)(img, generator=g).shape == (3, 32, 32)


def test_from_spec():
    spec = ImageSpec(size=48, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), interpolation="bilinear")
    p, a = Preprocess.from_spec(spec), TrainAugment.from_spec(spec, hflip=0.0)
    assert (p.size, p.mean, p.std, p.interpolation) == (48, spec.mean, spec.std, "bilinear")
    assert (a.size, a.mean, a.hflip, a.interpolation) == (48, spec.mean, 0.0, "bilinear")
    default = Preprocess.from_spec(ImageSpec())
    assert (default.size, default.mean, default.std) == (224, CLIP_MEAN, CLIP_STD)


def test_bad_arguments():
    with pytest.raises(ValueError, match="interpolation"):
        Preprocess(32, interpolation="cubic-ish")
    with pytest.raises(ValueError, match="scale"):
        TrainAugment(32, scale=(0.9, 0.1))
    with pytest.raises(ValueError, match="hflip"):
        TrainAugment(32, hflip=1.5)
    with pytest.raises(ValueError, match="std"):
        Preprocess(32, std=(0.1, 0.0, 0.1))
    with pytest.raises(TypeError, match="PIL image"):
        Preprocess(32)(np.zeros((4, 4, 3), dtype=np.uint8))


def test_random_resized_crop_boxes_follow_the_constraints():
    g = torch.Generator().manual_seed(0)
    width, height = 120, 80
    areas, ratios = [], []
    for _ in range(2000):
        top, left, h, w = random_resized_crop_params(width, height, (0.08, 1.0), (3 / 4, 4 / 3), g)
        assert 0 <= top and top + h <= height and 0 <= left and left + w <= width and h > 0 and w > 0
        areas.append(w * h / (width * height))
        ratios.append(w / h)
    areas, ratios = np.array(areas), np.array(ratios)
    # w, h are rounded: allow half a pixel either side in each dimension
    assert areas.min() >= 0.08 * (1 - 2 * 0.5 / math.sqrt(0.08 * width * height)) - 1e-9
    assert areas.max() <= 1.0
    assert ratios.min() >= 3 / 4 * 0.9 and ratios.max() <= 4 / 3 / 0.9
    # log-uniform ratio: about half the accepted crops are wider than tall
    assert 0.4 < (ratios > 1).mean() < 0.6
    assert areas.mean() > 0.3  # U(0.08, 1) is 0.54 before rejection of big crops


def test_random_resized_crop_fallback_boxes():
    # no attempt can fit: centre crop clamped to the ratio range (hand-derived)
    assert random_resized_crop_params(1000, 10, (0.9, 1.0)) == (0, 493, 10, 13)  # w = round(10 * 4/3)
    assert random_resized_crop_params(10, 1000, (0.9, 1.0)) == (493, 0, 13, 10)  # h = round(10 / (3/4))
    assert random_resized_crop_params(100, 100, (1.5, 2.0), (1.0, 1.0)) == (0, 0, 100, 100)  # whole image


def test_same_seed_same_output_different_seed_different():
    img = _noise_image(80, 60, seed=5)
    aug = TrainAugment(32)
    a = aug(img, generator=torch.Generator().manual_seed(7))
    b = aug(img, generator=torch.Generator().manual_seed(7))
    c = aug(img, generator=torch.Generator().manual_seed(8))
    assert a.shape == (3, 32, 32) and torch.equal(a, b) and not torch.equal(a, c)
    torch.manual_seed(7)  # without a generator the global RNG is used, in the same order
    assert torch.equal(aug(img), a)


def test_train_augment_is_crop_then_resize_then_flip():
    img = _noise_image(64, 48, seed=9)
    aug = TrainAugment(32, hflip=0.0)
    g = torch.Generator().manual_seed(3)
    top, left, h, w = random_resized_crop_params(64, 48, aug.scale, aug.ratio, torch.Generator().manual_seed(3))
    expected = img.crop((left, top, left + w, top + h)).resize((32, 32), Image.Resampling.BICUBIC)
    np.testing.assert_allclose(aug(img, generator=g).numpy(), _np_reference(expected), atol=2e-6)


def test_flip_happens_about_half_the_time():
    # a square image and scale = ratio = 1: the crop is the whole image, so only the flip varies
    img = _noise_image(32, 32, seed=4)
    aug = TrainAugment(32, scale=(1.0, 1.0), ratio=(1.0, 1.0))
    plain = normalize(to_tensor(img))
    g = torch.Generator().manual_seed(0)
    flips = 0
    n = 400
    for _ in range(n):
        out = aug(img, generator=g)
        if torch.equal(out, plain.flip(-1)):
            flips += 1
        else:
            assert torch.equal(out, plain)
    assert abs(flips / n - 0.5) < 4 * math.sqrt(0.25 / n)  # within 4 binomial standard deviations
    never = TrainAugment(32, scale=(1.0, 1.0), ratio=(1.0, 1.0), hflip=0.0)
    assert torch.equal(never(img, generator=g), plain)
