"""Datasets held in memory and on-device batch loading with vectorised augmentation.

* :func:`load_dataset` reads a dataset (``cifar10``, ``cifar100``, ``fashion-mnist``,
  ``food101``, ``digits`` or ``npz:PATH``) into an :class:`InMemoryDataset` of uint8 tensors.
* :class:`BatchLoader` serves shuffled, augmented, per-rank-sharded mini-batches from a copy of
  the data kept on the training device.
* :func:`symmetric_label_noise` corrupts a fraction of the training labels (label-noise runs).
* :func:`validation_split` holds a stratified fraction of the training set out for validation.
"""

from aace.data.loader import BatchLoader
from aace.data.noise import symmetric_label_noise
from aace.data.sources import DATASET_NAMES, DatasetError, InMemoryDataset, load_dataset
from aace.data.split import SplitError, validation_split

__all__ = [
    "DATASET_NAMES",
    "BatchLoader",
    "DatasetError",
    "InMemoryDataset",
    "SplitError",
    "load_dataset",
    "symmetric_label_noise",
    "validation_split",
]
