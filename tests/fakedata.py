"""Tiny fake datasets in the real on-disk formats that torchvision reads (shared by tests)."""

from __future__ import annotations

import gzip
import hashlib
import json
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from torchvision.datasets import CIFAR10, CIFAR100


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def dump(path: Path, obj: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        pickle.dump(obj, f)


def write_cifar10(root: Path, monkeypatch: pytest.MonkeyPatch, n_train=20, n_test=10, seed=0):
    """CIFAR-10 python pickles; patches torchvision's expected MD5s to those of the fake files."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    x_train = rng.integers(0, 256, (n_train, 3, 32, 32), dtype=np.uint8)
    y_train = rng.integers(0, 10, n_train)
    x_test = rng.integers(0, 256, (n_test, 3, 32, 32), dtype=np.uint8)
    y_test = rng.integers(0, 10, n_test)
    train_list = []
    for i, (xs, ys) in enumerate(
        zip(np.array_split(x_train, 5), np.array_split(y_train, 5), strict=True), start=1
    ):
        name = f"data_batch_{i}"
        dump(folder / name, {"data": xs.reshape(len(xs), -1), "labels": ys.tolist()})
        train_list.append([name, md5(folder / name)])
    dump(folder / "test_batch", {"data": x_test.reshape(n_test, -1), "labels": y_test.tolist()})
    names = [f"class{i}" for i in range(10)]
    dump(folder / "batches.meta", {"label_names": names})
    monkeypatch.setattr(CIFAR10, "train_list", train_list)
    monkeypatch.setattr(CIFAR10, "test_list", [["test_batch", md5(folder / "test_batch")]])
    monkeypatch.setattr(
        CIFAR10,
        "meta",
        {
            "filename": "batches.meta",
            "key": "label_names",
            "md5": md5(folder / "batches.meta"),
        },
    )
    return x_train, y_train, x_test, y_test, names


def write_cifar100(root: Path, monkeypatch: pytest.MonkeyPatch, n_train=20, n_test=10):
    rng = np.random.default_rng(1)
    folder = root / "cifar-100-python"
    x_train = rng.integers(0, 256, (n_train, 3, 32, 32), dtype=np.uint8)
    y_train = rng.integers(0, 100, n_train)
    x_test = rng.integers(0, 256, (n_test, 3, 32, 32), dtype=np.uint8)
    y_test = rng.integers(0, 100, n_test)
    for name, xs, ys in (("train", x_train, y_train), ("test", x_test, y_test)):
        dump(
            folder / name,
            {
                "data": xs.reshape(len(xs), -1),
                "fine_labels": ys.tolist(),
                "coarse_labels": (ys // 5).tolist(),
            },
        )
    names = [f"fine{i}" for i in range(100)]
    dump(folder / "meta", {"fine_label_names": names, "coarse_label_names": list("abcdefghij")})
    monkeypatch.setattr(CIFAR100, "train_list", [["train", md5(folder / "train")]])
    monkeypatch.setattr(CIFAR100, "test_list", [["test", md5(folder / "test")]])
    monkeypatch.setattr(
        CIFAR100,
        "meta",
        {"filename": "meta", "key": "fine_label_names", "md5": md5(folder / "meta")},
    )
    return x_train, y_train, x_test, y_test, names


def idx_bytes(arr: np.ndarray) -> bytes:
    """IDX (LeCun) format, uint8 payload: magic 0x0000 08 <ndim>, big-endian int32 dims."""
    header = bytes([0, 0, 8, arr.ndim]) + b"".join(struct.pack(">i", d) for d in arr.shape)
    return header + arr.astype(np.uint8).tobytes()


def write_fashion_mnist(root: Path, n_train=20, n_test=10, compress=False):
    rng = np.random.default_rng(2)
    raw = root / "FashionMNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    out = {}
    for split, n in (("train", n_train), ("t10k", n_test)):
        x = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        y = rng.integers(0, 10, n).astype(np.uint8)
        for kind, arr in (("images-idx3", x), ("labels-idx1", y)):
            path = raw / f"{split}-{kind}-ubyte"
            if compress:
                with gzip.open(str(path) + ".gz", "wb") as f:
                    f.write(idx_bytes(arr))
            else:
                path.write_bytes(idx_bytes(arr))
        out[split] = (x, y)
    return out


FOOD_CLASSES = ["apple_pie", "baby_back_ribs", "caesar_salad"]
FOOD_COLORS = [(200, 30, 30), (30, 200, 30), (30, 30, 200)]


def write_food101(root: Path):
    """food-101/images/<class>/<id>.jpg (solid colours, non-square) + meta/{train,test}.json."""
    base = root / "food-101"
    meta = {"train": {}, "test": {}}
    sizes = [(40, 20), (18, 30), (25, 25), (31, 12)]  # (width, height)
    k = 0
    for cls, color in zip(FOOD_CLASSES, FOOD_COLORS, strict=True):
        (base / "images" / cls).mkdir(parents=True, exist_ok=True)
        for split, count in (("train", 3), ("test", 2)):
            ids = []
            for _ in range(count):
                img_id = str(1000 + k)
                Image.new("RGB", sizes[k % len(sizes)], color).save(
                    base / "images" / cls / f"{img_id}.jpg", quality=95
                )
                ids.append(f"{cls}/{img_id}")
                k += 1
            meta[split][cls] = ids
    (base / "meta").mkdir(parents=True, exist_ok=True)
    for split in ("train", "test"):
        (base / "meta" / f"{split}.json").write_text(json.dumps(meta[split]))
    (base / "meta" / "classes.txt").write_text("\n".join(FOOD_CLASSES) + "\n")
    return base, meta
