"""The Adaptive Adversarial Cross-Entropy (AACE) loss.

Ratchatorn & Tanaka, "Adaptive Adversarial Cross-Entropy Loss for Sharpness-Aware
Minimization", ICIP 2024 (arXiv:2406.14329).

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

__all__ = ["AACE_MODES", "REDUCTIONS", "AACELoss", "aace_loss"]

AACE_MODES = ("ada", "rand", "const")
REDUCTIONS = ("none", "mean", "sum")


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
