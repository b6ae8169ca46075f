"""SAM against hand computations on tiny models."""

import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from aace import SAM, aace_loss, frozen_batchnorm_stats


def tiny_problem(dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).to(dtype)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=dtype))
    x = torch.randn(12, 4, generator=gen, dtype=dtype)
    y = torch.randint(0, 3, (12,), generator=gen)
    return model, x, y


def asam_operator(params, eta=0.01):
    """ASAM's T as a flat vector (Kwon et al. 2021): |w| + eta on weight matrices, 1 elsewhere."""
    return torch.cat(
        [(p.abs() + eta if p.ndim > 1 else torch.ones_like(p)).flatten() for p in params]
    )


def hand_perturbation(grads, params, rho, rule, adaptive, eps=1e-12):
    """e for each rule, written out with plain tensor arithmetic on flat vectors."""
    g = torch.cat([t.flatten() for t in grads])
    w = torch.cat([t.flatten() for t in params])
    scale_w = asam_operator(params) if adaptive else torch.ones_like(w)
    if rule == "sam":
        e = rho * scale_w**2 * g / ((scale_w * g).norm() + eps)
    elif rule == "aace":
        e = -rho * scale_w**2 * g
    else:
        e = -rho * scale_w**2 * g / ((scale_w * g).norm() + eps)
    return e


@pytest.mark.parametrize("rule", ["sam", "aace", "aace-normalized"])
@pytest.mark.parametrize("adaptive", [False, True])
@pytest.mark.parametrize("foreach", [False, True])
def test_first_step_perturbs_by_hand_computation(rule, adaptive, foreach):
    model, x, y = tiny_problem()
    loss_fn = F.cross_entropy if rule == "sam" else aace_loss
    opt = SAM(
        model.parameters(),
        torch.optim.SGD,
        rho=0.3,
        perturbation=rule,
        adaptive=adaptive,
        foreach=foreach,
        lr=0.1,
    )
    loss_fn(model(x), y).backward()
    params = [p.detach().clone() for p in model.parameters()]
    grads = [p.grad.clone() for p in model.parameters()]
    opt.first_step()
    expected = torch.cat([p.flatten() for p in params]) + hand_perturbation(
        grads, params, 0.3, rule, adaptive
    )
    got = torch.cat([p.detach().flatten() for p in model.parameters()])
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    # zero_grad=False leaves the gradients as they were.
    for p, g in zip(model.parameters(), grads):
        assert torch.equal(p.grad, g)


def test_second_step_restores_exactly_then_steps_base_optimizer():
    model, x, y = tiny_problem(dtype=torch.float32)
    reference = [p.detach().clone() for p in model.parameters()]
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.5, perturbation="aace", lr=0.0)
    aace_loss(model(x), y).backward()
    opt.first_step(zero_grad=True)
    assert all(p.grad is None for p in model.parameters())
    assert not all(torch.equal(p, r) for p, r in zip(model.parameters(), reference))
    F.cross_entropy(model(x), y).backward()
    opt.second_step(zero_grad=True)
    for p, r in zip(model.parameters(), reference):
        assert torch.equal(p, r)  # bit for bit, lr = 0


def test_restore_undoes_first_step_without_updating():
    model, x, y = tiny_problem(dtype=torch.float32)
    reference = [p.detach().clone() for p in model.parameters()]
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.5, lr=0.1, momentum=0.9)
    F.cross_entropy(model(x), y).backward()
    opt.first_step(zero_grad=True)
    opt.restore()
    for p, r in zip(model.parameters(), reference):
        assert torch.equal(p, r)
    assert opt.state_dict()["state"] == {}  # the base optimizer never stepped
    F.cross_entropy(model(x), y).backward()
    opt.first_step(zero_grad=True)  # a new step may begin


