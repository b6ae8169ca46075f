"""Loss landscapes: the 1-D linear interpolation between two models (Goodfellow et al., ICLR 2015)
and 1-D / 2-D slices along filter-normalized random directions (Li et al., NeurIPS 2018,
"Visualizing the loss landscape of neural nets"), as arrays and as plots.

Filter normalization (Li et al., Sec. 4): a direction d is drawn from N(0, I) with the shape of
the parameters, then every filter of a weight of dimension >= 2 (a slice along its first
dimension: an output channel of a convolution, a row of a linear layer) is rescaled to the norm
of the same filter of the weights, d_i <- d_i ||w_i|| / ||d_i||. Parameters of dimension <= 1
(biases, BatchNorm scales and shifts) get d = 0 (their ``ignore="biasbn"`` setting, which the
paper's figures use). Buffers are not moved. The plane is

    f(a, b) = L(w + a d_1 + b d_2),    f(0, 0) = L(w).

The interpolation is L((1 - alpha) w_A + alpha w_B) over the parameters of the two models. Their
floating-point buffers (BatchNorm's running means and variances, any layer's statistics) follow the
same line with alpha clamped to [0, 1]: between the models they are interpolated, beyond them
they are held at the nearer model's values, so alpha = 0 and 1 are exactly the two models in eval
mode and a variance is never extrapolated below zero. (Extrapolated, a running variance that falls
from 1.0 at initialization to 0.15 after training is negative from alpha = 1.18 on, and the loss
NaN: tomgoldstein/loss-landscape #25.) Integer buffers stay those of the first model.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from aace.analysis._objective import (
    Batches,
    LossFn,
    Objective,
    check_finite_number,
    check_positive_int,
    cpu_generator,
    preserved_state,
)

__all__ = [
    "Landscape",
    "filter_normalized_direction",
    "interpolation",
    "plot_landscape",
    "random_line",
    "random_plane",
]


@dataclass
class Landscape:
    """A loss landscape: losses on a 1-D or 2-D grid of coordinates.

    Attributes:
        kind: "interpolation", "random-line" or "random-plane".
        coordinates: one 1-D array per axis: alpha for an interpolation, a (and b) along the
            random directions, in units of the filter-normalized direction.
        losses: shape (P,) for a line, (P, Q) for a plane: ``losses[i]`` is the loss at
            ``coordinates[0][i]``, ``losses[i, j]`` at ``(coordinates[0][i], coordinates[1][j])``.
        directions: the random directions (one list of per-parameter tensors each); None for an
            interpolation.
    """

    kind: str
    coordinates: tuple[np.ndarray, ...]
    losses: np.ndarray
    # The random directions (one list of per-parameter tensors each); None for interpolation.
    directions: tuple[list[torch.Tensor], ...] | None = field(default=None, repr=False)

    def to_dict(self) -> dict:
        names = ("alpha",) if self.kind == "interpolation" else ("a", "b")[: self.losses.ndim]
        out: dict = {"kind": self.kind}
        out.update({name: c.tolist() for name, c in zip(names, self.coordinates)})
        out["losses"] = self.losses.tolist()
        return out


def _filter_normalized(objective: Objective, generator: torch.Generator) -> list[torch.Tensor]:
    directions = []
    for p in objective.params:
        d = torch.randn(p.shape, generator=generator, dtype=torch.float64)
        d = d.to(p.device, p.dtype)
        w = p.detach()
        if p.dim() <= 1:
            d.zero_()
        else:
            d_norm = d.flatten(1).norm(dim=1).view(-1, *([1] * (p.dim() - 1)))
            w_norm = w.flatten(1).norm(dim=1).view_as(d_norm)
            d.mul_(w_norm / d_norm.clamp_min(torch.finfo(p.dtype).tiny))
        directions.append(d)
    return directions


def filter_normalized_direction(model: nn.Module, *, seed: int = 0) -> list[torch.Tensor]:
    """A filter-normalized random direction (Li et al., NeurIPS 2018, Sec. 4; see the module
    documentation).

    Args:
        model: the network whose parameters with ``requires_grad`` set the shapes and the
            filter norms.
        seed: fixes the draw (made on the CPU, so CPU and CUDA agree).

    Returns:
        One tensor per parameter with ``requires_grad``, each of that parameter's shape, in the
        order of ``model.parameters()``; zero for parameters of dimension <= 1.
    """
    objective = Objective(model, lambda output, target: output, [])  # parameters only
    return _filter_normalized(objective, cpu_generator(seed))


def _grid(name: str, span, steps) -> np.ndarray:
    span = check_finite_number(name.replace("steps", "span"), span, positive=True)
    check_positive_int(name, steps, minimum=2)
    return np.linspace(-span, span, steps)


def _losses_along(
    objective: Objective, directions: list[list[torch.Tensor]], points: np.ndarray
) -> np.ndarray:
    """L(w + sum_k points[i, k] d_k) for each row of ``points`` (shape (P, K))."""
    w0 = [p.detach().clone() for p in objective.params]
    losses = torch.empty(len(points), dtype=torch.float64, device=objective.device)
    with torch.no_grad():
        for i, point in enumerate(points):
            torch._foreach_copy_(objective.params, w0)
            for scale, direction in zip(point.tolist(), directions):
                if scale != 0.0:
                    torch._foreach_add_(objective.params, direction, alpha=scale)
            losses[i] = objective.mean_loss()
    return losses.cpu().numpy()


def random_line(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Batches,
    *,
    span: float = 1.0,
    steps: int = 21,
    seed: int = 0,
) -> Landscape:
    """L(w + a d) for ``steps`` evenly spaced values of a in [-span, span], d a
    filter-normalized random direction (Li et al., NeurIPS 2018).

    Args:
        model: the network; its parameters with ``requires_grad`` are the analysed w, and its
            mode (train/eval) is used as found.
        loss_fn: ``loss_fn(model(x), y)``, the mean loss of a batch (e.g.
            ``torch.nn.functional.cross_entropy``).
        batches: a re-iterable of ``(x, y)`` (a list, a ``DataLoader``); the objective is the
            sample-weighted mean loss over all of them.
        span: the half-width of the line, in units of the direction (> 0).
        steps: points on the line (>= 2); each costs one pass over ``batches``.
        seed: fixes the direction.

    Returns:
        A "random-line" landscape with ``losses`` of shape (steps,).

    Raises:
        ValueError: ``model`` is not a module or has no trainable floating-point parameter,
            ``loss_fn`` is not callable or ``batches`` holds no sample, or ``span`` or
            ``steps`` is out of range.
    """
    a = _grid("steps", span, steps)
    objective = Objective(model, loss_fn, batches)
    with preserved_state(model):
        direction = _filter_normalized(objective, cpu_generator(seed))
        losses = _losses_along(objective, [direction], a[:, None])
    return Landscape("random-line", (a,), losses, (direction,))


def random_plane(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Batches,
    *,
    span: float = 1.0,
    steps: int = 21,
    seed: int = 0,
) -> Landscape:
    """L(w + a d_1 + b d_2) on a ``steps`` x ``steps`` grid over [-span, span]^2, d_1 and d_2
    independent filter-normalized random directions (Li et al., NeurIPS 2018).

    Args:
        model: the network; its parameters with ``requires_grad`` are the analysed w, and its
            mode (train/eval) is used as found.
        loss_fn: ``loss_fn(model(x), y)``, the mean loss of a batch (e.g.
            ``torch.nn.functional.cross_entropy``).
        batches: a re-iterable of ``(x, y)`` (a list, a ``DataLoader``); the objective is the
            sample-weighted mean loss over all of them.
        span: the half-width of the grid along each direction (> 0).
        steps: points per axis (>= 2); the grid costs steps^2 passes over ``batches``.
        seed: fixes the two directions.

    Returns:
        A "random-plane" landscape with ``losses`` of shape (steps, steps), ``losses[i, j]`` at
        (a_i, b_j).

    Raises:
        ValueError: ``model`` is not a module or has no trainable floating-point parameter,
            ``loss_fn`` is not callable or ``batches`` holds no sample, or ``span`` or
            ``steps`` is out of range.
    """
    a = _grid("steps", span, steps)
    objective = Objective(model, loss_fn, batches)
    with preserved_state(model):
        generator = cpu_generator(seed)
        first = _filter_normalized(objective, generator)
        second = _filter_normalized(objective, generator)
        points = np.stack(np.meshgrid(a, a, indexing="ij"), axis=-1).reshape(-1, 2)
        losses = _losses_along(objective, [first, second], points).reshape(steps, steps)
    return Landscape("random-plane", (a, a.copy()), losses, (first, second))


def interpolation(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Batches,
    other: nn.Module | Mapping[str, torch.Tensor],
    *,
    alphas: Sequence[float] | np.ndarray | None = None,
) -> Landscape:
    """L((1 - alpha) w_model + alpha w_other) for each alpha: the linear interpolation between
    two models (Goodfellow et al., ICLR 2015). Parameters follow the line for every alpha;
    floating-point buffers (BatchNorm's running statistics) follow it with alpha clamped to
    [0, 1], i.e. held at the nearer model's values beyond the two models, so that a running
    variance is never extrapolated into a negative one (see the module documentation). Integer
    buffers stay those of ``model``.

    Args:
        model: the network; its parameters with ``requires_grad`` are the analysed w, and its
            mode (train/eval) is used as found.
        loss_fn: ``loss_fn(model(x), y)``, the mean loss of a batch (e.g.
            ``torch.nn.functional.cross_entropy``).
        batches: a re-iterable of ``(x, y)`` (a list, a ``DataLoader``); the objective is the
            sample-weighted mean loss over all of them.
        other: a model of the same architecture, or its ``state_dict()``.
        alphas: the interpolation coefficients (default: 21 values in [-0.5, 1.5]); 0 is
            ``model``, 1 is ``other``.

    Returns:
        An "interpolation" landscape with ``losses`` of shape (len(alphas),).

    Raises:
        ValueError: ``model`` is not a module or has no trainable floating-point parameter,
            ``loss_fn`` is not callable or ``batches`` holds no sample, ``alphas`` is not
            a non-empty 1-D sequence of finite numbers, or ``other``'s state dict does not match
            the model's (missing or unexpected keys, other shapes).
    """
    alphas = np.linspace(-0.5, 1.5, 21) if alphas is None else np.asarray(alphas, dtype=float)
    if alphas.ndim != 1 or alphas.size == 0 or not np.isfinite(alphas).all():
        raise ValueError(f"alphas must be a non-empty 1-D sequence of finite numbers, got {alphas}")
    objective = Objective(model, loss_fn, batches)
    target = other.state_dict() if isinstance(other, nn.Module) else other
    if not isinstance(target, Mapping):
        raise ValueError(f"other must be an nn.Module or a state dict, got {type(other).__name__}")
    state = model.state_dict(keep_vars=True)
    missing = sorted(set(state) - set(target))
    unexpected = sorted(set(target) - set(state))
    mismatched = [
        k
        for k in state
        if k in target and tuple(torch.as_tensor(target[k]).shape) != tuple(state[k].shape)
    ]
    if missing or unexpected or mismatched:
        details = "; ".join(
            f"{what}: {', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''}"
            for what, keys in (
                ("missing", missing),
                ("unexpected", unexpected),
                ("shape differs", mismatched),
            )
            if keys
        )
        raise ValueError(f"other: its state dict does not match the model's ({details})")
    floating = [k for k, v in state.items() if v.is_floating_point()]
    # Buffers, unlike parameters, are held at the nearer end outside [0, 1].
    buffers = {k for k in floating if not isinstance(state[k], nn.Parameter)}
    start = {k: state[k].detach().clone() for k in floating}
    end = {k: torch.as_tensor(target[k]).to(state[k].device, state[k].dtype) for k in floating}
    losses = torch.empty(len(alphas), dtype=torch.float64, device=objective.device)
    with preserved_state(model), torch.no_grad():
        for i, alpha in enumerate(alphas.tolist()):
            held = min(max(alpha, 0.0), 1.0)
            for k in floating:
                state[k].copy_(torch.lerp(start[k], end[k], held if k in buffers else alpha))
            losses[i] = objective.mean_loss()
    return Landscape("interpolation", (alphas,), losses.cpu().numpy())


def plot_landscape(
    landscape: Landscape, path: str | Path, *, title: str | None = None, log: bool = False
) -> Path:
    """Draw a landscape with matplotlib: a line plot (1-D) or a contour plot with the minimum
    marked (2-D).

    Args:
        landscape: from :func:`interpolation`, :func:`random_line` or :func:`random_plane`.
        path: the image file to write (its suffix picks the format, e.g. ``.png``).
        title: the plot's title (default: the landscape's kind).
        log: plot log10 of the loss.

    Returns:
        ``path``, as a ``Path``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    values = np.log10(np.maximum(landscape.losses, 1e-12)) if log else landscape.losses
    label = "log10 loss" if log else "loss"
    figure, ax = plt.subplots(figsize=(6, 4.5), constrained_layout=True)
    if landscape.losses.ndim == 1:
        (x,) = landscape.coordinates
        ax.plot(x, values, marker="o", markersize=3)
        ax.set_xlabel("alpha" if landscape.kind == "interpolation" else "a (filter-normalized)")
        ax.set_ylabel(label)
        if landscape.kind == "interpolation":
            for end in (0.0, 1.0):
                ax.axvline(end, color="gray", linewidth=0.8, linestyle=":")
    else:
        a, b = landscape.coordinates
        contour = ax.contourf(a, b, values.T, levels=30, cmap="viridis")
        ax.contour(a, b, values.T, levels=15, colors="white", linewidths=0.4)
        ax.plot([0], [0], marker="*", color="red", markersize=10)
        figure.colorbar(contour, ax=ax, label=label)
        ax.set_xlabel("a (direction 1)")
        ax.set_ylabel("b (direction 2)")
        ax.set_aspect("equal")
    ax.set_title(title or landscape.kind)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
