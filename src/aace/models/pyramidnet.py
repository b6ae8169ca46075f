"""PyramidNet for CIFAR-style inputs, with optional ShakeDrop regularisation.

Han, Kim & Kim, "Deep Pyramidal Residual Networks", CVPR 2017 (arXiv:1610.02915).
Yamada, Iwamura, Akiba & Kise, "ShakeDrop Regularization for Deep Residual Learning",
IEEE Access 2019 (arXiv:1802.02375).

The widths grow additively by ``alpha / L`` per block over all ``L`` residual blocks (starting
from 16), the shortcut is the identity zero-padded along channels (with 2x2 average pooling
when the block downsamples), and every residual branch ends with a BatchNorm:

* basic block:      BN-conv3x3-BN-ReLU-conv3x3-BN
* bottleneck block: BN-conv1x1-BN-ReLU-conv3x3-BN-ReLU-conv1x1(x4)-BN

The network ends with BN-ReLU, global average pooling (``F.adaptive_avg_pool2d``, so any input
size works) and a linear classifier. With ``shakedrop > 0`` the output of residual branch
``l`` (1-based, of ``L``) is perturbed by ShakeDrop with drop probability
``shakedrop * l / L``. With ``dropout > 0`` dropout is applied to the pooled features before the
classifier (not part of the original architecture).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from aace.models._init import init_weights

__all__ = ["PyramidNet", "PyramidBasicBlock", "PyramidBottleneck", "ShakeDrop", "shake_drop"]


class _ShakeDropFunction(torch.autograd.Function):
    """ShakeDrop with a per-sample gate ``b ~ Bernoulli(1 - p)``.

    Training forward: ``(b + alpha - b * alpha) * x`` with ``alpha ~ U(-1, 1)`` per sample.
    Training backward: ``(b + beta - b * beta) * grad`` with a fresh ``beta ~ U(0, 1)``.
    Eval: ``(1 - p) * x`` (the expected forward scaling), gradient scaled alike.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, p_drop: float, training: bool) -> torch.Tensor:
        ctx.is_training = training
        ctx.p_drop = p_drop
        if not training:
            return x * (1.0 - p_drop)
        shape = (x.shape[0],) + (1,) * (x.dim() - 1)  # one factor per sample
        gate = torch.bernoulli(torch.full(shape, 1.0 - p_drop, device=x.device, dtype=x.dtype))
        alpha = torch.empty(shape, device=x.device, dtype=x.dtype).uniform_(-1.0, 1.0)
        ctx.save_for_backward(gate)
        # b + alpha - b * alpha, written so that it is exactly 1 (or alpha) for b = 1 (or 0).
        return x * (gate + (1.0 - gate) * alpha)

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, None, None]:
        if not ctx.is_training:
            return grad_output * (1.0 - ctx.p_drop), None, None
        (gate,) = ctx.saved_tensors
        beta = torch.rand(gate.shape, device=gate.device, dtype=gate.dtype)
        return grad_output * (gate + (1.0 - gate) * beta), None, None


def shake_drop(x: torch.Tensor, p_drop: float, training: bool = True) -> torch.Tensor:
    """Apply ShakeDrop to a batch ``x`` of shape ``(N, ...)`` with drop probability ``p_drop``."""
    if not 0.0 <= p_drop <= 1.0:
        raise ValueError(f"p_drop must be in [0, 1], got {p_drop!r}")
    return _ShakeDropFunction.apply(x, float(p_drop), bool(training))


