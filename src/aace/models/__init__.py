"""Image classifiers for CIFAR-style (and smaller) inputs, built by name.

>>> model = create_model("wrn16_1", num_classes=10)  # doctest: +SKIP

Names:

* ``wrn{depth}_{width}``: Wide ResNet (e.g. ``wrn28_10``, ``wrn16_8``).
* ``pyramidnet{depth}_{alpha}``: PyramidNet with bottleneck blocks (e.g. ``pyramidnet272_200``,
  the SAM paper's model); ``_bottleneck`` may be appended explicitly.
* ``pyramidnet{depth}_{alpha}_basic``: PyramidNet with basic blocks (e.g. ``pyramidnet110_48``).
* ``timm:NAME``: any timm architecture (``pip install 'aace[timm]'``; see
  :mod:`aace.integrations.timm`), e.g. ``timm:resnet18`` or ``timm:vit_tiny_patch16_224``.
"""

from __future__ import annotations

import math
import numbers
import re

from torch import nn

from .pyramidnet import PyramidNet, ShakeDrop, shake_drop
from .wide_resnet import WideResNet

__all__ = ["create_model", "list_models", "WideResNet", "PyramidNet", "ShakeDrop", "shake_drop"]

_WRN_RE = re.compile(r"wrn(\d+)_(\d+)")
_PYRAMIDNET_RE = re.compile(r"pyramidnet(\d+)_(\d+)(?:_(basic|bottleneck))?")
_EXPECTED = (
    "wrn{depth}_{width} (e.g. wrn28_10), "
    "pyramidnet{depth}_{alpha}[_basic|_bottleneck] (e.g. pyramidnet272_200), "
    "timm:NAME (e.g. timm:resnet18)"
)


def list_models() -> list[str]:
    """Name patterns accepted by :func:`create_model`, followed by a few concrete examples."""
    return [
        "wrn{depth}_{width}",
        "pyramidnet{depth}_{alpha}",
        "pyramidnet{depth}_{alpha}_basic",
        "pyramidnet{depth}_{alpha}_bottleneck",
        "timm:NAME",
        "wrn28_10",
        "wrn16_8",
        "pyramidnet272_200",
        "pyramidnet110_48_basic",
    ]


def _check_int(arg: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{arg} must be an int, got {value!r}")
    if value < minimum:
        raise ValueError(f"{arg} must be >= {minimum}, got {value!r}")
    return int(value)


def _check_prob(arg: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{arg} must be a float, got {value!r}")
    if not (math.isfinite(value) and 0.0 <= value < 1.0):
        raise ValueError(f"{arg} must be in [0, 1), got {value!r}")
    return float(value)


def create_model(
    name: str,
    num_classes: int,
    in_channels: int = 3,
    dropout: float = 0.0,
    shakedrop: float = 0.0,
    *,
    image_size: tuple[int, int] | int | None = None,
    pretrained: bool = False,
) -> nn.Module:
    """Build a freshly initialised model from its name (see :func:`list_models`).

    Args:
        name: ``wrn{depth}_{width}`` or ``pyramidnet{depth}_{alpha}[_basic|_bottleneck]``
            (case-insensitive).
        num_classes: number of output logits (>= 2).
        in_channels: number of input image channels (>= 1).
        dropout: dropout probability in [0, 1); inside every block for WRN, before the
            classifier for PyramidNet.
        shakedrop: final-block ShakeDrop probability in [0, 1); PyramidNet only.
        image_size: the input size, for timm models with a fixed one (vision transformers).
        pretrained: timm models only: pretrained weights from the local cache.

    Raises:
        ValueError: unknown name, invalid depth for the architecture, or an argument out of range.
    """
    if not isinstance(name, str):
        raise TypeError(f"model name must be a str, got {name!r}")
    num_classes = _check_int("num_classes", num_classes, 2)
    in_channels = _check_int("in_channels", in_channels, 1)
    dropout = _check_prob("dropout", dropout)
    shakedrop = _check_prob("shakedrop", shakedrop)

    if name.strip().startswith("timm:"):
        if shakedrop > 0:
            raise ValueError(f"shakedrop={shakedrop!r} is only supported by pyramidnet models")
        from aace.integrations.timm import create_timm_model

        return create_timm_model(
            name.strip()[len("timm:") :],
            num_classes,
            in_channels,
            dropout=dropout,
            image_size=image_size,
            pretrained=pretrained,
        )
    if pretrained:
        raise ValueError(f"pretrained=True is only supported by timm:NAME models, not {name!r}")

    key = name.strip().lower()
    match = _WRN_RE.fullmatch(key)
    if match:
        if shakedrop > 0:
            raise ValueError(
                f"shakedrop={shakedrop!r} is only supported by pyramidnet models, not {name!r}"
            )
        depth, width = int(match.group(1)), int(match.group(2))
        return WideResNet(depth, width, num_classes, in_channels=in_channels, dropout=dropout)

    match = _PYRAMIDNET_RE.fullmatch(key)
    if match:
        depth, alpha = int(match.group(1)), int(match.group(2))
        bottleneck = match.group(3) != "basic"
        return PyramidNet(
            depth,
            alpha,
            num_classes,
            in_channels=in_channels,
            bottleneck=bottleneck,
            dropout=dropout,
            shakedrop=shakedrop,
        )

    raise ValueError(f"unknown model {name!r}; expected one of: {_EXPECTED}")
