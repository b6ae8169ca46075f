"""Perturbation losses for SAM's first pass: AACE (below) and BiSAM (:func:`bisam_loss`).

The Adaptive Adversarial Cross-Entropy (AACE) loss: Ratchatorn & Tanaka, "Adaptive Adversarial
Cross-Entropy Loss for Sharpness-Aware Minimization", ICIP 2024 (arXiv:2406.14329).

For logits z (N, C) and targets y, with q = softmax(z) (detached when the target is built)
and p_y = q_y, the adversarial target distribution t is

    t_y = min(p_y, threshold)
    t_j = a_j / sum_{k != y} a_k                      (j != y)

with a_j = q_j ("ada"), a_j = 1 - U(0, 1) ("rand") or a_j = 1 ("const"). The per-sample loss
is KL-style cross-entropy against t, with 0 * log 0 = 0 and no gradient through t:

    L = sum_j t_j (log t_j - log softmax(z)_j).

With threshold 0 and mode "ada" this is exactly -log(1 - p_y), whose logit gradient is
-(p_y / (1 - p_y)) times the cross-entropy gradient (q - onehot(y)): it grows as the model
becomes confident, which is what makes it a stable perturbation loss near convergence.

Everything is computed in log space, so the loss and its gradient stay finite for any finite
logits (for example logit margins of 1e4, where softmax-then-divide gives 0/0).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "AACE_MODES",
    "BISAM_BOUNDS",
    "REDUCTIONS",
    "AACELoss",
    "BiSAMLoss",
    "aace_loss",
    "bisam_loss",
]

AACE_MODES = ("ada", "rand", "const")
"""The ways :func:`aace_loss` spreads the adversarial target over the wrong classes (``mode``)."""
REDUCTIONS = ("none", "mean", "sum")
# BiSAM's lower bounds phi of the 0-1 step, and the temperature mu each uses when none is given
# (see bisam_loss for where these come from).
BISAM_BOUNDS = ("log", "tanh")
BISAM_DEFAULT_MU = {"log": 1.0, "tanh": 10.0}
# gamma = log(e - 1) makes the "log" bound 0 at a zero margin, as the step's lower bound must be.
_BISAM_GAMMA = math.log(math.e - 1.0)


def _check_options(threshold: float, mode: str, reduction: str) -> None:
    if not isinstance(threshold, (int, float)) or not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must be a number in [0, 1], got {threshold!r}")
    if mode not in AACE_MODES:
        raise ValueError(f"mode must be one of {', '.join(AACE_MODES)}; got {mode!r}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {', '.join(REDUCTIONS)}; got {reduction!r}")


def _check_inputs(logits: torch.Tensor, target: torch.Tensor) -> None:
    if not isinstance(logits, torch.Tensor) or not logits.is_floating_point():
        raise ValueError(
            f"logits must be a floating-point tensor, got {getattr(logits, 'dtype', type(logits))}"
        )
    if logits.dim() != 2 or logits.shape[1] < 2:
        raise ValueError(f"logits must have shape (N, C) with C >= 2, got {tuple(logits.shape)}")
    if not isinstance(target, torch.Tensor) or target.dtype not in (
        torch.int64,
        torch.int32,
        torch.int16,
        torch.int8,
        torch.uint8,
    ):
        raise ValueError(
            "target must be an integer tensor of class indices, got "
            f"{getattr(target, 'dtype', type(target))}"
        )
    if target.dim() != 1 or target.shape[0] != logits.shape[0]:
        raise ValueError(
            f"target must have shape (N,) = ({logits.shape[0]},) to match logits "
            f"{tuple(logits.shape)}, got {tuple(target.shape)}"
        )
    num_classes = logits.shape[1]
    if target.numel() == 0:
        return
    if target.device.type == "cpu":
        # On the CPU the check costs nothing, so the user gets a ValueError naming the value.
        low, high = int(target.min()), int(target.max())
        if low < 0 or high >= num_classes:
            bad = low if low < 0 else high
            raise ValueError(f"target values must be in [0, {num_classes - 1}], got {bad}")
    else:
        # On an accelerator a Python-side check would stall the device; assert asynchronously.
        torch._assert_async(
            ((target >= 0) & (target < num_classes)).all(),
            f"target values must be in [0, {num_classes - 1}]",
        )


def _adversarial_log_target(
    log_q: torch.Tensor,
    target: torch.Tensor,
    threshold: float,
    mode: str,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """log t for the adversarial target t (N, C); -inf where t_j = 0. No gradient."""
    onehot = F.one_hot(target.long(), log_q.shape[1]).bool()  # (N, C)
    if mode == "ada":
        log_a = log_q
    elif mode == "rand":
        # 1 - U(0, 1) lies in (0, 1], so its log is finite.
        u = torch.rand(log_q.shape, device=log_q.device, dtype=log_q.dtype, generator=generator)
        log_a = torch.log1p(-u)
    else:  # "const"
        log_a = torch.zeros_like(log_q)
    log_a = log_a.masked_fill(onehot, -math.inf)
    # t_j = a_j / sum_{k != y} a_k, in log space.
    log_t = log_a - torch.logsumexp(log_a, dim=1, keepdim=True)
    # t_y = min(p_y, threshold); log 0 = -inf for threshold 0.
    log_p_y = log_q.gather(1, target.long().unsqueeze(1))  # (N, 1)
    log_threshold = math.log(threshold) if threshold > 0 else -math.inf
    log_t_y = torch.clamp(log_p_y, max=log_threshold)
    return torch.where(onehot, log_t_y, log_t)


def aace_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    threshold: float = 0.0,
    mode: str = "ada",
    reduction: str = "mean",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Adaptive Adversarial Cross-Entropy (AACE), see the module docstring for the formula.

    Args:
        logits: (N, C) unnormalized scores. float16/bfloat16 inputs are computed in float32
            and the loss is returned in float32, as ``F.cross_entropy`` does under autocast.
        target: (N,) integer class indices in [0, C).
        threshold: upper bound of the target-class probability in the adversarial target,
            in [0, 1]. 0 (the default) gives -log(1 - p_y) in mode "ada".
        mode: how the non-target mass is spread: "ada" (proportional to the model's own
            probabilities), "rand" (random weights) or "const" (uniform).
        reduction: "none" (per-sample losses, shape (N,)), "mean" or "sum".
        generator: random generator for mode "rand".
    """
    _check_options(threshold, mode, reduction)
    _check_inputs(logits, target)
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    log_q = F.log_softmax(logits, dim=1)  # (N, C)
    with torch.no_grad():
        log_t = _adversarial_log_target(log_q.detach(), target, threshold, mode, generator)
        t = log_t.exp()
        present = t > 0
        log_t = torch.where(present, log_t, torch.zeros_like(log_t))
    # 0 * log 0 = 0: where t_j = 0 the term contributes nothing (and no gradient).
    terms = torch.where(present, t * (log_t - log_q), torch.zeros_like(log_q))
    per_sample = terms.sum(dim=1)  # (N,)
    if reduction == "mean":
        return per_sample.mean()
    if reduction == "sum":
        return per_sample.sum()
    return per_sample


