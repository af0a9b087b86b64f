"""CLIP's image preprocessing and the paper's train augmentation, on PIL + torch (no torchvision).

Both reproduce torchvision's arithmetic exactly (sizes, crop boxes, random draws), because CLIP and
the authors' code (Dassl) are defined by it:

* :class:`Preprocess` (test time, = CLIP's ``preprocess``): resize the SHORT side to ``size`` with
  PIL bicubic (long side ``int(size * long / short)``), centre crop ``size x size`` (top/left rounded
  with Python's ``round``, i.e. half to even, as torchvision's ``CenterCrop``), float tensor in [0, 1],
  normalise with CLIP's mean/std.
* :class:`TrainAugment` (train time, Dassl's ``random_resized_crop`` + ``random_flip`` + ``normalize``):
  torchvision's ``RandomResizedCrop`` algorithm (scale 0.08-1, ratio 3/4-4/3, 10 attempts, centre-crop
  fallback), bicubic resize to ``size x size``, horizontal flip with probability 0.5, normalise.

Random draws use ``torch`` with an optional ``generator`` (``t(img, generator=g)``) so the data layer
can make each image's augmentation depend only on (seed, epoch, index), whatever the worker count.
Without a generator the global torch RNG is used, in the same order as torchvision.

Non-RGB images (grayscale, RGBA, palette, CMYK...) are converted to RGB first, as the authors' Dassl
``read_image`` does before any transform (CLIP converts after resizing; for RGB input, the normal
case, the two orders are identical).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image
from torch import Tensor

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

_INTERPOLATIONS = {
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "nearest": Image.Resampling.NEAREST,
    "lanczos": Image.Resampling.LANCZOS,
}


def pil_interpolation(name: str) -> Image.Resampling:
    """PIL resampling filter for a name (``bicubic``, ``bilinear``, ``nearest``, ``lanczos``)."""
    try:
        return _INTERPOLATIONS[name.lower()]
    except KeyError:
        raise ValueError(f"unknown interpolation {name!r}; use one of {sorted(_INTERPOLATIONS)}") from None


def to_rgb(img: Image.Image) -> Image.Image:
    """The image in RGB mode (grayscale, RGBA, palette... converted; RGB returned as is)."""
    if not isinstance(img, Image.Image):
        raise TypeError(f"expected a PIL image, got {type(img).__name__}")
    return img if img.mode == "RGB" else img.convert("RGB")


def to_tensor(img: Image.Image) -> Tensor:
    """An RGB PIL image -> float32 tensor [3, H, W] in [0, 1] (torchvision's ``ToTensor``)."""
    arr = np.asarray(to_rgb(img), dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(255.0)


def normalize(x: Tensor, mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD) -> Tensor:
    """(x - mean) / std per channel, for [C, H, W] or [B, C, H, W]; returns a new tensor."""
    if x.shape[-3] != len(mean) or len(mean) != len(std):
        raise ValueError(f"{len(mean)} means / {len(std)} stds for a tensor with {x.shape[-3]} channels")
    m = torch.as_tensor(mean, dtype=x.dtype, device=x.device).view(-1, 1, 1)
    s = torch.as_tensor(std, dtype=x.dtype, device=x.device).view(-1, 1, 1)
    if (s == 0).any():
        raise ValueError(f"std must be non-zero, got {tuple(std)}")
    return (x - m) / s


def resized_size(width: int, height: int, size: int) -> tuple[int, int]:
    """(new_width, new_height) with the short side = ``size`` (torchvision's ``Resize(int)``)."""
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = size, int(size * long / short)
    return (new_short, new_long) if width <= height else (new_long, new_short)


def center_crop_box(width: int, height: int, size: int) -> tuple[int, int, int, int]:
    """PIL box (left, top, right, bottom) of torchvision's ``CenterCrop(size)``."""
    if width < size or height < size:
        raise ValueError(f"cannot centre-crop {size}x{size} from a {width}x{height} image")
    top = int(round((height - size) / 2.0))
    left = int(round((width - size) / 2.0))
    return left, top, left + size, top + size


def random_resized_crop_params(width: int, height: int, scale: tuple[float, float] = (0.08, 1.0),
                               ratio: tuple[float, float] = (3 / 4, 4 / 3),
                               generator: torch.Generator | None = None) -> tuple[int, int, int, int]:
    """(top, left, crop_height, crop_width) drawn as torchvision's ``RandomResizedCrop.get_params``.

    Up to 10 attempts: area fraction ~ U(scale), aspect ratio ~ exp(U(log ratio)),
    w = round(sqrt(area * r)), h = round(sqrt(area / r)); the first box that fits is placed uniformly.
    Otherwise: a centre crop of the whole image, clamped to the ratio range.
    """
    area = height * width
    log_ratio = torch.log(torch.tensor(ratio))
    for _ in range(10):
        target_area = area * torch.empty(1).uniform_(scale[0], scale[1], generator=generator).item()
        # exp in float32 on the tensor, as torchvision does (math.exp could round w/h differently)
        aspect = torch.exp(torch.empty(1).uniform_(log_ratio[0], log_ratio[1], generator=generator)).item()
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, size=(1,), generator=generator).item())
            left = int(torch.randint(0, width - w + 1, size=(1,), generator=generator).item())
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        w, h = int(round(height * max(ratio))), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def _check_stats(mean: Sequence[float], std: Sequence[float]) -> tuple[tuple[float, ...], tuple[float, ...]]:
    mean, std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
    if len(mean) != 3 or len(std) != 3:
        raise ValueError(f"mean and std need 3 values (RGB), got {mean} and {std}")
    if any(s <= 0 for s in std):
        raise ValueError(f"std values must be positive, got {std}")
    return mean, std


