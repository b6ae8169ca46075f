"""The ``npz:PATH`` format: a user's own dataset in one numpy archive.

The archive holds ``x_train``, ``y_train``, ``x_test``, ``y_test`` and optionally ``classes``:
uint8 images ``N x H x W`` or ``N x H x W x C`` (C in {1, 3}), integer labels ``>= 0``, one per
image, and a 1-D array of unique class names. ``PATH`` is resolved relative to the current
directory. Anything else raises :class:`~aace.data.dataset.DatasetError` naming the key, what
was found and what was expected; nothing is unpickled (``allow_pickle=False``).
"""

from __future__ import annotations

import os
import zipfile
from typing import Any

import numpy as np
import torch

from aace.data.dataset import DatasetError, InMemoryDataset, default_crop_padding, make_dataset

__all__ = ["NPZ_KEYS", "load_npz"]

NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")


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


def load_npz(spec: str) -> InMemoryDataset:
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
            f"{', '.join(NPZ_KEYS)} (use numpy.savez)"
        )
    with data:
        missing = [k for k in NPZ_KEYS if k not in data.files]
        if missing:
            raise DatasetError(
                f"{name}: {path!r} is missing key(s) {', '.join(missing)} "
                f"(found {', '.join(data.files) or 'none'}; expected "
                f"{', '.join(NPZ_KEYS)} and optionally classes)"
            )
        arrays = {k: _npz_get(name, path, data, k) for k in NPZ_KEYS}
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
    return make_dataset(
        spec,
        torch.from_numpy(np.ascontiguousarray(images["x_train"])),
        torch.from_numpy(labels["y_train"]),
        torch.from_numpy(np.ascontiguousarray(images["x_test"])),
        torch.from_numpy(labels["y_test"]),
        classes,
        hflip=True,
        crop_padding=default_crop_padding(height),
        cutout=0,
    )
