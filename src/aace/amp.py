"""float16 mixed precision with SAM: one ``GradScaler`` across both passes of a step.

``torch.amp.GradScaler`` assumes one backward per optimizer step: ``unscale_`` may run once per
optimizer between two ``update()`` calls, and ``scaler.step(opt)`` calls ``opt.step()``, which
for :class:`~aace.sam.SAM` needs a closure. A SAM step has two backward passes, and the
perturbation must be computed from the *unscaled* first gradient. :func:`unscale_` unscales the
gradients of one pass and reports overflow, keeping the scaler's bookkeeping right:

* the perturbation pass is recorded under ``optimizer.base_optimizer`` and the update pass under
  ``optimizer`` itself. Both share the same ``param_groups`` (hence the same ``.grad`` tensors),
  so each pass is unscaled exactly once, and ``scaler.update()`` at the end of the step sees both
  records: it backs off when either pass overflowed and counts one growth step per SAM step;
* a non-finite ``loss`` counts as an overflow too;
* the returned tensor *is* the scaler's record, so reducing it in place across processes
  (``all_reduce`` with ``MAX``) makes every rank skip the same steps and keep the same scale.

Recipe (a step is skipped as a whole when either pass overflows; ``restore()`` undoes the
perturbation without updating)::

    scaler = torch.amp.GradScaler("cuda")
    with torch.autocast("cuda", dtype=torch.float16):
        loss = aace_loss(model(x), y)
    scaler.scale(loss).backward()
    if unscale_(scaler, opt, loss, sam_pass="perturbation").item():  # host sync
        opt.zero_grad(set_to_none=True); scaler.update(); continue
    opt.first_step(zero_grad=True)                   # e from the unscaled gradient
    with frozen_running_stats(model), torch.autocast("cuda", dtype=torch.float16):
        loss = F.cross_entropy(model(x), y)
    scaler.scale(loss).backward()
    if unscale_(scaler, opt, loss, sam_pass="update").item():
        opt.restore(); opt.zero_grad(set_to_none=True); scaler.update(); continue
    opt.second_step(zero_grad=True)
    scaler.update()

Reading the verdict (``.item()``) is a host synchronization, one per pass: the price of deciding
on the host whether to take ``first_step``, which ``scaler.step`` pays too.

**Misuse is caught before the weights move.** ``scaler.unscale_(opt)`` on the SAM optimizer in the
perturbation pass, next to this function, would divide the gradients by the scale twice and
perturb with them. Before or after :func:`unscale_` of that pass, ``unscale_`` (before) or
``first_step`` (after) raises, with the weights still at w. ``scaler.unscale_(opt)`` alone in the
perturbation pass (a correct perturbation, but the update pass's record is then taken) is found by
the update pass's :func:`unscale_`, which puts the weights back at w (``opt.restore()``) before
raising.
"""

from __future__ import annotations

import torch
from torch.amp.grad_scaler import OptState

from aace.sam import SAM

__all__ = ["SAM_PASSES", "unscale_"]

SAM_PASSES = ("perturbation", "update")
"""The values of :func:`unscale_`'s ``sam_pass``: the pass before ``first_step`` and the pass
before ``second_step``."""


def unscale_(
    scaler: torch.amp.GradScaler,
    optimizer: torch.optim.Optimizer,
    loss: torch.Tensor | None = None,
    *,
    sam_pass: str | None = None,
) -> torch.Tensor:
    """``scaler.unscale_`` for one backward pass; returns the overflow verdict.

    Args:
        scaler: an enabled ``torch.amp.GradScaler``.
        optimizer: the optimizer whose gradients were produced by ``scaler.scale(loss).backward()``.
        loss: the (unscaled) loss of the pass; if given, a non-finite loss counts as overflow.
        sam_pass: for a :class:`~aace.sam.SAM` optimizer, which pass the gradients belong to,
            "perturbation" (before ``first_step``) or "update" (before ``second_step``).

    Returns:
        The scaler's own found-inf record for this pass: a 1-element float32 tensor on the
        gradients' device, nonzero when a gradient or the loss is inf/NaN. In-place changes to
        it (an ``all_reduce`` with ``MAX`` across ranks) are what ``scaler.update()`` will see.

    Raises:
        ValueError: ``scaler`` is not an enabled ``GradScaler``; ``sam_pass`` is missing or
            unknown for a SAM optimizer, or given for another optimizer; the gradients lie on
            more than one device; ``scaler.unscale_(optimizer)`` was already called on the SAM
            optimizer in this step (see the module documentation: the update pass then restores
            the weights to w before raising).
    """
    if not isinstance(scaler, torch.amp.GradScaler) or not scaler.is_enabled():
        raise ValueError(f"scaler must be an enabled torch.amp.GradScaler, got {scaler!r}")
    if isinstance(optimizer, SAM):
        if sam_pass not in SAM_PASSES:
            raise ValueError(
                f"sam_pass must be one of {', '.join(SAM_PASSES)} for a SAM optimizer, "
                f"got {sam_pass!r}"
            )
        if _unscaled(scaler, optimizer):
            if sam_pass == "update":
                optimizer.restore()  # never leave the model at w + e
            raise ValueError(
                f"unscale_(sam_pass={sam_pass!r}): scaler.unscale_() was already called on this "
                "SAM optimizer since the last scaler.update(); a SAM step unscales each pass "
                "once, with aace.amp.unscale_ alone (sam_pass='perturbation' before first_step, "
                "'update' before second_step), never with scaler.unscale_(optimizer) as well"
                + ("; the weights were put back at w" if sam_pass == "update" else "")
            )
        key: torch.optim.Optimizer = (
            optimizer.base_optimizer if sam_pass == "perturbation" else optimizer
        )
    elif sam_pass is not None:
        raise ValueError(f"sam_pass applies to SAM optimizers only, got {sam_pass!r}")
    else:
        key = optimizer
    scaler.unscale_(key)
    # GradScaler keeps one record per device of the gradients; torch has no public accessor.
    records = list(scaler._found_inf_per_device(key).values())
    if len(records) != 1:
        devices = sorted({str(r.device) for r in records}) or ["none: no gradients"]
        raise ValueError(
            f"unscale_ supports gradients on exactly one device, got {', '.join(devices)}"
        )
    found_inf = records[0]
    if loss is not None:
        found_inf.add_((~torch.isfinite(loss.detach())).to(found_inf))
    if sam_pass == "perturbation":
        # A scaler.unscale_(optimizer) between here and first_step divides the gradients a second
        # time; first_step runs this check before moving the weights.
        optimizer._before_first_step = lambda: _refuse_unscaled_twice(scaler, optimizer)
    return found_inf


def _unscaled(scaler: torch.amp.GradScaler, optimizer: torch.optim.Optimizer) -> bool:
    """``scaler.unscale_(optimizer)`` ran since the last ``update()`` (torch has no public
    accessor for the scaler's per-optimizer stage)."""
    state = scaler._per_optimizer_states.get(id(optimizer))
    return state is not None and state["stage"] is OptState.UNSCALED


def _refuse_unscaled_twice(scaler: torch.amp.GradScaler, optimizer: SAM) -> None:
    if _unscaled(scaler, optimizer):
        raise ValueError(
            "SAM.first_step: the perturbation pass's gradients were unscaled twice, by "
            "aace.amp.unscale_(..., sam_pass='perturbation') and by scaler.unscale_(optimizer); "
            "call only aace.amp.unscale_ in each pass. The weights were not moved (still at w)"
        )
