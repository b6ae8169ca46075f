"""What the micro-benchmarks measure aace against, defined once: reference optimizers and models,
the training steps of each variant, and the memory a variant holds.

* :class:`LoopSAM`: SAM as the widely copied reference code writes it (davda54/sam), a Python
  loop over parameters; ``perturbation="sam"`` (normalized) or ``"aace"`` (``e = -rho g``).
* :func:`cnn13`: a small BatchNorm CNN on which the optimizer's own work is as large a share of
  a step as it gets; :func:`batchnorm_flag_only`: the former second-pass context manager.
* :func:`make_optimizer`, :func:`sgd_step`, :func:`sam_step`: the variants SGD, SAM, SAM+AACE
  and LoopSAM and their documented steps (two passes for SAM, the second under
  ``frozen_running_stats``).
* :func:`footprint_bytes`, :func:`optimizer_state_bytes`, :func:`cuda_peak_bytes`: what a
  variant keeps between steps and the most it holds during one.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from aace import SAM, aace_loss, frozen_running_stats

# The optimizer-only benchmarks (sam_step, sam_overhead): SAM+AACE's rho and the SGD base.
RHO = 0.2
SGD_KWARGS = dict(lr=0.01, momentum=0.9, weight_decay=5e-4)
# Whole training steps on CIFAR-shaped batches: the paper's recipe (lr 0.1).
CIFAR_SGD_KWARGS = dict(lr=0.1, momentum=0.9, weight_decay=5e-4)

VARIANTS = ("SGD", "SAM", "SAM+AACE", "LoopSAM")
# The loss of each SAM variant's first pass (the one that sets the perturbation).
FIRST_LOSS: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "SAM": F.cross_entropy,
    "SAM+AACE": aace_loss,
    "LoopSAM": F.cross_entropy,
}
Autocast = Callable[[], AbstractContextManager[Any]]
Forward = Callable[[torch.Tensor], torch.Tensor]


class LoopSAM(torch.optim.Optimizer):
    """SAM as a plain loop over parameters, the structure of the davda54/sam implementation.

    A reference point only: a Python loop with one small kernel per parameter and operation,
    a fresh clone of every weight at each step, and ``p.data`` reassignment to restore it (a
    pointer swap: no pass over memory, but an anti-pattern for autograd and DDP; kept to time
    the reference faithfully). ``perturbation="sam"``: ``e = rho g / (||g|| + 1e-12)`` with
    ``||g||`` the L2 norm over all gradients (Foret et al. 2021); ``"aace"``: the unnormalized
    AACE rule ``e = -rho g``.
    """

    def __init__(
        self,
        params: Any,
        base_optimizer: Callable[..., torch.optim.Optimizer],
        rho: float = 0.05,
        perturbation: str = "sam",
        **kwargs: Any,
    ) -> None:
        if rho < 0.0:
            raise ValueError(f"rho must be >= 0, got {rho!r}")
        if perturbation not in ("sam", "aace"):
            raise ValueError(f"perturbation must be 'sam' or 'aace', got {perturbation!r}")
        super().__init__(params, dict(rho=rho, **kwargs))
        self.perturbation = perturbation
        self.base_optimizer = base_optimizer(self.param_groups, **kwargs)
        self.param_groups = self.base_optimizer.param_groups
        self.defaults.update(self.base_optimizer.defaults)

    @torch.no_grad()
    def first_step(self, zero_grad: bool = False) -> None:
        if self.perturbation == "sam":
            grad_norm = torch.norm(
                torch.stack(
                    [
                        p.grad.norm(p=2)
                        for group in self.param_groups
                        for p in group["params"]
                        if p.grad is not None
                    ]
                ),
                p=2,
            )
        for group in self.param_groups:
            if self.perturbation == "sam":
                scale = group["rho"] / (grad_norm + 1e-12)
            for p in group["params"]:
                if p.grad is None:
                    continue
                self.state[p]["old_p"] = p.data.clone()
                if self.perturbation == "sam":
                    p.add_(p.grad * scale.to(p))
                else:
                    p.add_(p.grad * -group["rho"])
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def second_step(self, zero_grad: bool = False) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                # Reassigning .data is the reference's way back to w; kept to time it faithfully.
                p.data = self.state[p]["old_p"]
        self.base_optimizer.step()
        if zero_grad:
            self.zero_grad()


def cnn13(channels: int = 16, convolutions: int = 12, num_classes: int = 10) -> nn.Module:
    """12 convolutions (3x3, ``channels`` wide, BatchNorm, ReLU), average pooling, linear."""
    layers: list[nn.Module] = []
    in_channels = 3
    for _ in range(convolutions):
        layers += [
            nn.Conv2d(in_channels, channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(channels),
            nn.ReLU(),
        ]
        in_channels = channels
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, num_classes)]
    return nn.Sequential(*layers)


@contextmanager
def batchnorm_flag_only(model: nn.Module) -> Iterator[None]:
    """The former ``frozen_batchnorm_stats``: BatchNorm's flag off, other buffers left alone."""
    layers = [m for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]
    for layer in layers:
        layer.track_running_stats = False
    try:
        yield
    finally:
        for layer in layers:
            layer.track_running_stats = True