def test_update_uses_gradient_at_perturbed_point():
    model, x, y = tiny_problem()
    start = [p.detach().clone() for p in model.parameters()]
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.2, lr=0.5)
    F.cross_entropy(model(x), y).backward()
    opt.first_step(zero_grad=True)
    F.cross_entropy(model(x), y).backward()
    grads_at_adv = [p.grad.clone() for p in model.parameters()]
    opt.second_step()
    for p, w, g in zip(model.parameters(), start, grads_at_adv):
        torch.testing.assert_close(p.detach(), w - 0.5 * g)


def test_step_with_closure_returns_its_loss_and_equals_two_calls():
    model_a, x, y = tiny_problem()
    model_b, _, _ = tiny_problem()
    opt_a = SAM(model_a.parameters(), torch.optim.SGD, rho=0.1, lr=0.1, momentum=0.9)
    opt_b = SAM(model_b.parameters(), torch.optim.SGD, rho=0.1, lr=0.1, momentum=0.9)
    for _ in range(3):
        F.cross_entropy(model_a(x), y).backward()

        def closure():
            loss = F.cross_entropy(model_a(x), y)
            loss.backward()
            return loss

        loss_a = opt_a.step(closure)
        opt_a.zero_grad()
        F.cross_entropy(model_b(x), y).backward()
        opt_b.first_step(zero_grad=True)
        loss_b = F.cross_entropy(model_b(x), y)
        loss_b.backward()
        opt_b.second_step(zero_grad=True)
        assert torch.equal(loss_a, loss_b)
    for a, b in zip(model_a.parameters(), model_b.parameters()):
        assert torch.equal(a, b)


def test_step_without_closure_is_a_clear_error():
    model, _, _ = tiny_problem()
    opt = SAM(model.parameters(), torch.optim.SGD, lr=0.1)
    with pytest.raises(ValueError, match="needs a closure"):
        opt.step()


@pytest.mark.parametrize("rule", ["sam", "aace", "aace-normalized"])
@pytest.mark.parametrize("adaptive", [False, True])
def test_foreach_equals_loop(rule, adaptive):
    trajectories = []
    for foreach in (False, True):
        model, x, y = tiny_problem()
        opt = SAM(
            model.parameters(),
            torch.optim.SGD,
            rho=0.2,
            perturbation=rule,
            adaptive=adaptive,
            foreach=foreach,
            track_stats=True,
            lr=0.1,
            momentum=0.9,
            weight_decay=5e-4,
        )
        stats = []
        for _ in range(4):
            (F.cross_entropy if rule == "sam" else aace_loss)(model(x), y).backward()
            opt.first_step(zero_grad=True)
            stats.append((opt.grad_norm, opt.perturbation_norm, opt.perturbation_cosine))
            F.cross_entropy(model(x), y).backward()
            opt.second_step(zero_grad=True)
        trajectories.append(([p.detach().clone() for p in model.parameters()], stats))
    (params_loop, stats_loop), (params_foreach, stats_foreach) = trajectories
    for a, b in zip(params_loop, params_foreach):
        torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(stats_loop, stats_foreach, rtol=1e-12, atol=1e-12, equal_nan=True)


def test_tracked_stats_match_hand_computation():
    model, x, y = tiny_problem()
    opt = SAM(
        model.parameters(), torch.optim.SGD, rho=0.3, perturbation="aace", lr=0.1, track_stats=True
    )
    perturbations, reported = [], []
    for _ in range(2):
        aace_loss(model(x), y).backward()
        g = torch.cat([p.grad.flatten() for p in model.parameters()])
        before = torch.cat([p.detach().flatten() for p in model.parameters()])
        opt.first_step(zero_grad=True)
        after = torch.cat([p.detach().flatten() for p in model.parameters()])
        perturbations.append(after - before)
        reported.append((opt.grad_norm, opt.perturbation_norm, opt.perturbation_cosine))
        torch.testing.assert_close(opt.grad_norm, g.norm())
        torch.testing.assert_close(opt.perturbation_norm, 0.3 * g.norm())
        F.cross_entropy(model(x), y).backward()
        opt.second_step(zero_grad=True)
    assert torch.isnan(reported[0][2])
    cosine = F.cosine_similarity(perturbations[0], perturbations[1], dim=0)
    torch.testing.assert_close(reported[1][2], cosine)
    opt.reset_stats()
    aace_loss(model(x), y).backward()
    opt.first_step(zero_grad=True)
    assert torch.isnan(opt.perturbation_cosine)


