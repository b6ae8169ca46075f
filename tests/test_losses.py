"""The AACE and BiSAM losses against their definitions, computed independently in float64 (and,
at large margins, in 80-digit decimal arithmetic)."""

import math
from decimal import Decimal, localcontext

import pytest
import torch
import torch.nn.functional as F

from aace import AACELoss, BiSAMLoss, aace_loss, bisam_loss


def reference_aace(logits, target, threshold, mode, rand_weights=None):
    """Direct transcription of the definition: probabilities, then division, then KL terms."""
    logits = logits.double()
    q = torch.softmax(logits, dim=1)
    losses = []
    for i in range(logits.shape[0]):
        y = int(target[i])
        c = logits.shape[1]
        if mode == "ada":
            a = [q[i, j].item() for j in range(c)]
        elif mode == "const":
            a = [1.0] * c
        else:
            a = [rand_weights[i, j].item() for j in range(c)]
        denominator = sum(a[j] for j in range(c) if j != y)
        t = [a[j] / denominator for j in range(c)]
        t[y] = min(q[i, y].item(), threshold)
        log_q = torch.log_softmax(logits[i], dim=0)
        total = 0.0
        for j in range(c):
            if t[j] > 0:
                total += t[j] * (math.log(t[j]) - log_q[j].item())
        losses.append(total)
    return torch.tensor(losses, dtype=torch.float64)


@pytest.mark.parametrize("mode", ["ada", "const"])
@pytest.mark.parametrize("threshold", [0.0, 0.3, 1.0])
def test_matches_definition(mode, threshold):
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(16, 7, generator=gen, dtype=torch.float64) * 3
    target = torch.randint(0, 7, (16,), generator=gen)
    got = aace_loss(logits, target, threshold=threshold, mode=mode, reduction="none")
    torch.testing.assert_close(got, reference_aace(logits, target, threshold, mode))