# -- the variants' steps ----------------------------------------------------------------------


def make_optimizer(
    variant: str, model: nn.Module, sgd: dict[str, float] = CIFAR_SGD_KWARGS
) -> torch.optim.Optimizer:
    """SGD; SAM (rho 0.05, CE perturbation); SAM+AACE (rho 0.2, ``perturbation="aace"``);
    LoopSAM (rho 0.05, CE perturbation); each with SGD ``sgd`` as the base."""
    if variant == "SGD":
        return torch.optim.SGD(model.parameters(), **sgd)
    if variant == "SAM":
        return SAM(model.parameters(), torch.optim.SGD, rho=0.05, **sgd)
    if variant == "SAM+AACE":
        return SAM(model.parameters(), torch.optim.SGD, rho=0.2, perturbation="aace", **sgd)
    if variant == "LoopSAM":
        return LoopSAM(model.parameters(), torch.optim.SGD, rho=0.05, **sgd)
    raise ValueError(f"variant: got {variant!r}; expected one of {', '.join(VARIANTS)}")


def sgd_step(
    forward: Forward,
    opt: torch.optim.Optimizer,
    x: torch.Tensor,
    y: torch.Tensor,
    autocast: Autocast = nullcontext,
) -> Callable[[], None]:
    """One SGD step: forward, cross-entropy, backward, ``opt.step()``, ``opt.zero_grad()``."""

    def step() -> None:
        with autocast():
            loss = F.cross_entropy(forward(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def sam_step(
    model: nn.Module,
    forward: Forward,
    opt: Any,
    first_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    y: torch.Tensor,
    autocast: Autocast = nullcontext,
    phase_done: Callable[[str], None] = lambda phase: None,
    second_pass: Callable[[nn.Module], AbstractContextManager[Any]] = frozen_running_stats,
) -> Callable[[], None]:
    """The documented two-pass SAM step; ``phase_done(name)`` is called after each phase.

    ``forward`` is ``model`` or its compiled wrapper; the BatchNorm flags that ``second_pass``
    (``frozen_running_stats``, or :func:`batchnorm_flag_only` to time the former one) flips are
    the model's own either way.
    """

    def step() -> None:
        with autocast():
            loss = first_loss(forward(x), y)
        loss.backward()
        phase_done("first pass (forward + backward)")
        opt.first_step(zero_grad=True)
        phase_done("SAM.first_step")
        with second_pass(model), autocast():
            loss = F.cross_entropy(forward(x), y)
        loss.backward()
        phase_done("second pass (forward + backward)")
        opt.second_step(zero_grad=True)
        phase_done("SAM.second_step")

    return step


def variant_step(
    variant: str,
    model: nn.Module,
    opt: Any,
    x: torch.Tensor,
    y: torch.Tensor,
    autocast: Autocast = nullcontext,
    forward: Forward | None = None,
) -> Callable[[], None]:
    """The step of ``variant`` (one of :data:`VARIANTS`) with ``opt`` from
    :func:`make_optimizer`; ``forward`` defaults to ``model`` itself."""
    forward = model if forward is None else forward
    if variant == "SGD":
        return sgd_step(forward, opt, x, y, autocast)
    return sam_step(model, forward, opt, FIRST_LOSS[variant], x, y, autocast)


# -- memory -----------------------------------------------------------------------------------


def _tensors(value: Any) -> list[torch.Tensor]:
    """The tensors in a (nested) dict/list/tuple, such as an optimizer's state."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _tensors(v)]
    return []


def _optimizer_state(opt: torch.optim.Optimizer) -> list[torch.Tensor]:
    """The tensors ``opt`` keeps between steps; for SAM and LoopSAM also their base's."""
    tensors = _tensors(opt.state)
    base = getattr(opt, "base_optimizer", None)
    if base is not None and base is not opt:
        tensors += _tensors(base.state)
    return tensors


def _storage_bytes(tensors: list[torch.Tensor]) -> int:
    """Bytes of the storages behind ``tensors``, each storage counted once."""
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    return sum(storages.values())


def optimizer_state_bytes(opt: torch.optim.Optimizer) -> int:
    """Bytes of the state ``opt`` keeps between steps (momentum, SAM's saved weights)."""
    return _storage_bytes(_optimizer_state(opt))


def footprint_bytes(model: nn.Module, opt: torch.optim.Optimizer) -> int:
    """Bytes a variant keeps between steps: parameters, buffers and optimizer state, each
    storage counted once (LoopSAM's saved weights become the parameters' storage). Gradients
    are freed by ``zero_grad``."""
    tensors = list(model.parameters()) + list(model.buffers()) + _optimizer_state(opt)
    return _storage_bytes(tensors)


def cuda_peak_bytes(step: Callable[[], None], device: torch.device) -> tuple[int, int]:
    """``(allocated before, peak during)`` one ``step()``: ``torch.cuda.memory_allocated``
    just before it and ``torch.cuda.max_memory_allocated`` with the peak reset before it."""
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    step()
    torch.cuda.synchronize(device)
    return before, torch.cuda.max_memory_allocated(device)
