"""The validation split: stratified, disjoint, seeded on its own, after label noise; the epoch it
selects, best.pt, exact resume, compare, one-line errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from aace.cli import main
from aace.data import SplitError, load_dataset, symmetric_label_noise, validation_split
from aace.report import compare_table
from aace.training.build import build_loader, split_training_set
from aace.training.checkpoint import load_checkpoint
from aace.training.config import ConfigError, RunConfig
from aace.training.evaluate import evaluate, load_trained_model
from aace.training.metrics import TIMING_FIELDS
from aace.training.trainer import Trainer


@pytest.fixture(scope="module")
def npz_path(tmp_path_factory):
    rng = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("data") / "tiny.npz"
    y_train, y_test = np.repeat(np.arange(4), [30, 20, 26, 20]), rng.integers(0, 4, 24)

    def images(y):
        noise = rng.integers(0, 40, (len(y), 8, 8, 3))
        return (y[:, None, None, None] * 60 + noise).astype(np.uint8)

    np.savez(path, x_train=images(y_train), y_train=y_train, x_test=images(y_test), y_test=y_test)
    return path


def tiny(npz_path, out, **overrides):
    values = dict(
        dataset=f"npz:{npz_path}", model="wrn10_1", epochs=3, batch_size=16, lr=0.05,
        out=str(out), seed=1, val_split=0.25,
    )  # fmt: skip
    values.update(overrides)
    return RunConfig(**values)


def rows_of(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_split_is_stratified_disjoint_and_seeded_on_its_own():
    labels = torch.tensor([0] * 30 + [1] * 20 + [2] * 26 + [3] * 7)
    torch.manual_seed(0)
    train, val = validation_split(labels, 0.2, 4, seed=3)
    torch.manual_seed(123)  # the global stream (--seed) does not move the split
    train2, val2 = validation_split(labels, 0.2, 4, seed=3)
    assert torch.equal(train, train2) and torch.equal(val, val2)
    assert not set(train.tolist()) & set(val.tolist())
    assert sorted(train.tolist() + val.tolist()) == list(range(len(labels)))
    # round(0.2 n_c) of each class: 6, 4, 5 (round(5.2)), 1 (round(1.4)).
    assert torch.bincount(labels[val], minlength=4).tolist() == [6, 4, 5, 1]
    _, other = validation_split(labels, 0.2, 4, seed=4)
    assert not torch.equal(val, other)
    train0, val0 = validation_split(labels, 0.0, 4)
    assert train0.tolist() == list(range(len(labels))) and val0.numel() == 0


@pytest.mark.parametrize(
    ("labels", "fraction", "message"),
    [
        ([0, 0, 1, 1, 2], 0.5, "class 2 has 1 training image"),
        ([0, 0, 1, 1, 1, 1], 0.75, "takes all 2 training images of class 0"),
        ([0, 0, 1, 1], 1.0, "expected a number in [0, 1)"),
    ],
)
def test_split_errors(labels, fraction, message):
    with pytest.raises(SplitError, match=message.replace("[", r"\[").replace(")", r"\)")):
        validation_split(torch.tensor(labels), fraction, 3)


def test_split_comes_after_label_noise(npz_path, tmp_path):
    config = tiny(npz_path, tmp_path / "r", label_noise=0.3, label_noise_seed=2)
    dataset = load_dataset(config.dataset)
    labels, train, val = split_training_set(config, dataset)
    noisy = symmetric_label_noise(dataset.y_train, 0.3, 4, seed=2)
    assert torch.equal(labels, noisy)
    # Stratified by the labels the user has (the noisy ones), so as noisy as training's.
    assert torch.equal(val, validation_split(noisy, 0.25, 4, seed=0)[1])
    assert bool((labels[val] != dataset.y_train[val]).any())
    # The same for every training seed (and so for every rank: nothing else enters).
    _, _, val_other_seed = split_training_set(tiny(npz_path, tmp_path, seed=7, label_noise=0.3,
                                                   label_noise_seed=2), dataset)  # fmt: skip
    assert torch.equal(val, val_other_seed)


def test_selected_epoch_best_pt_and_resume(npz_path, tmp_path):
    out = tmp_path / "run"
    config = tiny(npz_path, out, label_noise=0.2)
    summary = Trainer(config, log=lambda _: None).fit()
    n_val = len(split_training_set(config, load_dataset(config.dataset))[2])
    rows = rows_of(out)
    for row in rows:
        assert {"val_loss", "val_acc", "val_acc_clean"} <= set(row)
        assert row["val_acc"] * n_val == pytest.approx(round(row["val_acc"] * n_val))
    best = max(r["val_acc"] for r in rows)
    selected = next(r for r in rows if r["val_acc"] == best)  # the earliest of equals
    assert summary["selected_epoch"] == selected["epoch"]
    assert summary["test_acc_at_selected"] == selected["test_acc"]
    assert json.loads((out / "summary.json").read_text())["selected_epoch"] == selected["epoch"]
    # best.pt holds that epoch's model: its test accuracy, recomputed, is that row's.
    model, _, dataset, checkpoint = load_trained_model(out / "best.pt")
    assert checkpoint["epoch"] == selected["epoch"]
    _, correct, count = evaluate(model, build_loader(dataset, "test", torch.device("cpu")))
    assert int(correct) / int(count) == pytest.approx(selected["test_acc"], abs=1e-12)

    # Exact resume: stop after epoch 2 (at its checkpoint), resume, compare.
    def stop_after_two(row, rows_so_far):
        if row["epoch"] == 2:
            raise KeyboardInterrupt

    interrupted = tmp_path / "interrupted"
    with pytest.raises(KeyboardInterrupt):
        Trainer(tiny(npz_path, interrupted, label_noise=0.2), lambda _: None, stop_after_two).fit()
    Trainer(tiny(npz_path, interrupted, label_noise=0.2), log=lambda _: None).fit(resume=True)

    def strip(rs):
        return [{k: v for k, v in r.items() if k not in TIMING_FIELDS} for r in rs]

    assert strip(rows_of(interrupted)) == strip(rows)
    resumed_best = load_checkpoint(interrupted / "best.pt")
    for key, tensor in load_checkpoint(out / "best.pt")["model"].items():
        assert torch.equal(resumed_best["model"][key], tensor), key
    # Changing the split on --resume is refused.
    with pytest.raises(ConfigError, match="val_split"):
        Trainer(tiny(npz_path, out, label_noise=0.2, val_split=0.5), log=lambda _: None).fit(
            resume=True
        )


def test_compare_reports_test_accuracy_at_the_selected_epoch(npz_path, tmp_path):
    outs = []
    for seed in (1, 2):
        out = tmp_path / f"s{seed}"
        Trainer(tiny(npz_path, out, seed=seed, epochs=2), log=lambda _: None).fit()
        outs.append(out)
    table = compare_table(outs)
    assert "test acc at val-selected epoch (%)" in table and "best test acc" not in table
    expected = []
    for out in outs:
        rows = rows_of(out)
        expected.append(max(rows, key=lambda r: r["val_acc"])["test_acc"])
    mean = 100 * sum(expected) / 2
    cells = [cell.strip() for cell in table.splitlines()[2].split("|")]
    assert cells[5].startswith(f"{mean:.2f} ± ")  # the column after the final accuracy's CI


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--val-split", "1"], "--val-split: got 1.0; expected a number in [0, 1)"),
        (["--val-split", "0.99"], "takes all"),
    ],
)
def test_bad_split_is_one_line_and_exit_2(npz_path, tmp_path, capsys, extra, message):
    argv = ["train", "--dataset", f"npz:{npz_path}", "--model", "wrn10_1", "--epochs", "1",
            "--batch-size", "16", "--out", str(tmp_path / "r"), *extra]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
