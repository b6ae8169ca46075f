"""SAM on the inputs that public SAM implementations get silently wrong, each against a value
computed another way: by hand in float64, by the paper's formula, or by a plain SGD step."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from aace import SAM, aace_loss
from aace.models import create_model

RULES = ["sam", "aace", "aace-normalized"]
NORMALIZED = ["sam", "aace-normalized"]


def linear_problem(seed=0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    model = nn.Linear(4, 3).to(dtype)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=dtype))
    x = torch.randn(16, 4, generator=gen, dtype=dtype)
    y = torch.randint(0, 3, (16,), generator=gen)
    return model, x, y


def flat(tensors):
    return torch.cat([t.detach().flatten() for t in tensors])


def grad_at(model, x, y, w_flat, loss_fn=F.cross_entropy):
    """The gradient of loss_fn at the flat weights w_flat, on a copy of the model."""
    probe = type(model)(model.in_features, model.out_features).to(w_flat.dtype)
    torch.nn.utils.vector_to_parameters(w_flat.clone(), probe.parameters())
    loss_fn(probe(x), y).backward()
    return flat(p.grad for p in probe.parameters())


# -- 1. step(closure) with nothing in .grad ------------------------------------------------


def test_closure_without_a_gradient_is_a_true_sam_step_for_the_sam_rule():
    model, x, y = linear_problem()
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.5, lr=0.1)

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    w = flat(model.parameters())
    g = grad_at(model, x, y, w)
    w_adv = w + 0.5 * g / g.norm()
    expected = w - 0.1 * grad_at(model, x, y, w_adv)
    loss = opt.step(closure)
    torch.testing.assert_close(flat(model.parameters()), expected, rtol=1e-12, atol=1e-12)
    # Not the plain SGD step, which it used to be bit for bit.
    assert (flat(model.parameters()) - (w - 0.1 * g)).abs().max() > 1e-3
    # The returned loss is the closure's at w + e.
    with torch.no_grad():
        probe = nn.Linear(4, 3).double()
        torch.nn.utils.vector_to_parameters(w_adv, probe.parameters())
        torch.testing.assert_close(loss.detach(), F.cross_entropy(probe(x), y))


@pytest.mark.parametrize("rule", ["aace", "aace-normalized"])
def test_closure_without_a_gradient_refuses_the_aace_rules(rule):
    model, x, y = linear_problem()
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.5, perturbation=rule, lr=0.1)
    w = flat(model.parameters())

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    with pytest.raises(ValueError, match=rf"found no first-pass gradient.*'{rule}'.*aace_loss"):
        opt.step(closure)
    assert torch.equal(flat(model.parameters()), w)


def test_closure_with_the_aace_gradient_in_grad_perturbs_with_it():
    model, x, y = linear_problem()
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.5, perturbation="aace", lr=0.1)
    w = flat(model.parameters())
    g_aace = grad_at(model, x, y, w, aace_loss)
    expected = w - 0.1 * grad_at(model, x, y, w - 0.5 * g_aace)
    aace_loss(model(x), y).backward()

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    opt.step(closure)
    torch.testing.assert_close(flat(model.parameters()), expected, rtol=1e-12, atol=1e-12)


def test_first_step_without_any_gradient_raises():
    model, _, _ = linear_problem()
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.5, lr=0.1)
    with pytest.raises(RuntimeError, match="found no gradient.*backpropagate"):
        opt.first_step()
    # A gradient only in a group with rho = 0 is still a gradient: no perturbation, no error.
    opt = SAM([{"params": model.parameters(), "rho": 0.0}], torch.optim.SGD, lr=0.1)
    model.weight.grad = torch.ones_like(model.weight)
    w = flat(model.parameters())
    opt.first_step()
    assert torch.equal(flat(model.parameters()), w)


# -- 2. float16 and bfloat16 with a norm beyond float16's range ----------------------------


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("adaptive", [False, True])
@pytest.mark.parametrize("foreach", [False, True])
def test_low_precision_norms_are_accumulated_in_float32(dtype, rule, adaptive, foreach):
    gen = torch.Generator().manual_seed(0)
    w64 = torch.randn(50, 100, generator=gen, dtype=torch.float64) * 0.01
    g64 = torch.randn(50, 100, generator=gen, dtype=torch.float64) * 1000
    p = nn.Parameter(w64.to(dtype))
    p.grad = g64.to(dtype)
    w, g = p.detach().double().clone(), p.grad.double()  # the rounded inputs, in float64
    rho = 0.5 if rule != "aace" else 1e-5
    # eta = 1 keeps ASAM's ||T g|| beyond float16's range too (T = |w| + 1, about 1).
    opt = SAM([{"params": [p], "adaptive_eta": 1.0}], torch.optim.SGD, rho=rho,
              perturbation=rule, adaptive=adaptive, foreach=foreach, track_stats=True,
              lr=0.1)  # fmt: skip
    opt.first_step()
    t = (w.abs() + 1.0) if adaptive else torch.ones_like(w)
    grad_norm = (t * g).norm()
    assert grad_norm > 65504  # beyond float16's range
    sign = 1.0 if rule == "sam" else -1.0
    e = sign * rho * t * t * g / (grad_norm if rule in NORMALIZED else 1.0)
    assert opt.grad_norm.dtype == torch.float32
    assert abs(opt.grad_norm.double() / grad_norm - 1) < 1e-3
    assert abs(opt.perturbation_norm.double() / e.norm() - 1) < 1e-3
    moved = p.detach().double() - w
    # w + e is rounded to the parameter's precision: compare with that rounding's tolerance.
    resolution = torch.finfo(dtype).eps
    assert (moved - e).abs().max() <= resolution * (w.abs().max() + e.abs().max())
    assert abs(moved.norm() / e.norm() - 1) < 0.02


# -- 3. a zero gradient, whatever perturbation_eps ---------------------------------------


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("adaptive", [False, True])
@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("track_stats", [False, True])
@pytest.mark.parametrize("eps", [0.0, 1e-12])
def test_a_zero_gradient_gives_no_perturbation(rule, adaptive, foreach, track_stats, eps):
    model, x, y = linear_problem()
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.5, perturbation=rule,
              adaptive=adaptive, perturbation_eps=eps, foreach=foreach,
              track_stats=track_stats, lr=0.1)  # fmt: skip
    w = flat(model.parameters())
    loss_fn = F.cross_entropy if rule == "sam" else aace_loss
    (loss_fn(model(x), y, reduction="none") * torch.zeros(len(y), dtype=x.dtype)).sum().backward()
    assert flat(p.grad for p in model.parameters()).abs().max() == 0
    opt.first_step(zero_grad=True)
    assert torch.equal(flat(model.parameters()), w)
    if track_stats:
        assert opt.grad_norm == 0 and opt.perturbation_norm == 0
    F.cross_entropy(model(x), y).backward()
    g = flat(p.grad for p in model.parameters())
    opt.second_step(zero_grad=True)
    torch.testing.assert_close(flat(model.parameters()), w - 0.1 * g, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("foreach", [False, True])
def test_a_subnormal_gradient_with_eps_0_never_gives_inf_or_nan(foreach):
    p = nn.Parameter(torch.ones(1000))
    p.grad = torch.full((1000,), 1e-44)  # float32 subnormals: ||g|| ~ 3e-43
    opt = SAM([p], torch.optim.SGD, rho=10.0, perturbation_eps=0.0, foreach=foreach, lr=0.1)
    opt.first_step()
    assert torch.isfinite(p).all()
    assert (p.detach() - 1).abs().max() <= 10.0


# -- 4. ASAM's operator T = |w| + eta on weights, 1 on biases and normalization ----------------


def test_asam_perturbs_zero_biases_by_the_papers_formula():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3)).double()
    with torch.no_grad():
        for m in model:
            if isinstance(m, nn.Linear):
                m.bias.zero_()
                m.weight[0, 0] = 0.0  # an exactly-zero weight entry: T = eta there
    x, y = torch.randn(20, 6, dtype=torch.float64), torch.randint(0, 3, (20,))
    rho, eta = 0.5, 0.01
    opt = SAM(model.parameters(), torch.optim.SGD, rho=rho, adaptive=True, lr=0.1,
              track_stats=True)  # fmt: skip
    F.cross_entropy(model(x), y).backward()
    params = list(model.parameters())
    w, g = flat(params), flat(p.grad for p in params)
    t = torch.cat([(p.detach().abs() + eta if p.ndim > 1 else torch.ones_like(p)).flatten()
                   for p in params])  # fmt: skip
    e = rho * t * t * g / (t * g).norm()
    opt.first_step()
    torch.testing.assert_close(flat(params) - w, e, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(opt.grad_norm, (t * g).norm(), rtol=1e-12, atol=0)
    # Every bias (zero-valued) moves by rho * g_i / ||T g||. (The first layer's bias, before
    # BatchNorm, has a gradient of zero up to rounding.)
    offset = 0
    for p in params:
        n = p.numel()
        if p.ndim == 1:
            moved = flat(params)[offset : offset + n] - w[offset : offset + n]
            torch.testing.assert_close(moved, rho * p.grad.flatten() / (t * g).norm())
            assert (moved[p.grad.flatten().abs() > 1e-12] != 0).all()
        offset += n


def test_asam_eta_is_a_group_option():
    p = nn.Parameter(torch.zeros(3, 2, dtype=torch.float64))
    p.grad = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]], dtype=torch.float64)
    opt = SAM([{"params": [p], "adaptive_eta": 0.5}], torch.optim.SGD, rho=1.0, adaptive=True,
              lr=0.1)  # fmt: skip
    opt.first_step()
    # T = 0.5 everywhere: e = rho * 0.25 g / (0.5 ||g||) = 0.5 g / ||g||.
    torch.testing.assert_close(p.detach(), 0.5 * p.grad / p.grad.norm())


def test_built_in_models_have_every_parameter_perturbed_by_asam():
    torch.manual_seed(0)
    model = create_model("wrn16_1", num_classes=10, in_channels=3).train()
    x, y = torch.randn(4, 3, 16, 16), torch.randint(0, 10, (4,))
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.5, adaptive=True, lr=0.1)
    F.cross_entropy(model(x), y).backward()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    zero_valued = [name for name, w in before.items() if (w == 0).all()]
    assert zero_valued  # BatchNorm shifts and the classifier bias start at 0
    opt.first_step()
    for name, p in model.named_parameters():
        moved = p.detach() != before[name]
        if name in zero_valued:  # w = 0: any e != 0 shows, so every entry with a gradient moves
            assert moved[p.grad != 0].all(), name
        else:
            assert moved.any(), name


# -- 5. groups with rho = 0 are left out of the norm ---------------------------------------


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("rule", NORMALIZED)
def test_only_the_perturbed_groups_count_in_the_norm(foreach, rule):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.BatchNorm1d(7), nn.ReLU(), nn.Linear(7, 3)).double()
    x, y = torch.randn(16, 5, dtype=torch.float64), torch.randint(0, 3, (16,))
    norm_params = list(model[1].parameters())
    others = [p for m in (model[0], model[3]) for p in m.parameters()]
    opt = SAM([{"params": norm_params, "rho": 0.5}, {"params": others, "rho": 0.0}],
              torch.optim.SGD, perturbation=rule, foreach=foreach, track_stats=True,
              lr=0.1)  # fmt: skip
    loss_fn = F.cross_entropy if rule == "sam" else aace_loss
    loss_fn(model(x), y).backward()
    w_norm, w_others = flat(norm_params), flat(others)
    g_norm = flat(p.grad for p in norm_params)
    opt.first_step()
    e = flat(norm_params) - w_norm
    torch.testing.assert_close(e.norm(), torch.tensor(0.5, dtype=torch.float64))
    sign = 1.0 if rule == "sam" else -1.0
    # (rtol: perturbation_eps = 1e-12 is added to the norm)
    torch.testing.assert_close(e, sign * 0.5 * g_norm / g_norm.norm(), rtol=1e-10, atol=1e-15)
    assert torch.equal(flat(others), w_others)
    torch.testing.assert_close(opt.grad_norm, g_norm.norm())
    torch.testing.assert_close(opt.perturbation_norm, torch.tensor(0.5, dtype=torch.float64))


def test_groups_with_different_radii_share_one_norm():
    a = nn.Parameter(torch.zeros(3, dtype=torch.float64))
    b = nn.Parameter(torch.zeros(2, dtype=torch.float64))
    a.grad = torch.tensor([1.0, 2.0, 2.0], dtype=torch.float64)  # ||g_a|| = 3
    b.grad = torch.tensor([0.0, 4.0], dtype=torch.float64)  # ||g_b|| = 4, ||g|| = 5
    opt = SAM([{"params": [a], "rho": 0.1}, {"params": [b], "rho": 1.0}], torch.optim.SGD, lr=0.1)
    opt.first_step()
    torch.testing.assert_close(a.detach(), 0.1 * a.grad / 5)
    torch.testing.assert_close(b.detach(), 1.0 * b.grad / 5)


# -- statistics never change the step; the cached layout follows the gradients ------------------


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("adaptive", [False, True])
@pytest.mark.parametrize("foreach", [False, True])
def test_track_stats_leaves_the_trajectory_unchanged_bit_for_bit(rule, adaptive, foreach):
    trajectories = []
    for track in (False, True):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))
        x, y = torch.randn(32, 6), torch.randint(0, 3, (32,))
        opt = SAM(model.parameters(), torch.optim.SGD, rho=0.3, perturbation=rule,
                  adaptive=adaptive, foreach=foreach, track_stats=track, lr=0.1,
                  momentum=0.9)  # fmt: skip
        perturbed = []
        for _ in range(3):
            (F.cross_entropy if rule == "sam" else aace_loss)(model(x), y).backward()
            opt.first_step(zero_grad=True)
            perturbed.append(flat(model.parameters()))
            F.cross_entropy(model(x), y).backward()
            opt.second_step(zero_grad=True)
        trajectories.append(perturbed + [flat(model.parameters())])
    for a, b in zip(*trajectories):
        assert torch.equal(a, b)


def test_parameters_that_gain_or_lose_a_gradient_and_a_changed_rho_are_followed():
    model, x, y = linear_problem()
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.5, lr=0.1)
    for step, (with_bias, rho) in enumerate([(True, 0.5), (False, 0.5), (True, 0.2)]):
        opt.param_groups[0]["rho"] = rho
        out = model(x) if with_bias else F.linear(x, model.weight)
        F.cross_entropy(out, y).backward()
        grads = [p.grad for p in model.parameters()]
        g = flat(t for t in grads if t is not None)
        w = flat(model.parameters())
        opt.first_step()
        e = flat(model.parameters()) - w
        expected = rho * g / g.norm()
        if not with_bias:
            expected = torch.cat([expected, torch.zeros(model.bias.numel(), dtype=w.dtype)])
        torch.testing.assert_close(e, expected, rtol=1e-10, atol=1e-15, msg=f"step {step}")
        opt.restore()
        opt.zero_grad(set_to_none=True)