def test_unnormalized_aace_does_not_compute_the_norm_unless_tracked():
    model, x, y = tiny_problem()
    opt = SAM(model.parameters(), torch.optim.SGD, perturbation="aace", lr=0.1)
    calls = []
    original = SAM._global_norm

    def spy(self, *args):
        calls.append(1)
        return original(self, *args)

    SAM._global_norm = spy
    try:
        aace_loss(model(x), y).backward()
        opt.first_step(zero_grad=True)
    finally:
        SAM._global_norm = original
    assert calls == []


def run_steps(model, opt, x, y, steps):
    for _ in range(steps):
        F.cross_entropy(model(x), y).backward()
        opt.first_step(zero_grad=True)
        F.cross_entropy(model(x), y).backward()
        opt.second_step(zero_grad=True)


def test_state_dict_round_trip_continues_identical_trajectory():
    model, x, y = tiny_problem()
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.1, lr=0.1, momentum=0.9, nesterov=True)
    run_steps(model, opt, x, y, 3)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, buffer)
    run_steps(model, opt, x, y, 3)
    uninterrupted = [p.detach().clone() for p in model.parameters()]

    buffer.seek(0)
    checkpoint = torch.load(buffer, weights_only=True)
    resumed_model, _, _ = tiny_problem(seed=99)
    resumed_model.load_state_dict(checkpoint["model"])
    resumed = SAM(resumed_model.parameters(), torch.optim.SGD, rho=0.7, lr=0.3, momentum=0.9)
    resumed.load_state_dict(checkpoint["optimizer"])
    assert "momentum_buffer" in next(iter(resumed.base_optimizer.state.values()))
    assert resumed.param_groups[0]["rho"] == 0.1 and resumed.param_groups[0]["nesterov"]
    assert resumed.param_groups is resumed.base_optimizer.param_groups
    run_steps(resumed_model, resumed, x, y, 3)
    for a, b in zip(uninterrupted, resumed_model.parameters()):
        assert torch.equal(a, b)


def test_lr_scheduler_on_sam_drives_base_optimizer(recwarn):
    model, x, y = tiny_problem()
    opt = SAM(model.parameters(), torch.optim.SGD, lr=0.1)
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    run_steps(model, opt, x, y, 1)
    scheduler.step()
    assert opt.base_optimizer.param_groups[0]["lr"] == pytest.approx(0.05)
    assert not [w for w in recwarn if "lr_scheduler.step()" in str(w.message)]
    # After a reload the shared groups still follow the scheduler.
    opt.load_state_dict(opt.state_dict())
    scheduler.step()
    assert opt.base_optimizer.param_groups[0]["lr"] == pytest.approx(0.025)


def test_param_groups_override_rho_and_rule():
    model, x, y = tiny_problem()
    first, second = model[0], model[2]
    opt = SAM(
        [{"params": first.parameters(), "rho": 0.0}, {"params": second.parameters()}],
        torch.optim.SGD,
        rho=0.2,
        lr=0.1,
    )
    F.cross_entropy(model(x), y).backward()
    before = [p.detach().clone() for p in first.parameters()]
    opt.first_step()
    for p, b in zip(first.parameters(), before):
        assert torch.equal(p, b)


