"""Adaptive worst-case and average m-sharpness (Andriushchenko et al., ICML 2023, "A modern look
at the relationship between sharpness and generalization", Eqs. 1-2):

    S_max(w) = E_S [ max_{||delta / c||_p <= rho} L_S(w + delta) ] - E_S [ L_S(w) ]
    S_avg(w) = E_S E_{delta ~ N(0, rho^2 diag(c^2))} [ L_S(w + delta) ] - E_S [ L_S(w) ]

with c = |w| (adaptive: invariant to the rescalings of ReLU networks that leave the function
unchanged, Kwon et al., ICML 2021) or c = 1 (``adaptive=False``), and S ranging over the given
batches: m-sharpness with m the batch size (Foret et al., ICLR 2021, Sec. 4.1), each batch
getting its own worst-case or random perturbation. Batches are weighted by their sample count.
Only parameters with ``requires_grad`` are perturbed; a parameter that is 0 is not perturbed
(its adaptive radius is 0).

The inner maximum is found by projected gradient ascent in the rescaled coordinates
gamma = delta / c, where the constraint is a plain ball ||gamma||_p <= rho: from gamma = 0, steps
gamma <- P(gamma + eta * sign(c * g)) for p = inf, or P(gamma + eta * (c * g) / ||c * g||) for
p = 2, with g the gradient of L_S at w + c * gamma; eta starts at 2 rho (inf) or rho (2) and is
halved, back at the best point so far, whenever a step does not increase the loss (the
step-size rule of APGD, Croce & Hein, ICML 2020, simplified). The result is the best loss seen,
so it is a lower bound on the true maximum (the problem is non-concave). The loop makes no host
synchronization.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

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

__all__ = ["NORMS", "SharpnessEstimate", "adaptive_average_sharpness", "adaptive_sharpness"]

NORMS = ("linf", "l2")
"""The perturbation norms of :func:`adaptive_sharpness`: the ball ||delta / c||_p <= rho with
p = infinity ("linf", the paper's main measure) or p = 2 ("l2")."""


@dataclass
class SharpnessEstimate:
    """A sharpness measurement, from :func:`adaptive_sharpness` or
    :func:`adaptive_average_sharpness`.

    Attributes:
        sharpness: ``perturbed_loss - loss``, in units of the loss.
        loss: the sample-weighted mean loss over the batches at w.
        perturbed_loss: the same at the perturbed weights (worst case found, or mean over
            draws).
        stderr: the Monte Carlo standard error of the average sharpness; None for worst-case.
        rho: the radius, relative to |w| when ``adaptive``.
        norm: "linf" or "l2" (the Gaussian average is reported as "l2").
        adaptive: whether the radius scales with |w| (c = |w|) or not (c = 1).
    """

    sharpness: float
    loss: float
    perturbed_loss: float
    stderr: float | None
    rho: float
    norm: str
    adaptive: bool


def _scale(objective: Objective, adaptive: bool) -> torch.Tensor:
    w = objective.flat_params()
    return w.abs() if adaptive else torch.ones_like(w)


def _set_params(objective: Objective, flat: torch.Tensor) -> None:
    with torch.no_grad():
        torch._foreach_copy_(objective.params, objective.split(flat))


def _check(rho, norm: str, adaptive) -> float:
    rho = check_finite_number("rho", rho, positive=True)
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {', '.join(NORMS)}, got {norm!r}")
    if not isinstance(adaptive, bool):
        raise ValueError(f"adaptive must be True or False, got {adaptive!r}")
    return rho


def adaptive_sharpness(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Batches,
    *,
    rho: float,
    norm: str = "linf",
    adaptive: bool = True,
    steps: int = 20,
) -> SharpnessEstimate:
    """Adaptive worst-case m-sharpness S_max (Andriushchenko et al., ICML 2023, Eq. 1; see the
    module documentation), by projected gradient ascent. Deterministic (the ascent starts at
    gamma = 0); the result is a lower bound on the true maximum.

    Args:
        model: the network; its parameters with ``requires_grad`` are the analysed w, and its
            mode (train/eval) is used as found.
        loss_fn: ``loss_fn(model(x), y)``, the mean loss of a batch (e.g.
            ``torch.nn.functional.cross_entropy``).
        batches: a re-iterable of ``(x, y)`` (a list, a ``DataLoader``); the objective is the
            sample-weighted mean loss over all of them.
        rho: the radius, > 0 (relative to |w| when ``adaptive``; ``aace sharpness`` uses 0.001).
        norm: "linf" (the paper's main measure) or "l2".
        adaptive: c = |w| (True) or c = 1 (False).
        steps: gradient evaluations per batch (plus one forward pass).

    Returns:
        The sharpness with the losses at w and at the worst perturbation found.

    Raises:
        ValueError: ``model`` is not a module or has no trainable floating-point parameter,
            ``loss_fn`` is not callable or ``batches`` holds no sample, or ``rho``,
            ``norm``, ``adaptive`` or ``steps`` is out of range.
    """
    rho = _check(rho, norm, adaptive)
    check_positive_int("steps", steps)
    objective = Objective(model, loss_fn, batches)
    params = objective.params
    with preserved_state(model):
        w0 = objective.flat_params()
        c = _scale(objective, adaptive)
        base = torch.zeros((), dtype=torch.float64, device=objective.device)
        worst = torch.zeros_like(base)
        count = 0
        for x, y, n in objective.batches():
            gamma = torch.zeros_like(w0)
            best_gamma = gamma.clone()
            best_grad = torch.zeros_like(w0)
            best = torch.full((), -math.inf, dtype=torch.float64, device=objective.device)
            eta = torch.full((), 2 * rho if norm == "linf" else rho, device=objective.device)
            first = None
            for _ in range(steps):
                _set_params(objective, torch.addcmul(w0, c, gamma))
                loss = objective.loss(x, y)
                grad = objective.flatten(
                    torch.autograd.grad(loss, params, allow_unused=True, materialize_grads=True)
                )
                loss = loss.detach().double()
                if first is None:
                    first = loss
                improved = loss > best
                best = torch.where(improved, loss, best)
                best_gamma = torch.where(improved, gamma, best_gamma)
                best_grad = torch.where(improved, grad, best_grad)
                eta = torch.where(improved, eta, eta / 2)
                ascent = c * best_grad
                if norm == "linf":
                    gamma = (best_gamma + eta * ascent.sign()).clamp_(-rho, rho)
                else:
                    length = ascent.norm()
                    gamma = best_gamma + eta * ascent / length.clamp_min(1e-30)
                    gamma = gamma * (rho / gamma.norm().clamp_min(rho))  # project on the ball
            with torch.no_grad():
                _set_params(objective, torch.addcmul(w0, c, gamma))
                best = torch.maximum(best, objective.loss(x, y).double())
            base += first * n
            worst += best * n
            count += n
    loss, perturbed = float(base / count), float(worst / count)
    return SharpnessEstimate(perturbed - loss, loss, perturbed, None, rho, norm, adaptive)


def adaptive_average_sharpness(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Batches,
    *,
    rho: float,
    samples: int = 8,
    adaptive: bool = True,
    seed: int = 0,
) -> SharpnessEstimate:
    """Adaptive average m-sharpness S_avg (Andriushchenko et al., ICML 2023, Eq. 2; see the
    module documentation): ``samples`` Gaussian perturbations delta = rho * c * z,
    z ~ N(0, I), per batch.

    Args:
        model: the network; its parameters with ``requires_grad`` are the analysed w, and its
            mode (train/eval) is used as found.
        loss_fn: ``loss_fn(model(x), y)``, the mean loss of a batch (e.g.
            ``torch.nn.functional.cross_entropy``).
        batches: a re-iterable of ``(x, y)`` (a list, a ``DataLoader``); the objective is the
            sample-weighted mean loss over all of them.
        rho: the standard deviation of the perturbation, > 0 (relative to |w| when
            ``adaptive``; ``aace sharpness`` uses 0.1).
        samples: draws, >= 2; the standard error is over the draws of the whole-data average
            (each draw perturbs every batch independently).
        adaptive: c = |w| (True) or c = 1 (False).
        seed: fixes the draws (made on the CPU, so CPU and CUDA agree).

    Returns:
        The sharpness with its standard error and the losses at w and perturbed.

    Raises:
        ValueError: ``model`` is not a module or has no trainable floating-point parameter,
            ``loss_fn`` is not callable or ``batches`` holds no sample, or ``rho``,
            ``samples`` or ``adaptive`` is out of range.
    """
    rho = _check(rho, "l2", adaptive)
    check_positive_int("samples", samples, minimum=2)
    generator = cpu_generator(seed)
    objective = Objective(model, loss_fn, batches)
    with preserved_state(model), torch.no_grad():
        w0 = objective.flat_params()
        c = _scale(objective, adaptive)
        base = torch.zeros((), dtype=torch.float64, device=objective.device)
        increases = torch.zeros(samples, dtype=torch.float64, device=objective.device)
        count = 0
        for x, y, n in objective.batches():
            _set_params(objective, w0)
            loss = objective.loss(x, y).double()
            base += loss * n
            for s in range(samples):
                z = torch.randn(objective.numel, generator=generator, dtype=torch.float64)
                z = z.to(objective.device, objective.dtype)
                _set_params(objective, torch.addcmul(w0, c, z, value=rho))
                increases[s] += (objective.loss(x, y).double() - loss) * n
            count += n
    increases /= count
    sharpness = float(increases.mean())
    loss = float(base / count)
    stderr = float(increases.std()) / math.sqrt(samples)
    return SharpnessEstimate(sharpness, loss, loss + sharpness, stderr, rho, "l2", adaptive)
