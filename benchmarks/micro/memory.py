"""Extra memory of a SAM step over an SGD step, in units of the model's parameter bytes.

Rerun the reported measurement from the repository root with:

    .venv/bin/python -m benchmarks.micro.memory --device cuda  # peak memory (the goal)
    .venv/bin/python -m benchmarks.micro.memory                # CPU: see below

Goal: a SAM step needs at most 1.0x the parameter bytes more than an SGD step (the saved
weights w; the perturbation e reuses the gradient buffers when ``first_step(zero_grad=True)``).

Variants: SGD, SAM (rho 0.05, CE perturbation) and SAM+AACE (rho 0.2, ``perturbation="aace"``,
AACE first pass), each on its own copy of the same model (train mode, random CIFAR-shaped batch,
SGD base with momentum 0.9 and weight decay 5e-4). Each variant is measured alone: its model
and optimizer are built, one untimed step creates the persistent state (momentum buffers,
SAM's saved weights), then one more step is measured. Two quantities:

* Persistent: the bytes of the tensors the optimizer keeps between steps (``opt.state``, and
  for SAM also its base optimizer's state). Exact, on every device.
* Peak: the most memory held by live tensors during the measured step, everything included
  (parameters, gradients, activations, optimizer state, temporaries).
  - CUDA: ``torch.cuda.max_memory_allocated`` after ``torch.cuda.reset_peak_memory_stats``.
  - CPU: PyTorch's CPU allocator keeps no statistics (and ``tracemalloc`` does not see tensor
    storage), so the step runs under ``torch.profiler.profile(profile_memory=True,
    record_shapes=True, with_stack=True)`` and the peak is the maximum total of the
    profiler's memory timeline (``export_memory_timeline``; deprecated in recent PyTorch,
    so ``--no-cpu-peak`` skips it and a failure is reported, not raised). The timeline counts
    tensor storages, not allocator overhead, and tensors that exist before the step only if
    the step uses them. ``--no-cpu-peak`` is also much faster.

Extra = SAM value - SGD value, divided by the parameter bytes.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from aace.models import create_model
from benchmarks import harness
from benchmarks.baselines import (
    CIFAR_SGD_KWARGS,
    cuda_peak_bytes,
    make_optimizer,
    optimizer_state_bytes,
    variant_step,
)

NUM_CLASSES = 10
VARIANTS = ("SGD", "SAM", "SAM+AACE")


def build(
    variant: str, base: nn.Module, x: torch.Tensor, y: torch.Tensor
) -> tuple[torch.optim.Optimizer, Callable[[], None]]:
    """``variant``'s optimizer and step on its own copy of ``base``."""
    model = copy.deepcopy(base)
    opt = make_optimizer(variant, model)
    return opt, variant_step(variant, model, opt, x, y)


def cpu_timeline_peak(step: Callable[[], None]) -> int:
    """Maximum total bytes of the profiler's CPU memory timeline during ``step()``."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    with torch.profiler.profile(
        activities=activities, profile_memory=True, record_shapes=True, with_stack=True
    ) as prof:
        step()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "timeline.json"
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*export_memory_timeline.*")
            prof.export_memory_timeline(str(path), device="cpu")
        _, sizes = json.loads(path.read_text())  # times, bytes per category at each time
    return int(max(sum(at_time) for at_time in sizes))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    harness.add_model_arguments(parser)
    parser.add_argument(
        "--cpu-peak",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="on the CPU, also measure the peak with the profiler's memory timeline (slow)",
    )
    harness.add_common_arguments(parser, repeats=None, warmup=None)
    args = parser.parse_args(argv)
    device = harness.setup(parser, args)
    models = args.model or ["wrn16_4"]
    if device.type == "cuda":
        peak_method = "torch.cuda.max_memory_allocated"
    elif device.type == "cpu" and args.cpu_peak:
        peak_method = "torch.profiler memory timeline"
    else:
        peak_method = None

    rows: list[dict[str, Any]] = []
    table_rows = []
    for model_name in models:
        torch.manual_seed(0)
        base = create_model(model_name, num_classes=NUM_CLASSES, in_channels=3).to(device).train()
        param_bytes = sum(p.numel() * p.element_size() for p in base.parameters())
        x = torch.randn(args.batch_size, 3, 32, 32, device=device)
        y = torch.randint(0, NUM_CLASSES, (args.batch_size,), device=device)
        measured: dict[str, dict[str, Any]] = {}
        for variant in VARIANTS:
            opt, step = build(variant, base, x, y)
            step()  # creates the momentum buffers and SAM's saved weights
            result: dict[str, Any] = {
                "persistent_bytes": optimizer_state_bytes(opt),
                "peak_bytes": None,
            }
            if peak_method == "torch.cuda.max_memory_allocated":
                result["peak_bytes"] = cuda_peak_bytes(step, device)[1]
            elif peak_method is not None:
                try:
                    result["peak_bytes"] = cpu_timeline_peak(step)
                except Exception as error:  # a deprecated API: report, do not fail
                    result["peak_error"] = f"{type(error).__name__}: {error}"
            measured[variant] = result
            del opt, step
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()

        sgd = measured["SGD"]
        for variant in VARIANTS:
            result = measured[variant]
            extra_persistent = (result["persistent_bytes"] - sgd["persistent_bytes"]) / param_bytes
            extra_peak = None
            if result["peak_bytes"] is not None and sgd["peak_bytes"] is not None:
                extra_peak = (result["peak_bytes"] - sgd["peak_bytes"]) / param_bytes
            rows.append(
                {
                    "model": model_name,
                    "variant": variant,
                    "parameter_bytes": param_bytes,
                    "batch_size": args.batch_size,
                    **result,
                    "extra_persistent_over_sgd_in_parameter_bytes": extra_persistent,
                    "extra_peak_over_sgd_in_parameter_bytes": extra_peak,
                }
            )
            peak = result["peak_bytes"]
            table_rows.append(
                [
                    model_name,
                    variant,
                    f"{param_bytes / 2**20:.2f}",
                    f"{result['persistent_bytes'] / 2**20:.2f}",
                    f"{extra_persistent:.3f}",
                    "n/a" if peak is None else f"{peak / 2**20:.1f}",
                    "n/a" if extra_peak is None else f"{extra_peak:.3f}",
                ]
            )

    errors = sorted({row["peak_error"] for row in rows if "peak_error" in row})
    notes = [
        "Extra = (variant - SGD) / parameter bytes; goal for SAM: extra peak <= 1.0. "
        "Persistent: bytes of the optimizer's state tensors (exact). "
        f"Peak: {peak_method or 'not measured on this device'}."
    ]
    if peak_method == "torch.profiler memory timeline":
        notes.append(
            "CPU peak from the profiler's memory timeline: bytes of live tensor storages, not "
            "allocator overhead; see the script's docstring."
        )
    notes += [f"Peak measurement failed: {error}" for error in errors]
    table = harness.markdown_table(
        [
            "model",
            "variant",
            "parameter MiB",
            "persistent MiB",
            "extra persistent",
            "peak MiB",
            "extra peak",
        ],
        table_rows,
    )
    config = {
        "models": models,
        "batch_size": args.batch_size,
        "device": str(device),
        "threads": args.threads,
        "sgd": CIFAR_SGD_KWARGS,
        "peak_method": peak_method,
    }
    text = harness.write_results(
        "memory",
        rows,
        f"Batch {args.batch_size}, one measured step after one untimed step.\n\n{table}",
        args.out_dir,
        device=device,
        config=config,
        notes="\n\n".join(notes),
    )
    print(text)


if __name__ == "__main__":
    main()