@pytest.mark.parametrize("rule", ["sam", "aace", "aace-normalized"])
def test_sam_and_aace_reduce_a_convex_loss(rule):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, 5, generator=gen, dtype=torch.float64)
    y = (x @ torch.randn(5, 3, generator=gen, dtype=torch.float64)).argmax(1)
    model = nn.Linear(5, 3).double()  # softmax regression: convex in the weights
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.05, perturbation=rule, lr=0.5)
    initial = F.cross_entropy(model(x), y).item()
    for _ in range(50):
        (F.cross_entropy if rule == "sam" else aace_loss)(model(x), y).backward()
        opt.first_step(zero_grad=True)
        F.cross_entropy(model(x), y).backward()
        opt.second_step(zero_grad=True)
    assert F.cross_entropy(model(x), y).item() < 0.5 * initial


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(rho=-0.1), "rho must be a finite number >= 0, got -0.1"),
        (dict(rho=float("nan")), "got nan"),
        (dict(rho=float("inf")), "got inf"),
        (
            dict(perturbation="asam"),
            "perturbation must be one of sam, aace, aace-normalized; got 'asam'",
        ),
        (dict(adaptive="yes"), "adaptive must be True or False, got 'yes'"),
        (dict(perturbation_eps=-1.0), "perturbation_eps must be a finite number >= 0, got -1.0"),
        (dict(adaptive_eta=-0.5), "adaptive_eta must be a finite number >= 0, got -0.5"),
        (dict(rho=True), "rho must be a finite number >= 0, got True"),
        (dict(foreach="auto"), "foreach must be None, True or False, got 'auto'"),
        (dict(lr=-1.0), "Invalid learning rate: -1.0"),
    ],
)
def test_bad_arguments(kwargs, message):
    model, _, _ = tiny_problem()
    kwargs = {"lr": 0.1, **kwargs}
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        SAM(model.parameters(), torch.optim.SGD, **kwargs)


def test_bad_group_override_and_clashing_base_optimizer():
    model, _, _ = tiny_problem()
    with pytest.raises(ValueError, match="got 'nope'"):
        SAM([{"params": model.parameters(), "perturbation": "nope"}], torch.optim.SGD, lr=0.1)
    with pytest.raises(ValueError, match="Adadelta.*'rho'"):
        SAM(model.parameters(), torch.optim.Adadelta)
    with pytest.raises(ValueError, match="base_optimizer must be an optimizer class"):
        SAM(model.parameters(), "sgd", lr=0.1)


def test_first_step_twice_is_an_error():
    model, x, y = tiny_problem()
    opt = SAM(model.parameters(), torch.optim.SGD, lr=0.1)
    F.cross_entropy(model(x), y).backward()
    opt.first_step()
    with pytest.raises(RuntimeError, match="twice"):
        opt.first_step()


def test_works_with_adam_and_keeps_its_eps():
    model, x, y = tiny_problem()
    opt = SAM(model.parameters(), torch.optim.Adam, rho=0.05, lr=1e-3, eps=1e-6)
    assert opt.param_groups[0]["eps"] == 1e-6
    run_steps(model, opt, x, y, 2)
    assert "exp_avg" in next(iter(opt.state_dict()["state"].values()))


def test_frozen_batchnorm_stats_keeps_running_statistics():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    model.train()
    x = torch.randn(16, 3)
    model(x)
    bn = model[1]
    before = (bn.running_mean.clone(), bn.running_var.clone(), bn.num_batches_tracked.clone())
    with frozen_batchnorm_stats(model):
        out_frozen = model(x * 3 + 1)
    assert torch.equal(bn.running_mean, before[0])
    assert torch.equal(bn.running_var, before[1])
    assert torch.equal(bn.num_batches_tracked, before[2])
    assert bn.track_running_stats
    # The forward pass itself is unchanged: training mode still normalizes with batch stats.
    out_normal = model(x * 3 + 1)
    torch.testing.assert_close(out_frozen, out_normal)
    assert not torch.equal(bn.running_mean, before[0])


