"""SAM and SAM+AACE under ``lightning.Trainer`` (``pip install 'aace[lightning]'``).

Lightning has no SAM of its own. Its automatic optimization runs one closure (training step,
backward) inside ``optimizer.step``, but a SAM step needs two different passes: the perturbation
loss (AACE) at w, then the update loss at w + e with BatchNorm statistics left alone. So the
module uses Lightning's *manual optimization*, and :func:`sam_step` does one SAM step from its
``training_step``::

    class Net(SAMModule):                      # or: L.LightningModule + sam_step(self, x, y)
        def __init__(self):
            super().__init__(perturbation_loss=aace_loss)
            self.net = ...

        def forward(self, x):
            return self.net(x)

        def configure_optimizers(self):
            opt = SAM(self.parameters(), torch.optim.SGD, rho=0.2, perturbation="aace",
                      lr=0.1, momentum=0.9, weight_decay=5e-4)
            return {"optimizer": opt, "lr_scheduler": CosineAnnealingLR(opt, T_max=200)}

What :func:`sam_step` does, in order:

1. the perturbation pass: ``perturbation_loss(module(x), y)`` and ``manual_backward``; under
   DDP with ``perturbation_sync="local"`` (default) inside the strategy's
   ``block_backward_sync()`` (DDP's ``no_sync``), so each process perturbs with its own
   gradient: the m-sharpness setting of Foret et al., ICLR 2021, as ``aace train`` does; with
   ``"global"`` the gradient is all-reduced first;
2. ``optimizer.step(closure)`` through Lightning's ``LightningOptimizer``, so that the precision
   plugin, the ``on_before_optimizer_step`` hooks and ``trainer.global_step`` see one step;
   :meth:`aace.sam.SAM.step` moves w to w + e, calls the closure (the update pass
   ``update_loss(module(x), y)`` inside :func:`~aace.batchnorm.frozen_running_stats`, and
   ``manual_backward``, all-reduced under DDP), restores w and steps the base optimizer.

Precision: ``"32-true"``, ``"64-true"``, ``"bf16-mixed"`` and ``"bf16-true"`` (autocast covers
both forward passes). ``"16-mixed"`` is refused: Lightning's GradScaler would step the optimizer
without the closure, and the perturbation needs unscaled gradients.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F

from aace.batchnorm import frozen_running_stats
from aace.integrations import require
from aace.losses import aace_loss
from aace.sam import SAM

pl = require("lightning.pytorch", "lightning", "aace.integrations.lightning", package="lightning")

__all__ = ["PERTURBATION_SYNCS", "SAMModule", "SAMStepOutput", "sam_step"]

PERTURBATION_SYNCS = ("local", "global")
"""The values of ``perturbation_sync``: each process perturbs with its own gradient ("local",
the m-sharpness setting of Foret et al., ICLR 2021) or with the all-reduced one ("global")."""
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class SAMStepOutput(NamedTuple):
    """What one SAM step computed, all detached.

    Attributes:
        logits: ``(N, C)``, of the perturbation pass, at the unperturbed weights w.
        perturbation_loss: 0-dim, the perturbation loss at w.
        update_loss: 0-dim, the loss at w + e whose gradient made the update.
    """

    logits: torch.Tensor  # of the perturbation pass, at the unperturbed weights w
    perturbation_loss: torch.Tensor  # at w
    update_loss: torch.Tensor  # at w + e: the loss whose gradient made the update


def _sam_optimizer(module: pl.LightningModule, optimizer: Any) -> tuple[Any, SAM]:
    """The ``LightningOptimizer`` to step and the :class:`SAM` inside it."""
    if module.automatic_optimization:
        raise ValueError(
            "sam_step needs manual optimization: set self.automatic_optimization = False in "
            "the LightningModule's __init__ (or derive from aace.integrations.lightning.SAMModule)"
        )
    if optimizer is None:
        optimizer = module.optimizers()
        if isinstance(optimizer, list):
            raise ValueError(
                f"configure_optimizers returned {len(optimizer)} optimizers; pass the SAM one "
                "as sam_step(..., optimizer=...)"
            )
    sam = getattr(optimizer, "optimizer", optimizer)
    if not isinstance(sam, SAM):
        raise ValueError(
            f"sam_step needs an aace.SAM optimizer from configure_optimizers, got "
            f"{type(sam).__name__}"
        )
    precision = module.trainer.precision_plugin
    if getattr(precision, "scaler", None) is not None:
        raise ValueError(
            f"precision={module.trainer.precision!r} (float16 with a GradScaler) is not "
            "supported with SAM under Lightning; use 'bf16-mixed', 'bf16-true' or '32-true'"
        )
    return optimizer, sam


def sam_step(
    module: pl.LightningModule,
    x: torch.Tensor,
    y: torch.Tensor,
    perturbation_loss: LossFn = aace_loss,
    update_loss: LossFn = F.cross_entropy,
    perturbation_sync: str = "local",
    optimizer: Any = None,
) -> SAMStepOutput:
    """One SAM step on the batch ``(x, y)``, from a manual-optimization ``training_step``.

    Args:
        module: the LightningModule (``automatic_optimization = False``); ``module(x)`` gives
            the logits, shape ``(N, C)``.
        x: the batch's inputs (first dimension N).
        y: the batch's targets, what both losses take as their second argument.
        perturbation_loss: the loss of the first pass: ``aace_loss`` for the ``"aace"`` rules,
            the update loss for ``"sam"``. Its gradient is what SAM's rule turns into e.
        update_loss: the loss at w + e whose gradient updates w (e.g. label-smoothed CE:
            ``functools.partial(F.cross_entropy, label_smoothing=0.1)``).
        perturbation_sync: under DDP, ``"local"`` (each process perturbs with its own gradient)
            or ``"global"`` (the perturbation gradient is all-reduced first).
        optimizer: the ``LightningOptimizer`` wrapping :class:`~aace.sam.SAM`; by default
            ``module.optimizers()``.

    Returns:
        The logits and both losses, detached.

    Raises:
        ValueError: ``perturbation_sync`` is unknown; the module uses automatic optimization;
            ``configure_optimizers`` returned several optimizers and none was passed, or the
            optimizer is not an ``aace.SAM``; the trainer's precision uses a float16
            ``GradScaler`` (use ``"bf16-mixed"``).
    """
    if perturbation_sync not in PERTURBATION_SYNCS:
        raise ValueError(
            f"perturbation_sync must be one of {', '.join(PERTURBATION_SYNCS)}, "
            f"got {perturbation_sync!r}"
        )
    optimizer, sam = _sam_optimizer(module, optimizer)
    sam.zero_grad(set_to_none=True)
    logits = module(x)
    first_loss = perturbation_loss(logits, y)
    # Under DDP, "local" keeps each process's own gradient (no all-reduce in this backward).
    block_sync = getattr(module.trainer.strategy, "block_backward_sync", None)
    local = block_sync is not None and perturbation_sync == "local"
    with block_sync() if local else nullcontext():
        module.manual_backward(first_loss)

    def update_pass() -> torch.Tensor:
        with frozen_running_stats(module):
            loss = update_loss(module(x), y)
        module.manual_backward(loss)
        return loss.detach()

    second_loss = optimizer.step(closure=update_pass)
    sam.zero_grad(set_to_none=True)
    return SAMStepOutput(logits.detach(), first_loss.detach(), second_loss)


def step_lr_schedulers(module: pl.LightningModule, interval: str) -> None:
    """Step the schedulers of ``configure_optimizers`` whose ``interval`` is ``"step"`` or
    ``"epoch"``, which manual optimization leaves to the module: a ``"step"`` scheduler after
    every ``frequency``-th optimizer step counted over the whole run (``trainer.global_step``),
    an ``"epoch"`` one after every ``frequency``-th epoch. Automatic optimization (Lightning 2.6)
    counts a ``"step"`` scheduler's ``frequency`` in batches within each epoch instead, starting
    again at every epoch; the two agree when ``frequency`` divides the steps per epoch. The global
    count is the one Lightning issue #17544 asks for."""
    trainer = module.trainer
    count = trainer.global_step if interval == "step" else trainer.current_epoch + 1
    for config in trainer.lr_scheduler_configs:
        if config.interval != interval or count % config.frequency:
            continue
        if config.reduce_on_plateau:
            raise ValueError(
                "ReduceLROnPlateau is not supported by SAMModule; step it yourself in "
                "on_train_epoch_end with the monitored value"
            )
        config.scheduler.step()


