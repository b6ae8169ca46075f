"""Wall-clock time of one training step: SGD, SAM, SAM+AACE and a per-parameter-loop SAM.

Rerun the reported measurement from the repository root with:

    .venv/bin/python benchmarks/step_time.py --model wrn16_4 --batch-size 128 --repeats 10

(``--model`` may be given several times, ``--device cuda --amp bf16`` for a GPU.)

Variants, each with its own copy of the same initial model and its own optimizer (SGD with
lr 0.1, momentum 0.9, weight decay 5e-4 as the base), all on the same random CIFAR-shaped batch
(B, 3, 32, 32) with 10 classes, model in train mode:

* ``SGD``: forward, cross-entropy, backward, ``opt.step()``, ``opt.zero_grad()``.
* ``SAM``: ``aace.SAM`` with rho 0.05 and the cross-entropy perturbation.
* ``SAM+AACE``: ``aace.SAM`` with rho 0.2, ``perturbation="aace"`` and ``aace_loss`` for the
  first pass.
* ``LoopSAM``: :class:`LoopSAM` below, a plain per-parameter loop in the style of the widely
  used davda54/sam implementation, rho 0.05, cross-entropy perturbation.

Every SAM variant runs its second forward pass under ``frozen_batchnorm_stats``. With
``--amp bf16`` each forward pass and its loss run under autocast, as in ``aace train``. A SAM step
costs two forward-backward passes, so ``SAM+AACE / (2 x SGD)`` near 1 means the optimizer's own
work (norm, perturbation, saving and restoring the weights) is negligible.

Timings are interleaved (see ``_common.time_interleaved``): each repetition times one step of
every variant, so machine-load changes hit all variants alike. Ratios are given both as the
ratio of medians and as the median of the per-repetition ratios. On CUDA the clock is read
after ``torch.cuda.synchronize()``.

``--profile`` adds a per-phase breakdown of the SAM+AACE step (first pass, ``first_step``,
second pass, ``second_step``) and the most expensive operators of ``first_step`` and
``second_step`` from ``torch.profiler``.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import _common
import torch
import torch.nn.functional as F
from torch import nn

from aace import SAM, aace_loss, frozen_batchnorm_stats
from aace.models import create_model

NUM_CLASSES = 10
SGD_KWARGS = dict(lr=0.1, momentum=0.9, weight_decay=5e-4)
VARIANTS = ("SGD", "SAM", "SAM+AACE", "LoopSAM")
Autocast = Callable[[], AbstractContextManager[Any]]


class LoopSAM(torch.optim.Optimizer):
    """SAM as a plain loop over parameters, the structure of the davda54/sam implementation.

    A reference point only: a Python loop with one small kernel per parameter and operation,
    a fresh clone of every weight at each step, and ``p.data`` reassignment to restore it.
    ``e = rho * g / (||g|| + 1e-12)``, with ``||g||`` the L2 norm over all gradients.
    """

    def __init__(
        self,
        params: Any,
        base_optimizer: Callable[..., torch.optim.Optimizer],
        rho: float = 0.05,
        **kwargs: Any,
    ) -> None:
        if rho < 0.0:
            raise ValueError(f"rho must be >= 0, got {rho!r}")
        super().__init__(params, dict(rho=rho, **kwargs))
        self.base_optimizer = base_optimizer(self.param_groups, **kwargs)
        self.param_groups = self.base_optimizer.param_groups
        self.defaults.update(self.base_optimizer.defaults)

    @torch.no_grad()
    def first_step(self, zero_grad: bool = False) -> None:
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
            scale = group["rho"] / (grad_norm + 1e-12)
            for p in group["params"]:
                if p.grad is None:
                    continue
                self.state[p]["old_p"] = p.data.clone()
                e_w = p.grad * scale.to(p)
                p.add_(e_w)
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


def _sgd_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, autocast: Autocast):
    opt = torch.optim.SGD(model.parameters(), **SGD_KWARGS)

    def step() -> None:
        with autocast():
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def _sam_step(
    model: nn.Module,
    opt: SAM | LoopSAM | _Labelled,
    first_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    y: torch.Tensor,
    autocast: Autocast,
    phase_done: Callable[[str], None] = lambda phase: None,
):
    """The documented two-pass SAM step; ``phase_done(name)`` is called after each phase."""

    def step() -> None:
        with autocast():
            loss = first_loss(model(x), y)
        loss.backward()
        phase_done("first pass (forward + backward)")
        opt.first_step(zero_grad=True)
        phase_done("SAM.first_step")
        with frozen_batchnorm_stats(model), autocast():
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        phase_done("second pass (forward + backward)")
        opt.second_step(zero_grad=True)
        phase_done("SAM.second_step")

    return step


def build_variants(
    base: nn.Module, x: torch.Tensor, y: torch.Tensor, autocast: Autocast
) -> tuple[dict[str, Callable[[], None]], dict[str, nn.Module]]:
    models = {name: copy.deepcopy(base) for name in VARIANTS}
    sam = SAM(models["SAM"].parameters(), torch.optim.SGD, rho=0.05, **SGD_KWARGS)
    sam_aace = SAM(
        models["SAM+AACE"].parameters(),
        torch.optim.SGD,
        rho=0.2,
        perturbation="aace",
        **SGD_KWARGS,
    )
    loop_sam = LoopSAM(models["LoopSAM"].parameters(), torch.optim.SGD, rho=0.05, **SGD_KWARGS)
    steps = {
        "SGD": _sgd_step(models["SGD"], x, y, autocast),
        "SAM": _sam_step(models["SAM"], sam, F.cross_entropy, x, y, autocast),
        "SAM+AACE": _sam_step(models["SAM+AACE"], sam_aace, aace_loss, x, y, autocast),
        "LoopSAM": _sam_step(models["LoopSAM"], loop_sam, F.cross_entropy, x, y, autocast),
    }
    return steps, models


class _Labelled:
    """The two SAM calls of an optimizer, each inside a ``record_function`` of its name."""

    def __init__(self, opt: SAM) -> None:
        self.opt = opt

    def first_step(self, zero_grad: bool = False) -> None:
        with torch.profiler.record_function("SAM.first_step"):
            self.opt.first_step(zero_grad=zero_grad)

    def second_step(self, zero_grad: bool = False) -> None:
        with torch.profiler.record_function("SAM.second_step"):
            self.opt.second_step(zero_grad=zero_grad)


class _PhaseClock:
    """Seconds between consecutive ``phase_done`` calls, per phase (device synchronized)."""

    def __init__(self, synchronize: Callable[[], None]) -> None:
        self.synchronize = synchronize
        self.seconds: dict[str, list[float]] = {}
        self.last = 0.0

    def start(self) -> None:
        self.synchronize()
        self.last = time.perf_counter()

    def __call__(self, phase: str) -> None:
        self.synchronize()
        now = time.perf_counter()
        self.seconds.setdefault(phase, []).append(now - self.last)
        self.last = now


def _ops_inside(events: Any, label: str, steps: int) -> list[dict[str, Any]]:
    """Self time per operator name over the events nested in the ``record_function(label)``
    ranges, per step, most expensive first."""
    totals: dict[str, dict[str, float]] = {}
    for event in events:
        parent = event.cpu_parent
        while parent is not None and parent.name != label:
            parent = parent.cpu_parent
        if parent is None:
            continue
        total = totals.setdefault(
            event.name, {"calls": 0, "self_cpu_us": 0.0, "self_device_us": 0.0}
        )
        total["calls"] += 1
        total["self_cpu_us"] += event.self_cpu_time_total
        total["self_device_us"] += getattr(event, "self_device_time_total", 0.0)
    ops = [
        {
            "operator": name,
            "calls_per_step": t["calls"] / steps,
            "self_cpu_ms_per_step": t["self_cpu_us"] / steps / 1e3,
            "self_device_ms_per_step": t["self_device_us"] / steps / 1e3,
        }
        for name, t in totals.items()
    ]
    key = "self_device_ms_per_step" if any(o["self_device_ms_per_step"] for o in ops) else None
    return sorted(ops, key=lambda o: -(o[key] if key else o["self_cpu_ms_per_step"]))


def profile_sam_aace(
    base: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    autocast: Autocast,
    device: torch.device,
    repeats: int,
    warmup: int,
) -> dict[str, Any]:
    """Median seconds of each phase of the SAM+AACE step, and the operators that
    ``SAM.first_step`` and ``SAM.second_step`` spend their time in (``torch.profiler``)."""
    model = copy.deepcopy(base)
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.2, perturbation="aace", **SGD_KWARGS)
    clock = _PhaseClock(_common.synchronizer(device))
    step = _sam_step(model, opt, aace_loss, x, y, autocast, clock)
    for round_index in range(warmup + repeats):
        if round_index == warmup:
            clock.seconds.clear()
        clock.start()
        step()
    phase_median_s = {phase: statistics.median(s) for phase, s in clock.seconds.items()}

    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    profiled_steps = min(repeats, 5)
    profiled = _sam_step(model, _Labelled(opt), aace_loss, x, y, autocast)
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(profiled_steps):
            profiled()
        _common.synchronizer(device)()
    events = prof.events()
    top_ops = {
        call: _ops_inside(events, call, profiled_steps)[:10]
        for call in ("SAM.first_step", "SAM.second_step")
    }
    return {"phase_median_s": phase_median_s, "top_operators": top_ops}


def _format_ratio(of_medians: float, paired: float) -> str:
    return f"{of_medians:.3f} ({paired:.3f})"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    _common.add_model_arguments(parser)
    parser.add_argument(
        "--amp",
        choices=("off", "bf16"),
        default="off",
        help="bf16 autocast for the forward passes; CUDA only (default: off)",
    )
    parser.add_argument(
        "--profile",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="also break the SAM+AACE step into phases and list its top operators",
    )
    _common.add_common_arguments(parser, repeats=20, warmup=3)
    args = parser.parse_args(argv)
    device = _common.setup(parser, args)
    if args.amp != "off" and device.type != "cuda":
        parser.error(f"--amp {args.amp} is for CUDA devices; got --device {args.device}")
    models = args.model or ["wrn16_4"]

    def autocast() -> AbstractContextManager[Any]:
        if args.amp == "bf16":
            return torch.autocast(device.type, dtype=torch.bfloat16)
        return nullcontext()

    rows: list[dict[str, Any]] = []
    ratios: list[dict[str, Any]] = []
    profiles: dict[str, Any] = {}
    step_rows, ratio_rows, phase_rows, op_rows = [], [], [], []
    for model_name in models:
        torch.manual_seed(0)
        base = create_model(model_name, num_classes=NUM_CLASSES, in_channels=3).to(device).train()
        n_params = sum(p.numel() for p in base.parameters())
        x = torch.randn(args.batch_size, 3, 32, 32, device=device)
        y = torch.randint(0, NUM_CLASSES, (args.batch_size,), device=device)
        steps, variant_models = build_variants(base, x, y, autocast)
        samples = _common.time_interleaved(
            steps, args.repeats, args.warmup, _common.synchronizer(device)
        )
        summaries = {name: _common.summarize(samples[name]) for name in VARIANTS}
        for name in VARIANTS:
            finite = all(bool(torch.isfinite(p).all()) for p in variant_models[name].parameters())
            rows.append(
                {
                    "model": model_name,
                    "parameters": n_params,
                    "variant": name,
                    "seconds": summaries[name],
                    "samples_s": samples[name],
                    "weights_finite_after": finite,
                }
            )
            s = summaries[name]
            step_rows.append(
                [
                    model_name,
                    name,
                    _common.milliseconds(s["median"]),
                    f"{_common.milliseconds(s['q1'])}-{_common.milliseconds(s['q3'])}",
                    f"{_common.milliseconds(s['min'])}-{_common.milliseconds(s['max'])}",
                    s["n"],
                ]
            )
        median = {name: summaries[name]["median"] for name in VARIANTS}
        pairs = {
            "SAM / (2 x SGD)": ("SAM", "SGD", 2.0),
            "SAM+AACE / (2 x SGD)": ("SAM+AACE", "SGD", 2.0),
            "LoopSAM / SAM+AACE": ("LoopSAM", "SAM+AACE", 1.0),
            "LoopSAM / SAM": ("LoopSAM", "SAM", 1.0),
        }
        model_ratios: dict[str, Any] = {"model": model_name}
        cells = [model_name]
        for label, (num, den, scale) in pairs.items():
            of_medians = median[num] / (scale * median[den])
            paired = _common.paired_ratio(samples[num], samples[den], scale)
            model_ratios[label] = {"ratio_of_medians": of_medians, "median_paired_ratio": paired}
            cells.append(_format_ratio(of_medians, paired))
        ratios.append(model_ratios)
        ratio_rows.append(cells)

        if args.profile:
            profile = profile_sam_aace(
                base, x, y, autocast, device, max(3, args.repeats // 2), args.warmup
            )
            profiles[model_name] = profile
            total = sum(profile["phase_median_s"].values())
            for phase, seconds in profile["phase_median_s"].items():
                phase_rows.append(
                    [model_name, phase, _common.milliseconds(seconds), f"{seconds / total:.1%}"]
                )
            for call, ops in profile["top_operators"].items():
                for op in ops[:6]:
                    op_rows.append(
                        [
                            model_name,
                            call,
                            op["operator"],
                            f"{op['calls_per_step']:g}",
                            f"{op['self_cpu_ms_per_step']:.3f}",
                            f"{op['self_device_ms_per_step']:.3f}",
                        ]
                    )

    tables = [
        f"Batch {args.batch_size}, {args.repeats} timed repetitions after {args.warmup} warm-up "
        f"rounds, amp {args.amp}. Milliseconds per step.",
        _common.markdown_table(
            ["model", "variant", "median ms", "IQR ms", "min-max ms", "n"], step_rows
        ),
        "Ratios: ratio of medians (median of per-repetition ratios).",
        _common.markdown_table(["model", *pairs], ratio_rows),
    ]
    if phase_rows:
        tables += [
            "SAM+AACE step by phase (medians of separately timed phases):",
            _common.markdown_table(["model", "phase", "median ms", "share"], phase_rows),
            "Top operators inside the SAM calls of the SAM+AACE step (torch.profiler, self time "
            "per step):",
            _common.markdown_table(
                ["model", "call", "operator", "calls", "self CPU ms", "self device ms"], op_rows
            ),
        ]
    notes = (
        "SGD: one forward-backward + `opt.step()`. SAM: rho 0.05, CE perturbation. SAM+AACE: "
        'rho 0.2, `perturbation="aace"`, AACE loss in the first pass. LoopSAM: per-parameter '
        "loop in the style of davda54/sam (rho 0.05, CE). All SAM variants use "
        "`frozen_batchnorm_stats` in the second pass; base optimizer SGD(lr 0.1, momentum 0.9, "
        "weight decay 5e-4); random data, 10 classes."
    )
    config = {
        "models": models,
        "batch_size": args.batch_size,
        "repeats": args.repeats,
        "warmup": args.warmup,
        "device": str(device),
        "amp": args.amp,
        "threads": args.threads,
        "sgd": SGD_KWARGS,
        "profile": args.profile,
    }
    extra: dict[str, Any] = {"ratios": ratios}
    if profiles:
        extra["profiles"] = profiles
    text = _common.write_results(
        "step_time",
        rows,
        "\n\n".join(tables),
        args.out_dir,
        device=device,
        config=config,
        extra=extra,
        notes=notes,
    )
    print(text)


if __name__ == "__main__":
    main()
