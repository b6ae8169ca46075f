"""What an epoch reports: EpochSums' means, checked against sums done by hand."""

from __future__ import annotations

import math

import pytest
import torch

from aace.training.config import RunConfig
from aace.training.distributed import Distributed
from aace.training.metrics import EpochSums, summarize
from aace.training.step import NonFiniteError, StepStats


def _stats(loss: float, correct: int, grad_norm: float | None = None, cosine=math.nan):
    t = lambda v: torch.tensor(v, dtype=torch.float32)  # noqa: E731
    stats = StepStats(train_loss=t(loss), ce_loss=t(loss + 1), aace_loss=t(loss + 2),
                      correct=torch.tensor(correct), sam_step=grad_norm is not None)  # fmt: skip
    if grad_norm is not None:
        stats.grad_norm, stats.perturbation_norm = t(grad_norm), t(0.05)
        stats.perturbation_cosine = t(cosine)
    return stats


def test_row_weights_losses_by_batch_and_sam_statistics_by_step():
    sums = EpochSums(torch.device("cpu"))
    sums.add(_stats(1.0, 3, grad_norm=2.0), batch_size=4)  # first SAM step: no cosine yet
    sums.add(_stats(4.0, 1, grad_norm=4.0, cosine=0.5), batch_size=2)
    test = (torch.tensor(6.0), torch.tensor(2), torch.tensor(4))  # loss sum, correct, count
    row, samples = sums.row(True, test, Distributed())
    assert samples == 6
    assert row["train_loss"] == pytest.approx((1.0 * 4 + 4.0 * 2) / 6)  # per sample: 2.0
    assert row["ce_loss"] == pytest.approx(3.0) and row["aace_loss"] == pytest.approx(4.0)
    assert row["train_acc"] == pytest.approx(4 / 6) == row["train_acc_clean"]
    assert row["grad_norm"] == pytest.approx(3.0)  # per step: (2 + 4) / 2
    assert row["perturbation_cosine"] == pytest.approx(0.5)  # over the steps that have one
    assert (row["test_loss"], row["test_acc"]) == (1.5, 0.5)
    assert row["sam_step_fraction"] == 1.0 and row["skipped_steps"] == 0


def test_a_nonfinite_step_is_named_by_step_and_pass():
    sums = EpochSums(torch.device("cpu"))
    stats = _stats(1.0, 1)
    stats.first_pass_finite, stats.update_pass_finite = torch.tensor(True), torch.tensor(False)
    sums.add(_stats(1.0, 1), 2)
    sums.add(stats, 2)
    test = (torch.tensor(0.0), torch.tensor(0), torch.tensor(1))
    with pytest.raises(NonFiniteError, match="non-finite update-pass loss or gradient at step 2"):
        sums.row(False, test, Distributed())


def test_summary_of_rows():
    rows = [{"epoch": 1, "test_acc": 0.6, "test_loss": 1.0, "seconds": 2.0},
            {"epoch": 2, "test_acc": 0.5, "test_loss": 1.2, "seconds": 3.0}]  # fmt: skip
    summary = summarize(rows, RunConfig(optimizer="asam"))
    assert (summary["rho"], summary["best_epoch"], summary["final_test_acc"]) == (0.5, 1, 0.5)
    assert summary["seconds"] == 5.0
    assert summarize(rows, RunConfig(optimizer="sgd"))["rho"] is None
