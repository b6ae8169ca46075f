"""torch.compile (inductor, on the CPU) of the model under SAM+AACE gives the eager weights, in the
library loop and in aace train --compile. Compiling is slow on a CPU: one small model, few steps."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from aace import SAM, aace_loss, frozen_running_stats
from aace.training.checkpoint import load_checkpoint
from aace.training.config import RunConfig
from aace.training.trainer import Trainer

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def small_net():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1), nn.InstanceNorm2d(8, affine=True, track_running_stats=True),
        nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4),
    )  # fmt: skip


def library_steps(model, step_model, data):
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.2, perturbation="aace", lr=0.1,
              momentum=0.9, weight_decay=5e-4)  # fmt: skip
    for x, y in data:
        aace_loss(step_model(x), y).backward()
        after_first_pass = [b.clone() for b in model.buffers()]
        opt.first_step(zero_grad=True)
        with frozen_running_stats(step_model):
            F.cross_entropy(step_model(x), y).backward()
        opt.second_step(zero_grad=True)
        for value, expected in zip(model.buffers(), after_first_pass):
            assert torch.equal(value, expected)
    return model


def test_compiled_library_loop_equals_eager():
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(8, 3, 8, 8, generator=g), torch.randint(0, 4, (8,), generator=g))
            for _ in range(3)]  # fmt: skip
    eager = small_net().train()
    compiled = copy.deepcopy(eager)
    library_steps(eager, eager, data)
    library_steps(compiled, torch.compile(compiled), data)
    start = small_net()
    assert not torch.equal(eager[0].weight, start[0].weight)
    for (name, a), b in zip(eager.state_dict().items(), compiled.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5, msg=name)


@pytest.fixture
def npz_path(tmp_path):
    rng = np.random.default_rng(0)
    y_train, y_test = rng.integers(0, 4, 32), rng.integers(0, 4, 8)

    def images(y):
        return (y[:, None, None, None] * 60 + rng.integers(0, 40, (len(y), 8, 8, 3))).astype(
            np.uint8
        )

    path = tmp_path / "tiny.npz"
    np.savez(path, x_train=images(y_train), y_train=y_train, x_test=images(y_test), y_test=y_test)
    return path


def test_aace_train_compile_equals_eager(npz_path, tmp_path):
    torch._dynamo.reset()
    weights = {}
    for compile_ in (False, True):
        out = tmp_path / f"compile-{compile_}"
        config = RunConfig(dataset=f"npz:{npz_path}", model="wrn10_1", optimizer="sam-aace",
                           epochs=1, batch_size=16, lr=0.05, out=str(out), seed=1,
                           compile=compile_, device="cpu")  # fmt: skip
        Trainer(config, log=lambda _: None).fit()
        weights[compile_] = load_checkpoint(out / "checkpoint.pt")["model"]
    for name, value in weights[False].items():
        torch.testing.assert_close(weights[True][name], value, rtol=1e-4, atol=1e-5, msg=name)
