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
  optionally ``classes``. ``PATH`` is resolved relative to the current directory, not ``root``.

Normalisation constants: ``mean``/``std`` are ALWAYS computed from the training images of the
loaded dataset (per channel, over all pixels of all training images, population standard
deviation, in float64 on ``x / 255``); no published constants are used. For CIFAR-10 this gives
the familiar (0.4914, 0.4822, 0.4465) / (0.2470, 0.2435, 0.2616). A channel with zero variance
gets ``std = 1.0`` so that normalisation never divides by zero.

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
import zipfile
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

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

_NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")
_DIGITS_TEST_SIZE = 360
_MIN_IMAGE_SIZE = 8


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


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def _channel_stats(x: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
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


def _default_crop_padding(height: int) -> int:
    return 4 if height >= 28 else max(1, height // 8)


def _make_dataset(
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
    mean, std = _channel_stats(x_train)
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
    return _make_dataset(
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
    return _make_dataset(
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
    return _make_dataset(
        name,
        x_train,
        y_train,
        x_test,
        y_test,
        list(ds_train.classes),
        hflip=True,
        crop_padding=_default_crop_padding(image_size),
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
    return _make_dataset(
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
# user .npz files
# --------------------------------------------------------------------------------------------


def _npz_get(name: str, path: str, data: Any, key: str) -> np.ndarray:
    try:
        return data[key]
    except ValueError as exc:  # object arrays with allow_pickle=False
        raise DatasetError(
            f"{name}: key {key!r} in {path!r} cannot be loaded without pickle ({exc}); "
            "store plain numeric/str arrays"
        ) from exc
    except (OSError, EOFError, zipfile.BadZipFile, KeyError) as exc:
        raise DatasetError(f"{name}: key {key!r} in {path!r} is corrupted: {exc}") from exc


def _load_npz(spec: str) -> InMemoryDataset:
    name = "npz"  # message prefix; the dataset itself is named by the full spec
    path = spec[len("npz:") :]
    if not path:
        raise DatasetError(f"dataset spec {spec!r}: expected 'npz:PATH' with a non-empty PATH")
    if not os.path.isfile(path):
        raise DatasetError(f"{name}: file {path!r} not found (expected an .npz file)")
    try:
        with open(path, "rb") as f:
            magic = f.read(6)
    except OSError as exc:
        raise DatasetError(f"{name}: cannot read {path!r}: {exc}") from exc
    if not magic.startswith((b"PK\x03\x04", b"PK\x05\x06", b"\x93NUMPY")):
        raise DatasetError(
            f"{name}: {path!r} is not an .npz archive (no zip header); "
            "expected a file written by numpy.savez / savez_compressed"
        )
    try:
        data = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise DatasetError(
            f"{name}: {path!r} is not a valid .npz archive ({type(exc).__name__}: {exc}); "
            "expected a file written by numpy.savez / savez_compressed"
        ) from exc
    if not isinstance(data, np.lib.npyio.NpzFile):
        raise DatasetError(
            f"{name}: {path!r} holds a single array, not an .npz archive with keys "
            f"{', '.join(_NPZ_KEYS)} (use numpy.savez)"
        )
    with data:
        missing = [k for k in _NPZ_KEYS if k not in data.files]
        if missing:
            raise DatasetError(
                f"{name}: {path!r} is missing key(s) {', '.join(missing)} "
                f"(found {', '.join(data.files) or 'none'}; expected "
                f"{', '.join(_NPZ_KEYS)} and optionally classes)"
            )
        arrays = {k: _npz_get(name, path, data, k) for k in _NPZ_KEYS}
        classes_arr = _npz_get(name, path, data, "classes") if "classes" in data.files else None

    def err(key: str, msg: str) -> DatasetError:
        return DatasetError(f"{name}: {key!r} in {path!r} {msg}")

    images: dict[str, np.ndarray] = {}
    for key in ("x_train", "x_test"):
        x = arrays[key]
        if x.dtype != np.uint8:
            raise err(key, f"has dtype {x.dtype}; expected uint8 images (values 0..255)")
        if x.ndim == 3:
            x = x[:, None]
        elif x.ndim == 4:
            if x.shape[3] not in (1, 3):
                raise err(
                    key,
                    f"has shape {x.shape}; expected N x H x W or N x H x W x C with C in {{1, 3}}",
                )
            x = x.transpose(0, 3, 1, 2)
        else:
            raise err(
                key,
                f"has {x.ndim} dimensions (shape {x.shape}); "
                "expected N x H x W or N x H x W x C with C in {1, 3}",
            )
        if x.shape[0] == 0:
            raise err(key, f"is empty (shape {arrays[key].shape}); expected at least one image")
        if x.shape[2] == 0 or x.shape[3] == 0:
            raise err(key, f"has shape {arrays[key].shape}; images must be non-empty")
        images[key] = x
    if images["x_train"].shape[1:] != images["x_test"].shape[1:]:
        raise DatasetError(
            f"{name}: 'x_train' and 'x_test' in {path!r} have different image shapes "
            f"({arrays['x_train'].shape[1:]} vs {arrays['x_test'].shape[1:]}); "
            "expected the same H x W (x C)"
        )

    labels: dict[str, np.ndarray] = {}
    for key, xkey in (("y_train", "x_train"), ("y_test", "x_test")):
        y = arrays[key]
        if y.dtype.kind not in "iu":
            raise err(key, f"has dtype {y.dtype}; expected integer class labels")
        if y.ndim != 1:
            raise err(key, f"has shape {y.shape}; expected a 1-D array of labels")
        if y.shape[0] != images[xkey].shape[0]:
            raise err(
                key,
                f"has {y.shape[0]} labels but {xkey!r} has {images[xkey].shape[0]} images; "
                "expected one label per image",
            )
        if y.size and int(y.min()) < 0:
            raise err(key, f"contains negative label {int(y.min())}; expected labels >= 0")
        labels[key] = y.astype(np.int64)

    max_label = max(int(labels["y_train"].max()), int(labels["y_test"].max()))
    if classes_arr is not None:
        if classes_arr.dtype.kind not in "US" or classes_arr.ndim != 1:
            raise err(
                "classes",
                f"has dtype {classes_arr.dtype} and shape {classes_arr.shape}; "
                "expected a 1-D array of str",
            )
        classes = [
            c.decode("utf-8", "replace") if isinstance(c, bytes) else str(c)
            for c in classes_arr.tolist()
        ]
        if len(set(classes)) != len(classes):
            raise err("classes", f"contains duplicate names {classes}; expected unique names")
        if max_label >= len(classes):
            key = "y_train" if int(labels["y_train"].max()) == max_label else "y_test"
            raise err(
                key,
                f"contains label {max_label} but 'classes' has only {len(classes)} entries; "
                f"expected labels in 0..{len(classes) - 1}",
            )
    else:
        classes = [str(i) for i in range(max_label + 1)]
    if len(classes) < 2:
        which = "'classes'" if classes_arr is not None else "the labels (max label + 1)"
        raise DatasetError(
            f"{name}: {path!r} defines {len(classes)} class(es) via {which}; "
            "expected at least 2 classes"
        )

    height = int(images["x_train"].shape[2])
    return _make_dataset(
        spec,
        torch.from_numpy(np.ascontiguousarray(images["x_train"])),
        torch.from_numpy(labels["y_train"]),
        torch.from_numpy(np.ascontiguousarray(images["x_test"])),
        torch.from_numpy(labels["y_test"]),
        classes,
        hflip=True,
        crop_padding=_default_crop_padding(height),
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
        return _load_npz("npz:" + spec[4:])
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
