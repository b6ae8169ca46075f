"""aace train end to end on tiny data: run directory, metrics, schedule, resume."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from aace import SAM, aace_loss, bisam_loss, frozen_batchnorm_stats
from aace.training.build import build_optimizer
from aace.training.checkpoint import load_checkpoint
from aace.training.config import ConfigError
from aace.training.step import NonFiniteError, TrainStep
from aace.training.trainer import Trainer
from conftest import Killed, read_rows, tiny_config, without_timing

ROW_FIELDS = {
    "epoch", "lr", "train_loss", "train_acc", "train_acc_clean", "test_loss", "test_acc", "ce_loss",
    "aace_loss", "grad_norm", "perturbation_norm", "perturbation_cosine", "seconds",
    "images_per_second", "sam_step_fraction", "skipped_steps",
}  # fmt: skip


@pytest.mark.parametrize(
    "optimizer", ["sgd", "sam", "sam-aace", "sam-aace-normalized", "asam", "sam-bisam"]
)
def test_run_directory_for_every_optimizer(npz_path, tmp_path, optimizer):
    out = tmp_path / "run"
    summary = Trainer(tiny_config(npz_path, out, optimizer=optimizer), log=lambda _: None).fit()
    rows = read_rows(out)
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    for row in rows:
        assert set(row) == ROW_FIELDS
        assert 0 <= row["train_acc"] <= 1 and 0 <= row["test_acc"] <= 1
        assert row["train_acc_clean"] == row["train_acc"]  # no label noise: the same labels
        sam_fields = [row["grad_norm"], row["perturbation_norm"], row["perturbation_cosine"]]
        if optimizer == "sgd":
            assert sam_fields == [None, None, None]
        else:
            assert all(isinstance(v, float) for v in sam_fields)
            assert -1 <= row["perturbation_cosine"] <= 1
    if optimizer in ("sam", "sam-aace-normalized", "sam-bisam"):
        # Normalized rules: ||e|| = rho exactly (up to eps).
        rho = {"sam": 0.05, "sam-aace-normalized": 0.05, "sam-bisam": 0.05}[optimizer]
        assert rows[0]["perturbation_norm"] == pytest.approx(rho, rel=1e-5)
    if optimizer == "sam-aace":
        assert rows[0]["perturbation_norm"] == pytest.approx(0.2 * rows[0]["grad_norm"], rel=1e-5)
    config = json.loads((out / "config.json").read_text())
    assert config["config"]["optimizer"] == optimizer
    # The radius the run used, so that reports need no table of defaults.
    expected_rho = {"sgd": None, "sam-aace": 0.2, "asam": 0.5}.get(optimizer, 0.05)
    assert config["resolved_rho"] == expected_rho
    assert config["torch_version"] == torch.__version__ and config["aace_version"]
    assert summary == json.loads((out / "summary.json").read_text())
    assert summary["final_test_acc"] == rows[-1]["test_acc"]
    assert summary["best_test_acc"] == max(r["test_acc"] for r in rows)
    checkpoint = load_checkpoint(out / "checkpoint.pt")
    assert checkpoint["epoch"] == 3 and without_timing(checkpoint["metrics"]) == without_timing(
        rows
    )


def test_step_schedule_multiplies_by_0_2_at_30_60_80_percent(npz_path, tmp_path):
    out = tmp_path / "run"
    config = tiny_config(npz_path, out, optimizer="sgd", epochs=10, lr=0.1, batch_size=48)
    Trainer(config, log=lambda _: None).fit()
    lrs = [r["lr"] for r in read_rows(out)]
    expected = [0.1] * 3 + [0.02] * 3 + [0.004] * 2 + [0.0008] * 2
    assert lrs == pytest.approx(expected)


def test_losses_logged_at_unperturbed_weights_are_consistent(npz_path, tmp_path):
    out = tmp_path / "run"
    Trainer(tiny_config(npz_path, out, optimizer="sam"), log=lambda _: None).fit()
    for row in read_rows(out):
        # Without label smoothing the update loss is the cross-entropy itself.
        assert row["train_loss"] == pytest.approx(row["ce_loss"])


def test_train_step_matches_manual_sam_aace(npz_path, tmp_path):
    config = tiny_config(npz_path, tmp_path, optimizer="sam-aace", rho=0.3, label_smoothing=0.1)
    torch.manual_seed(0)
    from aace.models import create_model

    model_a = create_model("wrn10_1", 4, 3)
    model_b = create_model("wrn10_1", 4, 3)
    model_b.load_state_dict(model_a.state_dict())
    x, y = torch.randn(8, 3, 8, 8), torch.randint(0, 4, (8,))
    step = TrainStep(model_a, build_optimizer(model_a, config), config, torch.device("cpu"))
    stats = step(x, y)
    opt = SAM(model_b.parameters(), torch.optim.SGD, rho=0.3, perturbation="aace", lr=0.05,
              momentum=0.9, weight_decay=5e-4)  # fmt: skip
    logits = model_b(x)
    aace_loss(logits, y).backward()
    opt.first_step(zero_grad=True)
    with frozen_batchnorm_stats(model_b):
        F.cross_entropy(model_b(x), y, label_smoothing=0.1).backward()
    opt.second_step(zero_grad=True)
    for a, b in zip(model_a.state_dict().values(), model_b.state_dict().values()):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(stats.ce_loss, F.cross_entropy(logits.detach(), y))
    torch.testing.assert_close(stats.aace_loss, aace_loss(logits.detach(), y))


def test_train_step_sam_bisam_perturbs_along_the_bisam_gradient(npz_path, tmp_path):
    """The trainer's first pass ascends BiSAM's loss: its perturbation is
    e = +rho g / ||g|| with g = grad bisam_loss (not the cross-entropy), and the whole step
    equals SAM written out by hand with that first pass."""
    config = tiny_config(npz_path, tmp_path, optimizer="sam-bisam", label_smoothing=0.1)
    assert config.resolved_rho == 0.05
    torch.manual_seed(0)
    from aace.models import create_model

    model_a = create_model("wrn10_1", 4, 3)
    model_b = create_model("wrn10_1", 4, 3)
    model_b.load_state_dict(model_a.state_dict())
    x, y = torch.randn(8, 3, 8, 8), torch.randint(0, 4, (8,))
    params_a = [p for p in model_a.parameters()]
    w0 = [p.detach().clone() for p in params_a]
    # The gradient BiSAM's perturbation should follow, at w0 (same BatchNorm mode: train).
    g = torch.autograd.grad(bisam_loss(model_b(x), y), list(model_b.parameters()))
    model_b.load_state_dict(model_a.state_dict())  # undo the BatchNorm statistics' update
    norm = torch.sqrt(sum((gi**2).sum() for gi in g))
    expected_e = [0.05 * gi / (norm + 1e-12) for gi in g]
    ce_g = torch.autograd.grad(
        F.cross_entropy(model_b(x), y, label_smoothing=0.1), list(model_b.parameters())
    )
    model_b.load_state_dict(model_a.state_dict())

    optimizer = build_optimizer(model_a, config)
    seen = []
    first_step = optimizer.first_step

    def record(*args, **kwargs):
        first_step(*args, **kwargs)
        seen.append([p.detach() - w for p, w in zip(params_a, w0)])

    optimizer.first_step = record
    stats = TrainStep(model_a, optimizer, config, torch.device("cpu"))(x, y)
    (e,) = seen
    for got, want in zip(e, expected_e):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-7)
    cosine_with_ce = sum((a * b).sum() for a, b in zip(e, ce_g)) / (
        0.05 * torch.sqrt(sum((b**2).sum() for b in ce_g))
    )
    assert cosine_with_ce < 0.999  # a different direction from SAM's cross-entropy ascent
    torch.testing.assert_close(stats.perturbation_norm, torch.tensor(0.05), rtol=1e-5, atol=0)

    opt = SAM(model_b.parameters(), torch.optim.SGD, rho=0.05, perturbation="sam", lr=0.05,
              momentum=0.9, weight_decay=5e-4)  # fmt: skip
    bisam_loss(model_b(x), y).backward()
    opt.first_step(zero_grad=True)
    with frozen_batchnorm_stats(model_b):
        F.cross_entropy(model_b(x), y, label_smoothing=0.1).backward()
    opt.second_step(zero_grad=True)
    for a, b in zip(model_a.state_dict().values(), model_b.state_dict().values()):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("optimizer", ["sgd", "sam-aace"])
def test_interrupted_run_resumes_to_the_uninterrupted_result(
    npz_path, tmp_path, interrupt_after, optimizer
):
    overrides = dict(optimizer=optimizer, epochs=4, dropout=0.3, aace_mode="rand")
    reference = tmp_path / "reference"
    Trainer(tiny_config(npz_path, reference, **overrides), log=lambda _: None).fit()

    out = tmp_path / "interrupted"
    interrupt_after(2)
    with pytest.raises(Killed):
        Trainer(tiny_config(npz_path, out, **overrides), log=lambda _: None).fit()
    interrupt_after(None)
    # A half-written third epoch: the metrics file may hold a row past the checkpoint.
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"epoch": 3, "test_acc": 0.0}\n')
    messages = []
    Trainer(tiny_config(npz_path, out, **overrides), log=messages.append).fit(resume=True)
    assert any("resumed" in m and "after epoch 2" in m for m in messages)
    assert without_timing(read_rows(out)) == without_timing(read_rows(reference))
    final, expected = (
        load_checkpoint(out / "checkpoint.pt"),
        load_checkpoint(reference / "checkpoint.pt"),
    )
    for key, tensor in expected["model"].items():
        assert torch.equal(final["model"][key], tensor), key


def test_resume_without_checkpoint_starts_from_the_beginning(npz_path, tmp_path):
    messages = []
    out = tmp_path / "fresh"
    Trainer(tiny_config(npz_path, out, epochs=1), log=messages.append).fit(resume=True)
    assert "no checkpoint" in messages[0]
    assert len(read_rows(out)) == 1


def test_run_directory_protection(npz_path, tmp_path):
    out = tmp_path / "run"
    Trainer(tiny_config(npz_path, out, epochs=1), log=lambda _: None).fit()
    with pytest.raises(ConfigError, match="already holds a run; pass --resume"):
        Trainer(tiny_config(npz_path, out, epochs=1), log=lambda _: None).fit()
    with pytest.raises(ConfigError, match=r"different run \(lr: 0.05 there, 0.2 now\)"):
        Trainer(tiny_config(npz_path, out, epochs=1, lr=0.2), log=lambda _: None).fit(resume=True)
    # Finished run resumed with the same settings: nothing to do, same summary.
    summary = Trainer(tiny_config(npz_path, out, epochs=1), log=lambda _: None).fit(resume=True)
    assert summary["epochs"] == 1


def test_batch_size_larger_than_dataset(npz_path, tmp_path):
    with pytest.raises(ConfigError, match="--batch-size: got 100, larger than"):
        Trainer(tiny_config(npz_path, tmp_path / "r", batch_size=100), log=lambda _: None).fit()


def _poison_batches(monkeypatch, bad_steps):
    """Make the loader yield NaN images at the given (epoch, step) pairs (1-based)."""
    from aace.data import BatchLoader

    real_iter = BatchLoader.__iter__

    def poisoned(self):
        for i, (x, y) in enumerate(real_iter(self), start=1):
            if self.train and (self.epoch + 1, i) in bad_steps:
                x = torch.full_like(x, float("nan"))
            yield x, y

    monkeypatch.setattr(BatchLoader, "__iter__", poisoned)


@pytest.mark.parametrize("optimizer, pass_name", [("sam-aace", "perturbation"), ("sgd", "update")])
def test_nonfinite_stops_and_keeps_last_good_checkpoint(
    npz_path, tmp_path, monkeypatch, optimizer, pass_name
):
    out = tmp_path / "run"
    _poison_batches(monkeypatch, {(2, 2)})
    with pytest.raises(NonFiniteError, match=f"non-finite {pass_name}-pass loss or gradient at "
                       "step 2 of epoch 2; stopped, checkpoint of epoch 1 kept"):  # fmt: skip
        Trainer(tiny_config(npz_path, out, optimizer=optimizer), log=lambda _: None).fit()
    assert load_checkpoint(out / "checkpoint.pt")["epoch"] == 1
    assert [r["epoch"] for r in read_rows(out)] == [1]


def test_nonfinite_skip_counts_steps_and_leaves_weights_finite(npz_path, tmp_path, monkeypatch):
    out = tmp_path / "run"
    _poison_batches(monkeypatch, {(1, 1), (2, 2), (2, 3)})
    config = tiny_config(npz_path, out, optimizer="sam-aace", nonfinite="skip")
    Trainer(config, log=lambda _: None).fit()
    rows = read_rows(out)
    assert [r["skipped_steps"] for r in rows] == [1, 2, 0]
    assert all(np.isfinite(r["train_loss"]) for r in rows)
    model = load_checkpoint(out / "checkpoint.pt")["model"]
    assert all(torch.isfinite(t).all() for t in model.values() if t.is_floating_point())


def test_update_pass_skip_restores_weights(npz_path, tmp_path):
    """A non-finite second pass: the perturbation is undone and nothing is updated."""
    from aace.models import create_model

    config = tiny_config(npz_path, tmp_path, optimizer="sam-aace", nonfinite="skip")
    model = create_model("wrn10_1", 4, 3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = build_optimizer(model, config)
    step = TrainStep(model, optimizer, config, torch.device("cpu"))
    step.update_loss = lambda logits, y: F.cross_entropy(logits, y) * float("inf")
    stats = step(torch.randn(8, 3, 8, 8), torch.randint(0, 4, (8,)))
    assert stats.skipped_pass == "update"
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key  # BatchNorm statistics included
    assert optimizer.base_optimizer.state_dict()["state"] == {}


def _instance_norm_net():
    from torch import nn

    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.InstanceNorm2d(4, affine=True, track_running_stats=True),
        nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 4),
    )  # fmt: skip


def test_train_step_keeps_instance_norm_statistics_of_the_first_pass(npz_path, tmp_path):
    config = tiny_config(npz_path, tmp_path, optimizer="sam-aace", rho=0.5)
    torch.manual_seed(0)
    model = _instance_norm_net()
    reference = _instance_norm_net()
    reference.load_state_dict(model.state_dict())
    x, y = torch.randn(8, 3, 8, 8), torch.randint(0, 4, (8,))
    TrainStep(model, build_optimizer(model, config), config, torch.device("cpu"))(x, y)
    reference(x)  # the first pass alone, at the same w
    norm, expected = model[1], reference[1]
    assert torch.equal(norm.running_mean, expected.running_mean)
    assert torch.equal(norm.running_var, expected.running_var)
    assert torch.equal(norm.num_batches_tracked, expected.num_batches_tracked)


def test_train_step_clears_gradients_left_in_grad(npz_path, tmp_path):
    config = tiny_config(npz_path, tmp_path, optimizer="sam", rho=0.2)
    torch.manual_seed(0)
    clean, dirty = _instance_norm_net(), _instance_norm_net()
    dirty.load_state_dict(clean.state_dict())
    x, y = torch.randn(8, 3, 8, 8), torch.randint(0, 4, (8,))
    for p in dirty.parameters():
        p.grad = torch.full_like(p, 100.0)  # e.g. a backward of the caller's own
    for model in (clean, dirty):
        TrainStep(model, build_optimizer(model, config), config, torch.device("cpu"))(x, y)
    for a, b in zip(clean.parameters(), dirty.parameters()):
        assert torch.equal(a, b)


def test_perturbation_weight_decay_flag_reaches_the_optimizer(npz_path, tmp_path):
    from aace.cli import build_parser, config_from_args

    args = build_parser().parse_args(
        ["train", "--optimizer", "sam", "--perturbation-weight-decay", "5e-4"]
    )
    config = config_from_args(args)
    assert config.perturbation_weight_decay == 5e-4
    model = _instance_norm_net()
    assert build_optimizer(model, config).param_groups[0]["perturbation_weight_decay"] == 5e-4
    with pytest.raises(ConfigError, match=r"--perturbation-weight-decay: got -1\.0; expected"):
        tiny_config(npz_path, tmp_path, perturbation_weight_decay=-1.0).validate()
    with pytest.raises(ConfigError, match="0 with --optimizer sgd"):
        tiny_config(npz_path, tmp_path, optimizer="sgd", perturbation_weight_decay=0.1).validate()
