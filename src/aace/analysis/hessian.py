"""Hessian-vector products, the top Hessian eigenvalues (Lanczos) and the trace (Hutchinson).

H is the Hessian of L(w) = (1/N) sum_b n_b loss_fn(model(x_b), y_b) with respect to the model's
parameters that have ``requires_grad``, as everywhere in :mod:`aace.analysis`. H is never formed:
everything is built on Hessian-vector products (Pearlmutter, Neural Computation 1994)

    H v = d/dw (grad L(w) . v),

computed per batch by double backward: one forward pass, one backward pass that keeps its graph
(``torch.autograd.grad(..., create_graph=True)``) and a second backward through it with ``v`` as
the output gradient. ``torch.func``'s forward-over-reverse (``jvp`` of ``grad``) gives the same
product; on CPU it was slower (``benchmarks/micro/sharpness.py``, WRN-16-4, batch 128: 5.2 against
4.6 forward-backward passes), and double backward lets one forward/backward graph serve many
probe vectors (the trace below), so it is the one implementation here. A central difference of
gradients, (g(w + h v) - g(w - h v)) / 2h, costs only two forward-backward passes but does not
measure this Hessian for a ReLU network: any step that rises above float32 rounding flips
ReLUs, and the difference then counts their kinks (``benchmarks/micro/hvp_finite_difference.py``:
relative error 17 to 164 on WRN-16-4 in float32 for h from 0.1 to 0.001; in float64 only
h = 1e-6 is accurate, and float64 passes cost twice as much).

The model's mode is the caller's: in eval mode BatchNorm uses its running statistics (the usual
choice, and what ``aace sharpness`` does); in train mode it uses batch statistics, and the
running statistics that such forward passes update are restored afterwards. Parameters, buffers,
modes and ``.grad`` are left as they were found.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

import torch
from torch import nn

from aace.analysis._objective import (
    Batches,
    LossFn,
    Objective,
    check_finite_number,
    check_positive_int,
    cpu_generator,
    preserved_state,
)

__all__ = [
    "HessianEigen",
    "TraceEstimate",
    "hessian_eigen",
    "hessian_eigenvalues",
    "hessian_trace",
    "hessian_trace_estimate",
    "hessian_vector_product",
]

# Memory for a block of trace probes held at once (each one a parameter-sized vector).
_PROBE_BLOCK_BYTES = 1 << 28


def _grads_with_graph(objective: Objective, x, y) -> tuple[torch.Tensor, list[torch.Tensor]]:
    loss = objective.loss(x, y)
    grads = torch.autograd.grad(
        loss, objective.params, create_graph=True, allow_unused=True, materialize_grads=True
    )
    return loss, list(grads)


def _second_backward(
    objective: Objective, grads: list[torch.Tensor], vectors: list[torch.Tensor], retain: bool
) -> list[torch.Tensor]:
    """d/dw (grads . vectors). A gradient that does not depend on w (the loss is linear in that
    parameter) contributes nothing; if none does, H v = 0."""
    live = [i for i, g in enumerate(grads) if g.requires_grad]
    result = [torch.zeros_like(p) for p in objective.params]
    if not live:
        return result
    products = torch.autograd.grad(
        [grads[i] for i in live],
        objective.params,
        grad_outputs=[vectors[i] for i in live],
        retain_graph=retain,
        allow_unused=True,
        materialize_grads=True,
    )
    return list(products)


def _hvp(objective: Objective, vector: torch.Tensor) -> torch.Tensor:
    """H v for a flat vector ``v``; flat result in the parameters' dtype."""
    vectors = objective.split(vector)
    total = torch.zeros_like(vector)
    parts = objective.split(total)
    count = 0
    for x, y, n in objective.batches():
        _, grads = _grads_with_graph(objective, x, y)
        products = _second_backward(objective, grads, vectors, retain=False)
        torch._foreach_add_(parts, products, alpha=float(n))
        count += n
    return total.div_(count)


