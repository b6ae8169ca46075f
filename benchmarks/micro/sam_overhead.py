"""A whole SAM+AACE training step against two SGD steps and against a per-parameter loop.

Rerun the reported measurement from the repository root with:

    .venv/bin/python -m benchmarks.micro.sam_overhead --runs 5 --repeats 15

What is timed: one training step, forward and backward passes included, on a small CNN where the
optimizer's own bookkeeping is as large a share of the step as it gets (a 14-layer, 16-channel CNN:
13 convolutions with BatchNorm and ReLU, then a linear layer; 41 parameter tensors), batch 64 of
3x16x16 random images, 2 threads. Variants, each with its own copy of the model:

* ``SGD x2``: two SGD steps (each: zero_grad, cross-entropy forward-backward, ``opt.step()``), the
  cost a SAM step is measured against (a SAM step takes two forward-backward passes too).
* ``SAM+AACE``: ``aace.SAM(perturbation="aace", rho=0.2)``: ``aace_loss`` forward-backward,
  ``first_step(zero_grad=True)``, cross-entropy forward-backward under
  ``frozen_running_stats``, ``second_step(zero_grad=True)``; the statistics off (``aace.SAM``'s
  default), and with ``--track-stats`` a second variant with them on, as ``aace train`` runs it.
* ``--shared-model``: every variant steps the same model object, so all variants compute on the
  same weights; without it each variant has its own copy, whose weights (and so, on a CPU,
  possibly its speed: subnormal numbers) follow that variant's own trajectory.
* ``LoopSAM``: the same passes with ``benchmarks.baselines.LoopSAM`` (the AACE rule), the
  per-parameter loop of the widely copied reference code (clone every parameter, ``p.data``
  swapped back).
* ``--batchnorm-only``: also ``SAM+AACE (BN flag only)``, the SAM+AACE step with its second pass
  under the former context manager, which switched BatchNorm's ``track_running_stats`` off and
  did nothing for other buffers; ``SAM+AACE / SAM+AACE (BN flag only)`` is then the cost of
  ``frozen_running_stats`` watching every buffer (on this BatchNorm-only model it copies none).

Each round steps every variant once, in an order that rotates from round to round; a run's figure
for a variant is the median over ``--repeats`` rounds (after ``--warmup``). ``--runs`` runs are
made one after another and the ratios are given per run and as median and range over the runs.
SGD momentum 0.9 and weight decay 5e-4 for every variant.
"""

from __future__ import annotations

import argparse
import copy
import statistics
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from aace import SAM, aace_loss
from benchmarks import harness
from benchmarks.baselines import (
    RHO,
    SGD_KWARGS,
    LoopSAM,
    batchnorm_flag_only,
    cnn13,
    sam_step,
    sgd_step,
)

BATCH, SIZE, CONVOLUTIONS = 64, 16, 13
# A variant: its model, its optimizer, and its step(model, opt, x, y) on one batch.
Step = Callable[[nn.Module, Any, torch.Tensor, torch.Tensor], Callable[[], None]]


def sgd_twice(model: nn.Module, opt: Any, x: torch.Tensor, y: torch.Tensor) -> Callable[[], None]:
    step = sgd_step(model, opt, x, y)

    def twice() -> None:
        step()
        step()

    return twice


def sam_aace(model: nn.Module, opt: Any, x: torch.Tensor, y: torch.Tensor) -> Callable[[], None]:
    return sam_step(model, model, opt, aace_loss, x, y)


def sam_aace_batchnorm_only(
    model: nn.Module, opt: Any, x: torch.Tensor, y: torch.Tensor
) -> Callable[[], None]:
    return sam_step(model, model, opt, aace_loss, x, y, second_pass=batchnorm_flag_only)