class ShakeDrop(nn.Module):
    """Module wrapper around :func:`shake_drop`; follows ``self.training``."""

    def __init__(self, p_drop: float) -> None:
        super().__init__()
        if not 0.0 <= p_drop <= 1.0:
            raise ValueError(f"p_drop must be in [0, 1], got {p_drop!r}")
        self.p_drop = float(p_drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p_drop == 0.0:
            return x
        return shake_drop(x, self.p_drop, self.training)

    def extra_repr(self) -> str:
        return f"p_drop={self.p_drop:.4f}"


def _add_padded_shortcut(out: torch.Tensor, shortcut: torch.Tensor) -> torch.Tensor:
    """``out + shortcut`` with the shortcut zero-padded along channels to match ``out``."""
    extra = out.shape[1] - shortcut.shape[1]
    if extra > 0:
        # (N, C_in, H, W) -> (N, C_out, H, W); F.pad's last pair pads dim 1 (channels).
        shortcut = F.pad(shortcut, (0, 0, 0, 0, 0, extra))
    return out + shortcut


class PyramidBasicBlock(nn.Module):
    """BN-conv3x3-BN-ReLU-conv3x3-BN residual branch with a zero-padded identity shortcut."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int, p_shakedrop: float) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes)
        self.shake_drop = ShakeDrop(p_shakedrop)
        self.downsample: nn.Module | None = (
            nn.AvgPool2d(2, stride=2, ceil_mode=True) if stride != 1 else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (N, in_planes, H, W) -> (N, planes, ceil(H/stride), ceil(W/stride))
        out = self.conv1(self.bn1(x))
        out = self.conv2(self.relu(self.bn2(out)))
        out = self.shake_drop(self.bn3(out))
        shortcut = x if self.downsample is None else self.downsample(x)
        return _add_padded_shortcut(out, shortcut)


class PyramidBottleneck(nn.Module):
    """BN-conv1x1-BN-ReLU-conv3x3-BN-ReLU-conv1x1-BN branch; output has ``4 * planes`` channels."""

    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int, p_shakedrop: float) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes)
        self.relu3 = nn.ReLU(inplace=True)
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
        self.bn4 = nn.BatchNorm2d(planes * self.expansion)
        self.shake_drop = ShakeDrop(p_shakedrop)
        self.downsample: nn.Module | None = (
            nn.AvgPool2d(2, stride=2, ceil_mode=True) if stride != 1 else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (N, in_planes, H, W) -> (N, 4 * planes, ceil(H/stride), ceil(W/stride))
        out = self.conv1(self.bn1(x))
        out = self.conv2(self.relu2(self.bn2(out)))
        out = self.conv3(self.relu3(self.bn3(out)))
        out = self.shake_drop(self.bn4(out))
        shortcut = x if self.downsample is None else self.downsample(x)
        return _add_padded_shortcut(out, shortcut)


class PyramidNet(nn.Module):
    """PyramidNet-``depth`` with widening factor ``alpha`` for small images.

    Args:
        depth: total number of layers; ``(depth - 2)`` must be a positive multiple of 9 for
            bottleneck blocks and of 6 for basic blocks.
        alpha: total width increase over all residual blocks.
        num_classes: number of output logits.
        in_channels: number of input image channels.
        bottleneck: use bottleneck blocks (output channels x4) instead of basic blocks.
        dropout: dropout probability on the pooled features before the classifier.
        shakedrop: ShakeDrop drop probability of the last block (linearly increasing from
            ``shakedrop / L`` on the first block); 0 disables ShakeDrop.
    """

    def __init__(
        self,
        depth: int,
        alpha: int,
        num_classes: int,
        in_channels: int = 3,
        bottleneck: bool = True,
        dropout: float = 0.0,
        shakedrop: float = 0.0,
    ) -> None:
        super().__init__()
        per_block, kind = (9, "bottleneck") if bottleneck else (6, "basic")
        if depth < per_block + 2 or (depth - 2) % per_block != 0:
            raise ValueError(
                f"invalid PyramidNet depth {depth} for {kind} blocks: (depth - 2) must be a "
                f"positive multiple of {per_block}"
            )
        if alpha < 0:
            raise ValueError(f"invalid PyramidNet alpha {alpha}: must be >= 0")
        block: type[PyramidBasicBlock] | type[PyramidBottleneck] = (
            PyramidBottleneck if bottleneck else PyramidBasicBlock
        )
        n = (depth - 2) // per_block  # blocks per stage
        total_blocks = 3 * n
        add_rate = alpha / total_blocks
        self.depth = depth
        self.alpha = alpha
        self.bottleneck = bottleneck

        base = 16
        self.conv1 = nn.Conv2d(in_channels, base, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(base)

        stages: list[nn.Sequential] = []
        in_planes = base
        width = float(base)  # un-rounded running width
        index = 0
        for stage in range(3):
            blocks: list[nn.Module] = []
            for i in range(n):
                index += 1
                width += add_rate
                planes = int(round(width))
                stride = 2 if stage > 0 and i == 0 else 1
                p = shakedrop * index / total_blocks
                blocks.append(block(in_planes, planes, stride, p))
                in_planes = planes * block.expansion
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages

        self.bn_final = nn.BatchNorm2d(in_planes)
        self.relu_final = nn.ReLU(inplace=True)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.fc = nn.Linear(in_planes, num_classes)
        self.num_features = in_planes
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (N, C_in, H, W)
        out = self.bn1(self.conv1(x))  # (N, 16, H, W)
        out = self.layer1(out)  # (N, C1, H, W)
        out = self.layer2(out)  # (N, C2, ceil(H/2), ceil(W/2))
        out = self.layer3(out)  # (N, C3, ceil(H/4), ceil(W/4))
        out = self.relu_final(self.bn_final(out))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)  # (N, C3)
        return self.fc(self.dropout(out))  # (N, num_classes)
