"""Symmetric label noise: the corrupted training sets of the label-noise experiments.

Foret et al. (ICLR 2021, Table 4) and Kwon et al. (ICML 2021, Table 6) corrupt a fraction of
CIFAR-10's training labels, each to another class drawn uniformly at random, and leave the test
set clean; SAM's advantage over SGD grows with the noise rate there.
"""

from __future__ import annotations

import math

import torch

__all__ = ["symmetric_label_noise"]

# A stream of its own: the corruption depends on the noise seed only, never on --seed.
_NOISE_STREAM = 0x4E4F495345  # "NOISE"


def symmetric_label_noise(
    labels: torch.Tensor, rate: float, num_classes: int, seed: int = 0
) -> torch.Tensor:
    """Labels with exactly ``round(rate * n)`` entries changed, each to a different class.

    The changed entries are a uniformly random subset of that size; each gets one of the
    ``num_classes - 1`` other classes with equal probability (new = (old + U{1..C-1}) mod C).
    Deterministic under ``seed`` and the same on every device; ``labels`` is not modified.

    Args:
        labels: integer tensor ``(n,)`` with values in ``[0, num_classes)``.
        rate: the fraction of labels to change, in ``[0, 1]``.
        num_classes: ``C >= 2``.
        seed: the corruption's seed (``>= 0``), independent of any training seed.

    Returns:
        int64 tensor ``(n,)`` on ``labels.device``.

    Raises:
        ValueError: ``labels`` is not a 1-D integer tensor, or a label is outside
            ``[0, num_classes)``, or ``rate``, ``num_classes`` or ``seed`` is out of range.
    """
    if not isinstance(labels, torch.Tensor) or labels.ndim != 1:
        shape = tuple(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__
        raise ValueError(f"labels: got {shape}; expected a 1-D integer tensor")
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise ValueError(f"labels: got dtype {labels.dtype}; expected an integer tensor")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"num_classes: got {num_classes!r}; expected an integer >= 2")
    if (
        isinstance(rate, bool)
        or not isinstance(rate, (int, float))
        or not math.isfinite(rate)
        or not 0 <= rate <= 1
    ):
        raise ValueError(f"rate: got {rate!r}; expected a number in [0, 1]")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed: got {seed!r}; expected an integer >= 0")
    n = labels.shape[0]
    if n and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(
            f"labels: got values in [{int(labels.min())}, {int(labels.max())}]; expected "
            f"[0, {num_classes - 1}] for num_classes={num_classes}"
        )
    generator = torch.Generator().manual_seed(seed ^ _NOISE_STREAM)
    changed = torch.randperm(n, generator=generator)[: round(rate * n)]
    offsets = torch.randint(1, num_classes, (changed.numel(),), generator=generator)
    noisy = labels.to(device="cpu", dtype=torch.int64, copy=True)
    noisy[changed] = (noisy[changed] + offsets) % num_classes
    return noisy.to(labels.device)