class AACELoss(nn.Module):
    """``nn.Module`` form of :func:`aace_loss`, for use as a criterion."""

    def __init__(self, threshold: float = 0.0, mode: str = "ada", reduction: str = "mean") -> None:
        super().__init__()
        _check_options(threshold, mode, reduction)
        self.threshold = float(threshold)
        self.mode = mode
        self.reduction = reduction

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return aace_loss(logits, target, self.threshold, self.mode, self.reduction)

    def extra_repr(self) -> str:
        return f"threshold={self.threshold}, mode={self.mode!r}, reduction={self.reduction!r}"


def _check_bisam_options(bound: str, mu: float | None, alpha: float, reduction: str) -> None:
    def positive(x: object) -> bool:
        return (
            isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0
        )

    if bound not in BISAM_BOUNDS:
        raise ValueError(f"bound must be one of {', '.join(BISAM_BOUNDS)}; got {bound!r}")
    if mu is not None and not positive(mu):
        raise ValueError(f"mu must be a finite number > 0 (or None for the default), got {mu!r}")
    if not positive(alpha):
        raise ValueError(f"alpha must be a finite number > 0, got {alpha!r}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {', '.join(REDUCTIONS)}; got {reduction!r}")


def _bisam_phi(margin: torch.Tensor, bound: str, alpha: float) -> torch.Tensor:
    """phi(margin), elementwise: a smooth lower bound of the step 1[margin >= 0], phi(0) = 0."""
    if bound == "tanh":
        return torch.tanh(alpha * margin)
    # 1 - log(1 + exp(gamma - m)) = 1 - softplus(gamma - m). logaddexp is exact for every
    # finite argument, unlike F.softplus, which switches to the identity above its threshold.
    return 1.0 - torch.logaddexp(torch.zeros_like(margin), _BISAM_GAMMA - margin)


