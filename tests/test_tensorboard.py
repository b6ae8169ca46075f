"""aace train --tensorboard: the events, read back with TensorBoard's own EventAccumulator, hold
the metrics.jsonl values per epoch and the training loss every N steps; resume continues the
curves without duplicates."""

from __future__ import annotations

import sys
import time

import numpy as np
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from aace.cli import main
from aace.training import checkpoint as checkpoint_module
from aace.training.config import RunConfig
from aace.training.trainer import Trainer
from conftest import Killed, read_rows

STEPS_PER_EPOCH = 3  # 48 images, batch 16


def config(npz_path, out, **overrides):
    values = dict(
        dataset=f"npz:{npz_path}", model="wrn10_1", epochs=2, batch_size=16, lr=0.05,
        optimizer="sam-aace", dropout=0.2, out=str(out), seed=1, tensorboard=True, log_every=1,
    )  # fmt: skip
    values.update(overrides)
    return RunConfig(**values)


def scalars(out, run: str) -> dict[str, list[tuple[int, float]]]:
    """Every scalar curve of ``out/tensorboard/run`` as TensorBoard shows it."""
    accumulator = EventAccumulator(str(out / "tensorboard" / run))
    accumulator.Reload()
    return {
        tag: [(e.step, e.value) for e in accumulator.Scalars(tag)]
        for tag in accumulator.Tags()["scalars"]
    }


def float32(x: float) -> float:
    return float(np.float32(x))


@pytest.fixture(scope="module")
def uninterrupted(npz_path, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "uninterrupted"
    Trainer(config(npz_path, out), log=lambda _: None).fit()
    return out


def test_every_metrics_column_per_epoch(uninterrupted):
    rows = read_rows(uninterrupted)
    curves = scalars(uninterrupted, "epochs")
    columns = {k for r in rows for k, v in r.items() if k != "epoch" and v is not None}
    assert {"test_acc", "grad_norm", "perturbation_cosine", "lr", "aace_loss"} <= columns
    assert set(curves) == columns
    for name in columns:
        assert curves[name] == [(r["epoch"], float32(r[name])) for r in rows], name


def test_training_loss_every_step_averages_to_the_epochs_loss(uninterrupted):
    (loss,) = scalars(uninterrupted, "steps").values()
    assert [step for step, _ in loss] == list(range(1, 2 * STEPS_PER_EPOCH + 1))
    for epoch, row in enumerate(read_rows(uninterrupted)):
        values = [v for _, v in loss[epoch * STEPS_PER_EPOCH : (epoch + 1) * STEPS_PER_EPOCH]]
        # Equal batches: the epoch's train_loss is the mean of its steps' losses.
        assert np.mean(values) == pytest.approx(row["train_loss"], rel=1e-6)


@pytest.mark.parametrize(
    "checkpoint_every, resumed",
    [(0, "after epoch 1"), (2, "after epoch 1 and step 1 of epoch 2")],  # step 4 of 6
)
def test_resume_continues_the_curves_without_duplicates(
    npz_path, uninterrupted, tmp_path, monkeypatch, checkpoint_every, resumed
):
    out = tmp_path / "run"
    real_save = checkpoint_module.save_checkpoint

    def die_before_the_last_checkpoint(path, payload):
        if payload["epoch"] == 2:
            raise Killed  # epoch 2's events are on disk, its checkpoint is not
        real_save(path, payload)

    overrides = dict(log_every=2, checkpoint_every=checkpoint_every)
    monkeypatch.setattr(checkpoint_module, "save_checkpoint", die_before_the_last_checkpoint)
    with pytest.raises(Killed):
        Trainer(config(npz_path, out, **overrides), log=lambda _: None).fit()
    monkeypatch.setattr(checkpoint_module, "save_checkpoint", real_save)
    stale = scalars(out, "epochs")["test_acc"]
    assert [step for step, _ in stale] == [1, 2]
    # TensorBoard orders event files by their names, which start with the second of creation.
    time.sleep(1.1)
    messages = []
    Trainer(config(npz_path, out, **overrides), log=messages.append).fit(resume=True)
    assert any(m.endswith(resumed) for m in messages), messages
    assert len(list((out / "tensorboard" / "epochs").iterdir())) == 2  # one file per attempt

    rows = read_rows(out)
    for name, curve in scalars(out, "epochs").items():
        assert curve == [(r["epoch"], float32(r[name])) for r in rows], name
    (loss,) = scalars(out, "steps").values()
    (reference,) = scalars(uninterrupted, "steps").values()
    assert loss == [(step, value) for step, value in reference if step % 2 == 0]


def test_log_every_must_be_positive_and_tensorboard_installed(
    npz_path, tmp_path, monkeypatch, capsys
):
    argv = ["train", "--dataset", f"npz:{npz_path}", "--model", "wrn10_1", "--epochs", "1"]
    argv += ["--batch-size", "16", "--tensorboard", "--out", str(tmp_path / "run")]
    assert main([*argv, "--log-every", "0"]) == 2
    assert capsys.readouterr().err == (
        "aace: error: --log-every: got 0; expected an integer >= 1\n"
    )
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    assert main(argv) == 2
    assert capsys.readouterr().err == (
        "aace: error: --tensorboard needs the package 'tensorboard', which is not installed; "
        "install it with: pip install 'aace[tensorboard]'\n"
    )
