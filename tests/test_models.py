"""Tests for aace.models: parameter counts, shapes, argument validation and ShakeDrop."""

from __future__ import annotations

import math
import re

import pytest
import torch
from torch import nn

from aace.models import PyramidNet, ShakeDrop, WideResNet, create_model, list_models, shake_drop


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# --------------------------------------------------------------------------- parameter counts

# Exact counts of the standard implementations (10 classes, 3 input channels):
# WRN: davda54/sam example/model/wide_res_net.py (36,479,194 and 10,961,370); WRN-16-1/16-4 use
# the usual identity shortcut when shapes match. PyramidNet: identical to osmr/imgclsmob
# pytorchcv pyramidnet_cifar.py (e.g. pyramidnet272_a200_bn_cifar10 = 26,210,842).
EXACT_COUNTS = {
    "wrn28_10": 36_479_194,
    "wrn16_8": 10_961_370,
    "wrn16_1": 175_066,
    "wrn16_4": 2_748_890,
    "pyramidnet272_200": 26_210_842,
    "pyramidnet110_48_basic": 1_772_706,
}

# Figures published in the papers (millions).
PUBLISHED_M = {
    "wrn28_10": (36.5, 0.005),
    "wrn16_8": (11.0, 0.005),
    "pyramidnet272_200": (26.0, 0.02),
    "pyramidnet110_48_basic": (1.7, 0.05),
}


@pytest.mark.parametrize("name", sorted(EXACT_COUNTS))
def test_parameter_count_exact(name: str) -> None:
    model = create_model(name, num_classes=10)
    assert n_params(model) == EXACT_COUNTS[name]


@pytest.mark.parametrize("name", sorted(PUBLISHED_M))
def test_parameter_count_published(name: str) -> None:
    published, rel_tol = PUBLISHED_M[name]
    count = n_params(create_model(name, num_classes=10)) / 1e6
    assert math.isclose(count, published, rel_tol=rel_tol), (name, count)


def test_pyramidnet_bottleneck_suffix_is_default() -> None:
    a = create_model("pyramidnet20_12", num_classes=10)
    b = create_model("pyramidnet20_12_bottleneck", num_classes=10)
    c = create_model("pyramidnet20_12_basic", num_classes=10)
    assert isinstance(a, PyramidNet) and a.bottleneck and b.bottleneck and not c.bottleneck
    assert n_params(a) == n_params(b) != n_params(c)


def test_pyramidnet_widths_grow_to_alpha() -> None:
    basic = create_model("pyramidnet20_12_basic", num_classes=10)
    assert basic.num_features == 16 + 12
    bottleneck = create_model("pyramidnet20_12", num_classes=10)
    assert bottleneck.num_features == 4 * (16 + 12)


# --------------------------------------------------------------------------- output shapes

SMALL_MODELS = ["wrn16_1", "wrn10_2", "pyramidnet20_12_basic", "pyramidnet11_12"]
INPUTS = [(3, 32), (1, 8), (1, 28), (1, 9)]


@pytest.mark.parametrize("name", SMALL_MODELS)
@pytest.mark.parametrize(("in_channels", "size"), INPUTS)
@pytest.mark.parametrize("num_classes", [2, 10, 100])
def test_output_shape(name: str, in_channels: int, size: int, num_classes: int) -> None:
    torch.manual_seed(0)
    model = create_model(name, num_classes=num_classes, in_channels=in_channels)
    x = torch.randn(3, in_channels, size, size)
    model.train()
    assert model(x).shape == (3, num_classes)
    model.eval()
    with torch.no_grad():
        out = model(x)
    assert out.shape == (3, num_classes)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", ["wrn16_1", "pyramidnet20_12_basic", "pyramidnet11_12"])
def test_backward_reaches_all_parameters(name: str) -> None:
    torch.manual_seed(0)
    model = create_model(name, num_classes=5, in_channels=1, dropout=0.1)
    loss = nn.functional.cross_entropy(model(torch.randn(4, 1, 8, 8)), torch.arange(4))
    loss.backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None, pname
        assert torch.isfinite(p.grad).all(), pname


def test_shakedrop_model_forward_backward() -> None:
    torch.manual_seed(0)
    model = create_model("pyramidnet20_12_basic", num_classes=10, shakedrop=0.5)
    x = torch.randn(4, 3, 16, 16)
    model.train()
    out = model(x)
    out.sum().backward()
    assert out.shape == (4, 10)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x), model(x))


