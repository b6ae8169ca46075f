"""One training step for every optimizer of the CLI: sgd, sam, asam, sam-aace, sam-aace-normalized,
sam-bisam (SAM's "sam" rule ascending BiSAM's lower bound of the 0-1 loss, :func:`bisam_loss`).

A step returns 0-dim device tensors only (losses, correct count, SAM statistics), so the loop
never waits for the device; the trainer sums them and reads them once per epoch. The exceptions,
each one host sync per pass and each asked for by a flag: ``--nonfinite skip`` and ``--amp
fp16`` decide on the host whether to take the step.

The second pass of a SAM step runs under :func:`aace.batchnorm.frozen_running_stats`: every
buffer of the model (BatchNorm's, InstanceNorm's, any layer's running statistics) ends the step as
the first pass, at w, left it.

The same step serves one process and DDP, with gradient accumulation and mixed precision:

* **DDP.** The perturbation pass runs inside ``ddp.no_sync()`` with ``--perturbation-sync
  local`` (each replica perturbs with its own gradient: the m-sharpness setting of Foret et al.,
  ICLR 2021, Sec. 4.1), or with DDP's gradient all-reduce with ``global`` (every replica takes the
  perturbation of the global batch, as one process with the whole batch would). The update pass
  always all-reduces, so the replicas stay one model.
* **Accumulation.** The batch is split into ``accumulate`` micro-batches; each pass sums their
  gradients, the loss of micro-batch i weighted by n_i / n, which makes the sum the gradient of
  the mean loss over the whole batch. Under DDP only the last micro-batch of a synchronized pass
  all-reduces.
* **float16.** A ``GradScaler`` scales both passes' losses; the gradients are unscaled before
  ``first_step`` and before ``second_step`` (:func:`aace.amp.unscale_`), and the whole SAM step
  is skipped when either pass overflows.
* **Schedules** (``--sam-every``, ``--sam-start``, ``--sam-adaptive``; :mod:`aace.schedule`).
  A step that the schedule makes plain is an SGD step inside the SAM run: one pass with the
  update loss (running statistics updated as by SGD), then ``SAM.plain_step``. The adaptive
  rule observes the squared norm of the step's first-pass gradient at w, after unscaling and
  accumulation; under DDP it is max-reduced across ranks (the perturbation pass of
  ``--perturbation-sync local`` has one gradient per rank), so all ranks keep the same
  statistics and take the same kind of step.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from aace import amp
from aace.batchnorm import frozen_running_stats
from aace.losses import aace_loss, bisam_loss
from aace.sam import SAM
from aace.schedule import SAMSchedule, squared_grad_norm
from aace.training.config import RunConfig
from aace.training.distributed import max_across_ranks_

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class NonFiniteError(RuntimeError):
    """The loss or a gradient became NaN/inf; the message says at which epoch, step and pass."""


@dataclass
class StepStats:
    """Per-step values, all detached 0-dim tensors on the training device.

    A skipped step (``--nonfinite skip``, or an fp16 overflow) carries ``skipped_pass``, and
    under ``--amp fp16 --nonfinite stop`` also a false ``*_pass_finite`` when its loss was not
    finite, so that the epoch's check stops the run.
    """

    train_loss: torch.Tensor | None = None  # update loss (label-smoothed CE) at w
    ce_loss: torch.Tensor | None = None  # plain CE at the unperturbed weights
    aace_loss: torch.Tensor | None = None  # AACE ("ada") at the unperturbed weights
    correct: torch.Tensor | None = None
    clean_correct: torch.Tensor | None = None  # against the true labels of a label-noise run
    grad_norm: torch.Tensor | None = None  # of the perturbation loss
    perturbation_norm: torch.Tensor | None = None
    perturbation_cosine: torch.Tensor | None = None
    first_pass_finite: torch.Tensor | None = None  # bool: perturbation loss and gradient
    update_pass_finite: torch.Tensor | None = None  # bool: update loss
    skipped_pass: str | None = None  # "perturbation" or "update" when the step was skipped
    sam_step: bool = False  # the step was (or, if skipped, was to be) a SAM step


def autocast(device: torch.device, amp_mode: str) -> AbstractContextManager:
    """The forward-pass context of ``--amp``: autocast to bfloat16/float16, or nothing."""
    if amp_mode == "off":
        return nullcontext()
    return torch.autocast(device.type, dtype=AMP_DTYPES[amp_mode])


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

    Args:
        model: the module to train, or its DDP wrapper (compiled or not).
        optimizer: from :func:`build_optimizer`.
        config: the run's losses, ``amp``, ``accumulate``, ``perturbation_sync``, ``nonfinite``.
        device: the training device.
        ddp: the ``DistributedDataParallel`` wrapper when ``model`` is (a compiled) one; its
            ``no_sync`` keeps passes and micro-batches out of the gradient all-reduce, and
            skip decisions are agreed on by all ranks.
        schedule: which steps of a SAM run are SAM steps (:func:`build_schedule`); None: all.

    ``scaler`` is the ``GradScaler`` (enabled with ``amp="fp16"``), for checkpoints.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        config: RunConfig,
        device: torch.device,
        ddp: DistributedDataParallel | None = None,
        schedule: SAMSchedule | None = None,
    ) -> None:
        self.model = model
        self.optimizer = optimizer
        self.config = config
        self.ddp = ddp
        self.is_sam = isinstance(optimizer, SAM)
        self.schedule = schedule if self.is_sam else None
        self.uses_aace = config.info.perturbation_loss == "aace"
        self.uses_bisam = config.info.perturbation_loss == "bisam"
        self.skip_nonfinite = config.nonfinite == "skip"
        self.local_perturbation = config.perturbation_sync == "local"
        self.accumulate = config.accumulate
        self.scaler = torch.amp.GradScaler(device.type, enabled=config.amp == "fp16")
        self.fp16 = self.scaler.is_enabled()
        self.params = [p for p in model.parameters() if p.requires_grad]
        # Skipping a step must also undo what its forward pass did to running statistics.
        self.buffers = list(model.buffers()) if self.skip_nonfinite or self.fp16 else []
        self.saved_buffers = [b.clone() for b in self.buffers]
        self.autocast = autocast(device, config.amp)

    def update_loss(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits, y, label_smoothing=self.config.label_smoothing)

    def perturbation_loss(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.uses_aace:
            return aace_loss(logits, y, self.config.aace_threshold, self.config.aace_mode)
        if self.uses_bisam:
            return bisam_loss(logits, y)  # BiSAM (-log), mu = 1: see bisam_loss
        return self.update_loss(logits, y)

    def _stats(
        self, logits: torch.Tensor, y: torch.Tensor, clean_y: torch.Tensor | None
    ) -> StepStats:
        logits = logits.detach().float()
        predicted = logits.argmax(1)
        return StepStats(
            train_loss=self.update_loss(logits, y),
            ce_loss=F.cross_entropy(logits, y),
            aace_loss=aace_loss(logits, y, self.config.aace_threshold, "ada"),
            correct=(predicted == y).sum(),
            clean_correct=None if clean_y is None else (predicted == clean_y).sum(),
        )

    def _micro_batches(
        self, x: torch.Tensor, y: torch.Tensor
    ) -> list[tuple[torch.Tensor, torch.Tensor, float]]:
        """``(x_i, y_i, n_i / n)``: sum_i (n_i / n) mean_i(loss) is the mean over the batch."""
        if self.accumulate == 1:
            return [(x, y, 1.0)]
        n = y.shape[0]
        if n < self.accumulate:
            raise ValueError(
                f"a batch of {n} samples cannot be split into accumulate={self.accumulate} "
                "micro-batches; expected at least one sample per micro-batch"
            )
        return [
            (xs, ys, ys.shape[0] / n)
            for xs, ys in zip(x.tensor_split(self.accumulate), y.tensor_split(self.accumulate))
        ]

    def _sync_context(self, perturbation_pass: bool, last: bool) -> AbstractContextManager:
        """DDP all-reduces in the last micro-batch of a pass, never in a local perturbation."""
        if self.ddp is None or (last and not (perturbation_pass and self.local_perturbation)):
            return nullcontext()
        return self.ddp.no_sync()

    def _pass(
        self,
        micro_batches: list[tuple[torch.Tensor, torch.Tensor, float]],
        loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        perturbation_pass: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Forward and backward over the micro-batches; ``(logits, loss)`` of the whole batch,
        both detached."""
        logits_parts, loss_total = [], None
        for i, (x, y, weight) in enumerate(micro_batches):
            with self._sync_context(perturbation_pass, last=i == len(micro_batches) - 1):
                with self.autocast:
                    logits = self.model(x)
                    loss = loss_fn(logits, y)
                if weight != 1.0:
                    loss = loss * weight
                self.scaler.scale(loss).backward()
            loss_total = loss.detach() if loss_total is None else loss_total + loss.detach()
            logits_parts.append(logits.detach())
        logits = logits_parts[0] if len(logits_parts) == 1 else torch.cat(logits_parts)
        return logits, loss_total

    def _skip(self, loss: torch.Tensor, sam_pass: str) -> StepStats | None:
        """Decide whether the pass's gradients can be used; if not, undo the step's effects
        (perturbation, gradients, running statistics) and return the skipped step's stats.

        fp16: unscale first (the SAM step needs true gradients), then skip on overflow or a
        non-finite loss. ``--nonfinite skip``: skip on a non-finite loss or gradient.
        Otherwise: never skip, and no host sync. Under DDP the verdict is agreed on by all
        ranks (a local perturbation pass may overflow on one rank only).
        """
        loss_finite = torch.isfinite(loss)
        if self.fp16:
            found_inf = amp.unscale_(
                self.scaler, self.optimizer, loss, sam_pass=sam_pass if self.is_sam else None
            )
            if self.ddp is not None:
                max_across_ranks_(found_inf)  # the scaler's own record: same scale on all ranks
            skip, loss_bad = torch.stack([found_inf.bool(), ~loss_finite]).tolist()
            # A non-finite loss (not just a scaled gradient overflow) is divergence, which
            # --nonfinite stop reports at the end of the epoch.
            stop = bool(loss_bad) and not self.skip_nonfinite
        elif self.skip_nonfinite:
            bad = (~(loss_finite & grads_finite(self.params))).float()
            if self.ddp is not None:
                max_across_ranks_(bad)
            skip, stop = bool(bad.item()), False
        else:
            return None
        if not skip:
            return None
        if sam_pass == "update" and self.is_sam:
            self.optimizer.restore()
        self.optimizer.zero_grad(set_to_none=True)
        if self.buffers:
            torch._foreach_copy_(self.buffers, self.saved_buffers)
        self.scaler.update()  # after an overflow: backs off the scale
        stats = StepStats(skipped_pass=sam_pass)
        if stop:
            name = "first_pass_finite" if sam_pass == "perturbation" else "update_pass_finite"
            setattr(stats, name, loss_finite)
        return stats

    def _save_buffers(self) -> None:
        if self.buffers:
            torch._foreach_copy_(self.saved_buffers, self.buffers)

    def _observe(self) -> None:
        """The adaptive schedule's statistic: ||g||^2 of the pass just taken, equal on all
        ranks (one 0-dim all-reduce under DDP)."""
        if self.schedule is None or self.schedule.adaptive is None:
            return
        value = squared_grad_norm(self.params)
        if self.ddp is not None:
            max_across_ranks_(value)
        self.schedule.observe(value)

    def __call__(
        self, x: torch.Tensor, y: torch.Tensor, clean_y: torch.Tensor | None = None
    ) -> StepStats:
        """One optimizer step on the batch ``(x, y)``. ``clean_y``, the true labels of a
        label-noise run, only adds ``clean_correct`` to the statistics. Gradients left in
        ``.grad`` by the caller are cleared first: the first pass's gradient is this batch's."""
        self.optimizer.zero_grad(set_to_none=True)
        self._save_buffers()
        micro_batches = self._micro_batches(x, y)
        sam_step = self.is_sam and (self.schedule is None or self.schedule.sam_step())
        if not sam_step:
            logits, loss = self._pass(micro_batches, self.update_loss, perturbation_pass=False)
            skipped = self._skip(loss, "update")
            if skipped is not None:
                return skipped
            self._observe()
            if self.is_sam:
                self.optimizer.plain_step()
            else:
                self.optimizer.step()
            self.scaler.update()
            self.optimizer.zero_grad(set_to_none=True)
            stats = self._stats(logits, y, clean_y)
            stats.update_pass_finite = torch.isfinite(loss)
            return stats

        logits, loss = self._pass(micro_batches, self.perturbation_loss, perturbation_pass=True)
        skipped = self._skip(loss, "perturbation")
        if skipped is not None:
            skipped.sam_step = True
            return skipped
        self._observe()
        self.optimizer.first_step(zero_grad=True)
        with frozen_running_stats(self.model):
            _, adversarial_loss = self._pass(
                micro_batches, self.update_loss, perturbation_pass=False
            )
        skipped = self._skip(adversarial_loss, "update")
        if skipped is not None:
            skipped.sam_step = True
            return skipped
        self.optimizer.second_step(zero_grad=True)
        self.scaler.update()
        stats = self._stats(logits, y, clean_y)
        stats.sam_step = True
        stats.grad_norm = self.optimizer.grad_norm
        stats.perturbation_norm = self.optimizer.perturbation_norm
        stats.perturbation_cosine = self.optimizer.perturbation_cosine
        stats.first_pass_finite = torch.isfinite(loss) & torch.isfinite(stats.grad_norm)
        stats.update_pass_finite = torch.isfinite(adversarial_loss)
        return stats