def hessian_vector_product(
    model: nn.Module, loss_fn: LossFn, batches: Batches, vector: torch.Tensor
) -> torch.Tensor:
    """The Hessian-vector product H v of the mean loss over ``batches``, by double backward
    (Pearlmutter, Neural Computation 1994).

    Args:
        model: the network; its parameters with ``requires_grad`` are the analysed w, and its
            mode (train/eval) is used as found.
        loss_fn: ``loss_fn(model(x), y)``, the mean loss of a batch (e.g.
            ``torch.nn.functional.cross_entropy``).
        batches: a re-iterable of ``(x, y)`` (a list, a ``DataLoader``); the objective is the
            sample-weighted mean loss over all of them.
        vector: a 1-D tensor of length n, the number of analysed parameter entries, in the
            order of ``model.parameters()`` (``torch.cat([p.flatten() for p in params])``).

    Returns:
        H v, a 1-D tensor of length n in the parameters' dtype and device.

    Raises:
        ValueError: ``model`` is not a module or has no trainable floating-point parameter,
            ``loss_fn`` is not callable or ``batches`` holds no sample, or ``vector`` is not
            1-D of length n.
    """
    objective = Objective(model, loss_fn, batches)
    if vector.dim() != 1 or vector.numel() != objective.numel:
        raise ValueError(
            f"vector must be 1-D with {objective.numel} entries (one per analysed parameter), "
            f"got shape {tuple(vector.shape)}"
        )
    with preserved_state(model):
        return _hvp(objective, vector.to(objective.device, objective.dtype))


# -- top eigenvalues ----------------------------------------------------------------------------


@dataclass
class HessianEigen:
    """Result of :func:`hessian_eigen`.

    Attributes:
        eigenvalues: the k largest (algebraic) eigenvalues, descending (units of the loss per
            squared parameter unit).
        residuals: the Lanczos residual norms ||H u - theta u|| of their Ritz pairs, in the same
            order; each eigenvalue is within its residual of a true eigenvalue.
        iterations: Hessian-vector products spent.
        converged: whether every residual met the tolerance before ``max_iter``.
        eigenvectors: the Ritz vectors u, shape (k, n), unit norm, in the order of
            ``eigenvalues``; n and the entry order as in :func:`hessian_vector_product`.
    """

    eigenvalues: list[float]
    residuals: list[float]
    iterations: int
    converged: bool
    eigenvectors: torch.Tensor | None = field(default=None, repr=False)  # (k, n), unit norm


class _Basis:
    """The Lanczos vectors as rows of a matrix that grows by doubling."""

    def __init__(self, first: torch.Tensor) -> None:
        self.rows = torch.empty((8, first.numel()), dtype=first.dtype, device=first.device)
        self.rows[0] = first
        self.size = 1

    def view(self) -> torch.Tensor:
        return self.rows[: self.size]

    def append(self, vector: torch.Tensor) -> None:
        if self.size == self.rows.shape[0]:
            self.rows = torch.cat([self.rows, torch.empty_like(self.rows)])
        self.rows[self.size] = vector
        self.size += 1

    def orthogonalize(self, vector: torch.Tensor) -> torch.Tensor:
        """Full reorthogonalization, classical Gram-Schmidt applied twice ("twice is enough",
        Giraud et al., Numer. Math. 2005)."""
        basis = self.view()
        for _ in range(2):
            vector = torch.addmv(vector, basis.T, basis @ vector, alpha=-1.0)
        return vector


def _lanczos(
    matvec,
    start: torch.Tensor,
    k: int,
    max_iter: int,
    tol: float,
    generator: torch.Generator,
) -> HessianEigen:
    n = start.numel()
    q = start / start.norm()
    basis = _Basis(q)
    alphas: list[float] = []
    betas: list[float] = []
    breakdown = 100 * torch.finfo(start.dtype).eps
    theta = s = None
    top_residuals: list[float] = []
    converged = False
    steps = min(max_iter, n)
    for j in range(steps):
        w = matvec(basis.rows[j])
        alpha = torch.dot(w, basis.rows[j])
        w = basis.orthogonalize(w)  # also removes alpha q_j and beta q_{j-1}
        beta = float(w.norm())
        alphas.append(float(alpha))
        t = torch.diag(torch.tensor(alphas, dtype=torch.float64))
        if betas:
            off = torch.tensor(betas, dtype=torch.float64)
            t += torch.diag(off, 1) + torch.diag(off, -1)
        theta, s = torch.linalg.eigh(t)  # ascending
        scale = float(theta.abs().max())
        if j + 1 >= k:
            top_residuals = (beta * s[-1, -k:].abs()).flip(0).tolist()
            exhausted = j + 1 == n
            if exhausted or (beta > breakdown * scale and max(top_residuals) <= tol * scale):
                converged = True
                break
        if j + 1 == steps:
            break
        if beta <= breakdown * max(scale, torch.finfo(start.dtype).tiny):
            # An invariant subspace is exhausted: the Ritz values so far are exact eigenvalues,
            # but others (a repeated eigenvalue, say) lie outside it. Continue from a random
            # vector orthogonal to the basis (T gets a zero off-diagonal entry).
            fresh = torch.randn(n, generator=generator, dtype=torch.float64)
            w = basis.orthogonalize(fresh.to(start.device, start.dtype))
            beta_next = 0.0
            w = w / w.norm()
        else:
            beta_next = beta
            w = w / beta
        betas.append(beta_next)
        basis.append(w)
    assert theta is not None and s is not None
    m = len(alphas)
    vectors = (s[:, -k:].flip(1).T.to(start.device, start.dtype)) @ basis.view()[:m]
    return HessianEigen(
        eigenvalues=theta[-k:].flip(0).tolist(),
        residuals=top_residuals,
        iterations=m,
        converged=converged,
        eigenvectors=vectors,
    )


