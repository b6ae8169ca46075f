"""The optimizer's own part of a SAM step: ``aace.SAM`` against a naive per-parameter loop.

Rerun the reported measurement from the repository root with:

    .venv/bin/python benchmarks/sam_step.py --runs 8 --repeats 15

What is timed: ``first_step(zero_grad=True)`` plus ``second_step(zero_grad=True)`` (SGD with
momentum 0.9 and weight decay 5e-4 as the base), not the forward and backward passes, which are
the same for every variant. Three small models (a 13-layer CNN: 12 convolutions of 16 channels
with BatchNorm and ReLU, then a linear layer; 26,330 parameters in 38 tensors) are stepped in
turn, so that each model's weights, saved copy and momentum buffers have left the cache when its
turn comes, as they have after a real forward-backward. Before each timed call the gradients are
set (untimed) to real gradients of that model: the AACE gradient at w before ``first_step``, the
cross-entropy gradient before ``second_step`` (a random batch of 32 CIFAR-shaped images).

Variants, each with its own copy of the three models:

* ``SAM``: ``aace.SAM(perturbation="aace", rho=0.2)``, as installed. Passes over parameter
  memory: save w (copy), ``w += -rho * g`` (one fused pass), restore (copy back).
* ``LoopSAM``: :class:`LoopSAM`, the per-parameter loop of the widely copied reference code
  (davda54/sam), with the AACE rule: ``old = p.data.clone()``, ``p.add_(-rho * p.grad)``, and
  ``p.data = old`` to restore (a pointer swap: no pass, but an anti-pattern for autograd and
  DDP; kept here to time it faithfully). Passes: clone, scale (a new tensor), add.
* ``--track-stats``: the ``aace.SAM`` variants keep their statistics (``grad_norm``,
  ``perturbation_norm``, ``perturbation_cosine``), as ``aace train`` does; LoopSAM keeps none.
* ``SAM (baseline)``, with ``--baseline-sam FILE``: the ``SAM`` class of another version of
  ``src/aace/sam.py``, e.g. ``git show <commit>:src/aace/sam.py > /tmp/sam_before.py``; for
  before/after figures in one interleaved measurement.

A run is ``--repeats`` rounds after ``--warmup`` untimed ones; in each round every variant steps
its three models, in an order that rotates from round to round. A run's figure for a variant is
the median over its ``3 x repeats`` step times; ``--runs`` runs are made one after the other, and
the ratios are given per run and as median and range over the runs.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import _common
import torch
import torch.nn.functional as F
from torch import nn

from aace import SAM, aace_loss

RHO = 0.2
SGD_KWARGS = dict(lr=0.01, momentum=0.9, weight_decay=5e-4)
MODELS = 3


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


class LoopSAM(torch.optim.Optimizer):
    """SAM+AACE as a plain loop over parameters (the davda54/sam structure, unnormalized AACE
    perturbation ``e = -rho g``); restores w by reassigning ``p.data``."""

    def __init__(self, params: Any, base_optimizer: Callable[..., Any], rho: float, **kwargs: Any):
        super().__init__(params, dict(rho=rho, **kwargs))
        self.base_optimizer = base_optimizer(self.param_groups, **kwargs)
        self.param_groups = self.base_optimizer.param_groups

    @torch.no_grad()
    def first_step(self, zero_grad: bool = False) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                self.state[p]["old_p"] = p.data.clone()
                p.add_(p.grad * -group["rho"])
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def second_step(self, zero_grad: bool = False) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                p.data = self.state[p]["old_p"]  # the reference's restore, timed faithfully
        self.base_optimizer.step()
        if zero_grad:
            self.zero_grad()


def _load_sam_class(path: Path) -> type:
    spec = importlib.util.spec_from_file_location("aace_sam_baseline", path)
    if spec is None or spec.loader is None:
        raise SystemExit(f"--baseline-sam: cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.SAM


def _real_gradients(model: nn.Module, seed: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(AACE gradient, cross-entropy gradient) of ``model`` on a random batch."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(32, 3, 32, 32, generator=gen)
    y = torch.randint(0, 10, (32,), generator=gen)
    grads = []
    for loss_fn in (aace_loss, F.cross_entropy):
        model.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()
        grads.append([p.grad.detach().clone() for p in model.parameters()])
    model.zero_grad(set_to_none=True)
    return grads[0], grads[1]


def _set_grads(model: nn.Module, grads: list[torch.Tensor]) -> None:
    for p, g in zip(model.parameters(), grads):
        p.grad = g.clone()


def build(
    sam_classes: dict[str, type], track_stats: bool = False
) -> dict[str, list[tuple[nn.Module, Any, Any]]]:
    """Per variant: three (model, optimizer, (aace grads, ce grads))."""
    bases, grads = [], []
    for seed in range(MODELS):
        torch.manual_seed(seed)
        model = cnn13().train()
        bases.append(model)
        grads.append(_real_gradients(model, seed))
    variants: dict[str, list[tuple[nn.Module, Any, Any]]] = {}
    for name, cls in sam_classes.items():
        entries = []
        for base, g in zip(bases, grads):
            model = copy.deepcopy(base)
            if cls is LoopSAM:
                opt = LoopSAM(model.parameters(), torch.optim.SGD, rho=RHO, **SGD_KWARGS)
            else:
                opt = cls(
                    model.parameters(),
                    torch.optim.SGD,
                    rho=RHO,
                    perturbation="aace",
                    track_stats=track_stats,
                    **SGD_KWARGS,
                )
            entries.append((model, opt, g))
        variants[name] = entries
    return variants


def one_run(
    variants: dict[str, list[tuple[nn.Module, Any, Any]]], repeats: int, warmup: int
) -> dict[str, dict[str, list[float]]]:
    """Seconds of first_step and second_step per model step, per variant."""
    names = list(variants)
    samples = {name: {"first_step": [], "second_step": []} for name in names}
    for round_index in range(warmup + repeats):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            for model, opt, (g_aace, g_ce) in variants[name]:
                _set_grads(model, g_aace)
                start = time.perf_counter()
                opt.first_step(zero_grad=True)
                middle = time.perf_counter()
                _set_grads(model, g_ce)
                middle2 = time.perf_counter()
                opt.second_step(zero_grad=True)
                end = time.perf_counter()
                if round_index >= warmup:
                    samples[name]["first_step"].append(middle - start)
                    samples[name]["second_step"].append(end - middle2)
    return samples


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=_common.positive_int, default=8)
    parser.add_argument(
        "--baseline-sam", type=Path, help="another sam.py whose SAM class to time alongside"
    )
    parser.add_argument("--name", default="sam_step", help="results file name (default sam_step)")
    parser.add_argument(
        "--track-stats",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="SAM variants keep grad_norm, perturbation_norm and cosine, as aace train does",
    )
    _common.add_common_arguments(parser, repeats=15, warmup=3)
    args = parser.parse_args(argv)
    device = _common.setup(parser, args)
    if device.type != "cpu":
        parser.error("this harness times the CPU step; got --device " + args.device)
    sam_classes: dict[str, type] = {"SAM": SAM, "LoopSAM": LoopSAM}
    if args.baseline_sam:
        sam_classes["SAM (baseline)"] = _load_sam_class(args.baseline_sam)
    variants = build(sam_classes, args.track_stats)
    params = sum(p.numel() for p in variants["SAM"][0][0].parameters())
    tensors = len(list(variants["SAM"][0][0].parameters()))

    rows: list[dict[str, Any]] = []
    for run in range(args.runs):
        samples = one_run(variants, args.repeats, args.warmup)
        row: dict[str, Any] = {"run": run + 1, "median_step_s": {}, "median_phase_s": {}}
        for name, phases in samples.items():
            steps = [a + b for a, b in zip(phases["first_step"], phases["second_step"])]
            row["median_step_s"][name] = statistics.median(steps)
            row["median_phase_s"][name] = {k: statistics.median(v) for k, v in phases.items()}
            row.setdefault("n_steps", len(steps))
        rows.append(row)

    others = [name for name in sam_classes if name != "SAM"]
    table_rows = []
    for row in rows:
        med = row["median_step_s"]
        cells = [row["run"]] + [_common.milliseconds(med[name]) for name in sam_classes]
        cells += [f"{med['SAM'] / med[name]:.3f}" for name in others]
        table_rows.append(cells)
    ratios = {
        name: [row["median_step_s"]["SAM"] / row["median_step_s"][name] for row in rows]
        for name in others
    }
    summary = {
        name: {"median": statistics.median(r), "min": min(r), "max": max(r), "n_runs": len(r)}
        for name, r in ratios.items()
    }
    headers = ["run"] + [f"{name} ms" for name in sam_classes]
    headers += [f"SAM / {name}" for name in others]
    table = _common.markdown_table(headers, table_rows)
    phase_rows = []
    for name in sam_classes:
        for phase in ("first_step", "second_step"):
            values = [row["median_phase_s"][name][phase] for row in rows]
            phase_rows.append([name, phase, _common.milliseconds(statistics.median(values))])
    table += "\n\n" + _common.markdown_table(
        ["variant", "call", "median over runs of the run medians, ms"], phase_rows
    )
    summary_lines = [
        f"SAM / {name}: median {s['median']:.3f} over {s['n_runs']} runs "
        f"(range {s['min']:.3f}-{s['max']:.3f}); below 1 means SAM is faster"
        for name, s in summary.items()
    ]
    notes = (
        f"Each run: median of {rows[0]['n_steps']} model steps per variant ({args.repeats} "
        f"interleaved rounds x {MODELS} models, after {args.warmup} warm-up rounds); "
        f"{params:,} parameters in {tensors} tensors per model.\n\n" + "\n\n".join(summary_lines)
    )
    text = _common.write_results(
        args.name,
        rows,
        table,
        args.out_dir,
        device=device,
        config=dict(
            runs=args.runs,
            repeats=args.repeats,
            warmup=args.warmup,
            rho=RHO,
            sgd=SGD_KWARGS,
            models=MODELS,
            baseline_sam=str(args.baseline_sam) if args.baseline_sam else None,
            track_stats=args.track_stats,
        ),
        extra={"ratios": ratios, "summary": summary},
        notes=notes,
    )
    print(text)


if __name__ == "__main__":
    main()