def test_first_step_keeps_parameter_memory_and_autograd_accumulators():
    """w + e is written into the parameters' own memory and undone by a copy, so hooks on the
    gradient accumulators (DDP's all-reduce is one) fire in the second pass. Pointing a
    parameter at other memory (``Tensor.set_``) would make autograd build a new accumulator
    without them."""
    model, x, y = tiny_problem(dtype=torch.float32)
    params = list(model.parameters())
    addresses = [p.data_ptr() for p in params]
    accumulators = [p.view_as(p).grad_fn.next_functions[0][0] for p in params]
    fired = []
    for i, accumulator in enumerate(accumulators):
        accumulator.register_hook(lambda *_, i=i: fired.append(i))
    opt = SAM(params, torch.optim.SGD, rho=0.5, perturbation="aace", lr=0.1)
    aace_loss(model(x), y).backward()
    fired.clear()
    opt.first_step(zero_grad=True)
    assert [p.data_ptr() for p in params] == addresses
    F.cross_entropy(model(x), y).backward()
    assert sorted(fired) == list(range(len(params)))
    opt.second_step(zero_grad=True)
    assert [p.data_ptr() for p in params] == addresses
    for p, accumulator in zip(params, accumulators):
        assert p.view_as(p).grad_fn.next_functions[0][0] is accumulator


@pytest.mark.parametrize("rule", ["sam", "aace"])
def test_track_stats_changes_perturbed_weights_by_rounding_only(rule):
    """With ``track_stats`` e is formed explicitly (``w + e``); without it the unnormalized rule
    fuses the scaling into the addition (``w + scale * g`` in one pass)."""
    results = []
    for track in (False, True):
        model, x, y = tiny_problem(dtype=torch.float32)
        opt = SAM(model.parameters(), torch.optim.SGD, rho=0.3, perturbation=rule,
                  track_stats=track, lr=0.1)  # fmt: skip
        (F.cross_entropy if rule == "sam" else aace_loss)(model(x), y).backward()
        opt.first_step(zero_grad=True)
        results.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=2e-7, atol=2e-7)


