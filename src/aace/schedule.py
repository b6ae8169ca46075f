"""Which steps are SAM steps: every k-th, from some step on, or when the gradient is large.

A SAM step costs two forward-backward passes; a plain step (one forward-backward with the update
loss and the base optimizer's step, :meth:`aace.SAM.plain_step`) costs one. Three published ways
to keep most of SAM's gain for a fraction of the extra passes, for any perturbation rule:

* ``every=k``: a SAM step at steps 0, k, 2k, ... (Composer's SAM ``interval``).
* ``start_step=s``: plain steps before step s, SAM steps from s on (Zhou et al., ICLR 2025:
  switching from SGD to SAM for the last part of training reaches SAM's flatness and accuracy).
  ``every`` and ``start_step`` combine: steps s, s + k, s + 2k, ...
* ``adaptive=c``: a SAM step when the squared gradient norm is large compared with its recent
  values (AE-SAM, Jiang et al., ICLR 2023).

The adaptive rule, with ``s_t = ||g_t||^2`` and exponential moving averages of decay ``d``
(AE-SAM's 0.9):

    mu_t    = d mu_{t-1}    + (1 - d) s_t
    var_t   = d var_{t-1}   + (1 - d) (s_t - mu_t)^2
    step t + 1 is a SAM step  iff  s_t >= mu_t + c sqrt(var_t)

Two differences from AE-SAM, both so that a plain step costs one pass for every rule. (1) The
decision for step t + 1 is taken from the gradient of step t: AE-SAM decides from the current
step's gradient at w, which a SAM+AACE step computes for the AACE loss and a plain step for the
update loss, so deciding first would need a third pass. (2) For the same reason, ``g_t`` is the
gradient at w of the step's first pass, whose loss depends on the kind of step; ``mu`` and
``var`` are kept separately for plain steps and SAM steps, so each ``s_t`` is compared with
values of the same quantity. The first observation of a kind sets its mean (variance 0), and
step 0 is a SAM step.

Cost. The step-count rules are host arithmetic on a step counter: no device work, no
synchronization. The adaptive rule costs, per step, one fused norm over the gradients
(:func:`squared_grad_norm`, a read of gradient memory), a few 0-dim operations, and one host
synchronization: :meth:`SAMSchedule.sam_step` reads the decision to choose the Python branch, so
on a GPU the host waits for the previous step to finish before queueing the next one.

Usage in a training loop (an ``aace.SAM`` optimizer ``opt``):

    schedule = SAMSchedule(every=2)          # or start_step=..., or adaptive=0.0
    for x, y in loader:
        if schedule.sam_step():
            aace_loss(model(x), y).backward()
            schedule.observe(squared_grad_norm(model.parameters()))   # adaptive rule only
            opt.first_step(zero_grad=True)
            with frozen_running_stats(model):
                F.cross_entropy(model(x), y).backward()
            opt.second_step(zero_grad=True)
        else:
            F.cross_entropy(model(x), y).backward()
            schedule.observe(squared_grad_norm(model.parameters()))   # adaptive rule only
            opt.plain_step(zero_grad=True)

``state_dict()`` holds the step counter and the adaptive rule's running statistics and pending
decision, so a resumed run takes the same kinds of steps. Under DDP every rank must observe the
same value (e.g. the squared norm of the all-reduced gradient, or a value max-reduced across
ranks); then every rank takes the same kind of step.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch

__all__ = ["SAMSchedule", "squared_grad_norm"]

PLAIN, SAM_KIND = 0, 1


def squared_grad_norm(params: Iterable[torch.Tensor]) -> torch.Tensor:
    """``sum_p ||p.grad||^2`` over the parameters with a gradient: the statistic
    :meth:`SAMSchedule.observe` takes for the adaptive rule.

    Args:
        params: parameters (e.g. ``model.parameters()``); those without ``.grad`` are skipped.

    Returns:
        A 0-dim float32 tensor on the first gradient's device (one fused norm per device and
        dtype, no host synchronization).

    Raises:
        ValueError: no parameter has a gradient.
    """
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        raise ValueError("squared_grad_norm: no parameter has a gradient; call backward() first")
    device = grads[0].device
    by_key: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
    for g in grads:
        by_key.setdefault((g.device, g.dtype), []).append(g.detach())
    norms = [n.float().to(device) for group in by_key.values() for n in torch._foreach_norm(group)]
    return torch.stack(norms).square().sum()


def _check_int(name: str, value: Any, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


class SAMSchedule:
    """Answers "SAM step or plain step?" for each step of a training loop.

    Args:
        every: a SAM step every ``every``-th step (1: every step).
        start_step: plain steps before this step index, SAM steps (every ``every``-th) from it
            on. For a fraction F of T steps use ``start_step=math.ceil(F * T)``.
        adaptive: AE-SAM's threshold c (in standard deviations; may be negative), or None for
            the step-count rules. Cannot be combined with ``every`` or ``start_step``.
        decay: the decay d of the adaptive rule's moving averages, in [0, 1).

    Call :meth:`sam_step` once per step (it advances the counter) and, with the adaptive rule,
    :meth:`observe` once per step that was not skipped, after the first backward pass.

    Raises:
        ValueError: ``every`` < 1, ``start_step`` < 0, ``adaptive`` not finite or combined with
            ``every``/``start_step``, or ``decay`` outside [0, 1).
    """

    def __init__(
        self,
        every: int = 1,
        start_step: int = 0,
        adaptive: float | None = None,
        decay: float = 0.9,
    ) -> None:
        _check_int("every", every, 1)
        _check_int("start_step", start_step, 0)
        if adaptive is not None:
            if not isinstance(adaptive, (int, float)) or isinstance(adaptive, bool):
                raise ValueError(f"adaptive must be a finite number or None, got {adaptive!r}")
            if not math.isfinite(adaptive):
                raise ValueError(f"adaptive must be a finite number or None, got {adaptive!r}")
            if every != 1 or start_step != 0:
                raise ValueError(
                    f"adaptive={adaptive!r} cannot be combined with every={every!r} or "
                    f"start_step={start_step!r}; expected every=1 and start_step=0"
                )
        if not isinstance(decay, (int, float)) or not 0.0 <= decay < 1.0:
            raise ValueError(f"decay must be a number in [0, 1), got {decay!r}")
        self.every = every
        self.start_step = start_step
        self.adaptive = adaptive
        self.decay = float(decay)
        self.steps = 0  # steps decided so far
        self.sam_steps = 0  # of which SAM steps
        self._last_kind: int | None = None  # kind of the step being taken, for observe()
        self._counts = [0, 0]  # observations per kind (PLAIN, SAM_KIND)
        self._mean: torch.Tensor | None = None  # (2,) float32, per kind
        self._var: torch.Tensor | None = None  # (2,) float32, per kind
        self._next_sam: torch.Tensor | None = None  # 0-dim bool: the next step's kind

    def __repr__(self) -> str:
        if self.adaptive is not None:
            return f"SAMSchedule(adaptive={self.adaptive!r}, decay={self.decay!r})"
        return f"SAMSchedule(every={self.every!r}, start_step={self.start_step!r})"

    def is_sam_step(self, step: int) -> bool:
        """The step-count rules' answer for step index ``step`` (not for the adaptive rule)."""
        if self.adaptive is not None:
            raise ValueError("is_sam_step(step) answers the step-count rules only")
        return step >= self.start_step and (step - self.start_step) % self.every == 0

    def sam_step(self) -> bool:
        """Whether the current step is a SAM step; advances to the next step. With the adaptive
        rule this reads a device value (one host synchronization)."""
        if self.adaptive is None:
            sam = self.is_sam_step(self.steps)
        else:
            sam = True if self._next_sam is None else bool(self._next_sam)
        self._last_kind = SAM_KIND if sam else PLAIN
        self.steps += 1
        self.sam_steps += int(sam)
        return sam

    @torch.no_grad()
    def observe(self, squared_norm: torch.Tensor) -> None:
        """Feed the adaptive rule the squared gradient norm of the step just decided by
        :meth:`sam_step` (the gradient at w of its first pass). A no-op for the step-count
        rules. A non-finite value leaves the statistics as they were and makes the next step a
        SAM step. No host synchronization."""
        if self.adaptive is None:
            return
        if self._last_kind is None:
            raise RuntimeError("observe() must follow sam_step(), once per step")
        kind, self._last_kind = self._last_kind, None
        s = squared_norm.detach().reshape(()).float()
        if self._mean is None or self._var is None:
            self._mean = torch.zeros(2, device=s.device)
            self._var = torch.zeros(2, device=s.device)
        mean, var = self._mean.to(s.device), self._var.to(s.device)
        if self._counts[kind] == 0:
            new_mean, new_var = s, torch.zeros_like(s)
        else:
            d = self.decay
            new_mean = d * mean[kind] + (1 - d) * s
            new_var = d * var[kind] + (1 - d) * (s - new_mean) ** 2
        finite = torch.isfinite(s)
        mean[kind] = torch.where(finite, new_mean, mean[kind])
        var[kind] = torch.where(finite, new_var, var[kind])
        self._mean, self._var = mean, var
        self._next_sam = ~finite | (s >= mean[kind] + self.adaptive * var[kind].sqrt())
        self._counts[kind] += 1

    # -- state -------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Step counters and the adaptive rule's statistics (tensors and ints only, so that
        ``torch.load(weights_only=True)`` reads it)."""
        return {
            "steps": self.steps,
            "sam_steps": self.sam_steps,
            "counts": list(self._counts),
            "mean": None if self._mean is None else self._mean.detach().clone(),
            "var": None if self._var is None else self._var.detach().clone(),
            "next_sam": None if self._next_sam is None else self._next_sam.detach().clone(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        missing = {"steps", "sam_steps", "counts", "mean", "var", "next_sam"} - set(state)
        if missing:
            raise ValueError(f"SAMSchedule state is missing {sorted(missing)}")
        self.steps = int(state["steps"])
        self.sam_steps = int(state["sam_steps"])
        self._counts = [int(c) for c in state["counts"]]
        self._mean, self._var, self._next_sam = state["mean"], state["var"], state["next_sam"]
        self._last_kind = None
