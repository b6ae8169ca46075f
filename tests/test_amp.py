"""aace.amp.unscale_: GradScaler misuse in a SAM step is refused before the weights move."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from aace import SAM, aace_loss
from aace.amp import unscale_


def setup():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.2, perturbation="aace", lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    x, y = torch.randn(6, 4), torch.randint(0, 3, (6,))
    return model, opt, scaler, x, y


def weights(model):
    return [p.detach().clone() for p in model.parameters()]


def perturbation_pass(model, scaler, x, y):
    loss = aace_loss(model(x), y)
    scaler.scale(loss).backward()
    return loss


def test_the_recipe_unscales_each_pass_once():
    model, opt, scaler, x, y = setup()
    loss = aace_loss(model(x), y)
    loss.backward()
    expected = [p.grad.clone() for p in model.parameters()]
    opt.zero_grad(set_to_none=True)
    perturbation_pass(model, scaler, x, y)
    assert unscale_(scaler, opt, sam_pass="perturbation").item() == 0
    for p, g in zip(model.parameters(), expected):
        torch.testing.assert_close(p.grad, g)  # the true gradient, divided once by 1024
    opt.first_step(zero_grad=True)


def test_scaler_unscale_before_aace_unscale_is_refused_before_anything_moves():
    model, opt, scaler, x, y = setup()
    w = weights(model)
    perturbation_pass(model, scaler, x, y)
    scaler.unscale_(opt)
    grads = [p.grad.clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=r"scaler\.unscale_\(\) was already called"):
        unscale_(scaler, opt, sam_pass="perturbation")
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads))  # not twice
    assert all(torch.equal(p, v) for p, v in zip(model.parameters(), w))


def test_scaler_unscale_after_aace_unscale_is_refused_by_first_step_at_w():
    model, opt, scaler, x, y = setup()
    w = weights(model)
    perturbation_pass(model, scaler, x, y)
    unscale_(scaler, opt, sam_pass="perturbation")
    scaler.unscale_(opt)  # divides the gradients by 1024 a second time
    with pytest.raises(ValueError, match="unscaled twice.*not moved"):
        opt.first_step(zero_grad=True)
    assert all(torch.equal(p, v) for p, v in zip(model.parameters(), w))


def test_scaler_unscale_alone_in_the_perturbation_pass_restores_w_at_the_update_pass():
    model, opt, scaler, x, y = setup()
    w = weights(model)
    perturbation_pass(model, scaler, x, y)
    scaler.unscale_(opt)
    opt.first_step(zero_grad=True)
    assert not all(torch.equal(p, v) for p, v in zip(model.parameters(), w))  # at w + e
    scaler.scale(F.cross_entropy(model(x), y)).backward()
    with pytest.raises(ValueError, match="weights were put back at w"):
        unscale_(scaler, opt, sam_pass="update")
    assert all(torch.equal(p, v) for p, v in zip(model.parameters(), w))


def test_a_skipped_step_leaves_no_check_behind():
    model, opt, scaler, x, y = setup()
    perturbation_pass(model, scaler, x, y)
    unscale_(scaler, opt, sam_pass="perturbation")
    opt.zero_grad(set_to_none=True)
    scaler.update()  # as after an overflow: the step is skipped
    perturbation_pass(model, scaler, x, y)
    unscale_(scaler, opt, sam_pass="perturbation")
    opt.first_step(zero_grad=True)
    scaler.scale(F.cross_entropy(model(x), y)).backward()
    unscale_(scaler, opt, sam_pass="update")
    opt.second_step(zero_grad=True)
    scaler.update()
