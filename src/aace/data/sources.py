"""Loading image-classification datasets into memory as uint8 tensors.

Every dataset is returned as an :class:`InMemoryDataset`: the full training and test sets as
contiguous CPU ``uint8`` tensors of shape ``(N, C, H, W)`` plus ``int64`` labels, the class names,
the per-channel normalisation constants and the default augmentation settings for that dataset.
The on-device batching and augmentation live in :mod:`aace.data.loader`.

Supported specs (see :data:`DATASET_NAMES`):

* ``cifar10``, ``cifar100``, ``fashion-mnist``, ``food101``: read through torchvision's own
  dataset classes from ``root`` (``download=True`` lets torchvision fetch them). The raw arrays
  are taken directly from the dataset objects (no PIL round trip) for CIFAR and Fashion-MNIST.
  Food-101 images are padded to a square (centred, black padding) and resized to
  ``image_size`` x ``image_size`` with PIL's bilinear filter (antialiased when downsampling).
* ``digits``: scikit-learn's bundled 8x8 digits (no download ever), with a fixed split.
* ``npz:PATH``: a user ``.npz`` file with ``x_train``, ``y_train``, ``x_test``, ``y_test`` and
  optionally ``classes``. ``PATH`` is resolved relative to the current directory, not ``root``
  (the format and its checks: :mod:`aace.data.npz`).

Normalisation constants: ``mean``/``std`` are ALWAYS computed from the training images of the
loaded dataset (per channel, over all pixels of all training images, population standard
deviation, in float64 on ``x / 255``); no published constants are used. For CIFAR-10 this gives
the familiar (0.4914, 0.4822, 0.4465) / (0.2470, 0.2435, 0.2616). A channel with zero variance
gets ``std = 1.0`` so that normalisation never divides by zero (:mod:`aace.data.dataset`).

Every user-facing problem (unknown name, missing or corrupted files, malformed ``.npz``) raises
:class:`DatasetError` (a ``ValueError``) with a message naming the path or argument, the value
found and what was expected. Nothing is loaded or downloaded at import time.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import pickle
import shutil
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch

from aace.data.dataset import DatasetError, InMemoryDataset, default_crop_padding, make_dataset
from aace.data.npz import load_npz

__all__ = ["DATASET_NAMES", "DatasetError", "InMemoryDataset", "load_dataset"]

DATASET_NAMES: tuple[str, ...] = ("cifar10", "cifar100", "fashion-mnist", "food101", "digits")
"""Built-in dataset names; ``npz:PATH`` is accepted in addition."""

_ALIASES = {
    "cifar-10": "cifar10",
    "cifar-100": "cifar100",
    "fashion_mnist": "fashion-mnist",
    "fashionmnist": "fashion-mnist",
    "fmnist": "fashion-mnist",
    "food-101": "food101",
    "food_101": "food101",
}

_DIGITS_TEST_SIZE = 360
_MIN_IMAGE_SIZE = 8


def _md5(path: str) -> str:
    h = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _missing_hint(download: bool, error: BaseException | None) -> str:
    if download:
        return f"downloading them failed: {error}" if error is not None else "download failed"
    return "pass --download (download=True) to fetch them"


def _diagnose(
    name: str,
    root: str,
    expected_desc: str,
    files: Sequence[tuple[str, str | None]],
    readers: Sequence[tuple[str, Callable[[str], Any]]],
    download: bool,
    error: BaseException,
) -> DatasetError:
    """Turn a torchvision failure into one clear DatasetError by inspecting the files on disk.

    ``files`` are ``(path, md5-or-None)`` pairs that must exist; ``readers`` are ``(path, fn)``
    pairs used to find which file cannot be parsed when everything exists and checksums match.
    """
    missing = [p for p, _ in files if not os.path.exists(p)]
    if missing:
        detail = ""
        if len(missing) < len(files):  # partially present: say exactly what is missing
            detail = "; missing " + ", ".join(repr(p) for p in missing)
        return DatasetError(
            f"{name}: dataset files not found in {root!r} (expected {expected_desc}{detail}); "
            f"{_missing_hint(download, error if download else None)}"
        )
    for path, md5 in files:
        if md5 is not None and os.path.isfile(path):
            actual = _md5(path)
            if actual != md5:
                return DatasetError(
                    f"{name}: file {path!r} is corrupted (MD5 {actual}, expected {md5}); "
                    "delete it and pass --download (download=True) to fetch it again"
                )
    for path, reader in readers:
        try:
            reader(path)
        except Exception as exc:  # noqa: BLE001 - reported to the user with the file name
            return DatasetError(
                f"{name}: file {path!r} is corrupted or not in the expected format "
                f"({type(exc).__name__}: {exc}); delete it and pass --download (download=True) "
                "to fetch it again"
            )
    return DatasetError(
        f"{name}: failed to load the dataset from {root!r} (expected {expected_desc}): "
        f"{type(error).__name__}: {error}"
    )


# Exceptions torchvision's dataset classes raise on missing/corrupted/unparsable files.
_LOAD_ERRORS = (
    RuntimeError,
    OSError,
    EOFError,
    pickle.UnpicklingError,
    KeyError,
    ValueError,
    TypeError,
    AssertionError,
    IndexError,
    AttributeError,
)


def _read_pickle(path: str) -> Any:
    with open(path, "rb") as f:
        return pickle.load(f, encoding="latin1")


# --------------------------------------------------------------------------------------------
# torchvision datasets
# --------------------------------------------------------------------------------------------


def _load_cifar(name: str, root: str, download: bool) -> InMemoryDataset:
    from torchvision.datasets import CIFAR10, CIFAR100

    cls = CIFAR10 if name == "cifar10" else CIFAR100
    folder = os.path.join(root, cls.base_folder)
    if name == "cifar10":
        expected = f"{folder}/data_batch_1..5, test_batch and batches.meta"
    else:
        expected = f"{folder}/train, test and meta"
    files = [(os.path.join(folder, f), md5) for f, md5 in cls.train_list + cls.test_list]
    files.append((os.path.join(folder, cls.meta["filename"]), cls.meta["md5"]))

    def check_batch(path: str) -> None:
        entry = _read_pickle(path)
        if "labels" not in entry and "fine_labels" not in entry:
            raise KeyError("no 'labels' / 'fine_labels' entry")
        np.asarray(entry["data"]).reshape(-1, 3, 32, 32)

    def check_meta(path: str) -> None:
        _read_pickle(path)[cls.meta["key"]]

    readers = [(p, check_batch) for p, _ in files[:-1]] + [(files[-1][0], check_meta)]

    try:
        parts = []
        for train in (True, False):
            ds = cls(root, train=train, download=download)
            x = torch.from_numpy(np.ascontiguousarray(ds.data.transpose(0, 3, 1, 2)))
            y = torch.as_tensor(np.asarray(ds.targets, dtype=np.int64))
            parts.append((x, y, list(ds.classes)))
    except _LOAD_ERRORS as exc:
        raise _diagnose(name, root, expected, files, readers, download, exc) from exc
    (x_train, y_train, classes), (x_test, y_test, _) = parts
    return make_dataset(
        name, x_train, y_train, x_test, y_test, classes, hflip=True, crop_padding=4, cutout=16
    )


def _load_fashion_mnist(root: str, download: bool) -> InMemoryDataset:
    from torchvision.datasets import FashionMNIST
    from torchvision.datasets.mnist import read_image_file, read_label_file

    name = "fashion-mnist"
    raw = os.path.join(root, "FashionMNIST", "raw")
    stems = [os.path.splitext(os.path.basename(url))[0] for url, _ in FashionMNIST.resources]
    expected = f"{raw}/{{train,t10k}}-{{images-idx3,labels-idx1}}-ubyte (optionally .gz)"
    files: list[tuple[str, str | None]] = [(os.path.join(raw, s), None) for s in stems]
    readers = [(p, read_image_file if "images" in p else read_label_file) for p, _ in files]

    # torchvision only extracts the .gz files as part of download(); do it here for users who
    # placed the compressed files by hand.
    for stem in stems:
        path = os.path.join(raw, stem)
        if not os.path.exists(path) and os.path.isfile(path + ".gz"):
            try:
                with gzip.open(path + ".gz", "rb") as src, open(path + ".part", "wb") as dst:
                    shutil.copyfileobj(src, dst)
                os.replace(path + ".part", path)
            except (OSError, EOFError) as exc:
                raise DatasetError(
                    f"{name}: cannot decompress {path + '.gz'!r} into {path!r}: {exc}"
                ) from exc

    try:
        parts = []
        for train in (True, False):
            ds = FashionMNIST(root, train=train, download=download)
            x = ds.data
            y = ds.targets
            if x.ndim != 3 or y.ndim != 1 or x.shape[0] != y.shape[0]:
                split = "train" if train else "t10k"
                raise DatasetError(
                    f"{name}: {raw}/{split}-images-idx3-ubyte has shape {tuple(x.shape)} but "
                    f"{raw}/{split}-labels-idx1-ubyte has shape {tuple(y.shape)}; expected "
                    "(N, 28, 28) images and (N,) labels"
                )
            parts.append((x.unsqueeze(1).contiguous(), y.to(torch.int64)))
    except DatasetError:
        raise
    except _LOAD_ERRORS as exc:
        raise _diagnose(name, root, expected, files, readers, download, exc) from exc
    (x_train, y_train), (x_test, y_test) = parts
    return make_dataset(
        name,
        x_train,
        y_train,
        x_test,
        y_test,
        list(FashionMNIST.classes),
        hflip=True,
        crop_padding=4,
        cutout=0,
    )


def _pad_square_resize(img: Any, size: int) -> np.ndarray:
    """Pad a PIL image to a centred black square, then resize it to ``size`` x ``size``."""
    from PIL import Image

    img = img.convert("RGB")
    w, h = img.size
    side = max(w, h)
    if w != h:
        canvas = Image.new("RGB", (side, side), (0, 0, 0))
        canvas.paste(img, ((side - w) // 2, (side - h) // 2))
        img = canvas
    if side != size:
        img = img.resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(img, dtype=np.uint8)


def _load_food101_split(ds: Any, size: int, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    from PIL import Image

    files = getattr(ds, "_image_files", None)
    labels = getattr(ds, "_labels", None)
    n = len(ds)
    out = np.empty((n, size, size, 3), dtype=np.uint8)

    if files is not None and labels is not None and len(files) == n and len(labels) == n:

        def work(i: int) -> None:
            path = files[i]
            try:
                with Image.open(path) as img:
                    out[i] = _pad_square_resize(img, size)
            except (OSError, ValueError, SyntaxError) as exc:
                raise DatasetError(f"{name}: cannot read image {str(path)!r}: {exc}") from exc

        y = np.asarray(labels, dtype=np.int64)
    else:  # public API fallback: decode through the dataset's own loader
        y = np.empty(n, dtype=np.int64)

        def work(i: int) -> None:
            try:
                img, label = ds[i]
            except (OSError, ValueError, SyntaxError) as exc:
                raise DatasetError(f"{name}: cannot read image #{i}: {exc}") from exc
            out[i] = _pad_square_resize(img, size)
            y[i] = label

    workers = max(1, min(8, os.cpu_count() or 1))
    if n > 0:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            # list() re-raises the first worker exception (a DatasetError naming the file)
            list(pool.map(work, range(n), chunksize=64))
    x = torch.from_numpy(out).permute(0, 3, 1, 2).contiguous()
    return x, torch.from_numpy(y)


def _load_food101(root: str, download: bool, image_size: int) -> InMemoryDataset:
    from torchvision.datasets import Food101

    name = "food101"
    base = os.path.join(root, "food-101")
    expected = f"{base}/images/<class>/<id>.jpg and {base}/meta/{{train,test}}.json"
    files: list[tuple[str, str | None]] = [
        (os.path.join(base, "images"), None),
        (os.path.join(base, "meta", "train.json"), None),
        (os.path.join(base, "meta", "test.json"), None),
    ]

    def check_json(path: str) -> None:
        with open(path) as f:
            meta = json.load(f)
        if not isinstance(meta, dict) or not all(isinstance(v, list) for v in meta.values()):
            raise ValueError("expected a JSON object mapping class name -> list of image ids")

    readers = [(p, check_json) for p, _ in files[1:]]
    try:
        ds_train = Food101(root, split="train", download=download)
        ds_test = Food101(root, split="test", download=download)
    except _LOAD_ERRORS as exc:
        raise _diagnose(name, root, expected, files, readers, download, exc) from exc
    if list(ds_train.classes) != list(ds_test.classes):
        raise DatasetError(
            f"{name}: {base}/meta/train.json and test.json list different classes "
            f"({len(ds_train.classes)} vs {len(ds_test.classes)})"
        )
    x_train, y_train = _load_food101_split(ds_train, image_size, name)
    x_test, y_test = _load_food101_split(ds_test, image_size, name)
    return make_dataset(
        name,
        x_train,
        y_train,
        x_test,
        y_test,
        list(ds_train.classes),
        hflip=True,
        crop_padding=default_crop_padding(image_size),
        cutout=max(1, image_size // 2),
    )


# --------------------------------------------------------------------------------------------
# scikit-learn digits
# --------------------------------------------------------------------------------------------


def _load_digits() -> InMemoryDataset:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = np.asarray(bunch.images, dtype=np.float64)  # (1797, 8, 8), values 0..16
    x = np.rint(images * 255.0 / 16.0).clip(0, 255).astype(np.uint8)[:, None]
    y = np.asarray(bunch.target, dtype=np.int64)
    perm = np.random.default_rng(0).permutation(len(y))
    train_idx, test_idx = perm[:-_DIGITS_TEST_SIZE], perm[-_DIGITS_TEST_SIZE:]
    return make_dataset(
        "digits",
        torch.from_numpy(np.ascontiguousarray(x[train_idx])),
        torch.from_numpy(y[train_idx]),
        torch.from_numpy(np.ascontiguousarray(x[test_idx])),
        torch.from_numpy(y[test_idx]),
        [str(i) for i in range(10)],
        hflip=False,
        crop_padding=1,
        cutout=0,
    )


# --------------------------------------------------------------------------------------------
# entry point
# --------------------------------------------------------------------------------------------


def load_dataset(
    spec: str,
    root: str | os.PathLike[str] = "data",
    download: bool = False,
    image_size: int = 32,
) -> InMemoryDataset:
    """Load a dataset fully into memory.

    Args:
        spec: one of :data:`DATASET_NAMES` (case-insensitive) or ``"npz:PATH"``.
        root: directory holding (or receiving, with ``download=True``) the torchvision datasets.
            Ignored for ``digits`` and ``npz:PATH``.
        download: let torchvision fetch missing files (torchvision datasets only).
        image_size: output side length for ``food101`` (which is resized); must be >= 8.
            The other datasets keep their native size.

    Raises:
        DatasetError: for an unknown spec, a bad ``image_size`` or missing/corrupted data.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise DatasetError(
            f"dataset: got {spec!r}; expected one of {', '.join(DATASET_NAMES)} or npz:PATH"
        )
    if isinstance(image_size, bool) or not isinstance(image_size, int | np.integer):
        raise DatasetError(f"image_size: got {image_size!r}; expected an integer >= 8")
    image_size = int(image_size)
    if image_size < _MIN_IMAGE_SIZE:
        raise DatasetError(f"image_size: got {image_size}; expected an integer >= 8")

    spec = spec.strip()
    if spec.lower().startswith("npz:"):
        return load_npz("npz:" + spec[4:])
    key = spec.lower()
    key = _ALIASES.get(key, key)
    root_s = os.fspath(root)
    if key in ("cifar10", "cifar100"):
        return _load_cifar(key, root_s, download)
    if key == "fashion-mnist":
        return _load_fashion_mnist(root_s, download)
    if key == "food101":
        return _load_food101(root_s, download, image_size)
    if key == "digits":
        return _load_digits()
    raise DatasetError(
        f"dataset: unknown name {spec!r}; expected one of {', '.join(DATASET_NAMES)} or npz:PATH"
    )