def build(
    track_stats: bool, shared_model: bool, batchnorm_only: bool = False
) -> dict[str, tuple[nn.Module, Any, Step]]:
    torch.manual_seed(0)
    base = cnn13(convolutions=CONVOLUTIONS).train()
    variants: dict[str, tuple[nn.Module, Any, Step]] = {}

    model = base if shared_model else copy.deepcopy(base)
    variants["SGD x2"] = (model, torch.optim.SGD(model.parameters(), **SGD_KWARGS), sgd_twice)
    model = base if shared_model else copy.deepcopy(base)
    opt = SAM(model.parameters(), torch.optim.SGD, rho=RHO, perturbation="aace", **SGD_KWARGS)
    variants["SAM+AACE"] = (model, opt, sam_aace)
    if track_stats:
        model = base if shared_model else copy.deepcopy(base)
        opt = SAM(
            model.parameters(),
            torch.optim.SGD,
            rho=RHO,
            perturbation="aace",
            track_stats=True,
            **SGD_KWARGS,
        )
        variants["SAM+AACE (stats)"] = (model, opt, sam_aace)
    if batchnorm_only:
        model = base if shared_model else copy.deepcopy(base)
        opt = SAM(model.parameters(), torch.optim.SGD, rho=RHO, perturbation="aace", **SGD_KWARGS)
        variants["SAM+AACE (BN flag only)"] = (model, opt, sam_aace_batchnorm_only)
    model = base if shared_model else copy.deepcopy(base)
    variants["LoopSAM"] = (
        model,
        LoopSAM(model.parameters(), torch.optim.SGD, rho=RHO, perturbation="aace", **SGD_KWARGS),
        sam_aace,
    )
    return variants


def one_run(variants: dict[str, Any], repeats: int, warmup: int, seed: int) -> dict[str, float]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(BATCH, 3, SIZE, SIZE, generator=gen)
    y = torch.randint(0, 10, (BATCH,), generator=gen)
    calls = {name: step(model, opt, x, y) for name, (model, opt, step) in variants.items()}
    samples = harness.time_interleaved(calls, repeats, warmup)
    return {name: statistics.median(values) for name, values in samples.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=harness.positive_int, default=5)
    parser.add_argument("--name", default="sam_overhead", help="results file name")
    parser.add_argument(
        "--track-stats",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also time SAM+AACE with its statistics on, as aace train runs it",
    )
    parser.add_argument(
        "--batchnorm-only",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="also time SAM+AACE with the former BatchNorm-only context manager",
    )
    parser.add_argument(
        "--shared-model",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="every variant steps one and the same model (the same weights at every step), "
        "instead of a copy of its own whose weights follow that variant's trajectory",
    )
    harness.add_common_arguments(parser, repeats=15, warmup=3)
    args = parser.parse_args(argv)
    if args.threads is None:
        args.threads = 2
    device = harness.setup(parser, args)
    if device.type != "cpu":
        parser.error("this harness times the CPU step; got --device " + args.device)
    variants = build(args.track_stats, args.shared_model, args.batchnorm_only)
    names = list(variants)
    sam_names = [n for n in names if n.startswith("SAM") and "flag only" not in n]
    references = ["SGD x2", "LoopSAM"]
    model = variants["SGD x2"][0]
    tensors = len(list(model.parameters()))
    params = sum(p.numel() for p in model.parameters())

    rows = []
    for run in range(args.runs):
        medians = one_run(variants, args.repeats, args.warmup, seed=run)
        rows.append({"run": run + 1, "median_step_s": medians})
    ratios = {
        f"{sam} / {ref}": [r["median_step_s"][sam] / r["median_step_s"][ref] for r in rows]
        for sam in sam_names
        for ref in references
    }
    if args.batchnorm_only:
        key, ref = "SAM+AACE / SAM+AACE (BN flag only)", "SAM+AACE (BN flag only)"
        ratios[key] = [r["median_step_s"]["SAM+AACE"] / r["median_step_s"][ref] for r in rows]
    summary = {key: harness.over_runs(v) for key, v in ratios.items()}
    headers = ["run"] + [f"{n} ms" for n in names] + list(ratios)
    table_rows = [
        [r["run"]]
        + [harness.milliseconds(r["median_step_s"][n]) for n in names]
        + [f"{ratios[key][i]:.3f}" for key in ratios]
        for i, r in enumerate(rows)
    ]
    table = harness.markdown_table(headers, table_rows)
    notes = (
        f"Each run: median of {args.repeats} interleaved steps per variant after {args.warmup} "
        f"warm-up rounds; {tensors} parameter tensors ({params:,} parameters), batch {BATCH} of "
        f"3x{SIZE}x{SIZE}, {torch.get_num_threads()} threads.\n\n"
        + "\n\n".join(harness.over_runs_text(key, s) for key, s in summary.items())
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
            batch=BATCH,
            size=SIZE,
            convolutions=CONVOLUTIONS,
            threads=torch.get_num_threads(),
            shared_model=args.shared_model,
            batchnorm_only=args.batchnorm_only,
        ),
        extra={"ratios": ratios, "summary": summary},
        notes=notes,
    )
    print(text)


if __name__ == "__main__":
    main()