def hessian_eigen(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Batches,
    k: int = 1,
    *,
    max_iter: int = 100,
    tol: float = 1e-3,
    seed: int = 0,
) -> HessianEigen:
    """The k largest (algebraic) eigenvalues of the Hessian, by Lanczos with full
    reorthogonalization (Golub & Van Loan, Matrix Computations, Sec. 10.1), with Ritz vectors.

    After j Hessian-vector products the Krylov space K_j(H, q_1) = span{q_1, H q_1, ...} gives
    the tridiagonal T_j = Q_j^T H Q_j; its eigenvalues theta (Ritz values) approximate the
    extreme eigenvalues of H, and the residual of Ritz pair (theta_i, Q_j s_i) is
    beta_j |s_i[j]|. Iteration stops when each of the top k residuals is <= tol * max|theta|
    (then each theta_i is within tol * ||H|| of an eigenvalue of H, and typically far closer:
    the error is about residual^2 / gap), after n products (exact), or after ``max_iter``
    (with a warning).

    Why Lanczos and not power iteration (PyHessian's method): power iteration converges like
    (lambda_2 / lambda_1)^j and finds the eigenvalue of largest *magnitude*, which near a
    saddle or early in training is a negative one; Lanczos converges like a Chebyshev
    polynomial in the relative gap (far fewer products), returns the largest *algebraic*
    eigenvalues, and finds k of them in one Krylov space without deflation. Full
    reorthogonalization costs O(j n) per step, small next to a Hessian-vector product over a
    dataset, and keeps ghost copies of converged eigenvalues out.

    Limitation (of every single-vector Krylov method): an eigenvalue of multiplicity > 1 shows
    up once until rounding brings in a second copy; an exactly exhausted Krylov space is
    detected and the iteration continues from a fresh random vector.

    Args:
        model: the model; its mode (train/eval) is used as found.
        loss_fn: ``loss_fn(model(x), y)``, the mean over a batch.
        batches: a re-iterable of ``(x, y)`` (a list, a DataLoader); moved to the parameters'
            device, floating-point inputs cast to their dtype.
        k: how many eigenvalues (1 <= k <= number of parameters).
        max_iter: at most this many Hessian-vector products.
        tol: relative residual tolerance, as above.
        seed: seed of the random start vector (drawn on the CPU, so CPU and CUDA agree).

    Returns:
        The eigenvalues with their residuals, the number of products and the Ritz vectors.

    Raises:
        ValueError: ``model`` is not a module or has no trainable floating-point parameter,
            ``loss_fn`` is not callable or ``batches`` holds no sample, or ``k``, ``max_iter``
            or ``tol`` is out of range (``k`` above n, ``max_iter`` below ``k``).

    Warns:
        RuntimeWarning: ``max_iter`` products were spent before the residuals met ``tol``.
    """
    check_positive_int("k", k)
    check_positive_int("max_iter", max_iter)
    tol = check_finite_number("tol", tol, positive=True)
    generator = cpu_generator(seed)
    objective = Objective(model, loss_fn, batches)
    if k > objective.numel:
        raise ValueError(
            f"k must be <= the number of analysed parameters ({objective.numel}), got {k}"
        )
    if max_iter < k:
        raise ValueError(f"max_iter must be >= k ({k}), got {max_iter}")
    start = torch.randn(objective.numel, generator=generator, dtype=torch.float64)
    start = start.to(objective.device, objective.dtype)
    with preserved_state(model):
        result = _lanczos(lambda v: _hvp(objective, v), start, k, max_iter, tol, generator)
    if not result.converged:
        warnings.warn(
            f"hessian_eigen: Lanczos did not reach tol={tol:g} in max_iter={max_iter} "
            f"Hessian-vector products (largest residual {max(result.residuals):.3g}); "
            "raise max_iter or tol",
            RuntimeWarning,
            stacklevel=2,
        )
    return result