def test_shakedrop_probabilities_increase_linearly() -> None:
    model = create_model("pyramidnet20_12_basic", num_classes=10, shakedrop=0.5)
    probs = [m.p_drop for m in model.modules() if isinstance(m, ShakeDrop)]
    n_blocks = len(probs)
    assert n_blocks == 3 * (20 - 2) // 6
    for i, p in enumerate(probs, start=1):
        assert p == pytest.approx(0.5 * i / n_blocks)
    assert probs[-1] == pytest.approx(0.5)


def test_init_scheme() -> None:
    model = create_model("wrn16_1", num_classes=10)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            assert torch.all(m.weight == 1) and torch.all(m.bias == 0)
        elif isinstance(m, nn.Linear):
            assert torch.all(m.bias == 0)


# --------------------------------------------------------------------------- dropout


def test_wrn_dropout_only_in_train_mode() -> None:
    torch.manual_seed(0)
    model = create_model("wrn16_1", num_classes=10, dropout=0.5)
    assert any(isinstance(m, nn.Dropout) for m in model.modules())
    x = torch.randn(4, 3, 8, 8)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x), model(x))
    model.train()
    with torch.no_grad():
        assert not torch.allclose(model(x), model(x))


def test_wrn_without_dropout_is_deterministic_in_train_mode() -> None:
    torch.manual_seed(0)
    model = create_model("wrn16_1", num_classes=10).train()
    x = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(model(x), model(x))


# --------------------------------------------------------------------------- ShakeDrop function


@pytest.mark.parametrize("p", [0.0, 0.3, 0.9, 1.0])
def test_shakedrop_eval_scales_by_one_minus_p(p: float) -> None:
    x = torch.randn(5, 4, 3, 3, requires_grad=True)
    y = shake_drop(x, p, training=False)
    assert torch.allclose(y, (1 - p) * x)
    y.sum().backward()
    assert torch.allclose(x.grad, torch.full_like(x, 1 - p))


def test_shakedrop_module_follows_training_flag() -> None:
    module = ShakeDrop(0.25).eval()
    x = torch.randn(3, 2, 4, 4)
    assert torch.allclose(module(x), 0.75 * x)


def test_shakedrop_train_p0_is_identity() -> None:
    torch.manual_seed(0)
    x = torch.randn(6, 3, 4, 4, requires_grad=True)
    y = shake_drop(x, 0.0, training=True)
    assert torch.equal(y, x)
    y.sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))
    assert ShakeDrop(0.0).train()(x) is x


