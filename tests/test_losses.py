"""The AACE loss against its definition, computed independently in float64."""

import math

import pytest
import torch
import torch.nn.functional as F

from aace import AACELoss, aace_loss


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
