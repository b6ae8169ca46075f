"""Property-based tests (hypothesis) for the AACE and BiSAM losses and the SAM step."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from aace import SAM, aace_loss, bisam_loss

finite_logits = st.integers(2, 12).flatmap(
    lambda c: st.tuples(
        arrays(
            "float64",
            st.tuples(st.integers(1, 6), st.just(c)),
            elements=st.floats(-1e4, 1e4, allow_nan=False, allow_infinity=False),
        ),
        st.integers(0, 2**31 - 1),
    )
)


def definition(logits: torch.Tensor, target: torch.Tensor, threshold: float) -> torch.Tensor:
    """AACE "ada" from probabilities, in float64 — only where q is representable."""
    q = torch.softmax(logits, 1)
    onehot = F.one_hot(target, logits.shape[1]).bool()
    rest = q.masked_fill(onehot, 0)
    t = rest / rest.sum(1, keepdim=True)
    t = torch.where(onehot, q.clamp(max=threshold), t)
    log_q = torch.log_softmax(logits, 1)
    terms = torch.where(t > 0, t * (torch.log(t) - log_q), torch.zeros_like(t))
    return terms.sum(1)


@settings(max_examples=200, deadline=None)
@given(
    finite_logits, st.sampled_from([0.0, 0.1, 0.5, 1.0]), st.sampled_from(["ada", "rand", "const"])
)
def test_aace_finite_and_equal_to_definition(data, threshold, mode):
    array, seed = data
    logits = torch.from_numpy(array)
    target = torch.randint(
        0, logits.shape[1], (logits.shape[0],), generator=torch.Generator().manual_seed(seed)
    )
    for dtype in (torch.float64, torch.float32, torch.bfloat16):
        z = logits.to(dtype).clone().requires_grad_()
        loss = aace_loss(z, target, threshold, mode, reduction="sum")
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(z.grad).all()
    if mode == "ada":
        q = torch.softmax(logits, 1)
        non_target_mass = q.masked_fill(F.one_hot(target, q.shape[1]).bool(), 0).sum(1)
        if (non_target_mass > 1e-300).all() and (q > 0).all():
            want = definition(logits, target, threshold)
            got = aace_loss(logits, target, threshold, "ada", reduction="none")
            torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)


@settings(max_examples=200, deadline=None)
@given(
    finite_logits,
    st.sampled_from(["log", "tanh"]),
    st.sampled_from([0.5, 1.0, 10.0]),
    st.sampled_from([0.1, 1.0]),
)
def test_bisam_finite_and_equal_to_definition(data, bound, mu, alpha):
    array, seed = data
    logits = torch.from_numpy(array)
    target = torch.randint(
        0, logits.shape[1], (logits.shape[0],), generator=torch.Generator().manual_seed(seed)
    )
    for dtype in (torch.float64, torch.float32, torch.bfloat16):
        z = logits.to(dtype).clone().requires_grad_()
        loss = bisam_loss(z, target, bound, mu, alpha, reduction="sum")
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(z.grad).all()
    # The definition, exp then log in float64: phi <= 1 and mu <= 10 keep every exp(mu phi)
    # below e^10, the j = y term keeps the sum >= 1, and an overflowing softplus gives
    # phi = -inf, whose term is the 0 it should be.
    d = logits - logits.gather(1, target[:, None])
    if bound == "tanh":
        phi = torch.tanh(alpha * d)
    else:
        phi = 1 - torch.log(1 + torch.exp(math.log(math.e - 1) - d))
    want = torch.log(torch.exp(mu * phi).sum(1)) / mu
    got = bisam_loss(logits, target, bound, mu, alpha, reduction="none")
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)


@settings(max_examples=60, deadline=None)
@given(
    st.integers(0, 2**31 - 1),
    st.floats(0.0, 10.0),
    st.sampled_from(["sam", "aace", "aace-normalized"]),
    st.booleans(),
    st.sampled_from([torch.float32, torch.float64, torch.bfloat16]),
    st.booleans(),
)
def test_zero_lr_step_leaves_weights_bit_identical(seed, rho, rule, adaptive, dtype, foreach):
    gen = torch.Generator().manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.ReLU(), torch.nn.Linear(4, 3))
    model = model.to(dtype)
    x = torch.randn(7, 5, generator=gen).to(dtype)
    y = torch.randint(0, 3, (7,), generator=gen)
    before = [p.detach().clone() for p in model.parameters()]
    opt = SAM(model.parameters(), torch.optim.SGD, rho=rho, perturbation=rule,
              adaptive=adaptive, foreach=foreach, lr=0.0, momentum=0.9)  # fmt: skip
    (aace_loss if rule != "sam" else F.cross_entropy)(model(x), y).backward()
    opt.first_step(zero_grad=True)
    F.cross_entropy(model(x), y).backward()
    opt.second_step(zero_grad=True)
    for p, b in zip(model.parameters(), before):
        assert torch.equal(p, b)
