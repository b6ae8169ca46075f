"""The optimizer's own part of a SAM step: ``aace.SAM`` against a naive per-parameter loop.

Rerun the reported measurement from the repository root with:

    .venv/bin/python -m benchmarks.micro.sam_step --runs 8 --repeats 15

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
* ``LoopSAM``: ``benchmarks.baselines.LoopSAM(perturbation="aace")``, the per-parameter loop of
  the widely copied reference code (davda54/sam), with the AACE rule: ``old = p.data.clone()``,
  ``p.add_(-rho * p.grad)``, and ``p.data = old`` to restore (a pointer swap: no pass, but an
  anti-pattern for autograd and DDP; kept here to time it faithfully). Passes: clone, scale (a
  new tensor), add.
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
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from aace import SAM, aace_loss
from benchmarks import harness
from benchmarks.baselines import RHO, SGD_KWARGS, LoopSAM, cnn13

MODELS = 3


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
                opt = LoopSAM(
                    model.parameters(), torch.optim.SGD, rho=RHO, perturbation="aace", **SGD_KWARGS
                )
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

    def step_models(entries: list[tuple[nn.Module, Any, Any]]):
        def run(laps: harness.Laps) -> None:
            for model, opt, (g_aace, g_ce) in entries:
                _set_grads(model, g_aace)  # untimed: a real gradient, as after a backward pass
                laps.start()
                opt.first_step(zero_grad=True)
                laps.lap("first_step")
                _set_grads(model, g_ce)
                laps.start()
                opt.second_step(zero_grad=True)
                laps.lap("second_step")

        return run

    calls = {name: step_models(entries) for name, entries in variants.items()}
    return harness.time_phases(calls, repeats, warmup)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=harness.positive_int, default=8)
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
    harness.add_common_arguments(parser, repeats=15, warmup=3)
    args = parser.parse_args(argv)
    device = harness.setup(parser, args)
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
        cells = [row["run"]] + [harness.milliseconds(med[name]) for name in sam_classes]
        cells += [f"{med['SAM'] / med[name]:.3f}" for name in others]
        table_rows.append(cells)
    ratios = {
        name: [row["median_step_s"]["SAM"] / row["median_step_s"][name] for row in rows]
        for name in others
    }
    summary = {name: harness.over_runs(r) for name, r in ratios.items()}
    headers = ["run"] + [f"{name} ms" for name in sam_classes]
    headers += [f"SAM / {name}" for name in others]
    table = harness.markdown_table(headers, table_rows)
    phase_rows = []
    for name in sam_classes:
        for phase in ("first_step", "second_step"):
            values = [row["median_phase_s"][name][phase] for row in rows]
            phase_rows.append([name, phase, harness.milliseconds(statistics.median(values))])
    table += "\n\n" + harness.markdown_table(
        ["variant", "call", "median over runs of the run medians, ms"], phase_rows
    )
    summary_lines = [
        harness.over_runs_text(f"SAM / {name}", s) + "; below 1 means SAM is faster"
        for name, s in summary.items()
    ]
    notes = (
        f"Each run: median of {rows[0]['n_steps']} model steps per variant ({args.repeats} "
        f"interleaved rounds x {MODELS} models, after {args.warmup} warm-up rounds); "
        f"{params:,} parameters in {tensors} tensors per model.\n\n" + "\n\n".join(summary_lines)
    )
    text = harness.write_results(
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