def test_tracked_cosine_in_float32_matches_the_direct_formula():
    """The cosine comes from norms (||e||^2 + ||p||^2 - ||p - e||^2) / (2 ||e|| ||p||); in float32
    it must still agree with the direct cosine of the perturbations."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 64), nn.Tanh(), nn.Linear(64, 10))
    x, y = torch.randn(32, 20), torch.randint(0, 10, (32,))
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.2, perturbation="aace", lr=0.5,
              track_stats=True)  # fmt: skip
    previous = None
    for _ in range(6):
        aace_loss(model(x), y).backward()
        before = torch.cat([p.detach().flatten() for p in model.parameters()]).double()
        opt.first_step(zero_grad=True)
        e = torch.cat([p.detach().flatten() for p in model.parameters()]).double() - before
        if previous is not None:
            direct = F.cosine_similarity(e, previous, dim=0)
            torch.testing.assert_close(opt.perturbation_cosine.double(), direct, atol=1e-5, rtol=0)
        previous = e
        F.cross_entropy(model(x), y).backward()
        opt.second_step(zero_grad=True)


def regularized_perturbation(model, x, y, loss_fn, rho, wd, sign, adaptive):
    """google-research/sam's direction, computed independently in float64: the gradient of the
    regularized loss (loss_fn + sign * wd/2 ||w||^2; sign -1 for the AACE rules, whose e
    descends their loss), e = sign * rho * T^2 G / ||T G|| (their dual_vector, T = 1 there)."""
    params = list(model.parameters())
    penalty = sum((p * p).sum() for p in params) * wd / 2
    (loss_fn(model(x), y) + sign * penalty).backward()
    grad = torch.cat([p.grad.flatten() for p in params])
    model.zero_grad(set_to_none=True)
    operator = asam_operator(params) if adaptive else torch.ones_like(grad)
    return sign * rho * operator**2 * grad / (operator * grad).norm()


@pytest.mark.parametrize("rule", ["sam", "aace-normalized"])
@pytest.mark.parametrize("adaptive", [False, True])
def test_perturbation_weight_decay_follows_the_regularized_gradient(rule, adaptive):
    wd, rho, lr = 0.3, 0.2, 0.1
    loss_fn = F.cross_entropy if rule == "sam" else aace_loss
    sign = 1.0 if rule == "sam" else -1.0
    model, x, y = tiny_problem()
    start = torch.cat([p.detach().flatten() for p in model.parameters()])
    expected_e = regularized_perturbation(model, x, y, loss_fn, rho, wd, sign, adaptive)
    opt = SAM(model.parameters(), torch.optim.SGD, rho=rho, perturbation=rule, adaptive=adaptive,
              perturbation_weight_decay=wd, lr=lr, weight_decay=wd)  # fmt: skip
    loss_fn(model(x), y).backward()
    opt.first_step(zero_grad=True)
    got_e = torch.cat([p.detach().flatten() for p in model.parameters()]) - start
    torch.testing.assert_close(got_e, expected_e, rtol=1e-10, atol=1e-14)
    # The update: the loss's gradient at w + e, then SGD's weight decay at w.
    F.cross_entropy(model(x), y).backward()
    update_grad = torch.cat([p.grad.flatten() for p in model.parameters()])
    opt.second_step(zero_grad=True)
    got = torch.cat([p.detach().flatten() for p in model.parameters()])
    torch.testing.assert_close(got, start - lr * (update_grad + wd * start), rtol=1e-12, atol=1e-14)


def test_perturbation_weight_decay_changes_the_direction_and_zero_is_the_default():
    model, x, y = tiny_problem()
    start = torch.cat([p.detach().flatten() for p in model.parameters()])
    decayed = regularized_perturbation(model, x, y, F.cross_entropy, 0.2, 0.3, 1.0, False)
    plain = regularized_perturbation(model, x, y, F.cross_entropy, 0.2, 0.0, 1.0, False)
    assert F.cosine_similarity(decayed, plain, dim=0) < 0.99  # the option matters here
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.2, lr=0.1, weight_decay=0.3)
    assert opt.param_groups[0]["perturbation_weight_decay"] == 0.0
    F.cross_entropy(model(x), y).backward()
    opt.first_step(zero_grad=True)
    got = torch.cat([p.detach().flatten() for p in model.parameters()]) - start
    torch.testing.assert_close(got, plain, rtol=1e-10, atol=1e-14)


def test_perturbation_weight_decay_is_a_group_option_and_keeps_grad_untouched():
    model, x, y = tiny_problem()
    first, second = list(model[0].parameters()), list(model[2].parameters())
    opt = SAM([{"params": first}, {"params": second, "perturbation_weight_decay": 0.0}],
              torch.optim.SGD, rho=0.2, perturbation="aace", perturbation_weight_decay=0.5,
              lr=0.1)  # fmt: skip
    aace_loss(model(x), y).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    start = [p.detach().clone() for p in model.parameters()]
    opt.first_step()
    for p, w, g in zip(first, start[:2], grads[:2]):
        torch.testing.assert_close(p.detach() - w, -0.2 * (g - 0.5 * w), rtol=1e-12, atol=1e-15)
    for p, w, g in zip(second, start[2:], grads[2:]):
        torch.testing.assert_close(p.detach() - w, -0.2 * g, rtol=1e-12, atol=1e-15)
    for p, g in zip(model.parameters(), grads):
        assert torch.equal(p.grad, g)


@pytest.mark.parametrize("value", [-0.1, float("nan"), float("inf"), True, "0.1"])
def test_perturbation_weight_decay_out_of_range_names_the_value(value):
    model, _, _ = tiny_problem()
    with pytest.raises(ValueError, match=r"perturbation_weight_decay must be a finite number >= 0"):
        SAM(model.parameters(), torch.optim.SGD, perturbation_weight_decay=value, lr=0.1)


def test_an_optimizer_instance_is_named_not_dumped():
    model, _, _ = tiny_problem()
    with pytest.raises(ValueError) as error:
        SAM(model.parameters(), torch.optim.SGD(model.parameters(), lr=0.1))
    message = str(error.value)
    assert "got an instance of SGD; pass the class" in message
    assert "\n" not in message and "Parameter Group" not in message  # not the optimizer's repr
