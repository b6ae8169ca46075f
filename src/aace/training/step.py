"""One training step for every optimizer of the CLI: sgd, sam, asam, sam-aace, sam-aace-normalized.

A step returns 0-dim device tensors only (losses, correct count, SAM statistics), so the loop
never waits for the device; the trainer sums them and reads them once per epoch.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from aace.batchnorm import frozen_batchnorm_stats
from aace.losses import aace_loss
from aace.sam import SAM
from aace.training.config import RunConfig

# CLI optimizer name -> (SAM perturbation rule, adaptive); sgd is absent.
SAM_RULES = {
    "sam": ("sam", False),
    "asam": ("sam", True),
    "sam-aace": ("aace", False),
    "sam-aace-normalized": ("aace-normalized", False),
}


def build_optimizer(model: nn.Module, config: RunConfig) -> torch.optim.Optimizer:
    """SGD, or SAM around SGD with the rule the optimizer name stands for."""
    sgd = dict(
        lr=config.lr,
        momentum=config.momentum,
        weight_decay=config.weight_decay,
        nesterov=config.nesterov,
    )
    if config.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), **sgd)
    rule, adaptive = SAM_RULES[config.optimizer]
    return SAM(
        model.parameters(),
        torch.optim.SGD,
        rho=config.resolved_rho,
        perturbation=rule,
        adaptive=adaptive,
        track_stats=True,
        **sgd,
    )


class NonFiniteError(RuntimeError):
    """The loss or a gradient became NaN/inf; the message says at which epoch, step and pass."""


@dataclass
class StepStats:
    """Per-step values, all detached 0-dim tensors on the training device.

    A skipped step (``--nonfinite skip``) carries only ``skipped_pass``.
    """

    train_loss: torch.Tensor | None = None  # update loss (label-smoothed CE) at w
    ce_loss: torch.Tensor | None = None  # plain CE at the unperturbed weights
    aace_loss: torch.Tensor | None = None  # AACE ("ada") at the unperturbed weights
    correct: torch.Tensor | None = None
    grad_norm: torch.Tensor | None = None  # of the perturbation loss
    perturbation_norm: torch.Tensor | None = None
    perturbation_cosine: torch.Tensor | None = None
    first_pass_finite: torch.Tensor | None = None  # bool: perturbation loss and gradient
    update_pass_finite: torch.Tensor | None = None  # bool: update loss
    skipped_pass: str | None = None  # "perturbation" or "update" when the step was skipped


def grads_finite(params: list[torch.Tensor]) -> torch.Tensor:
    """0-dim bool tensor: every gradient is finite (one fused norm per device and dtype)."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.ones((), dtype=torch.bool)
    device = grads[0].device
    norms = [n.to(device) for n in torch._foreach_norm(grads)]
    return torch.isfinite(torch.stack(norms)).all()


class TrainStep:
    """Callable ``step(x, y) -> StepStats``; owns the losses and the pass structure.

    ``first_pass_context`` wraps the perturbation pass (forward and backward); under DDP it is
    ``model.no_sync`` so that pass skips the gradient all-reduce.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        config: RunConfig,
        device: torch.device,
        first_pass_context: Callable[[], object] = nullcontext,
    ) -> None:
        self.model = model
        self.optimizer = optimizer
        self.config = config
        self.is_sam = isinstance(optimizer, SAM)
        self.uses_aace = config.optimizer in ("sam-aace", "sam-aace-normalized")
        self.first_pass_context = first_pass_context
        self.skip_nonfinite = config.nonfinite == "skip"
        self.params = [p for p in model.parameters() if p.requires_grad]
        # Skipping a step must also undo what its forward pass did to BatchNorm statistics.
        self.buffers = list(model.buffers()) if self.skip_nonfinite else []
        self.saved_buffers = [b.clone() for b in self.buffers]
        self.autocast = (
            torch.autocast(device.type, dtype=torch.bfloat16)
            if config.amp == "bf16"
            else nullcontext()
        )

    def update_loss(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits, y, label_smoothing=self.config.label_smoothing)

    def perturbation_loss(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.uses_aace:
            return aace_loss(logits, y, self.config.aace_threshold, self.config.aace_mode)
        return self.update_loss(logits, y)

    def _stats(self, logits: torch.Tensor, y: torch.Tensor) -> StepStats:
        logits = logits.detach().float()
        return StepStats(
            train_loss=self.update_loss(logits, y),
            ce_loss=F.cross_entropy(logits, y),
            aace_loss=aace_loss(logits, y, self.config.aace_threshold, "ada"),
            correct=(logits.argmax(1) == y).sum(),
        )

    def _finite_or_skip(self, loss: torch.Tensor) -> bool:
        """With ``--nonfinite skip``: whether loss and gradients are finite (a host sync, the
        price of deciding on the host); if not, the buffers are restored and the gradients
        dropped. Without it: always True, and no sync."""
        if not self.skip_nonfinite:
            return True
        if bool(torch.isfinite(loss.detach()) & grads_finite(self.params)):
            return True
        self.optimizer.zero_grad(set_to_none=True)
        if self.buffers:
            torch._foreach_copy_(self.buffers, self.saved_buffers)
        return False

    def _save_buffers(self) -> None:
        if self.buffers:
            torch._foreach_copy_(self.saved_buffers, self.buffers)

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> StepStats:
        self._save_buffers()
        if not self.is_sam:
            with self.autocast:
                logits = self.model(x)
                loss = self.update_loss(logits, y)
            loss.backward()
            if not self._finite_or_skip(loss):
                return StepStats(skipped_pass="update")
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            stats = self._stats(logits, y)
            stats.update_pass_finite = torch.isfinite(loss.detach())
            return stats

        with self.first_pass_context():
            with self.autocast:
                logits = self.model(x)
                loss = self.perturbation_loss(logits, y)
            loss.backward()
        if not self._finite_or_skip(loss):
            return StepStats(skipped_pass="perturbation")
        self.optimizer.first_step(zero_grad=True)
        with frozen_batchnorm_stats(self.model), self.autocast:
            adversarial_loss = self.update_loss(self.model(x), y)
        adversarial_loss.backward()
        if not self._finite_or_skip(adversarial_loss):
            self.optimizer.restore()
            return StepStats(skipped_pass="update")
        self.optimizer.second_step(zero_grad=True)
        stats = self._stats(logits, y)
        stats.grad_norm = self.optimizer.grad_norm
        stats.perturbation_norm = self.optimizer.perturbation_norm
        stats.perturbation_cosine = self.optimizer.perturbation_cosine
        stats.first_pass_finite = torch.isfinite(loss.detach()) & torch.isfinite(stats.grad_norm)
        stats.update_pass_finite = torch.isfinite(adversarial_loss.detach())
        return stats
