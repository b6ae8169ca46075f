"""The in-memory dataset every loader returns, its checks and its normalisation constants.

:class:`InMemoryDataset` holds a whole image-classification dataset as contiguous CPU ``uint8``
tensors ``(N, C, H, W)`` and ``int64`` labels; :func:`make_dataset` checks the arrays of a
source (:mod:`aace.data.sources`, :mod:`aace.data.npz`) and computes ``mean``/``std`` from the
training images (:func:`channel_stats`). Every user-facing problem raises :class:`DatasetError`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

__all__ = ["DatasetError", "InMemoryDataset", "channel_stats", "default_crop_padding",
           "make_dataset"]  # fmt: skip


class DatasetError(ValueError):
    """A user-facing data problem: bad spec, missing/corrupted files, malformed arrays."""


@dataclass(repr=False, eq=False)
class InMemoryDataset:
    """A whole image-classification dataset held in memory.

    Images are contiguous CPU ``uint8`` tensors ``(N, C, H, W)``; labels are ``int64`` ``(N,)``.
    ``mean``/``std`` are per-channel statistics of ``x_train / 255`` (see the module docstring).
    ``hflip``, ``crop_padding`` and ``cutout`` are the default training augmentation settings.
    """

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    classes: list[str]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    hflip: bool
    crop_padding: int
    cutout: int

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def in_channels(self) -> int:
        return int(self.x_train.shape[1])

    @property
    def image_size(self) -> tuple[int, int]:
        return int(self.x_train.shape[2]), int(self.x_train.shape[3])

    def __repr__(self) -> str:
        c, (h, w) = self.in_channels, self.image_size
        mean = ", ".join(f"{m:.4f}" for m in self.mean)
        std = ", ".join(f"{s:.4f}" for s in self.std)
        return (
            f"InMemoryDataset(name={self.name!r}, train={len(self.y_train)}, "
            f"test={len(self.y_test)}, shape=({c}, {h}, {w}), classes={self.num_classes}, "
            f"mean=({mean}), std=({std}), hflip={self.hflip}, "
            f"crop_padding={self.crop_padding}, cutout={self.cutout})"
        )


def channel_stats(x: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and population std of ``x / 255`` for a uint8 ``(N, C, H, W)`` tensor.

    Computed exactly from a 256-bin histogram of each channel (float64 arithmetic on integer
    counts), so it is fast and independent of summation order.
    """
    values = torch.arange(256, dtype=torch.float64)
    means, stds = [], []
    for c in range(int(x.shape[1])):
        hist = torch.bincount(x[:, c].reshape(-1), minlength=256).to(torch.float64)
        count = max(float(hist.sum()), 1.0)
        mean = float((hist * values).sum()) / count
        var = max(float((hist * (values - mean).square()).sum()) / count, 0.0)
        std = var**0.5 / 255.0
        means.append(mean / 255.0)
        stds.append(std if std > 0 else 1.0)
    return tuple(means), tuple(stds)


def default_crop_padding(height: int) -> int:
    return 4 if height >= 28 else max(1, height // 8)


def make_dataset(
    name: str,
    x_train: torch.Tensor,
    y_train: torch.Tensor,
    x_test: torch.Tensor,
    y_test: torch.Tensor,
    classes: Sequence[str],
    *,
    hflip: bool,
    crop_padding: int,
    cutout: int,
) -> InMemoryDataset:
    x_train = x_train.contiguous()
    x_test = x_test.contiguous()
    y_train = y_train.to(torch.int64).contiguous()
    y_test = y_test.to(torch.int64).contiguous()
    for split, x, y in (("train", x_train, y_train), ("test", x_test, y_test)):
        if x.dtype != torch.uint8 or x.ndim != 4:
            raise DatasetError(
                f"{name}: {split} images must be uint8 (N, C, H, W), got {x.dtype} {tuple(x.shape)}"
            )
        if y.ndim != 1 or y.shape[0] != x.shape[0]:
            raise DatasetError(
                f"{name}: {split} has {x.shape[0]} images but labels of shape {tuple(y.shape)}"
            )
    mean, std = channel_stats(x_train)
    return InMemoryDataset(
        name=name,
        x_train=x_train,
        y_train=y_train,
        x_test=x_test,
        y_test=y_test,
        classes=[str(c) for c in classes],
        mean=mean,
        std=std,
        hflip=hflip,
        crop_padding=crop_padding,
        cutout=cutout,
    )
