"""A validation split held out of the training set, stratified per class.

Foret et al. (ICLR 2021, Sec. 3.1) chose SAM's rho on a 10 % split held out of the training set;
the test set is never read to pick a hyperparameter. :func:`validation_split` takes
``round(fraction * n_c)`` images of every class ``c`` (of the labels the user trains on, noisy
or not) at random under its own seed, so that ``--seed`` varies training but not the split.
"""

from __future__ import annotations

import math

import torch

__all__ = ["SplitError", "validation_split"]

# A stream of its own: the split depends on its seed only, never on --seed or the noise seed.
_SPLIT_STREAM = 0x56414C4944  # "VALID"


class SplitError(ValueError):
    """A split that cannot be taken; the message names the class and its size."""


def validation_split(
    labels: torch.Tensor, fraction: float, num_classes: int, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices ``(train, validation)`` of a stratified split of ``labels``, each sorted.

    Of the ``n_c`` images of class ``c``, ``round(fraction * n_c)`` go to the validation split,
    a uniformly random subset drawn under ``seed``; the rest stay for training. Deterministic
    and the same on every process (drawn on the CPU). With ``fraction == 0`` every index is a
    training index.

    Raises :class:`SplitError` for a class with fewer than 2 images (it cannot be in both
    parts) or one that the split would leave without training images.
    """
    if (
        isinstance(fraction, bool)
        or not isinstance(fraction, (int, float))
        or not math.isfinite(fraction)
        or not 0 <= fraction < 1
    ):
        raise SplitError(f"--val-split: got {fraction!r}; expected a number in [0, 1)")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise SplitError(f"--val-split-seed: got {seed!r}; expected an integer >= 0")
    labels = labels.to(device="cpu", dtype=torch.int64)
    n = labels.shape[0]
    if fraction == 0:
        return torch.arange(n), torch.empty(0, dtype=torch.int64)
    counts = torch.bincount(labels, minlength=num_classes)
    generator = torch.Generator().manual_seed(seed ^ _SPLIT_STREAM)
    held_out = []
    for c in range(num_classes):
        n_c = int(counts[c])
        if n_c == 0:
            continue  # a class absent from the training set has nothing to split
        if n_c < 2:
            raise SplitError(
                f"--val-split {fraction:g}: class {c} has {n_c} training image; expected at "
                "least 2 per class (one for training, one for validation)"
            )
        k = round(fraction * n_c)
        if k >= n_c:
            raise SplitError(
                f"--val-split {fraction:g}: takes all {n_c} training images of class {c}, "
                f"leaving it none to train on; expected a smaller fraction"
            )
        members = torch.nonzero(labels == c).flatten()
        held_out.append(members[torch.randperm(n_c, generator=generator)[:k]])
    validation = (
        torch.cat(held_out).sort().values if held_out else torch.empty(0, dtype=torch.int64)
    )
    mask = torch.ones(n, dtype=torch.bool)
    mask[validation] = False
    return torch.nonzero(mask).flatten(), validation