def hessian_eigenvalues(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Batches,
    k: int = 1,
    *,
    max_iter: int = 100,
    tol: float = 1e-3,
    seed: int = 0,
) -> list[float]:
    """The k largest (algebraic) Hessian eigenvalues, descending, as floats: Lanczos with full
    reorthogonalization (Golub & Van Loan, Matrix Computations, Sec. 10.1).

    :func:`hessian_eigen` documents the method, the stopping rule, the arguments and the errors;
    it also returns the residuals, the iteration count and the Ritz vectors.

    Returns:
        A list of k floats, descending.
    """
    return hessian_eigen(
        model, loss_fn, batches, k, max_iter=max_iter, tol=tol, seed=seed
    ).eigenvalues


# -- trace --------------------------------------------------------------------------------------


@dataclass
class TraceEstimate:
    """Hutchinson's estimate of tr(H), from :func:`hessian_trace_estimate`.

    Attributes:
        trace: the mean of the ``samples`` quadratic forms v^T H v.
        stderr: their standard error, std(v^T H v) / sqrt(samples).
        samples: the number of Rademacher probes.
        quadratic_forms: each probe's v^T H v.
    """

    trace: float
    stderr: float
    samples: int
    quadratic_forms: list[float] = field(repr=False)


def hessian_trace_estimate(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Batches,
    *,
    samples: int = 100,
    seed: int = 0,
) -> TraceEstimate:
    """Hutchinson's estimator of the Hessian trace (Hutchinson, Commun. Stat. 1990; as in
    PyHessian, Yao et al., IEEE BigData 2020):

        tr(H) = E[v^T H v],   v with i.i.d. Rademacher (+-1) entries,

    averaged over ``samples`` probes. Var(v^T H v) = 2 (||H||_F^2 - sum_i H_ii^2), the smallest
    of the usual probe distributions; the reported standard error is the sample standard
    deviation of the v^T H v over sqrt(samples).

    Cost: one pass over ``batches``. For each batch the forward pass and the graph-keeping
    backward pass are done once and serve a block of probes (each one more backward pass through
    that graph), so every probe but the first costs only the second backward pass instead of a
    whole Hessian-vector product (``benchmarks/micro/sharpness.py`` measures the difference).

    Args:
        model: the network; its parameters with ``requires_grad`` are the analysed w, and its
            mode (train/eval) is used as found.
        loss_fn: ``loss_fn(model(x), y)``, the mean loss of a batch (e.g.
            ``torch.nn.functional.cross_entropy``).
        batches: a re-iterable of ``(x, y)`` (a list, a ``DataLoader``); the objective is the
            sample-weighted mean loss over all of them.
        samples: the number of probes, >= 2 (for the standard error).
        seed: fixes the probes (drawn on the CPU, so CPU and CUDA agree).

    Returns:
        The trace, its standard error and every probe's quadratic form.

    Raises:
        ValueError: ``model`` is not a module or has no trainable floating-point parameter,
            ``loss_fn`` is not callable or ``batches`` holds no sample, or ``samples`` < 2.
    """
    check_positive_int("samples", samples, minimum=2)
    generator = cpu_generator(seed)
    objective = Objective(model, loss_fn, batches)
    element = torch.finfo(objective.dtype).bits // 8
    block = max(1, min(samples, _PROBE_BLOCK_BYTES // (objective.numel * element)))
    forms = torch.zeros(samples, dtype=torch.float64, device=objective.device)
    count = 0
    with preserved_state(model):
        for first in range(0, samples, block):
            size = min(block, samples - first)
            probes = torch.randint(0, 2, (size, objective.numel), generator=generator)
            probes = probes.to(objective.device, objective.dtype).mul_(2).sub_(1)  # (size, n)
            views = [objective.split(p) for p in probes]
            count = 0
            for x, y, n in objective.batches():
                _, grads = _grads_with_graph(objective, x, y)
                for i, vectors in enumerate(views):
                    products = _second_backward(objective, grads, vectors, retain=i < size - 1)
                    form = sum(
                        torch.vdot(h.reshape(-1), v.reshape(-1)) for h, v in zip(products, vectors)
                    )
                    forms[first + i] += form.double() * n
                count += n
    forms /= count
    values = forms.tolist()
    return TraceEstimate(
        trace=float(forms.mean()),
        stderr=float(forms.std()) / math.sqrt(samples),
        samples=samples,
        quadratic_forms=values,
    )


def hessian_trace(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Batches,
    *,
    samples: int = 100,
    seed: int = 0,
) -> float:
    """tr(H) by Hutchinson's estimator (Hutchinson, Commun. Stat. 1990) with ``samples``
    Rademacher probes, as a float. :func:`hessian_trace_estimate` documents the arguments and
    errors, and also returns the standard error."""
    return hessian_trace_estimate(model, loss_fn, batches, samples=samples, seed=seed).trace
