"""Keep BatchNorm running statistics out of SAM's second pass.

The second forward pass runs at the perturbed weights w + e. Its batch statistics describe a
model that is never evaluated, so they must not enter the running mean and variance used at
test time (the practice of the SAM reference code). In training mode a BatchNorm layer with
``track_running_stats=False`` normalizes with the batch statistics exactly as before but updates
neither the running statistics nor ``num_batches_tracked``; this context manager switches that
flag off for the duration of the block.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = ["frozen_batchnorm_stats"]


@contextmanager
def frozen_batchnorm_stats(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block, BatchNorm layers of ``model`` do not update their running statistics.

    Example::

        with frozen_batchnorm_stats(model):
            F.cross_entropy(model(x), y).backward()   # SAM's second pass
    """
    layers = [m for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]
    for layer in layers:
        layer.track_running_stats = False
    try:
        yield model
    finally:
        for layer in layers:
            layer.track_running_stats = True
