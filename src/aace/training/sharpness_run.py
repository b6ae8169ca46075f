"""``aace sharpness``: Hessian spectrum, trace, adaptive sharpness and loss landscapes of a run's
final model, written to ``sharpness.json`` (and PNGs) in its run directory.

What is measured (the library's definitions, :mod:`aace.analysis`): the mean cross-entropy over
``--images`` training images (a seeded random subset, unaugmented, normalized as in training), in
batches of ``--batch-size`` (the m of m-sharpness), with the model in eval mode (BatchNorm uses
its running statistics; ``--mode train`` uses batch statistics instead).
"""

from __future__ import annotations

import copy
import dataclasses
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

import aace
from aace.analysis import (
    adaptive_average_sharpness,
    adaptive_sharpness,
    hessian_eigen,
    hessian_trace_estimate,
    interpolation,
    plot_landscape,
    random_line,
    random_plane,
)
from aace.runs import SHARPNESS, atomic_write_json
from aace.training.build import build_loader, resolve_device, training_labels
from aace.training.checkpoint import CheckpointError, load_checkpoint
from aace.training.config import ConfigError
from aace.training.evaluate import load_model_state, load_trained_model, resolve_checkpoint

LANDSCAPES = ("1d", "2d")
DTYPES = {"float32": torch.float32, "float64": torch.float64}


@dataclass
class SharpnessSettings:
    """What ``aace sharpness`` measures and how (its flags, less the run and
    ``--output-file``); saved as ``settings`` in ``sharpness.json``."""

    images: int = 1024  # training images measured on
    batch_size: int = 128  # the m of m-sharpness
    top_k: int = 1  # Hessian eigenvalues (0: skip)
    max_iter: int = 100  # most Lanczos iterations
    tol: float = 1e-3  # Lanczos relative residual tolerance
    samples: int = 20  # Hutchinson probes for the trace (0: skip)
    rho: float = 0.001  # radius of the adaptive worst-case sharpness
    norm: str = "linf"  # its norm: linf or l2
    steps: int = 20  # its gradient-ascent steps (0: skip)
    average_rho: float = 0.1  # relative noise scale of the adaptive average sharpness
    average_samples: int = 8  # its noise draws per batch (0: skip)
    landscape: str | None = None  # "1d" or "2d"
    against: str | None = None  # another checkpoint of the same model, for landscape 1d
    span: float = 1.0  # random line/plane: coordinates in [-span, span]
    resolution: int | None = None  # points per axis (None: 21 for 1d, 11 for 2d)
    mode: str = "eval"  # model mode
    dtype: str = "float32"
    seed: int = 0  # image subset, probes, directions
    device: str = "auto"
    data_dir: str | None = None  # override the dataset directory of the run


def _fail(name: str, value: Any, allowed: str) -> None:
    raise ConfigError(f"--{name.replace('_', '-')}: got {value!r}; expected {allowed}")


def _validate(args: SharpnessSettings) -> None:
    for name in ("images", "batch_size", "max_iter"):
        if getattr(args, name) < 1:
            _fail(name, getattr(args, name), "an integer >= 1")
    for name in ("top_k", "steps", "average_samples", "seed"):
        if getattr(args, name) < 0:
            _fail(name, getattr(args, name), "an integer >= 0 (0 skips it)")
    if args.samples == 1 or args.samples < 0:
        _fail("samples", args.samples, "0 (skip) or an integer >= 2")
    if args.average_samples == 1:
        _fail("average_samples", args.average_samples, "0 (skip) or an integer >= 2")
    for name in ("tol", "rho", "average_rho", "span"):
        value = getattr(args, name)
        if not value > 0 or value == float("inf"):
            _fail(name, value, "a finite number > 0")
    if args.resolution is not None and args.resolution < 2:
        _fail("resolution", args.resolution, "an integer >= 2")
    if args.against and args.landscape != "1d":
        _fail("against", args.against, "to be used with --landscape 1d")


