"""Keep running statistics, of BatchNorm or of any other layer, out of SAM's second pass.

The second forward pass runs at the perturbed weights w + e. Its batch statistics describe a
model that is never evaluated, so they must not enter the running statistics used at test time
(the practice of the SAM reference code; MLCommons AlgoPerf fixed the same bug, PR #325). Not
only BatchNorm keeps such statistics: ``nn.InstanceNorm2d(track_running_stats=True)``, timm's
``EvoNorm2dB*`` and a user's own layer update buffers in their forward pass too.
:func:`frozen_running_stats` leaves every buffer of the model as it was when the block began,
whatever module holds it, without a list of classes:

* **BatchNorm** (every ``torch.nn.modules.batchnorm._BatchNorm`` in training mode with
  ``track_running_stats``: ``BatchNorm1d/2d/3d``, ``SyncBatchNorm``, timm's ``BatchNormAct2d``):
  the flag is switched off for the block. In training mode such a layer then normalizes with the
  batch statistics exactly as before but updates neither its running statistics nor
  ``num_batches_tracked``: no copy at all.
* **Every other buffer** is watched through its version counter (``Tensor._version``, which every
  in-place write increments, also the writes of a ``torch.compile``'d graph) and its identity (a
  layer may assign a new tensor instead of writing in place). A buffer is copied on entry only
  if it may change in the block: one that changed since the model's previous block ended (so the
  forward pass at w, or something else, writes it), one that a previous block changed, and, on
  the first block of a model, every buffer (nothing is known yet). On exit, a buffer that changed
  is put back: its tensor re-bound if it was replaced, its saved value copied back if it was
  written in place. A buffer that nothing writes (a fixed mask, a positional table) is copied
  once, on the first block, and never again; a model whose only statistics are BatchNorm's costs
  no copy per step.

One case cannot be undone: a buffer written in place by the block although the forward pass
before it left it alone and no earlier block wrote it (a layer that updates its statistics only
on some calls). Its value before the block was not saved, so the block raises ``RuntimeError``
naming it; from then on that buffer is saved on every block.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = ["frozen_batchnorm_stats", "frozen_running_stats"]


@dataclass
class _History:
    """What the previous blocks of one model learned about its buffers, by qualified name:
    the tensor and its version when the last block ended, and which buffers a block changed."""

    seen: dict[str, tuple[weakref.ref, int]] = field(default_factory=dict)
    written: set[str] = field(default_factory=set)


# One history per model, dropped with the model.
_HISTORIES: weakref.WeakKeyDictionary[nn.Module, _History] = weakref.WeakKeyDictionary()


@dataclass
class _Watched:
    module: nn.Module
    name: str
    key: str
    tensor: torch.Tensor
    version: int
    saved: torch.Tensor | None  # a copy of the value on entry, or None if not expected to change


@contextmanager
def frozen_running_stats(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block, nothing that ``model``'s forward pass does changes its buffers: on exit
    every buffer (BatchNorm's running mean, variance and count, any other layer's statistics)
    holds the value it had on entry. See the module documentation for how, and what it costs.

    Example::

        aace_loss(model(x), y).backward()           # at w: running statistics updated
        opt.first_step(zero_grad=True)
        with frozen_running_stats(model):
            F.cross_entropy(model(x), y).backward()   # at w + e: statistics left alone
        opt.second_step(zero_grad=True)

    Raises:
        RuntimeError: on exit, a buffer was written in place that could not be saved on entry
            (see the module documentation); the message names it.
    """
    history = _HISTORIES.get(model)
    if history is None:
        history = _HISTORIES[model] = _History()
    frozen: list[_BatchNorm] = []
    watched: list[_Watched] = []
    seen_ids: set[int] = set()
    for module_name, module in model.named_modules():
        if isinstance(module, _BatchNorm) and module.training and module.track_running_stats:
            module.track_running_stats = False
            frozen.append(module)
            continue
        for name, tensor in module._buffers.items():
            # A buffer shared by two modules is watched once; an inference tensor has no
            # version counter and cannot be written in place outside inference mode.
            if tensor is None or id(tensor) in seen_ids or tensor.is_inference():
                continue
            seen_ids.add(id(tensor))
            key = f"{module_name}.{name}" if module_name else name
            previous = history.seen.get(key)
            unchanged = (
                previous is not None
                and previous[0]() is tensor
                and previous[1] == tensor._version
                and key not in history.written
            )
            saved = None if unchanged else tensor.detach().clone()
            watched.append(_Watched(module, name, key, tensor, tensor._version, saved))
    try:
        yield model
    finally:
        for module in frozen:
            module.track_running_stats = True
        lost = _restore(watched, history)
    if lost:
        raise RuntimeError(
            f"frozen_running_stats: buffer(s) {', '.join(lost)} were written in place inside "
            "the block although no forward pass since the previous block had changed them, so "
            "their values on entry were not saved and cannot be restored; from now on they are "
            "saved on every block"
        )


def _restore(watched: list[_Watched], history: _History) -> list[str]:
    """Put back every watched buffer that changed; returns the names of those that could not
    be (written in place, not saved). Records the versions for the next block."""
    lost = []
    with torch.no_grad():
        for w in watched:
            replaced = w.module._buffers.get(w.name) is not w.tensor
            if replaced:
                w.module._buffers[w.name] = w.tensor
            written = w.tensor._version != w.version
            if written:
                if w.saved is None:
                    lost.append(w.key)
                else:
                    w.tensor.copy_(w.saved)
            if replaced or written:
                history.written.add(w.key)
            history.seen[w.key] = (weakref.ref(w.tensor), w.tensor._version)
    return lost


frozen_batchnorm_stats = frozen_running_stats
"""The former name of :func:`frozen_running_stats`, which it is: BatchNorm's statistics and
every other buffer are kept."""
