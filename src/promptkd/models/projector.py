"""The PromptKD student projector: student image features [B, D_in] -> the teacher's space [B, D_out].

``"mlp"`` is the paper's: 1x1 conv D_in->D_out, BatchNorm, ReLU, 1x1 conv D_out->D_out, applied to the
features viewed as [B, D, 1, 1] (for 512 -> 768: 986,112 parameters, the paper's ~0.99M).
``"linear"`` is a single linear map (no batch statistics: useful for batch size 1 or per-rank DDP parity).
"""

from __future__ import annotations

from torch import Tensor, nn

PROJECTORS = ("mlp", "linear")


class ConvProjector(nn.Module):
    """1x1 conv -> BatchNorm -> ReLU -> 1x1 conv on [B, D, 1, 1] (the authors' two-layer feature transform)."""

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.in_dim, self.out_dim = in_dim, out_dim
        self.conv1 = nn.Conv2d(in_dim, out_dim, kernel_size=1)
        self.bn = nn.BatchNorm2d(out_dim)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(out_dim, out_dim, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        if x.ndim != 2 or x.shape[1] != self.in_dim:
            raise ValueError(f"projector expects features [B, {self.in_dim}], got {tuple(x.shape)}")
        x = x.to(self.conv1.weight.dtype)[:, :, None, None]
        return self.conv2(self.relu(self.bn(self.conv1(x))))[:, :, 0, 0]


class LinearProjector(nn.Module):
    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.in_dim, self.out_dim = in_dim, out_dim
        self.linear = nn.Linear(in_dim, out_dim)

    def forward(self, x: Tensor) -> Tensor:
        if x.ndim != 2 or x.shape[1] != self.in_dim:
            raise ValueError(f"projector expects features [B, {self.in_dim}], got {tuple(x.shape)}")
        return self.linear(x.to(self.linear.weight.dtype))


def build_projector(kind: str, in_dim: int, out_dim: int) -> nn.Module:
    """``"mlp"`` (the paper's conv-BN-ReLU-conv) or ``"linear"``, mapping [B, in_dim] -> [B, out_dim]."""
    if kind == "mlp":
        return ConvProjector(in_dim, out_dim)
    if kind == "linear":
        return LinearProjector(in_dim, out_dim)
    raise ValueError(f"unknown projector {kind!r}; expected one of {PROJECTORS}")