def training_batches(
    dataset: Any,
    labels: torch.Tensor,
    images: int,
    batch_size: int,
    seed: int,
    device: torch.device,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A seeded random subset of the training set with the labels the run trained on (noisy
    for a --label-noise run), unaugmented, in fixed batches."""
    total = len(labels)
    n = min(images, total)
    index = torch.randperm(total, generator=torch.Generator().manual_seed(seed))[:n]
    loader = build_loader(
        dataset, "eval", device, labels=labels, index=index, batch_size=batch_size
    )
    return list(loader)


class _Counted:
    """Batches that advance a progress bar each time one is used."""

    def __init__(self, batches: list, tick: Callable[[], None]) -> None:
        self.batches, self.tick = batches, tick

    def __iter__(self) -> Iterator:
        for batch in self.batches:
            yield batch
            self.tick()


class _Progress:
    """A tqdm bar per phase when stderr is a terminal, and one line per phase always."""

    def __init__(self, log: Callable[[str], None]) -> None:
        self.log = log
        self.bar = None
        self.tty = sys.stderr.isatty()

    def start(self, description: str) -> None:
        if self.tty:
            from tqdm import tqdm

            self.bar = tqdm(desc=description, unit="batch", leave=False)
        self.started = time.perf_counter()

    def tick(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def finish(self, line: str) -> float:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        seconds = time.perf_counter() - self.started
        self.log(f"{line} ({seconds:.1f} s)")
        return seconds


def run_sharpness(
    run: str | Path,
    settings: SharpnessSettings | None = None,
    out: str | Path | None = None,
    log: Callable[[str], None] = print,
) -> Path:
    """Measure the model of ``run`` (a run directory or a checkpoint) as ``settings`` say and
    write ``sharpness.json`` (default: next to the checkpoint; ``out`` names another file) and
    any landscape PNG beside it; returns the JSON's path."""
    args = settings or SharpnessSettings()
    _validate(args)
    started = time.perf_counter()
    checkpoint_path = resolve_checkpoint(run)
    out = Path(out) if out else checkpoint_path.parent / SHARPNESS
    device = resolve_device(args.device)
    dtype = DTYPES[args.dtype]
    model, config, dataset, checkpoint = load_trained_model(checkpoint_path, args.data_dir)
    model.to(device, dtype).train(args.mode == "train")
    other = None
    if args.against:
        other_path = resolve_checkpoint(args.against)
        other_checkpoint = load_checkpoint(other_path)
        other_model = other_checkpoint["config"].get("model")
        if other_model != config.model:
            raise CheckpointError(
                f"--against: checkpoint '{other_path}' is a {other_model} model, not "
                f"{config.model} like '{checkpoint_path}'"
            )
        other_copy = copy.deepcopy(model)
        load_model_state(other_copy, other_checkpoint, other_path, config.model)
        other = other_copy.state_dict()
    batches = training_batches(
        dataset, training_labels(config, dataset), args.images, args.batch_size, args.seed, device
    )
    progress = _Progress(log)
    counted = _Counted(batches, progress.tick)
    images = sum(len(y) for _, y in batches)
    log(
        f"{config.model} ({sum(p.numel() for p in model.parameters()):,} parameters), "
        f"epoch {checkpoint['epoch']} of '{checkpoint_path}'; {images} training images of "
        f"{dataset.name} in batches of {args.batch_size}, {args.mode} mode, {args.dtype}, {device}"
    )
    result: dict[str, Any] = {
        "checkpoint": str(checkpoint_path),
        "epoch": checkpoint["epoch"],
        "model": config.model,
        "dataset": config.dataset,
        "optimizer": config.optimizer,
        "run_seed": config.seed,
    }
    seconds: dict[str, float] = {}
    loss_fn = F.cross_entropy

    if args.top_k:
        progress.start("Hessian eigenvalues (Lanczos)")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", RuntimeWarning)
            eigen = hessian_eigen(
                model, loss_fn, counted, args.top_k, max_iter=args.max_iter, tol=args.tol,
                seed=args.seed,
            )  # fmt: skip
        for warning in caught:
            log(f"notice: {warning.message}")
        result["hessian_eigenvalues"] = eigen.eigenvalues
        result["hessian_eigenvalue_residuals"] = eigen.residuals
        result["lanczos_iterations"] = eigen.iterations
        result["lanczos_converged"] = eigen.converged
        values = ", ".join(f"{v:.4g}" for v in eigen.eigenvalues)
        seconds["hessian_eigenvalues"] = progress.finish(
            f"top Hessian eigenvalues: {values} ({eigen.iterations} Hessian-vector products)"
        )
    if args.samples:
        progress.start("Hessian trace (Hutchinson)")
        trace = hessian_trace_estimate(
            model, loss_fn, counted, samples=args.samples, seed=args.seed
        )
        result["hessian_trace"] = trace.trace
        result["hessian_trace_stderr"] = trace.stderr
        seconds["hessian_trace"] = progress.finish(
            f"Hessian trace: {trace.trace:.4g} ± {trace.stderr:.2g} ({args.samples} probes)"
        )
    if args.steps:
        progress.start("adaptive worst-case sharpness")
        worst = adaptive_sharpness(
            model, loss_fn, counted, rho=args.rho, norm=args.norm, steps=args.steps
        )
        result["loss"] = worst.loss
        result["adaptive_sharpness"] = worst.sharpness
        seconds["adaptive_sharpness"] = progress.finish(
            f"adaptive worst-case sharpness ({args.norm}, rho {args.rho:g}): "
            f"{worst.sharpness:.4g} (loss {worst.loss:.4g} -> {worst.perturbed_loss:.4g})"
        )
    if args.average_samples:
        progress.start("adaptive average sharpness")
        average = adaptive_average_sharpness(
            model, loss_fn, counted, rho=args.average_rho, samples=args.average_samples,
            seed=args.seed,
        )  # fmt: skip
        result["loss"] = average.loss
        result["adaptive_average_sharpness"] = average.sharpness
        result["adaptive_average_sharpness_stderr"] = average.stderr
        seconds["adaptive_average_sharpness"] = progress.finish(
            f"adaptive average sharpness (rho {args.average_rho:g}): "
            f"{average.sharpness:.4g} ± {average.stderr:.2g}"
        )
    if args.landscape:
        progress.start(f"landscape {args.landscape}")
        steps = args.resolution or (21 if args.landscape == "1d" else 11)
        if args.landscape == "2d":
            landscape = random_plane(
                model, loss_fn, counted, span=args.span, steps=steps, seed=args.seed
            )
        elif other is not None:
            landscape = interpolation(
                model, loss_fn, counted, other, alphas=torch.linspace(-0.5, 1.5, steps).tolist()
            )
        else:
            landscape = random_line(
                model, loss_fn, counted, span=args.span, steps=steps, seed=args.seed
            )
        png = out.parent / f"landscape-{args.landscape}.png"
        title = f"{config.optimizer} {config.model} epoch {checkpoint['epoch']}: {landscape.kind}"
        plot_landscape(landscape, png, title=title)
        result["landscape"] = {**landscape.to_dict(), "png": png.name}
        if other is not None:
            result["landscape"]["against"] = str(args.against)
        seconds["landscape"] = progress.finish(f"landscape: wrote {png}")

    seconds["total"] = time.perf_counter() - started
    saved_settings = {**dataclasses.asdict(args), "images_measured": images}
    result.update(
        {
            "settings": saved_settings,
            "seconds": seconds,
            "device": str(device),
            "aace_version": aace.__version__,
            "torch_version": torch.__version__,
        }
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out, result)
    return out