class SAMModule(pl.LightningModule):
    """A LightningModule that trains with SAM (+AACE): define ``forward`` (logits) and
    ``configure_optimizers`` (an :class:`~aace.sam.SAM`, and LR schedulers as usual).

    ``training_step`` takes ``(x, y)`` batches, runs :func:`sam_step`, logs ``train_loss`` (the
    update loss) and ``train_acc`` at the unperturbed weights, and steps the schedulers itself
    (``interval`` ``"step"`` or ``"epoch"``, ``frequency``): a ``"step"`` scheduler's
    ``frequency`` counts optimizer steps over the whole run, not within each epoch as Lightning's
    automatic optimization does (see :func:`step_lr_schedulers`).

    Args:
        perturbation_loss: see :func:`sam_step` (default AACE).
        update_loss: see :func:`sam_step` (default cross-entropy).
        perturbation_sync: ``"local"`` or ``"global"``, under DDP.
    """

    def __init__(
        self,
        perturbation_loss: LossFn = aace_loss,
        update_loss: LossFn = F.cross_entropy,
        perturbation_sync: str = "local",
    ) -> None:
        super().__init__()
        if perturbation_sync not in PERTURBATION_SYNCS:
            raise ValueError(
                f"perturbation_sync must be one of {', '.join(PERTURBATION_SYNCS)}, "
                f"got {perturbation_sync!r}"
            )
        self.automatic_optimization = False
        self.perturbation_loss = perturbation_loss
        self.update_loss = update_loss
        self.perturbation_sync = perturbation_sync

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        out = sam_step(self, x, y, self.perturbation_loss, self.update_loss, self.perturbation_sync)
        logits = out.logits.float()
        # At the unperturbed weights, as aace train's metrics.jsonl.
        loss, accuracy = self.update_loss(logits, y), (logits.argmax(1) == y).float().mean()
        self.log_dict({"train_loss": loss, "train_acc": accuracy}, prog_bar=True)
        step_lr_schedulers(self, "step")
        return loss

    def on_train_epoch_end(self) -> None:
        step_lr_schedulers(self, "epoch")
