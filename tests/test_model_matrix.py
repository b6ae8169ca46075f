"""SAM and SAM+AACE on the models users bring: timm and torchvision architectures, InstanceNorm
statistics, frozen parameters, a head without gradient on some steps, parameter groups with their
own rho, channels_last.

For each model, two steps of aace's loop (``first_step``, second pass under
``frozen_running_stats``, ``second_step``) in float64 equal a plain-torch re-implementation in
float64 written here from the formulas (``torch.autograd.grad``, flat vectors, SGD's update by
hand, the second pass on a copy of the model so that its buffers cannot leak), and the buffers
after the second pass are those after the first. A bfloat16-autocast step runs and keeps the
buffers too. Models and batches are tiny (4 images of 3x32x32): the file runs in under a minute.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from aace import SAM, aace_loss, frozen_running_stats

timm = pytest.importorskip("timm")
torchvision = pytest.importorskip("torchvision")

LR, MOMENTUM, WEIGHT_DECAY, EPS, BATCH = 0.1, 0.9, 5e-4, 1e-12, 4
RHO = {"sam": 0.05, "aace": 0.2}
LOSSES = {"sam": F.cross_entropy, "aace": aace_loss}
SIGN = {"sam": 1.0, "aace": -1.0}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: threads only wait for each other
    yield
    torch.set_num_threads(threads)


# -- the models ----------------------------------------------------------------------------------


class InstanceNormNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, stride=2, padding=1),
            nn.InstanceNorm2d(8, affine=True, track_running_stats=True),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.features(x))


class TwoHeads(nn.Module):
    """An auxiliary head that enters the logits only when ``use_aux`` is set: on the other steps
    its parameters get no gradient (``.grad`` None), so they are neither perturbed nor updated."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, 8, 3, stride=2), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )  # fmt: skip
        self.head, self.aux = nn.Linear(8, 3), nn.Linear(8, 3)
        self.use_aux = True

    def forward(self, x):
        features = self.body(x)
        logits = self.head(features)
        return logits + self.aux(features) if self.use_aux else logits


def tiny_efficientnet():
    from timm.models._efficientnet_builder import decode_arch_def
    from timm.models.efficientnet import EfficientNet

    # EfficientNet's blocks (depthwise-separable, inverted residual with squeeze-excitation),
    # BatchNorm and SiLU, at a width that keeps the test fast.
    arch = decode_arch_def(
        [["ds_r1_k3_s1_e1_c8"], ["ir_r1_k3_s2_e4_c16_se0.25"], ["ir_r1_k5_s2_e4_c24_se0.25"]]
    )
    return EfficientNet(block_args=arch, num_features=32, stem_size=8, act_layer=nn.SiLU,
                        num_classes=3)  # fmt: skip


def tiny_resnet(**kwargs):
    return timm.create_model("resnet10t", pretrained=False, num_classes=3,
                             channels=(8, 16, 32, 64), stem_width=8, **kwargs)  # fmt: skip


def frozen_backbone():
    model = tiny_resnet()
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith("fc."))  # BatchNorm statistics still move
    return model


def evonorm_resnet():
    from timm.layers import EvoNorm2dB0

    return tiny_resnet(norm_layer=EvoNorm2dB0)


def two_groups(model):
    """Convolutions at rho_1, the rest at 2 rho_1, and the first convolution not perturbed."""
    convs = [p for n, p in model.named_parameters() if p.ndim == 4 and n != "features.0.weight"]
    others = [p for n, p in model.named_parameters() if p.ndim != 4]
    first = [model.features[0].weight]
    return [{"params": convs, "rho_scale": 1.0}, {"params": others, "rho_scale": 2.0},
            {"params": first, "rho_scale": 0.0}]  # fmt: skip


def one_group(model):
    return [{"params": list(model.parameters()), "rho_scale": 1.0}]


@dataclass
class Case:
    build: Callable[[], nn.Module]
    groups: Callable[[nn.Module], list[dict]] = one_group
    channels_last: bool = False
    before_step: Callable[[nn.Module, int], None] = field(default=lambda model, step: None)


def toggle_aux(model, step):
    model.use_aux = step == 0


CASES = {
    "timm-resnet10t": Case(tiny_resnet),
    "timm-convnext-layernorm": Case(
        lambda: timm.create_model(
            "convnext_atto",
            pretrained=False,
            num_classes=3,
            depths=(1, 1, 1, 1),
            dims=(8, 16, 32, 64),
        )  # fmt: skip
    ),
    "timm-vit": Case(
        lambda: timm.create_model(
            "vit_tiny_patch16_224",
            pretrained=False,
            num_classes=3,
            img_size=32,
            patch_size=8,
            depth=2,
            embed_dim=32,
            num_heads=2,
        )  # fmt: skip
    ),
    "timm-efficientnet": Case(tiny_efficientnet),
    "timm-regnetx": Case(lambda: timm.create_model("regnetx_002", pretrained=False, num_classes=3)),
    "timm-evonorm-b0": Case(evonorm_resnet),
    "torchvision-resnet18": Case(lambda: torchvision.models.resnet18(num_classes=3)),
    "instancenorm-running-stats": Case(InstanceNormNet),
    "frozen-backbone": Case(frozen_backbone),
    "head-without-gradient": Case(TwoHeads, before_step=toggle_aux),
    "groups-with-own-rho": Case(InstanceNormNet, groups=two_groups),
    "channels-last": Case(tiny_resnet, channels_last=True),
}


