"""Symmetric label noise: the corruption itself, the loader's true labels, the step's count of
predictions that match them, and a training run with --label-noise."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch

from aace.cli import main
from aace.data import BatchLoader, symmetric_label_noise
from aace.models import create_model
from aace.training import build as build_module
from aace.training.build import build_optimizer
from aace.training.config import RunConfig
from aace.training.step import TrainStep


@pytest.mark.parametrize(("n", "rate"), [(1000, 0.2), (997, 0.4), (10, 0.25), (7, 1.0), (5, 0.0)])
def test_exactly_round_rate_n_labels_change_each_to_another_class(n, rate):
    labels = torch.arange(n) % 10
    noisy = symmetric_label_noise(labels, rate, 10, seed=3)
    assert int((noisy != labels).sum()) == round(rate * n)  # Python's round: 2.5 -> 2
    assert noisy.dtype == torch.int64 and int(noisy.min()) >= 0 and int(noisy.max()) <= 9
    assert torch.equal(labels, torch.arange(n) % 10)  # the input is not modified


def test_new_classes_are_uniform_over_the_other_classes():
    # 60,000 labels of 4 classes, half changed: each of the 12 (old, new) pairs with old != new
    # is expected 30,000 / 12 = 2,500 times (binomial sd ~ 48); the seed fixes the draw.
    labels = torch.arange(60_000) % 4
    noisy = symmetric_label_noise(labels, 0.5, 4, seed=0)
    counts = np.zeros((4, 4), dtype=int)
    np.add.at(counts, (labels.numpy(), noisy.numpy()), 1)
    off_diagonal = counts[~np.eye(4, dtype=bool)]
    assert off_diagonal.sum() == 30_000
    assert np.all(np.abs(off_diagonal - 2_500) < 5 * 48), counts
    # The changed positions are spread over the whole set, not a prefix.
    changed = (noisy != labels).nonzero().flatten()
    assert int(changed.min()) < 100 and int(changed.max()) > 59_900


def test_the_seed_alone_decides_the_corruption():
    labels = torch.arange(500) % 10
    torch.manual_seed(1)
    first = symmetric_label_noise(labels, 0.3, 10, seed=7)
    torch.manual_seed(2)  # the global RNG (--seed) does not matter
    assert torch.equal(first, symmetric_label_noise(labels, 0.3, 10, seed=7))
    assert not torch.equal(first, symmetric_label_noise(labels, 0.3, 10, seed=8))


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((torch.zeros(3, 2, dtype=torch.int64), 0.1, 10), "labels: got (3, 2); expected a 1-D"),
        ((torch.zeros(3), 0.1, 10), "labels: got dtype torch.float32; expected an integer"),
        ((torch.zeros(3, dtype=torch.int64), 1.5, 10), "rate: got 1.5; expected a number in"),
        ((torch.zeros(3, dtype=torch.int64), 0.1, 1), "num_classes: got 1; expected an integer"),
        ((torch.tensor([0, 10]), 0.1, 10), "labels: got values in [0, 10]; expected [0, 9]"),
    ],
)
def test_bad_arguments_are_named(args, message):
    with pytest.raises(ValueError) as error:
        symmetric_label_noise(*args)
    assert message in str(error.value)


def test_loader_carries_the_true_labels_of_each_sample():
    images = torch.arange(20, dtype=torch.uint8).view(20, 1, 1, 1).expand(20, 1, 4, 4).clone()
    clean = torch.arange(20) % 5
    noisy = symmetric_label_noise(clean, 0.5, 5, seed=0)
    loader = BatchLoader(
        images, noisy, clean_labels=clean, batch_size=6, mean=[0], std=[1], train=True, seed=1
    )
    seen = 0
    for x, y, y_clean in loader:
        index = (x[:, 0, 2, 2] * 255).round().long()  # the image's value is its index (no crop)
        assert torch.equal(y, noisy[index]) and torch.equal(y_clean, clean[index])
        seen += len(y)
    assert seen == 18


def test_step_counts_predictions_that_match_the_true_labels():
    torch.manual_seed(0)
    model = create_model("wrn10_1", num_classes=3, in_channels=1)
    config = RunConfig(optimizer="sam-aace", lr=0.01)
    step = TrainStep(model, build_optimizer(model, config), config, torch.device("cpu"))
    x = torch.randn(16, 1, 8, 8)
    y, y_clean = torch.randint(0, 3, (16,)), torch.randint(0, 3, (16,))
    reference = copy.deepcopy(model).train()
    with torch.no_grad():
        predicted = reference(x).argmax(1)  # the first pass's prediction, at w, train mode
    stats = step(x, y, y_clean)
    assert int(stats.correct) == int((predicted == y).sum())
    assert int(stats.clean_correct) == int((predicted == y_clean).sum())
    assert step(x, y).clean_correct is None


def test_a_label_noise_run_trains_on_the_noisy_labels_and_reports_both_accuracies(tmp_path):
    rng = np.random.default_rng(0)
    data = tmp_path / "d.npz"
    y_train = np.arange(40) % 4
    np.savez(
        data, x_train=rng.integers(0, 256, (40, 8, 8), dtype=np.uint8), y_train=y_train,
        x_test=rng.integers(0, 256, (8, 8, 8), dtype=np.uint8), y_test=np.arange(8) % 4,
    )  # fmt: skip
    argv = ["train", "--dataset", f"npz:{data}", "--model", "wrn10_1", "--epochs", "2"]
    argv += ["--batch-size", "8", "--optimizer", "sgd", "--label-noise", "1", "--out"]
    assert main([*argv, str(tmp_path / "noisy")]) == 0
    rows = [json.loads(line) for line in (tmp_path / "noisy" / "metrics.jsonl").open()]
    config = json.loads((tmp_path / "noisy" / "config.json").read_text())["config"]
    assert config["label_noise"] == 1.0 and config["label_noise_seed"] == 0
    for row in rows:
        # Every training label is wrong: no prediction can match both label sets.
        assert row["train_acc"] + row["train_acc_clean"] <= 1 + 1e-12
    assert main([*argv[:-3], "--out", str(tmp_path / "clean")]) == 0
    for line in (tmp_path / "clean" / "metrics.jsonl").open():
        row = json.loads(line)
        assert row["train_acc_clean"] == row["train_acc"]


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--label-noise", "1.5"], "--label-noise: got 1.5; expected a number in [0, 1]"),
        (["--label-noise-seed", "-1"], "--label-noise-seed: got -1; expected an integer >= 0"),
    ],
)
def test_bad_label_noise_flags_are_one_line(flags, message, capsys):
    assert main(["train", "--dataset", "digits", *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_no_augment_trains_on_the_plain_images(tmp_path, monkeypatch):
    made = []

    class Recording(BatchLoader):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self)

    monkeypatch.setattr(build_module, "BatchLoader", Recording)
    argv = ["train", "--dataset", "digits", "--model", "wrn10_1", "--epochs", "1"]
    argv += ["--batch-size", "512", "--optimizer", "sgd", "--out"]
    assert main([*argv, str(tmp_path / "plain"), "--no-augment"]) == 0
    assert main([*argv, str(tmp_path / "augmented")]) == 0
    plain, augmented = (m for m in made if m.train)
    assert (plain.crop_padding, plain.hflip, plain.cutout) == (0, False, 0)
    assert augmented.crop_padding == 1  # digits' default random crop
    x, _ = next(iter(plain))
    index = plain.indices(0)[: len(x)]
    assert torch.equal(x, plain._normalize(plain.images[index]))  # exactly the images, unchanged


def test_no_augment_with_cutout_is_refused(capsys):
    assert main(["train", "--dataset", "digits", "--no-augment", "--cutout", "8"]) == 2
    assert "--cutout: got 8; expected 0 or unset with --no-augment" in capsys.readouterr().err