@pytest.mark.parametrize("threshold", [0.0, 0.5])
def test_rand_mode_matches_definition_with_same_draw(threshold):
    logits = torch.randn(8, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    target = torch.arange(8) % 5
    got = aace_loss(
        logits, target, threshold, "rand", "none", generator=torch.Generator().manual_seed(7)
    )
    u = torch.rand(8, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    want = reference_aace(logits, target, threshold, "rand", rand_weights=1 - u)
    torch.testing.assert_close(got, want)


def test_ada_threshold_zero_is_minus_log_one_minus_p():
    logits = torch.randn(32, 10, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    target = torch.randint(0, 10, (32,), generator=torch.Generator().manual_seed(3))
    p_y = torch.softmax(logits, 1).gather(1, target[:, None]).squeeze(1)
    torch.testing.assert_close(aace_loss(logits, target, reduction="none"), -torch.log1p(-p_y))


def test_gradient_is_minus_p_over_one_minus_p_times_ce_gradient():
    logits = torch.randn(6, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    target = torch.tensor([0, 1, 2, 3, 0, 1])
    z = logits.clone().requires_grad_()
    aace_loss(z, target, reduction="sum").backward()
    q = torch.softmax(logits, 1)
    p_y = q.gather(1, target[:, None])
    ce_grad = q - F.one_hot(target, 4).double()
    torch.testing.assert_close(z.grad, -(p_y / (1 - p_y)) * ce_grad)


@pytest.mark.parametrize("mode", ["ada", "const", "rand"])
@pytest.mark.parametrize("threshold", [0.0, 0.4])
def test_gradient_matches_finite_differences(mode, threshold):
    logits = torch.randn(3, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    target = torch.tensor([4, 0, 2])

    def f(z):
        # The target is built without gradient: freeze it at the current logits.
        gen = torch.Generator().manual_seed(0)
        return aace_loss(z, target, threshold, mode, "sum", generator=gen)

    z = logits.clone().requires_grad_()
    f(z).backward()
    # t is treated as a constant, so the reference differentiates -sum t log_softmax(z).
    with torch.no_grad():
        gen = torch.Generator().manual_seed(0)
        q = torch.softmax(logits, 1)
        if mode == "ada":
            a = q.clone()
        elif mode == "const":
            a = torch.ones_like(q)
        else:
            a = 1 - torch.rand(q.shape, dtype=q.dtype, generator=gen)
        onehot = F.one_hot(target, 5).bool()
        a = a.masked_fill(onehot, 0)
        t = a / a.sum(1, keepdim=True)
        t = torch.where(onehot, q.clamp(max=threshold), t)
    eps = 1e-6
    numeric = torch.zeros_like(logits)
    for i in range(3):
        for j in range(5):
            plus, minus = logits.clone(), logits.clone()
            plus[i, j] += eps
            minus[i, j] -= eps
            cross = lambda zz: -(t * torch.log_softmax(zz, 1)).sum()  # noqa: E731
            numeric[i, j] = (cross(plus) - cross(minus)) / (2 * eps)
    torch.testing.assert_close(z.grad, numeric, atol=1e-7, rtol=1e-6)


def test_reductions():
    logits = torch.randn(5, 3, generator=torch.Generator().manual_seed(6))
    target = torch.tensor([0, 1, 2, 0, 1])
    per_sample = aace_loss(logits, target, reduction="none")
    assert per_sample.shape == (5,)
    torch.testing.assert_close(aace_loss(logits, target, reduction="sum"), per_sample.sum())
    torch.testing.assert_close(aace_loss(logits, target), per_sample.mean())
    module = AACELoss(threshold=0.2, mode="const", reduction="sum")
    torch.testing.assert_close(
        module(logits, target), aace_loss(logits, target, 0.2, "const", "sum")
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("mode", ["ada", "rand", "const"])
@pytest.mark.parametrize("margin", [1e4, -1e4, 60.0])
def test_finite_at_extreme_margins(dtype, mode, margin):
    logits = torch.zeros(4, 10)
    target = torch.tensor([0, 3, 9, 5])
    logits[torch.arange(4), target] = margin
    logits[1, 4] = -margin  # a very unlikely non-target class too
    z = logits.to(dtype).requires_grad_()
    loss = aace_loss(z, target, threshold=0.0, mode=mode)
    loss.backward()
    assert torch.isfinite(loss)
    assert torch.isfinite(z.grad).all()
    if margin > 0 and mode == "ada":
        # -log(1 - p_y) with log(1 - p_y) = logsumexp_{j != y} z_j - logsumexp_j z_j.
        # Sample 1's non-target mass is dominated by the 8 zero logits.
        expected = torch.tensor([margin - math.log(9)] * 4, dtype=torch.float64)
        expected[1] = margin - math.log(8 + math.exp(-margin))
        got = aace_loss(logits.double(), target, reduction="none")
        torch.testing.assert_close(got, expected)


def test_naive_softmax_division_fails_where_ours_does_not():
    logits = torch.tensor([[1e4, 0.0, 0.0]])
    q = torch.softmax(logits, 1)
    naive = q[:, 1:] / q[:, 1:].sum(1, keepdim=True)  # 0 / 0
    assert torch.isnan(naive).all()
    assert torch.isfinite(aace_loss(logits, torch.tensor([0])))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(threshold=-0.1), "threshold must be a number in [0, 1], got -0.1"),
        (dict(threshold=1.5), "got 1.5"),
        (dict(threshold=float("nan")), "got nan"),
        (dict(mode="adaptive"), "got 'adaptive'"),
        (dict(reduction="avg"), "got 'avg'"),
    ],
)
def test_bad_options(kwargs, message):
    logits, target = torch.randn(2, 3), torch.tensor([0, 1])
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        aace_loss(logits, target, **kwargs)
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        AACELoss(**kwargs)


@pytest.mark.parametrize(
    "logits, target, message",
    [
        (torch.randn(3), torch.tensor([0, 1, 2]), r"shape \(N, C\).*got \(3,\)"),
        (torch.randn(3, 1), torch.tensor([0, 0, 0]), r"C >= 2, got \(3, 1\)"),
        (torch.randint(0, 3, (3, 4)), torch.tensor([0, 1, 2]), "floating-point"),
        (torch.randn(3, 4), torch.tensor([0.0, 1.0, 2.0]), "integer tensor.*float32"),
        (torch.randn(3, 4), torch.tensor([0, 1]), r"shape \(N,\) = \(3,\).*got \(2,\)"),
        (torch.randn(3, 4), torch.tensor([0, 1, 4]), r"in \[0, 3\], got 4"),
        (torch.randn(3, 4), torch.tensor([0, -1, 2]), r"in \[0, 3\], got -1"),
        (torch.randn(3, 4), torch.tensor([True, False, True]), "integer tensor.*bool"),
    ],
)
def test_bad_inputs(logits, target, message):
    with pytest.raises(ValueError, match=message):
        aace_loss(logits, target)


# ---------------------------------------------------------------------------------------------
# BiSAM (Xie et al., ICML 2024): Q = (1/mu) log sum_j exp(mu phi(z_j - z_y)).

GAMMA = math.log(math.e - 1)


def reference_bisam(logits, target, bound, mu, alpha=0.1):
    """Plain Python math, one sample and one class at a time (exp then log: fine for the small
    logits it is used on)."""
    losses = []
    for row, y in zip(logits.tolist(), target.tolist()):
        total = 0.0
        for z_j in row:
            d = z_j - row[y]
            phi = math.tanh(alpha * d) if bound == "tanh" else 1 - math.log(1 + math.exp(GAMMA - d))
            total += math.exp(mu * phi)
        losses.append(math.log(total) / mu)
    return torch.tensor(losses, dtype=torch.float64)


def test_bisam_closed_forms_by_hand():
    # Equal logits: every margin is 0, phi(0) = 0 for both bounds, so Q = log(C) / mu.
    for bound, mu in (("log", 1.0), ("tanh", 10.0), ("tanh", 2.0)):
        got = bisam_loss(torch.zeros(2, 3, dtype=torch.float64), torch.tensor([0, 2]), bound, mu)
        assert got.item() == pytest.approx(math.log(3) / mu, rel=1e-15)
    # Two classes, "log", margin gamma: phi = 1 - log 2, so Q = log(1 + e / 2).
    logits = torch.tensor([[0.0, GAMMA]], dtype=torch.float64)
    got = bisam_loss(logits, torch.tensor([0]), "log", 1.0)
    assert got.item() == pytest.approx(math.log(1 + math.e / 2), rel=1e-15)
    # Two classes, "tanh" with alpha 0.1, margin 10, mu 2: Q = log(1 + exp(2 tanh 1)) / 2.
    logits = torch.tensor([[0.0, 10.0]], dtype=torch.float64)
    got = bisam_loss(logits, torch.tensor([0]), "tanh", 2.0, alpha=0.1)
    assert got.item() == pytest.approx(math.log(1 + math.exp(2 * math.tanh(1.0))) / 2, rel=1e-15)


@pytest.mark.parametrize("bound, mu", [("log", 1.0), ("log", 5.0), ("tanh", 10.0), ("tanh", 1.0)])
def test_bisam_matches_plain_python_on_two_by_three(bound, mu):
    logits = torch.tensor([[2.0, 0.5, -1.0], [0.0, 3.0, 1.0]], dtype=torch.float64)
    target = torch.tensor([0, 2])  # one right, one wrong
    got = bisam_loss(logits, target, bound, mu, alpha=0.1, reduction="none")
    torch.testing.assert_close(
        got, reference_bisam(logits, target, bound, mu), rtol=1e-12, atol=1e-15
    )


def _authors_loss(pred, targets, bound, mu, alpha=0.1):
    """LIONS-EPFL/BiSAM loss_fnc.py (perturbation_loss_tanh / perturbation_loss_log), with the
    in-place margin loop written as one subtraction. Per sample, without the paper's 1/mu."""
    pred = pred - pred.gather(1, targets[:, None])
    if bound == "tanh":
        return torch.logsumexp(mu * torch.tanh(alpha * pred), 1)
    gamma = torch.log(torch.tensor(math.e - 1))
    return torch.logsumexp(mu * (1 + F.softplus(pred - gamma, beta=-1)), 1)


@pytest.mark.parametrize("bound, mu", [("log", 1.0), ("tanh", 10.0), ("tanh", 3.0)])
def test_bisam_is_the_authors_code_divided_by_mu(bound, mu):
    gen = torch.Generator().manual_seed(11)
    logits = torch.randn(16, 10, generator=gen, dtype=torch.float64) * 4
    target = torch.randint(0, 10, (16,), generator=gen)
    got = bisam_loss(logits, target, bound, mu, reduction="none")
    torch.testing.assert_close(got, _authors_loss(logits, target, bound, mu) / mu)


def test_bisam_defaults():
    logits = torch.randn(4, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    target = torch.tensor([0, 1, 2, 3])
    torch.testing.assert_close(bisam_loss(logits, target), bisam_loss(logits, target, "log", 1.0))
    torch.testing.assert_close(
        bisam_loss(logits, target, "tanh"), bisam_loss(logits, target, "tanh", 10.0, 0.1)
    )
    assert (BiSAMLoss().bound, BiSAMLoss().mu, BiSAMLoss(bound="tanh").mu) == ("log", 1.0, 10.0)
    assert repr(BiSAMLoss()) == "BiSAMLoss(bound='log', mu=1.0, alpha=0.1, reduction='mean')"


@pytest.mark.parametrize("bound, mu", [("log", 1.0), ("log", 4.0), ("tanh", 10.0), ("tanh", 0.5)])
@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
def test_bisam_gradient_matches_finite_differences(bound, mu, reduction):
    gen = torch.Generator().manual_seed(5)
    logits = (torch.randn(4, 5, generator=gen, dtype=torch.float64) * 3).requires_grad_()
    target = torch.tensor([4, 0, 2, 2])
    assert torch.autograd.gradcheck(
        lambda z: bisam_loss(z, target, bound, mu, 0.3, reduction), (logits,), eps=1e-6, atol=1e-8
    )
    assert torch.autograd.gradgradcheck(
        lambda z: bisam_loss(z, target, bound, mu, 0.3, reduction), (logits,)
    )


def test_bisam_gradient_is_an_ascent_towards_misclassification():
    # dQ/dz_j = w_j phi'(d_j) > 0 for j != y (w = softmax(mu phi)), and dQ/dz_y is minus their
    # sum: the sign pattern of the cross-entropy gradient q - onehot(y), so SAM's "sam" rule
    # (e = +rho g / ||g||) ascends Q as it ascends the cross-entropy.
    logits = torch.randn(6, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(8))
    target = torch.tensor([0, 1, 2, 3, 0, 1])
    for bound in ("log", "tanh"):
        z = logits.clone().requires_grad_()
        bisam_loss(z, target, bound, reduction="sum").backward()
        onehot = F.one_hot(target, 4).bool()
        assert (z.grad[onehot] < 0).all() and (z.grad[~onehot] > 0).all()
        torch.testing.assert_close(z.grad.sum(1), torch.zeros(6, dtype=torch.float64))
        # Explicitly: w_j phi'(d_j) off the target.
        d = logits - logits.gather(1, target[:, None])
        if bound == "tanh":
            phi, dphi = torch.tanh(0.1 * d), 0.1 * (1 - torch.tanh(0.1 * d) ** 2)
            mu = 10.0
        else:
            phi, dphi = 1 - torch.log1p(torch.exp(GAMMA - d)), torch.sigmoid(GAMMA - d)
            mu = 1.0
        w = torch.softmax(mu * phi, 1)
        off = torch.where(onehot, torch.zeros_like(d), w * dphi)
        torch.testing.assert_close(z.grad, off - onehot * off.sum(1, keepdim=True))


def test_bisam_reductions_and_module():
    logits = torch.randn(5, 3, generator=torch.Generator().manual_seed(6))
    target = torch.tensor([0, 1, 2, 0, 1])
    per_sample = bisam_loss(logits, target, reduction="none")
    assert per_sample.shape == (5,) and per_sample.dtype == torch.float32
    torch.testing.assert_close(bisam_loss(logits, target, reduction="sum"), per_sample.sum())
    torch.testing.assert_close(bisam_loss(logits, target), per_sample.mean())
    module = BiSAMLoss(bound="tanh", mu=3.0, alpha=0.2, reduction="sum")
    torch.testing.assert_close(
        module(logits, target), bisam_loss(logits, target, "tanh", 3.0, 0.2, "sum")
    )


def _decimal_bisam(row, y, bound, mu, alpha):
    """Q of one sample in 80-digit decimal arithmetic, from the floats' exact values."""
    with localcontext() as ctx:
        ctx.prec = 80
        mu, alpha = Decimal(mu), Decimal(alpha)
        gamma = (Decimal(1).exp() - 1).ln()
        total = Decimal(0)
        for z_j in row:
            d = z_j - row[y]
            if bound == "tanh":
                e2 = (2 * alpha * d).exp()
                phi = (e2 - 1) / (e2 + 1)
            else:
                phi = 1 - (1 + (gamma - d).exp()).ln()
            total += (mu * phi).exp()
        return total.ln() / mu


def decimal_reference(logits, target, bound, mu, alpha=0.1):
    """Values and central-difference gradients (step 1e-25) of the per-sample losses."""
    values, grads = [], []
    h = Decimal("1e-25")
    for row, y in zip(logits.double().tolist(), target.tolist()):
        row = [Decimal(v) for v in row]
        values.append(float(_decimal_bisam(row, y, bound, mu, alpha)))
        grad_row = []
        for j in range(len(row)):
            with localcontext() as ctx:
                ctx.prec = 80  # also for z_j +- h, which the default 28 digits would round away
                plus, minus = list(row), list(row)
                plus[j] += h
                minus[j] -= h
                diff = _decimal_bisam(plus, y, bound, mu, alpha) - _decimal_bisam(
                    minus, y, bound, mu, alpha
                )
                grad_row.append(float(diff / (2 * h)))
        grads.append(grad_row)
    return torch.tensor(values, dtype=torch.float64), torch.tensor(grads, dtype=torch.float64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("bound, mu", [("log", 1.0), ("tanh", 10.0)])
@pytest.mark.parametrize("margin", [1e4, -1e4])
def test_bisam_exact_at_large_margins(dtype, bound, mu, margin):
    logits = torch.zeros(4, 6, dtype=dtype)
    target = torch.tensor([0, 3, 5, 1])
    logits[torch.arange(4), target] = margin  # confidently right (1e4) or wrong (-1e4)
    logits[1, 4] = -margin  # a margin of 2e4 to another class
    logits[2] = margin + torch.tensor([0.0, 0.5, -1.0, 2.0, 1.0, 0.0], dtype=dtype)  # 1e4 +- small
    logits[3, 2] = margin - 3.0  # and a close runner-up to the right/wrong class
    z = logits.clone().requires_grad_()
    loss = bisam_loss(z, target, bound, mu, reduction="none")
    loss.sum().backward()
    assert torch.isfinite(loss).all() and torch.isfinite(z.grad).all()
    want_value, want_grad = decimal_reference(logits, target, bound, mu)
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loss.double(), want_value, **tol)
    torch.testing.assert_close(z.grad.double(), want_grad, **tol)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bound", ["log", "tanh"])
@pytest.mark.parametrize("margin", [6e4, -6e4, 60.0])
def test_bisam_finite_in_half_precision(dtype, bound, margin):
    logits = torch.zeros(3, 10)
    target = torch.tensor([0, 3, 9])
    logits[torch.arange(3), target] = margin
    logits[1, 4] = -margin
    z = logits.to(dtype).requires_grad_()
    loss = bisam_loss(z, target, bound)
    loss.backward()
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert torch.isfinite(z.grad).all()


def test_exp_then_log_overflows_where_bisam_does_not():
    d = torch.tensor([-1e4])  # the "log" bound's softplus(gamma - d), naively
    assert torch.isinf(torch.log(1 + torch.exp(GAMMA - d))).all()
    logits = torch.tensor([[1e4, 0.0, 0.0], [-1e4, 0.0, 0.0]]).requires_grad_()
    loss = bisam_loss(logits, torch.tensor([0, 0]))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logits.grad).all()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(bound="softplus"), "bound must be one of log, tanh; got 'softplus'"),
        (dict(mu=0.0), r"mu must be a finite number > 0 \(or None for the default\), got 0.0"),
        (dict(mu=-1), "mu must be .*got -1"),
        (dict(mu=float("inf")), "mu must be .*got inf"),
        (dict(mu=True), "mu must be .*got True"),
        (dict(alpha=0), "alpha must be a finite number > 0, got 0"),
        (dict(alpha=float("nan")), "alpha must be .*got nan"),
        (dict(reduction="avg"), "reduction must be one of none, mean, sum; got 'avg'"),
    ],
)
def test_bisam_bad_options(kwargs, message):
    logits, target = torch.randn(2, 3), torch.tensor([0, 1])
    with pytest.raises(ValueError, match=message):
        bisam_loss(logits, target, **kwargs)
    with pytest.raises(ValueError, match=message):
        BiSAMLoss(**kwargs)


@pytest.mark.parametrize(
    "logits, target, message",
    [
        (torch.randn(3, 1), torch.tensor([0, 0, 0]), r"C >= 2, got \(3, 1\)"),
        (torch.randint(0, 3, (3, 4)), torch.tensor([0, 1, 2]), "floating-point"),
        (torch.randn(3, 4), torch.tensor([0.0, 1.0, 2.0]), "integer tensor.*float32"),
        (torch.randn(3, 4), torch.tensor([0, 1, 4]), r"in \[0, 3\], got 4"),
    ],
)
def test_bisam_bad_inputs(logits, target, message):
    with pytest.raises(ValueError, match=message):
        bisam_loss(logits, target)
