"""Wide Residual Network for CIFAR-style inputs.

Zagoruyko & Komodakis, "Wide Residual Networks", BMVC 2016 (arXiv:1605.07146).

The standard CIFAR variant: a 3x3 stem convolution with 16 channels followed by three groups
of pre-activation basic blocks (BN-ReLU-conv3x3-BN-ReLU-dropout-conv3x3) with widths
16k, 32k and 64k and strides 1, 2, 2, then a final BN-ReLU, global average pooling and a
linear classifier. A block whose input and output shapes differ uses a 1x1 convolution on the
pre-activated input as its shortcut; otherwise the shortcut is the identity.

Global average pooling uses ``F.adaptive_avg_pool2d`` so any input size works (8x8 digits,
28x28 MNIST, 32x32 CIFAR, ...).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from aace.models._init import init_weights

__all__ = ["WideResNet", "WideBasicBlock"]


class WideBasicBlock(nn.Module):
    """Pre-activation basic block: BN-ReLU-conv3x3-BN-ReLU-dropout-conv3x3 (+ shortcut)."""

    def __init__(self, in_planes: int, out_planes: int, stride: int, dropout: float) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(in_planes, out_planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.relu2 = nn.ReLU(inplace=True)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.conv2 = nn.Conv2d(out_planes, out_planes, 3, stride=1, padding=1, bias=False)
        self.equal_in_out = in_planes == out_planes and stride == 1
        self.shortcut: nn.Module | None = (
            None
            if self.equal_in_out
            else nn.Conv2d(in_planes, out_planes, 1, stride=stride, padding=0, bias=False)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (N, in_planes, H, W) -> (N, out_planes, ceil(H/stride), ceil(W/stride))
        act = self.relu1(self.bn1(x))
        out = self.conv1(act)
        out = self.conv2(self.dropout(self.relu2(self.bn2(out))))
        if self.shortcut is None:
            return out + x
        # The projection shortcut sees the pre-activated input, as in the reference code.
        return out + self.shortcut(act)


class WideResNet(nn.Module):
    """WRN-``depth``-``width`` for small images.

    Args:
        depth: total number of layers; ``(depth - 4)`` must be a positive multiple of 6.
        width: widening factor ``k`` (group widths are 16k, 32k, 64k).
        num_classes: number of output logits.
        in_channels: number of input image channels.
        dropout: dropout probability between the two convolutions of every block.
    """

    def __init__(
        self,
        depth: int,
        width: int,
        num_classes: int,
        in_channels: int = 3,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if depth < 10 or (depth - 4) % 6 != 0:
            raise ValueError(
                f"invalid WideResNet depth {depth}: (depth - 4) must be a positive multiple of 6 "
                "(e.g. 10, 16, 22, 28, 40)"
            )
        if width < 1:
            raise ValueError(f"invalid WideResNet width {width}: must be >= 1")
        n = (depth - 4) // 6  # blocks per group
        widths = [16, 16 * width, 32 * width, 64 * width]
        self.depth = depth
        self.width = width

        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, stride=1, padding=1, bias=False)
        self.block1 = self._make_group(widths[0], widths[1], n, 1, dropout)
        self.block2 = self._make_group(widths[1], widths[2], n, 2, dropout)
        self.block3 = self._make_group(widths[2], widths[3], n, 2, dropout)
        self.bn = nn.BatchNorm2d(widths[3])
        self.relu = nn.ReLU(inplace=True)
        self.fc = nn.Linear(widths[3], num_classes)
        self.num_features = widths[3]
        init_weights(self)

    @staticmethod
    def _make_group(
        in_planes: int, out_planes: int, n: int, stride: int, dropout: float
    ) -> nn.Sequential:
        layers = [WideBasicBlock(in_planes, out_planes, stride, dropout)]
        layers += [WideBasicBlock(out_planes, out_planes, 1, dropout) for _ in range(n - 1)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (N, C_in, H, W)
        out = self.conv1(x)  # (N, 16, H, W)
        out = self.block1(out)  # (N, 16k, H, W)
        out = self.block2(out)  # (N, 32k, H/2, W/2)
        out = self.block3(out)  # (N, 64k, H/4, W/4)
        out = self.relu(self.bn(out))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)  # (N, 64k)
        return self.fc(out)  # (N, num_classes)
