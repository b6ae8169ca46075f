"""Tests for aace.data: dataset sources (fake files in the real on-disk formats) and BatchLoader."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.datasets import CIFAR10

from aace.data import DATASET_NAMES, BatchLoader, DatasetError, InMemoryDataset, load_dataset
from aace.data.loader import _cutout, _random_crop, _random_hflip
from fakedata import (  # noqa: E402
    FOOD_CLASSES,
    md5,
    write_cifar10,
    write_cifar100,
    write_fashion_mnist,
    write_food101,
)


def _reference_food_image(path: Path, size: int) -> np.ndarray:
    with Image.open(path) as img:
        img = img.convert("RGB")
        w, h = img.size
        side = max(w, h)
        canvas = Image.new("RGB", (side, side), (0, 0, 0))
        canvas.paste(img, ((side - w) // 2, (side - h) // 2))
        return np.asarray(canvas.resize((size, size), Image.Resampling.BILINEAR)).transpose(2, 0, 1)


def _check_common(ds: InMemoryDataset) -> None:
    for x in (ds.x_train, ds.x_test):
        assert x.dtype == torch.uint8 and x.ndim == 4 and x.is_contiguous()
        assert x.device.type == "cpu"
    for y in (ds.y_train, ds.y_test):
        assert y.dtype == torch.int64 and y.ndim == 1
    assert len(ds.mean) == len(ds.std) == ds.in_channels
    assert all(s > 0 for s in ds.std)
    xf = ds.x_train.double() / 255
    np.testing.assert_allclose(ds.mean, xf.mean(dim=(0, 2, 3)).numpy(), rtol=1e-10)
    np.testing.assert_allclose(
        ds.std, xf.transpose(0, 1).reshape(ds.in_channels, -1).std(dim=1, unbiased=False), 1e-9
    )
    assert int(ds.y_train.max()) < ds.num_classes and int(ds.y_train.min()) >= 0


# --------------------------------------------------------------------------------------------
# torchvision-backed sources
# --------------------------------------------------------------------------------------------


def test_cifar10_roundtrip(tmp_path, monkeypatch):
    x_train, y_train, x_test, y_test, names = write_cifar10(tmp_path, monkeypatch)
    ds = load_dataset("cifar10", root=tmp_path)
    _check_common(ds)
    assert ds.name == "cifar10"
    assert ds.x_train.shape == (20, 3, 32, 32) and ds.x_test.shape == (10, 3, 32, 32)
    assert torch.equal(ds.x_train, torch.from_numpy(x_train))
    assert torch.equal(ds.x_test, torch.from_numpy(x_test))
    assert ds.y_train.tolist() == y_train.tolist() and ds.y_test.tolist() == y_test.tolist()
    assert ds.classes == names and ds.num_classes == 10
    assert ds.image_size == (32, 32) and ds.in_channels == 3
    assert (ds.hflip, ds.crop_padding, ds.cutout) == (True, 4, 16)
    assert "cifar10" in repr(ds)


def test_cifar100_roundtrip(tmp_path, monkeypatch):
    x_train, y_train, x_test, y_test, names = write_cifar100(tmp_path, monkeypatch)
    ds = load_dataset("CIFAR100", root=str(tmp_path))
    _check_common(ds)
    assert ds.name == "cifar100"
    assert torch.equal(ds.x_train, torch.from_numpy(x_train))
    assert torch.equal(ds.x_test, torch.from_numpy(x_test))
    assert ds.y_train.tolist() == y_train.tolist() and ds.y_test.tolist() == y_test.tolist()
    assert ds.classes == names and ds.num_classes == 100
    assert (ds.hflip, ds.crop_padding, ds.cutout) == (True, 4, 16)


@pytest.mark.parametrize("compress", [False, True])
def test_fashion_mnist_roundtrip(tmp_path, compress):
    arrays = write_fashion_mnist(tmp_path, compress=compress)
    ds = load_dataset("fashion-mnist", root=tmp_path)
    _check_common(ds)
    assert ds.x_train.shape == (20, 1, 28, 28) and ds.x_test.shape == (10, 1, 28, 28)
    assert torch.equal(ds.x_train[:, 0], torch.from_numpy(arrays["train"][0]))
    assert torch.equal(ds.x_test[:, 0], torch.from_numpy(arrays["t10k"][0]))
    assert ds.y_train.tolist() == arrays["train"][1].tolist()
    assert ds.y_test.tolist() == arrays["t10k"][1].tolist()
    assert ds.num_classes == 10 and ds.classes[0] == "T-shirt/top"
    assert (ds.hflip, ds.crop_padding, ds.cutout) == (True, 4, 0)


def test_food101_pad_and_resize(tmp_path):
    base, meta = write_food101(tmp_path)
    ds = load_dataset("food101", root=tmp_path, image_size=16)
    _check_common(ds)
    assert ds.classes == sorted(FOOD_CLASSES)
    assert ds.x_train.shape == (9, 3, 16, 16) and ds.x_test.shape == (6, 3, 16, 16)
    assert (ds.hflip, ds.cutout) == (True, 8)
    # order and labels follow torchvision's Food101 (json order, class index = sorted position)
    for split, x, y in (("train", ds.x_train, ds.y_train), ("test", ds.x_test, ds.y_test)):
        i = 0
        for cls, ids in meta[split].items():
            for rel in ids:
                assert int(y[i]) == ds.classes.index(cls)
                ref = _reference_food_image(base / "images" / f"{rel}.jpg", 16)
                assert np.array_equal(x[i].numpy(), ref)
                i += 1
        assert i == len(y)
    # a 40x20 solid image: black padding above/below, colour in the middle rows
    first = ds.x_train[0].int()
    assert first[:, 0, :].max() < 30 and first[:, -1, :].max() < 30
    assert abs(int(first[0, 8, 8]) - 200) < 12 and int(first[1, 8, 8]) < 50


def test_food101_default_size(tmp_path):
    write_food101(tmp_path)
    ds = load_dataset("food101", root=tmp_path)
    assert ds.image_size == (32, 32) and (ds.crop_padding, ds.cutout) == (4, 16)


@pytest.mark.parametrize(
    "name, expected",
    [
        ("cifar10", "cifar-10-batches-py"),
        ("cifar100", "cifar-100-python"),
        ("fashion-mnist", "FashionMNIST"),
        ("food101", "food-101"),
    ],
)
def test_missing_files(tmp_path, name, expected):
    root = tmp_path / "nowhere"
    with pytest.raises(DatasetError) as info:
        load_dataset(name, root=root)
    msg = str(info.value)
    assert str(root) in msg and expected in msg and "--download" in msg
    assert msg.startswith(name)


def test_cifar10_partially_missing_names_the_file(tmp_path, monkeypatch):
    write_cifar10(tmp_path, monkeypatch)
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(DatasetError, match="data_batch_3"):
        load_dataset("cifar10", root=tmp_path)


def test_cifar10_truncated_file_fails_checksum(tmp_path, monkeypatch):
    write_cifar10(tmp_path, monkeypatch)
    path = tmp_path / "cifar-10-batches-py" / "data_batch_2"
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(DatasetError, match="data_batch_2.*corrupted"):
        load_dataset("cifar10", root=tmp_path)


def test_cifar10_unparsable_file_with_matching_checksum(tmp_path, monkeypatch):
    write_cifar10(tmp_path, monkeypatch)
    path = tmp_path / "cifar-10-batches-py" / "test_batch"
    path.write_bytes(path.read_bytes()[:100])  # truncated pickle, but the "right" MD5
    monkeypatch.setattr(CIFAR10, "test_list", [["test_batch", md5(path)]])
    with pytest.raises(DatasetError, match="test_batch.*corrupted"):
        load_dataset("cifar10", root=tmp_path)


def test_fashion_mnist_truncated_file(tmp_path):
    write_fashion_mnist(tmp_path)
    path = tmp_path / "FashionMNIST" / "raw" / "t10k-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:7])
    with pytest.raises(DatasetError, match="t10k-images-idx3-ubyte"):
        load_dataset("fashion-mnist", root=tmp_path)


def test_food101_corrupted_image(tmp_path):
    base, meta = write_food101(tmp_path)
    bad = base / "images" / f"{meta['test']['caesar_salad'][0]}.jpg"
    bad.write_bytes(b"not a jpeg")
    with pytest.raises(DatasetError, match=str(bad.name)):
        load_dataset("food101", root=tmp_path)


def test_bad_spec_and_image_size():
    with pytest.raises(DatasetError) as info:
        load_dataset("imagenet")
    for name in (*DATASET_NAMES, "npz:PATH"):
        assert name in str(info.value)
    with pytest.raises(DatasetError, match="image_size"):
        load_dataset("digits", image_size=7)
    with pytest.raises(DatasetError, match="npz:PATH"):
        load_dataset("npz:")


# --------------------------------------------------------------------------------------------
# digits
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits() -> InMemoryDataset:
    return load_dataset("digits")


def test_digits(digits):
    ds = digits
    _check_common(ds)
    assert ds.x_train.shape == (1437, 1, 8, 8) and ds.x_test.shape == (360, 1, 8, 8)
    assert ds.classes == [str(i) for i in range(10)]
    assert sorted(set(ds.y_train.tolist())) == list(range(10))
    assert int(ds.x_train.max()) == 255 and int(ds.x_train.min()) == 0
    assert (ds.hflip, ds.crop_padding, ds.cutout) == (False, 1, 0)
    again = load_dataset("digits", root="/nonexistent", download=True)
    assert torch.equal(again.x_train, ds.x_train) and torch.equal(again.y_test, ds.y_test)
    # the split is the documented permutation of sklearn's order
    from sklearn.datasets import load_digits

    bunch = load_digits()
    perm = np.random.default_rng(0).permutation(len(bunch.target))
    assert ds.y_test.tolist() == bunch.target[perm[-360:]].tolist()
    expected = np.rint(bunch.images[perm[:-360]] * 255 / 16).astype(np.uint8)
    assert np.array_equal(ds.x_train[:, 0].numpy(), expected)


# --------------------------------------------------------------------------------------------
# npz
# --------------------------------------------------------------------------------------------


def _npz_arrays(hwc=True, channels=3, n_train=12, n_test=6, size=10):
    rng = np.random.default_rng(3)
    shape = (size, size, channels) if hwc else (size, size)
    return {
        "x_train": rng.integers(0, 256, (n_train, *shape), dtype=np.uint8),
        "y_train": np.arange(n_train) % 3,
        "x_test": rng.integers(0, 256, (n_test, *shape), dtype=np.uint8),
        "y_test": np.arange(n_test) % 3,
    }


def _save(tmp_path, arrays, name="d.npz") -> str:
    path = tmp_path / name
    np.savez(path, **arrays)
    return f"npz:{path}"


def test_npz_hwc_roundtrip(tmp_path):
    arrays = _npz_arrays()
    arrays["classes"] = np.array(["cat", "dog", "emu"])
    spec = _save(tmp_path, arrays)
    ds = load_dataset(spec)
    _check_common(ds)
    assert ds.name == spec
    assert torch.equal(ds.x_train, torch.from_numpy(arrays["x_train"]).permute(0, 3, 1, 2))
    assert torch.equal(ds.x_test, torch.from_numpy(arrays["x_test"]).permute(0, 3, 1, 2))
    assert ds.y_train.tolist() == arrays["y_train"].tolist()
    assert ds.classes == ["cat", "dog", "emu"]
    assert (ds.hflip, ds.crop_padding, ds.cutout) == (True, 1, 0)  # H = 10 < 28 -> max(1, 10//8)


def test_npz_grayscale_no_classes(tmp_path):
    arrays = _npz_arrays(hwc=False, size=28)
    arrays["y_test"] = np.array([0, 1, 2, 3, 0, 1], dtype=np.uint8)
    ds = load_dataset(_save(tmp_path, arrays))
    assert ds.x_train.shape == (12, 1, 28, 28)
    assert torch.equal(ds.x_train[:, 0], torch.from_numpy(arrays["x_train"]))
    assert ds.num_classes == 4 and ds.classes == ["0", "1", "2", "3"]
    assert ds.crop_padding == 4


def _defect(arrays, key, value):
    arrays = dict(arrays)
    if value is None:
        del arrays[key]
    else:
        arrays[key] = value
    return arrays


_BASE = _npz_arrays()
_NPZ_DEFECTS = [
    ("missing-key", _defect(_BASE, "y_test", None), "y_test"),
    ("float-images", _defect(_BASE, "x_train", _BASE["x_train"].astype(np.float32)), "x_train"),
    ("ndim-2", _defect(_BASE, "x_test", np.zeros((6, 10), np.uint8)), "x_test"),
    ("ndim-5", _defect(_BASE, "x_test", np.zeros((6, 10, 10, 3, 1), np.uint8)), "x_test"),
    ("bad-channels", _defect(_BASE, "x_train", np.zeros((12, 10, 10, 2), np.uint8)), "x_train"),
    ("n-mismatch", _defect(_BASE, "y_train", np.arange(11) % 3), "y_train"),
    ("shape-mismatch", _defect(_BASE, "x_test", np.zeros((6, 12, 12, 3), np.uint8)), "x_test"),
    ("float-labels", _defect(_BASE, "y_train", (np.arange(12) % 3).astype(float)), "y_train"),
    ("bool-labels", _defect(_BASE, "y_test", np.ones(6, bool)), "y_test"),
    ("2d-labels", _defect(_BASE, "y_test", np.zeros((6, 1), np.int64)), "y_test"),
    ("negative-labels", _defect(_BASE, "y_test", np.array([0, 1, -1, 0, 1, 2])), "y_test"),
    ("label-too-big", _defect(_BASE, "classes", np.array(["a", "b"])), "y_train"),
    ("classes-not-str", _defect(_BASE, "classes", np.array([1, 2, 3])), "classes"),
    ("one-class", _defect(_defect(_BASE, "y_train", np.zeros(12, int)), "y_test", np.zeros(6, int)),
     "2 classes"),
    ("empty", _defect(_defect(_BASE, "x_train", np.zeros((0, 10, 10, 3), np.uint8)), "y_train",
                      np.zeros(0, int)), "x_train"),
]  # fmt: skip


@pytest.mark.parametrize(
    "arrays, key", [d[1:] for d in _NPZ_DEFECTS], ids=[d[0] for d in _NPZ_DEFECTS]
)
def test_npz_defects(tmp_path, arrays, key):
    spec = _save(tmp_path, arrays)
    with pytest.raises(DatasetError) as info:
        load_dataset(spec)
    assert key in str(info.value) and str(tmp_path) in str(info.value)


def test_npz_missing_and_corrupted_files(tmp_path):
    with pytest.raises(DatasetError, match="not found"):
        load_dataset(f"npz:{tmp_path / 'absent.npz'}")
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"garbage")
    with pytest.raises(DatasetError, match="garbage.npz.*not an .npz"):
        load_dataset(f"npz:{garbage}")
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"PK\x03\x04 definitely not a zip")
    with pytest.raises(DatasetError, match="bad.npz"):
        load_dataset(f"npz:{bad}")
    good = tmp_path / "good.npz"
    np.savez(good, **_BASE)
    truncated = tmp_path / "truncated.npz"
    truncated.write_bytes(good.read_bytes()[:-200])
    with pytest.raises(DatasetError, match="truncated.npz"):
        load_dataset(f"npz:{truncated}")
    single = tmp_path / "single.npy"
    np.save(single, _BASE["x_train"])
    with pytest.raises(DatasetError, match="single.npy"):
        load_dataset(f"npz:{single}")
    obj = tmp_path / "obj.npz"
    np.savez(obj, **_BASE, classes=np.array(["a", 1, None], dtype=object))
    with pytest.raises(DatasetError, match="classes"):
        load_dataset(f"npz:{obj}")


# --------------------------------------------------------------------------------------------
# BatchLoader
# --------------------------------------------------------------------------------------------


def _toy(n=21, c=3, h=8, w=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, c, h, w), generator=g, dtype=torch.uint8)
    return x, torch.arange(n)


_MEAN3, _STD3 = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)


def _loader(x, y, **kw):
    args = dict(batch_size=4, mean=_MEAN3, std=_STD3, train=True)
    args.update(kw)
    return BatchLoader(x, y, **args)


def _epoch(loader, epoch):
    loader.set_epoch(epoch)
    return [(xb.clone(), yb.clone()) for xb, yb in loader]


def test_loader_epoch_reproducibility():
    x, y = _toy()
    kw = dict(crop_padding=2, hflip=True, cutout=4, seed=7)
    a = _loader(x, y, **kw)
    e3 = _epoch(a, 3)
    again = _epoch(a, 3)
    fresh = _epoch(_loader(x, y, **kw), 3)  # "resumed" loader, no saved state
    for (xa, ya), (xb, yb), (xc, yc) in zip(e3, again, fresh, strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
        assert torch.equal(xa, xc) and torch.equal(ya, yc)
    e4 = _epoch(a, 4)
    assert not torch.equal(torch.cat([b[1] for b in e3]), torch.cat([b[1] for b in e4]))
    other_seed = _epoch(_loader(x, y, **{**kw, "seed": 8}), 3)
    assert not torch.equal(torch.cat([b[1] for b in e3]), torch.cat([b[1] for b in other_seed]))
    for xb, yb in e3:
        assert xb.shape == (4, 3, 8, 8) and xb.dtype == torch.float32 and yb.dtype == torch.int64


def test_loader_sharding_two_ranks():
    x, y = _toy(n=21)
    loaders = [_loader(x, y, rank=r, world_size=2, seed=3) for r in range(2)]
    perm = torch.randperm(21, generator=loaders[0]._shuffle_generator(5))
    idx = [ld.indices(5) for ld in loaders]
    assert len(idx[0]) == len(idx[1]) == 10
    assert set(idx[0].tolist()).isdisjoint(idx[1].tolist())
    interleaved = torch.stack(idx, dim=1).flatten()
    assert torch.equal(interleaved, perm[:20])  # union == truncated shared permutation
    for ld, ix in zip(loaders, idx, strict=True):
        assert ld.num_samples == 10 and len(ld) == 2
        labels = torch.cat([yb for _, yb in _epoch(ld, 5)])
        assert torch.equal(labels, y[ix[:8]])
    # augmentation streams differ per rank, the shuffle does not
    g0, g1 = (ld._augment_generator(5) for ld in loaders)
    assert not torch.equal(torch.rand(8, generator=g0), torch.rand(8, generator=g1))


def test_loader_lengths():
    x, y = _toy(n=21)
    assert len(_loader(x, y)) == 5  # 21 // 4, drop_last default True for train
    assert len(_loader(x, y, drop_last=False)) == 6
    assert [yb.numel() for _, yb in _loader(x, y, drop_last=False)] == [4, 4, 4, 4, 4, 1]
    assert len(_loader(x, y, world_size=2, rank=1, drop_last=False)) == 3
    test0 = _loader(x, y, train=False, world_size=2, rank=0)
    test1 = _loader(x, y, train=False, world_size=2, rank=1)
    assert (test0.num_samples, test1.num_samples) == (11, 10)
    assert (len(test0), len(test1)) == (3, 3)
    assert test0.drop_last is False
    got = torch.cat([yb for ld in (test0, test1) for _, yb in ld])
    assert sorted(got.tolist()) == list(range(21))  # every sample evaluated exactly once


def test_test_loader_exact_data_in_order():
    x, y = _toy(n=10)
    ld = _loader(x, y, train=False, batch_size=3, crop_padding=4, hflip=True, cutout=4)
    mean = torch.tensor(_MEAN3).view(1, 3, 1, 1)
    std = torch.tensor(_STD3).view(1, 3, 1, 1)
    batches = list(ld)
    assert [b[1].numel() for b in batches] == [3, 3, 3, 1]
    xs = torch.cat([b[0] for b in batches])
    assert torch.equal(torch.cat([b[1] for b in batches]), y)
    torch.testing.assert_close(xs, (x.float() / 255 - mean) / std, rtol=0, atol=1e-6)
    ld.set_epoch(9)  # no effect on evaluation
    assert torch.equal(torch.cat([b[0] for b in ld]), xs)


def test_loader_train_pipeline_matches_helpers():
    x, y = _toy(n=16)
    ld = _loader(x, y, batch_size=8, crop_padding=2, hflip=True, cutout=4, seed=11)
    ld.set_epoch(2)
    batches = list(ld)
    idx = ld.indices(2)
    g = ld._augment_generator(2)
    mean = torch.tensor(_MEAN3).view(1, 3, 1, 1)
    std = torch.tensor(_STD3).view(1, 3, 1, 1)
    for b, (xb, yb) in enumerate(batches):
        sel = idx[b * 8 : (b + 1) * 8]
        assert torch.equal(yb, y[sel])
        ref, _, _ = _random_crop(x[sel], 2, g)
        ref, _ = _random_hflip(ref, g)
        ref = (ref.float() / 255 - mean) / std
        ref, _ = _cutout(ref, 4, g)
        torch.testing.assert_close(xb, ref, rtol=0, atol=1e-6)


def test_no_augmentation_flags_give_plain_shuffled_batches():
    x, y = _toy(n=12)
    ld = _loader(x, y, batch_size=6, seed=1)
    mean = torch.tensor(_MEAN3).view(1, 3, 1, 1)
    std = torch.tensor(_STD3).view(1, 3, 1, 1)
    for xb, yb in ld:
        torch.testing.assert_close(xb, (x[yb].float() / 255 - mean) / std, rtol=0, atol=1e-6)


def test_random_crop_matches_per_sample_reference():
    x, _ = _toy(n=64, h=9, w=7)
    g = torch.Generator().manual_seed(0)
    out, top, left = _random_crop(x, 3, g)
    assert out.shape == x.shape and out.dtype == torch.uint8
    assert int(top.min()) >= 0 and int(top.max()) <= 6 and int(left.max()) <= 6
    assert len(set(top.tolist())) > 3 and len(set(left.tolist())) > 3
    for i in range(len(x)):
        padded = F.pad(x[i], (3, 3, 3, 3))
        t, l = int(top[i]), int(left[i])
        assert torch.equal(out[i], padded[:, t : t + 9, l : l + 7])
    # offsets are what the generator draws: rows then columns
    g2 = torch.Generator().manual_seed(0)
    assert torch.equal(top, torch.randint(0, 7, (64,), generator=g2))
    assert torch.equal(left, torch.randint(0, 7, (64,), generator=g2))


def test_random_hflip_flips_some_samples_exactly():
    x, _ = _toy(n=64)
    out, mask = _random_hflip(x, torch.Generator().manual_seed(1))
    assert 0 < int(mask.sum()) < 64
    for i in range(64):
        assert torch.equal(out[i], x[i].flip(-1) if mask[i] else x[i])


def _cutout_reference(x, size, seed):
    """Per-sample re-implementation of davda54/sam Cutout with the same random draws."""
    b, _, h, w = x.shape
    g = torch.Generator().manual_seed(seed)
    apply = torch.rand(b, generator=g) < 0.5
    half = size // 2
    tops = torch.randint(-half, h - half, (b,), generator=g)
    lefts = torch.randint(-half, w - half, (b,), generator=g)
    out = x.clone()
    for i in range(b):
        if apply[i]:
            t, l = int(tops[i]), int(lefts[i])
            out[i, :, max(0, t) : min(h, t + size), max(0, l) : min(w, l + size)] = 0
    return out


def test_cutout_square():
    x = torch.ones(200, 3, 32, 32)
    out, mask = _cutout(x, 16, torch.Generator().manual_seed(2))
    assert torch.equal(out, _cutout_reference(x, 16, 2))
    assert torch.equal(out == 0, mask.expand_as(out))
    zeroed = mask[:, 0].sum(dim=(1, 2))
    assert 60 < int((zeroed > 0).sum()) < 140  # p = 0.5
    assert int(zeroed.max()) == 256  # some square fully inside: 16 x 16
    for i in torch.nonzero(zeroed).flatten().tolist():
        rows = torch.nonzero(mask[i, 0].any(dim=1)).flatten()
        cols = torch.nonzero(mask[i, 0].any(dim=0)).flatten()
        # a single clipped rectangle of side <= 16, at least 8 (the corner is >= -8)
        assert int(zeroed[i]) == len(rows) * len(cols)
        assert 8 <= len(rows) <= 16 and 8 <= len(cols) <= 16
        assert int(rows[-1] - rows[0]) + 1 == len(rows)
    x5 = torch.randn(50, 1, 8, 8)
    out5, _ = _cutout(x5, 5, torch.Generator().manual_seed(4))
    assert torch.equal(out5, _cutout_reference(x5, 5, 4))


def test_loader_with_digits(digits):
    ld = BatchLoader(
        digits.x_train,
        digits.y_train,
        batch_size=128,
        mean=digits.mean,
        std=digits.std,
        train=True,
        crop_padding=digits.crop_padding,
        hflip=digits.hflip,
        cutout=digits.cutout,
        dtype=torch.float64,
    )
    assert len(ld) == 1437 // 128 and ld.num_samples == 1437
    xb, yb = next(iter(ld))
    assert xb.shape == (128, 1, 8, 8) and xb.dtype == torch.float64


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"batch_size": 0}, "batch_size"),
        ({"rank": 2, "world_size": 2}, "rank"),
        ({"rank": -1}, "rank"),
        ({"world_size": 0}, "world_size"),
        ({"crop_padding": -1}, "crop_padding"),
        ({"cutout": -2}, "cutout"),
        ({"mean": (0.5,)}, "mean"),
        ({"std": (0.5, 0.0, 1.0)}, "std"),
        ({"dtype": torch.int32}, "dtype"),
        ({"batch_size": 50}, "batch_size"),  # drop_last=True would yield no batches
        ({"images": torch.zeros(21, 3, 8, 8)}, "images"),
        ({"images": torch.zeros(21, 8, 8, dtype=torch.uint8)}, "images"),
        ({"labels": torch.zeros(20, dtype=torch.int64)}, "labels"),
        ({"labels": torch.zeros(21)}, "labels"),
    ],
)
def test_loader_validation(kwargs, name):
    x, y = _toy()
    args = dict(images=x, labels=y, batch_size=4, mean=_MEAN3, std=_STD3, train=True)
    args.update(kwargs)
    with pytest.raises(ValueError, match=name):
        BatchLoader(args.pop("images"), args.pop("labels"), **args)
    with pytest.raises(ValueError, match="epoch"):
        _loader(x, y).set_epoch(-1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_loader_cuda():
    x, y = _toy(n=64)
    ld = _loader(x, y, batch_size=16, crop_padding=2, hflip=True, cutout=4, device="cuda")
    assert ld.images.is_cuda
    a = _epoch(ld, 1)
    b = _epoch(ld, 1)
    for (xa, ya), (xb, yb) in zip(a, b, strict=True):
        assert xa.is_cuda and ya.is_cuda
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
