"""The objective every analysis measures: the sample-weighted mean loss over a set of batches.

    L(w) = (1 / N) * sum_b n_b * loss_fn(model(x_b), y_b),    N = sum_b n_b,

where ``loss_fn`` returns the mean over its batch and n_b is the batch's first dimension, so the
result does not depend on how the samples are split into batches (unless the model itself does,
e.g. BatchNorm in train mode). The parameters w are those with ``requires_grad``.

Private helpers shared by :mod:`~aace.analysis.hessian`, :mod:`~aace.analysis.sharpness` and
:mod:`~aace.analysis.landscape`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import nn

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Batches = Iterable[tuple[Any, Any]]


def check_positive_int(name: str, value: Any, minimum: int = 1) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def check_finite_number(name: str, value: Any, *, positive: bool = False) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not ok or value != value or value in (float("inf"), float("-inf")):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if positive and value <= 0:
        raise ValueError(f"{name} must be > 0, got {value!r}")
    return float(value)


def cpu_generator(seed: Any) -> torch.Generator:
    """All random draws come from a CPU generator and are then moved to the device, so results
    are the same on CPU and CUDA for the same seed."""
    check_positive_int("seed", seed, minimum=0)
    return torch.Generator(device="cpu").manual_seed(seed)


class Objective:
    """The parameters of ``model`` with ``requires_grad`` and a way to run the loss over
    ``batches`` on their device and dtype."""

    def __init__(self, model: nn.Module, loss_fn: LossFn, batches: Batches) -> None:
        if not isinstance(model, nn.Module):
            raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not callable(loss_fn):
            raise ValueError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
        if isinstance(batches, Iterator):  # (not iter(): a DataLoader would start workers)
            raise ValueError(
                f"batches must be re-iterable (a list of (x, y) pairs or a DataLoader), got a "
                f"one-shot iterator ({type(batches).__name__}); pass list(batches)"
            )
        self.model = model
        self.loss_fn = loss_fn
        self._batches = batches
        self.params = [p for p in model.parameters() if p.requires_grad]
        if not self.params:
            raise ValueError("model has no parameter with requires_grad=True to analyse")
        kinds = {(p.device, p.dtype) for p in self.params}
        if len(kinds) > 1:
            found = ", ".join(sorted(f"{d}/{t}" for d, t in kinds))
            raise ValueError(
                f"model: the analysed parameters must share one device and dtype, got {found}"
            )
        self.device, self.dtype = kinds.pop()
        if not self.dtype.is_floating_point:
            raise ValueError(f"model: parameters must be floating point, got {self.dtype}")
        self.shapes = [p.shape for p in self.params]
        self.sizes = [p.numel() for p in self.params]
        self.numel = sum(self.sizes)

    def batches(self) -> Iterator[tuple[Any, Any, int]]:
        """``(x, y, n)`` on the parameters' device; floating-point inputs in their dtype."""
        count = 0
        for batch in self._batches:
            try:
                x, y = batch
            except (TypeError, ValueError) as error:
                raise ValueError(
                    f"batches must yield (x, y) pairs, got a {type(batch).__name__}"
                ) from error
            if isinstance(x, torch.Tensor):
                dtype = self.dtype if x.is_floating_point() else None
                x = x.to(self.device, dtype, non_blocking=True)
            if isinstance(y, torch.Tensor):
                y = y.to(self.device, non_blocking=True)
            n = int(x.shape[0]) if isinstance(x, torch.Tensor) else len(x)
            if n == 0:
                continue
            count += n
            yield x, y, n
        if count == 0:
            raise ValueError("batches: got no samples; expected at least one non-empty (x, y)")

    def loss(self, x: Any, y: Any) -> torch.Tensor:
        return self.loss_fn(self.model(x), y)

    def split(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """Views of a flat vector shaped like the parameters."""
        return [t.view(s) for t, s in zip(flat.split(self.sizes), self.shapes)]

    def flatten(self, tensors: Iterable[torch.Tensor]) -> torch.Tensor:
        return torch.cat([t.reshape(-1) for t in tensors])

    def flat_params(self) -> torch.Tensor:
        return self.flatten(p.detach() for p in self.params)

    @torch.no_grad()
    def mean_loss(self) -> torch.Tensor:
        """L(w) as a float64 0-dim tensor on the device (no host sync)."""
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        count = 0
        for x, y, n in self.batches():
            total += self.loss(x, y).double() * n
            count += n
        return total / count


@contextlib.contextmanager
def preserved_state(model: nn.Module) -> Iterator[None]:
    """Leave the model as it was found: parameter values, buffers (BatchNorm running statistics,
    which a train-mode forward pass updates) and train/eval modes are restored on exit."""
    saved = {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()}
    modes = [(m, m.training) for m in model.modules()]
    try:
        yield
    finally:
        with torch.no_grad():
            state = model.state_dict(keep_vars=True)
            for key, value in saved.items():
                state[key].copy_(value)
        for module, training in modes:
            module.training = training
