"""frozen_running_stats: every buffer that a forward pass writes stays as the first pass left it."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from aace import SAM, aace_loss, frozen_batchnorm_stats, frozen_running_stats


class InPlaceStat(nn.Module):
    """A user's layer: an exponential moving average of its input's mean, written in place."""

    def __init__(self, width):
        super().__init__()
        self.register_buffer("running_mean", torch.zeros(width))
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))

    def forward(self, x):
        if self.training:
            with torch.no_grad():
                self.running_mean.mul_(0.9).add_(x.mean((0, 1)), alpha=0.1)
                self.calls += 1
        return x - self.running_mean


class AssignedStat(nn.Module):
    """A user's layer that assigns a new tensor to its buffer instead of writing in place."""

    def __init__(self, width):
        super().__init__()
        self.register_buffer("running_max", torch.zeros(width))

    def forward(self, x):
        if self.training:
            self.running_max = torch.maximum(self.running_max, x.detach().amax((0, 1)))
        return x / (1 + self.running_max)


def conv_net(norm):
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), norm(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(4, 3),
    )  # fmt: skip


def instance_norm(width):
    return nn.InstanceNorm2d(width, affine=True, track_running_stats=True)


def evonorm_b0(width):
    timm_layers = pytest.importorskip("timm.layers")
    return timm_layers.EvoNorm2dB0(width)


def user_layers(width):
    return nn.Sequential(nn.Flatten(2), InPlaceStat(16), AssignedStat(16), nn.Unflatten(2, (4, 4)))


NORMS = {
    "batchnorm": nn.BatchNorm2d,
    "syncbatchnorm": nn.SyncBatchNorm,  # without a process group: BatchNorm's computation
    "instancenorm": instance_norm,
    "evonorm-b0": evonorm_b0,
    "user-layers": user_layers,
}


def buffers(model):
    return {name: b.clone() for name, b in model.named_buffers()}


@pytest.mark.parametrize("norm", list(NORMS))
def test_a_sam_step_leaves_every_buffer_as_the_first_pass_left_it(norm):
    torch.manual_seed(0)
    model = conv_net(NORMS[norm]).train()
    x, y = torch.randn(6, 3, 4, 4), torch.randint(0, 3, (6,))
    # Reference for the first step: the forward pass at w alone, on a copy of the model.
    reference = copy.deepcopy(model)
    reference(x)
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.5, perturbation="aace", lr=0.1)
    for step in range(3):
        aace_loss(model(x), y).backward()
        after_first_pass = buffers(model)
        opt.first_step(zero_grad=True)
        with frozen_running_stats(model):
            F.cross_entropy(model(x), y).backward()
        opt.second_step(zero_grad=True)
        for name, value in model.named_buffers():
            assert torch.equal(value, after_first_pass[name]), (step, name)
        if step == 0:
            expected = dict(reference.named_buffers())
            for name, value in model.named_buffers():
                assert torch.equal(value, expected[name]), name
            assert any(b.count_nonzero() for b in model.buffers())  # it does keep statistics


@pytest.mark.parametrize("norm", ["instancenorm", "evonorm-b0", "user-layers"])
def test_the_old_name_keeps_statistics_that_are_not_batchnorms(norm):
    # Replays the public report: InstanceNorm's running_var moved by 0.067 in the second pass.
    torch.manual_seed(0)
    model = conv_net(NORMS[norm]).train()
    x = torch.randn(6, 3, 4, 4)
    model(x)
    before = buffers(model)
    with frozen_batchnorm_stats(model):
        model(3 * x + 1)
    for name, value in model.named_buffers():
        assert torch.equal(value, before[name]), name
    model(3 * x + 1)  # outside the block the layer does update
    assert any(not torch.equal(v, before[n]) for n, v in model.named_buffers())


def test_batchnorm_is_switched_off_not_copied_and_unwritten_buffers_are_copied_once(monkeypatch):
    torch.manual_seed(0)
    model = conv_net(nn.BatchNorm2d).train()
    model.register_buffer("mask", torch.ones(3))  # a buffer no forward pass writes
    x = torch.randn(6, 3, 4, 4)
    clones = []
    original_clone = torch.Tensor.clone

    def counting_clone(self, *args, **kwargs):
        clones.append(tuple(self.shape))
        return original_clone(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "clone", counting_clone)
    for _ in range(3):
        model(x)  # the first pass writes BatchNorm's statistics
        with frozen_running_stats(model):
            model(x)
    assert clones == [(3,)]  # the mask, on the first block only; BatchNorm never
    assert model[1].track_running_stats


def test_batchnorm_in_eval_mode_keeps_normalizing_with_its_running_statistics():
    torch.manual_seed(0)
    model = conv_net(nn.BatchNorm2d).train()
    x = torch.randn(6, 3, 4, 4)
    model(x)
    model.eval()
    expected = model(x + 1)
    with frozen_running_stats(model):
        got = model(x + 1)
    assert torch.equal(got, expected)


class SometimesWrites(nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("total", torch.zeros(()))
        self.armed = False

    def forward(self, x):
        if self.armed:
            self.total.add_(1.0)
        return x


def test_a_buffer_first_written_inside_a_later_block_is_named_in_the_error():
    layer = SometimesWrites()
    model = nn.Sequential(nn.Linear(2, 2), layer)
    x = torch.randn(3, 2)
    for _ in range(2):
        model(x)
        with frozen_running_stats(model):
            model(x)
    layer.armed = True
    with pytest.raises(RuntimeError, match=r"buffer\(s\) 1\.total were written in place"):
        with frozen_running_stats(model):
            model(x)
    # Learned: from now on it is saved and put back.
    with frozen_running_stats(model):
        model(x)
    assert layer.total.item() == 1.0


def test_an_exception_in_the_block_still_restores_and_propagates():
    torch.manual_seed(0)
    model = conv_net(instance_norm).train()
    x = torch.randn(6, 3, 4, 4)
    model(x)
    before = buffers(model)
    with pytest.raises(ValueError, match="boom"):
        with frozen_running_stats(model):
            model(x + 1)
            raise ValueError("boom")
    for name, value in model.named_buffers():
        assert torch.equal(value, before[name])
    assert model[1].track_running_stats


def test_buffers_made_in_inference_mode_and_shared_buffers_are_handled():
    torch.manual_seed(0)
    model = conv_net(instance_norm).train()
    with torch.inference_mode():
        table = torch.arange(3.0)
    model.register_buffer("table", table)  # no version counter
    model[5].register_buffer("shared", model[1].running_mean)  # one tensor, two modules
    x = torch.randn(6, 3, 4, 4)
    for _ in range(2):
        model(x)
        before = buffers(model)
        with frozen_running_stats(model):
            model(x + 1)
        for name, value in model.named_buffers():
            assert torch.equal(value, before[name]), name