def _per_sample_factors(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Ratio t / x, checked to be constant within each sample; returns shape (N,)."""
    ratio = (t / x).flatten(1)
    assert torch.allclose(ratio, ratio[:, :1].expand_as(ratio), atol=1e-5)
    return ratio[:, 0]


def test_shakedrop_train_gate_zero_scales_forward_and_backward() -> None:
    torch.manual_seed(0)
    x = (torch.rand(64, 3, 4, 4) + 0.5).requires_grad_()  # positive, away from zero
    y = shake_drop(x, 1.0, training=True)  # p = 1: the gate is always 0
    alpha = _per_sample_factors(y.detach(), x.detach())
    assert torch.all(alpha != 1.0)  # no sample passes through unchanged
    assert torch.all(alpha >= -1) and torch.all(alpha <= 1)
    assert alpha.min() < 0 < alpha.max()  # alpha ~ U(-1, 1) takes both signs
    y.backward(torch.ones_like(y))
    beta = _per_sample_factors(x.grad, torch.ones_like(x))
    assert torch.all(beta >= 0) and torch.all(beta <= 1)
    assert beta.std() > 0  # drawn per sample
    assert not torch.allclose(alpha, beta)  # backward uses fresh noise


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_shakedrop_train_mixed_gates(p: float) -> None:
    torch.manual_seed(1)
    x = (torch.rand(512, 2, 3, 3) + 0.5).requires_grad_()
    y = shake_drop(x, p, training=True)
    fwd = _per_sample_factors(y.detach(), x.detach())
    y.backward(torch.ones_like(y))
    bwd = _per_sample_factors(x.grad, torch.ones_like(x))
    kept = fwd == 1.0
    # Gate 1: identity both ways; gate 0: forward factor in [-1, 1], backward in [0, 1].
    assert torch.all(bwd[kept] == 1.0)
    assert torch.all(fwd[~kept].abs() <= 1) and torch.all((bwd[~kept] >= 0) & (bwd[~kept] <= 1))
    assert abs(kept.float().mean().item() - (1 - p)) < 0.08  # about 1 - p of the samples kept


@pytest.mark.parametrize("p", [-0.1, 1.5])
def test_shakedrop_bad_probability(p: float) -> None:
    with pytest.raises(ValueError, match=re.escape(str(p))):
        shake_drop(torch.ones(2, 3), p)
    with pytest.raises(ValueError, match=re.escape(str(p))):
        ShakeDrop(p)


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("name", "needle"),
    [
        ("resnet9", "resnet9"),
        ("wrn28", "wrn28"),
        ("wrn28_10_basic", "wrn28_10_basic"),
        ("pyramidnet272", "pyramidnet272"),
        ("pyramidnet272_200_wide", "pyramidnet272_200_wide"),
        ("", "''"),
        ("wrn27_10", "27"),  # (27 - 4) % 6 != 0
        ("wrn4_1", "4"),  # no blocks
        ("wrn28_0", "0"),
        ("pyramidnet26_12", "26"),  # (26 - 2) % 9 != 0 for bottleneck
        ("pyramidnet26_12_bottleneck", "26"),
        ("pyramidnet21_12_basic", "21"),  # (21 - 2) % 6 != 0 for basic
        ("pyramidnet2_12_basic", "2"),
    ],
)
def test_bad_name_raises(name: str, needle: str) -> None:
    with pytest.raises(ValueError, match=re.escape(needle)):
        create_model(name, num_classes=10)


def test_unknown_name_message_lists_patterns() -> None:
    with pytest.raises(ValueError) as info:
        create_model("resnet9", num_classes=10)
    message = str(info.value)
    assert "wrn{depth}_{width}" in message and "pyramidnet{depth}_{alpha}" in message


def test_bad_depth_message_names_rule() -> None:
    with pytest.raises(ValueError, match=r"\(depth - 4\).*multiple of 6"):
        create_model("wrn27_10", num_classes=10)
    with pytest.raises(ValueError, match=r"\(depth - 2\).*multiple of 9"):
        create_model("pyramidnet26_12", num_classes=10)
    with pytest.raises(ValueError, match=r"\(depth - 2\).*multiple of 6"):
        create_model("pyramidnet21_12_basic", num_classes=10)


@pytest.mark.parametrize(
    ("kwargs", "arg", "value"),
    [
        ({"num_classes": 1}, "num_classes", "1"),
        ({"num_classes": 0}, "num_classes", "0"),
        ({"num_classes": -3}, "num_classes", "-3"),
        ({"in_channels": 0}, "in_channels", "0"),
        ({"dropout": -0.1}, "dropout", "-0.1"),
        ({"dropout": 1.0}, "dropout", "1.0"),
        ({"dropout": float("nan")}, "dropout", "nan"),
        ({"shakedrop": 1.0}, "shakedrop", "1.0"),
        ({"shakedrop": -0.5}, "shakedrop", "-0.5"),
    ],
)
@pytest.mark.parametrize("name", ["wrn16_1", "pyramidnet20_12_basic"])
def test_bad_argument_raises(name: str, kwargs: dict, arg: str, value: str) -> None:
    full = {"num_classes": 10, **kwargs}
    with pytest.raises(ValueError) as info:
        create_model(name, **full)
    assert arg in str(info.value) and value in str(info.value)


def test_shakedrop_rejected_for_wrn() -> None:
    with pytest.raises(ValueError, match="shakedrop"):
        create_model("wrn16_1", num_classes=10, shakedrop=0.5)


def test_non_integer_arguments_rejected() -> None:
    with pytest.raises(TypeError):
        create_model("wrn16_1", num_classes=10.0)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        create_model("wrn16_1", num_classes=True)  # type: ignore[arg-type]


def test_name_is_case_insensitive() -> None:
    assert isinstance(create_model("WRN16_1", num_classes=10), WideResNet)


def test_list_models() -> None:
    names = list_models()
    assert isinstance(names, list) and all(isinstance(n, str) for n in names)
    for pattern in ["wrn{depth}_{width}", "pyramidnet{depth}_{alpha}"]:
        assert pattern in names
    assert "pyramidnet{depth}_{alpha}_basic" in names
    assert any("{" not in n for n in names)  # a few concrete examples too