def bisam_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    bound: str = "log",
    mu: float | None = None,
    alpha: float = 0.1,
    reduction: str = "mean",
) -> torch.Tensor:
    """BiSAM's perturbation loss: a smooth lower bound of the 0-1 loss, to be *ascended*.

    Xie, Latorre, Antonakopoulos, Pethick & Cevher, "Improving SAM Requires Rethinking its
    Optimization Formulation", ICML 2024 (arXiv:2407.12993), Eq. (11); code
    https://github.com/LIONS-EPFL/BiSAM (``loss_fnc.py``; line numbers below are of commit
    be996e4).

    For logits z (N, C) and targets y, with the margins of every class over the true one
    d_j = z_j - z_y (so d_y = 0), the per-sample loss is

        Q = (1 / mu) log sum_{j=1}^{C} exp(mu phi(d_j))

    a soft maximum (temperature 1 / mu) over the classes of a lower bound phi of the step
    1[d_j >= 0], whose maximum over j != y is the sample's 0-1 loss. The sum includes
    j = y, where phi(0) = 0 contributes exp(0) = 1, as in the paper and in the code. The bounds:

        "log":  phi(d) = 1 - log(1 + exp(gamma - d)),  gamma = log(e - 1)   (BiSAM (-log))
        "tanh": phi(d) = tanh(alpha d)                                      (BiSAM (tanh))

    Both are increasing in d, so ascending Q (SAM's "sam" rule, e = +rho g / ||g||, with g the
    gradient of Q) moves the weights towards misclassifying the batch; that is BiSAM's
    perturbation (Algorithm 1, step 4). Q is dimensionless, in the units of phi (phi < 1,
    the 0-1 loss's value on a mistake): max_j phi(d_j) <= Q <= max_j phi(d_j) + log(C) / mu,
    so Q is the smooth maximum of the per-class lower bounds, within log(C) / mu of their max.

    Paper and code, and what is followed here:

    * The factor 1 / mu is the paper's (Eq. 11, and the repository's README); the code omits
      it (``loss_fnc.py`` lines 22 and 30). It rescales Q and its gradient by a positive
      constant, so the normalized SAM perturbation is the same either way; the paper's form is
      kept so that Q stays in phi's units for every mu.
    * ``bound="log"`` is the default: it is the code's default optimizer (``args.py`` line 4,
      ``--optim bisam_log``) and the one of the README's example command.
    * ``mu=None`` takes 1 for "log" (``loss_fnc.py`` line 26 and ``args.py`` line 20 agree)
      and 10 for "tanh" (the default of ``perturbation_loss_tanh``, ``loss_fnc.py`` line 18).
      The code disagrees with itself for "tanh": ``train.py`` line 49 passes ``args.mu``,
      whose default is 1.0 (``args.py`` line 20), so their script runs tanh with mu = 1
      unless ``--mu`` is given. Pass ``mu=1.0`` to reproduce that.
    * ``alpha=0.1`` for "tanh": ``loss_fnc.py`` line 18 and ``args.py`` line 21 agree. The
      "log" bound has no such parameter; alpha is then unused.

    Everything is computed with logsumexp and logaddexp (never exp then log), so the loss and
    its gradient are finite for any finite logits, in float32 as in float64 (e.g. logit
    margins of 1e4, where exp overflows even in float64).

    Args:
        logits: (N, C) unnormalized scores, C >= 2. float16/bfloat16 inputs are computed in
            float32 and the loss is returned in float32, as ``F.cross_entropy`` does under
            autocast.
        target: (N,) integer (int64 or narrower) class indices in [0, C).
        bound: the lower bound phi, "log" or "tanh" (see above).
        mu: the log-sum-exp's inverse temperature, a finite number > 0; None for the bound's
            default (1 for "log", 10 for "tanh").
        alpha: the slope of the "tanh" bound, a finite number > 0 (unused by "log").
        reduction: "none" (per-sample losses, shape (N,)), "mean" or "sum".

    Raises:
        ValueError: an option outside the values above (the message names it, the value given
            and what is allowed), logits that are not a floating-point (N, C) tensor with
            C >= 2, or a target that is not an (N,) integer tensor with values in [0, C)
            (on accelerators the range is checked asynchronously instead).
    """
    _check_bisam_options(bound, mu, alpha, reduction)
    _check_inputs(logits, target)
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    mu = BISAM_DEFAULT_MU[bound] if mu is None else float(mu)
    margins = logits - logits.gather(1, target.long().unsqueeze(1))  # (N, C), 0 at y
    per_sample = torch.logsumexp(mu * _bisam_phi(margins, bound, alpha), dim=1) / mu  # (N,)
    if reduction == "mean":
        return per_sample.mean()
    if reduction == "sum":
        return per_sample.sum()
    return per_sample


class BiSAMLoss(nn.Module):
    """``nn.Module`` form of :func:`bisam_loss`, for use as a criterion."""

    def __init__(
        self,
        bound: str = "log",
        mu: float | None = None,
        alpha: float = 0.1,
        reduction: str = "mean",
    ) -> None:
        super().__init__()
        _check_bisam_options(bound, mu, alpha, reduction)
        self.bound = bound
        self.mu = BISAM_DEFAULT_MU[bound] if mu is None else float(mu)
        self.alpha = float(alpha)
        self.reduction = reduction

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return bisam_loss(logits, target, self.bound, self.mu, self.alpha, self.reduction)

    def extra_repr(self) -> str:
        return (
            f"bound={self.bound!r}, mu={self.mu}, alpha={self.alpha}, reduction={self.reduction!r}"
        )