class Preprocess:
    """CLIP's test-time preprocessing: short-side resize, centre crop, [0, 1] tensor, normalise."""

    def __init__(self, size: int = 224, mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD,
                 interpolation: str = "bicubic"):
        if size <= 0:
            raise ValueError(f"size must be positive, got {size}")
        self.size = int(size)
        self.mean, self.std = _check_stats(mean, std)
        self.interpolation = interpolation
        self._resample = pil_interpolation(interpolation)

    @classmethod
    def from_spec(cls, spec) -> Preprocess:
        """From a :class:`promptkd.models.backbones.ImageSpec`."""
        return cls(spec.size, spec.mean, spec.std, spec.interpolation)

    def resize_and_crop(self, img: Image.Image) -> Image.Image:
        """The RGB PIL image after resize + centre crop (before tensor conversion)."""
        img = to_rgb(img)
        new_size = resized_size(img.width, img.height, self.size)
        if new_size != img.size:
            img = img.resize(new_size, self._resample)
        return img.crop(center_crop_box(img.width, img.height, self.size))

    def __call__(self, img: Image.Image, generator: torch.Generator | None = None) -> Tensor:
        """[3, size, size] float32; ``generator`` is accepted for the loader's API and unused."""
        return normalize(to_tensor(self.resize_and_crop(img)), self.mean, self.std)

    def __repr__(self) -> str:
        return f"Preprocess(size={self.size}, interpolation={self.interpolation!r}, mean={self.mean}, std={self.std})"


class TrainAugment:
    """RandomResizedCrop (torchvision's algorithm) + bicubic resize + horizontal flip + normalise."""

    def __init__(self, size: int = 224, mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD,
                 scale: tuple[float, float] = (0.08, 1.0), ratio: tuple[float, float] = (3 / 4, 4 / 3),
                 hflip: float = 0.5, interpolation: str = "bicubic"):
        if size <= 0:
            raise ValueError(f"size must be positive, got {size}")
        if not 0 < scale[0] <= scale[1]:
            raise ValueError(f"scale must satisfy 0 < min <= max, got {tuple(scale)}")
        if not 0 < ratio[0] <= ratio[1]:
            raise ValueError(f"ratio must satisfy 0 < min <= max, got {tuple(ratio)}")
        if not 0.0 <= hflip <= 1.0:
            raise ValueError(f"hflip is a probability in [0, 1], got {hflip}")
        self.size = int(size)
        self.mean, self.std = _check_stats(mean, std)
        self.scale = (float(scale[0]), float(scale[1]))
        self.ratio = (float(ratio[0]), float(ratio[1]))
        self.hflip = float(hflip)
        self.interpolation = interpolation
        self._resample = pil_interpolation(interpolation)

    @classmethod
    def from_spec(cls, spec, **kwargs) -> TrainAugment:
        """From a :class:`promptkd.models.backbones.ImageSpec` (extra keywords: scale, ratio, hflip)."""
        return cls(spec.size, spec.mean, spec.std, interpolation=spec.interpolation, **kwargs)

    def crop_and_resize(self, img: Image.Image, generator: torch.Generator | None = None) -> Image.Image:
        """The randomly cropped, resized RGB PIL image (no flip, no normalisation)."""
        img = to_rgb(img)
        top, left, h, w = random_resized_crop_params(img.width, img.height, self.scale, self.ratio, generator)
        # crop first, then resize: the filter sees only the crop, as in torchvision's resized_crop
        return img.crop((left, top, left + w, top + h)).resize((self.size, self.size), self._resample)

    def __call__(self, img: Image.Image, generator: torch.Generator | None = None) -> Tensor:
        x = to_tensor(self.crop_and_resize(img, generator))
        if torch.rand(1, generator=generator).item() < self.hflip:
            x = x.flip(-1)
        return normalize(x, self.mean, self.std)

    def __repr__(self) -> str:
        return (f"TrainAugment(size={self.size}, scale={self.scale}, ratio={self.ratio}, hflip={self.hflip}, "
                f"interpolation={self.interpolation!r})")