def batches(case, dtype, steps=2):
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(steps):
        x = torch.randn(BATCH, 3, 32, 32, generator=g, dtype=dtype)
        if case.channels_last:
            x = x.to(memory_format=torch.channels_last)
        out.append((x, torch.randint(0, 3, (BATCH,), generator=g)))
    return out


def build(case, dtype):
    torch.manual_seed(0)
    model = case.build().to(dtype).train()
    if case.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


# -- aace's loop and the reference ---------------------------------------------------------------


def aace_steps(case, model, data, rule):
    groups = [
        {"params": g["params"], "rho": RHO[rule] * g["rho_scale"]} for g in case.groups(model)
    ]
    opt = SAM(groups, torch.optim.SGD, rho=RHO[rule], perturbation=rule, lr=LR,
              momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)  # fmt: skip
    for step, (x, y) in enumerate(data):
        case.before_step(model, step)
        LOSSES[rule](model(x), y).backward()
        after_first_pass = {n: b.clone() for n, b in model.named_buffers()}
        opt.first_step(zero_grad=True)
        with frozen_running_stats(model):
            F.cross_entropy(model(x), y).backward()
        opt.second_step(zero_grad=True)
        for name, value in model.named_buffers():
            assert torch.equal(value, after_first_pass[name]), (step, name)
    return model


def reference_steps(case, model, data, rule):
    """SAM by the formulas, with nothing from aace but the AACE loss itself:
    e_G = rho_G g_G / (||g|| + eps) ("sam", the norm over every perturbed parameter) or
    -rho_G g_G ("aace"), over the parameters with a gradient in groups with rho_G > 0; the
    update gradient at w + e from a copy of the model (whose buffers are thrown away); SGD:
    b = m b + (g' + wd w) (b = g' + wd w on the first step), w -= lr b."""
    names = {id(p): n for n, p in model.named_parameters()}
    groups = [(g["params"], RHO[rule] * g["rho_scale"]) for g in case.groups(model)]
    momentum: dict[str, torch.Tensor] = {}
    for step, (x, y) in enumerate(data):
        case.before_step(model, step)
        trainable = [p for p, _ in groups_params(groups) if p.requires_grad]
        grads = dict(
            zip(
                map(id, trainable),
                torch.autograd.grad(LOSSES[rule](model(x), y), trainable, allow_unused=True),
            )
        )
        perturbed = [(p, rho) for p, rho in groups_params(groups)
                     if rho > 0 and grads.get(id(p)) is not None]  # fmt: skip
        norm = torch.cat([grads[id(p)].flatten() for p, _ in perturbed]).norm()
        shifted = copy.deepcopy(model)
        shifted_params = dict(shifted.named_parameters())
        with torch.no_grad():
            for p, rho in perturbed:
                g = grads[id(p)]
                e = rho * g / (norm + EPS) if rule == "sam" else SIGN[rule] * rho * g
                shifted_params[names[id(p)]].add_(e)
        case.before_step(shifted, step)
        shifted_trainable = [shifted_params[names[id(p)]] for p in trainable]
        update = torch.autograd.grad(
            F.cross_entropy(shifted(x), y), shifted_trainable, allow_unused=True
        )
        with torch.no_grad():
            for p, g in zip(trainable, update):
                if g is None:
                    continue
                d = g + WEIGHT_DECAY * p
                name = names[id(p)]
                momentum[name] = d if name not in momentum else MOMENTUM * momentum[name] + d
                p.sub_(LR * momentum[name])
    return model


def groups_params(groups):
    return [(p, rho) for params, rho in groups for p in params]


@pytest.mark.parametrize("rule", ["sam", "aace"])
@pytest.mark.parametrize("name", list(CASES))
def test_two_steps_equal_the_float64_reference(name, rule):
    case = CASES[name]
    data = batches(case, torch.float64)
    got = aace_steps(case, build(case, torch.float64), data, rule)
    expected = reference_steps(case, build(case, torch.float64), data, rule)
    start = build(case, torch.float64)
    for (key, value), want in zip(got.state_dict().items(), expected.state_dict().values()):
        torch.testing.assert_close(value, want, rtol=1e-8, atol=1e-10, msg=key)
    # The steps did something: some weight moved, and the frozen ones did not.
    moved = [not torch.equal(a, b) for a, b in zip(got.parameters(), start.parameters())]
    assert any(moved)
    for p, has_moved in zip(got.parameters(), moved):
        if not p.requires_grad:
            assert not has_moved


@pytest.mark.parametrize("name", list(CASES))
def test_a_bf16_autocast_step_runs_and_keeps_the_buffers(name):
    case = CASES[name]
    model = build(case, torch.float32)
    start = copy.deepcopy(model)
    (x, y), _ = batches(case, torch.float32)
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.2, perturbation="aace", lr=LR,
              momentum=MOMENTUM)  # fmt: skip
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = aace_loss(model(x), y)
    loss.backward()
    after_first_pass = {n: b.clone() for n, b in model.named_buffers()}
    opt.first_step(zero_grad=True)
    with frozen_running_stats(model), torch.autocast("cpu", dtype=torch.bfloat16):
        update_loss = F.cross_entropy(model(x), y)
    update_loss.backward()
    opt.second_step(zero_grad=True)
    assert torch.isfinite(loss) and torch.isfinite(update_loss)
    for name_, value in model.named_buffers():
        assert torch.equal(value, after_first_pass[name_]), name_
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(model.parameters(), start.parameters()))
