"""One training step (aace.training.step.TrainStep) against the same step written by hand.

Further step tests run through the trainer in test_training.py (SAM+AACE and BiSAM by hand),
test_schedule.py (plain steps inside a SAM run) and test_distributed.py (DDP)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from aace.training.build import build_optimizer
from aace.training.config import RunConfig
from aace.training.step import TrainStep

CPU = torch.device("cpu")


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(12, 8), nn.Tanh(), nn.Linear(8, 3)).double()


def _batch():
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(6, 3, 2, 2, generator=generator, dtype=torch.float64)
    return x, torch.randint(0, 3, (6,), generator=generator)


def test_sgd_step_is_one_sgd_update_on_the_smoothed_loss():
    config = RunConfig(optimizer="sgd", lr=0.1, momentum=0.0, weight_decay=0.0,
                       label_smoothing=0.2)  # fmt: skip
    model, reference = _model(), _model()
    x, y = _batch()
    stats = TrainStep(model, build_optimizer(model, config), config, CPU)(x, y)
    loss = F.cross_entropy(reference(x), y, label_smoothing=0.2)
    grads = torch.autograd.grad(loss, list(reference.parameters()))
    for p, q, g in zip(model.parameters(), reference.parameters(), grads):
        torch.testing.assert_close(p, q - 0.1 * g)  # w - lr * grad
    torch.testing.assert_close(stats.train_loss.double(), loss.detach(), rtol=1e-6, atol=0)
    assert stats.grad_norm is None and not stats.sam_step


@pytest.mark.parametrize("optimizer", ["sam", "sam-aace", "asam"])
def test_accumulated_micro_batches_take_the_whole_batch_step(optimizer):
    # Micro-batch losses weighted n_i / n sum to the mean loss of the batch, so without
    # BatchNorm the step equals the unsplit one (up to the order of float additions).
    x, y = _batch()
    models = []
    for accumulate in (1, 2, 3):
        config = RunConfig(optimizer=optimizer, lr=0.1, batch_size=6, accumulate=accumulate)
        model = _model()
        TrainStep(model, build_optimizer(model, config), config, CPU)(x, y)
        models.append(model)
    for other in models[1:]:
        for p, q in zip(models[0].parameters(), other.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)
