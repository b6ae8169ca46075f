"""Wall-clock time of one training step: SGD, SAM, SAM+AACE and a per-parameter-loop SAM.

Rerun the reported measurement from the repository root with:

    .venv/bin/python -m benchmarks.micro.step_time --model wrn16_4 --batch-size 128 --repeats 10

(``--model`` may be given several times, as ``NAME:BATCH`` for a batch size of its own;
``--device cuda --amp bf16`` for a GPU.) On a GPU, one invocation sweeps models, precision,
compilation and memory layout (``benchmarks/gpu/run_all.sh``)::

    python -m benchmarks.micro.step_time --device cuda --model wrn28_10:256 \\
        --model pyramidnet272_200:64 --setting fp32 --setting bf16 --setting bf16+channels-last \\
        --setting bf16+compile --name step_time-gpu

Settings (``--setting``, repeatable; or ``--matrix`` for all eight; or the single-setting flags
``--amp``, ``--compile``, ``--channels-last``): ``+``-joined parts, one of ``fp32``/``bf16``
(autocast to bfloat16 around each forward pass and its loss, as ``aace train --amp bf16``), one
of ``eager``/``compile`` (``torch.compile`` of each variant's model with the default mode, as
``aace train --compile``), one of ``contiguous``/``channels-last`` (model and batch in
``torch.channels_last``). ``fp32`` on an NVIDIA GPU means PyTorch's defaults: cuDNN convolutions
may use TF32 (``torch.backends.cudnn.allow_tf32``, recorded in the JSON). With ``compile`` the
first call of each variant compiles (minutes for PyramidNet-272: it is reported as "first step
s" and is not in the timings); the warm-up rounds then run compiled code.

Variants, each with its own copy of the same initial model and its own optimizer (SGD with
lr 0.1, momentum 0.9, weight decay 5e-4 as the base), all on the same random CIFAR-shaped batch
(B, 3, 32, 32) with 10 classes, model in train mode:

* ``SGD``: forward, cross-entropy, backward, ``opt.step()``, ``opt.zero_grad()``.
* ``SAM``: ``aace.SAM`` with rho 0.05 and the cross-entropy perturbation.
* ``SAM+AACE``: ``aace.SAM`` with rho 0.2, ``perturbation="aace"`` and ``aace_loss`` for the
  first pass.
* ``LoopSAM``: ``benchmarks.baselines.LoopSAM``, a plain per-parameter loop in the style of the
  widely used davda54/sam implementation, rho 0.05, cross-entropy perturbation.

Every SAM variant runs its second forward pass under ``frozen_running_stats``. With
``--amp bf16`` each forward pass and its loss run under autocast, as in ``aace train``. A SAM step
costs two forward-backward passes, so ``SAM+AACE / (2 x SGD)`` near 1 means the optimizer's own
work (norm, perturbation, saving and restoring the weights) is negligible.

Timings are interleaved (see ``benchmarks.harness.time_interleaved``): each repetition times
one step of every variant, so machine-load changes hit all variants alike. Ratios are given both
as the ratio of medians and as the median of the per-repetition ratios. On CUDA the clock is read
after ``torch.cuda.synchronize()``.

Also reported per model and setting: images/s (batch / median step time) and, on CUDA, each
variant's peak memory: its own footprint as if it ran alone, i.e. the bytes of its model's
parameters and buffers and its optimizer's state (exact, from the tensors) plus the peak of
``torch.cuda.max_memory_allocated`` above ``torch.cuda.memory_allocated`` during one step (peak
statistics reset before it), so the other variants' resident models do not count. On the CPU
the peak is n/a. The result files are rewritten after every (setting, model) block, so a run
cut off by a time limit keeps what it finished.

``--profile`` adds a per-phase breakdown of the SAM+AACE step (first pass, ``first_step``,
second pass, ``second_step``) and the most expensive operators of ``first_step`` and
``second_step`` from ``torch.profiler``.
"""

from __future__ import annotations

import argparse
import copy
import gc
import itertools
import statistics
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from aace import SAM, aace_loss
from aace.models import create_model
from benchmarks import harness
from benchmarks.baselines import (
    CIFAR_SGD_KWARGS,
    VARIANTS,
    Autocast,
    Forward,
    cuda_peak_bytes,
    footprint_bytes,
    make_optimizer,
    sam_step,
    variant_step,
)

NUM_CLASSES = 10
_SETTING_PARTS = {
    "fp32": ("amp", "off"),
    "bf16": ("amp", "bf16"),
    "eager": ("compile", False),
    "compile": ("compile", True),
    "contiguous": ("channels_last", False),
    "channels-last": ("channels_last", True),
}


@dataclass(frozen=True)
class Setting:
    """How a step runs: autocast precision, ``torch.compile`` or not, memory layout."""

    amp: str = "off"  # "off" (fp32) or "bf16"
    compile: bool = False
    channels_last: bool = False

    @property
    def label(self) -> str:
        parts = ["bf16" if self.amp == "bf16" else "fp32"]
        parts += ["compile"] if self.compile else []
        parts += ["channels-last"] if self.channels_last else []
        return "+".join(parts)

    @property
    def memory_format(self) -> torch.memory_format:
        return torch.channels_last if self.channels_last else torch.contiguous_format


def parse_setting(text: str) -> Setting:
    """``bf16+compile+channels-last`` -> Setting; omitted parts take fp32, eager, contiguous."""
    values: dict[str, Any] = {}
    for part in text.lower().split("+"):
        if part not in _SETTING_PARTS:
            raise argparse.ArgumentTypeError(
                f"unknown part {part!r} in {text!r}; expected '+'-joined parts, at most one of "
                "each pair fp32|bf16, eager|compile, contiguous|channels-last (e.g. "
                "bf16+compile+channels-last)"
            )
        field, value = _SETTING_PARTS[part]
        if field in values and values[field] != value:
            raise argparse.ArgumentTypeError(f"{text!r} sets {field} twice")
        values[field] = value
    return Setting(**values)


def matrix_settings() -> list[Setting]:
    """All eight settings, the eager ones first (they finish fast; compiling takes minutes)."""
    combos = itertools.product((False, True), ("off", "bf16"), (False, True))
    return [Setting(amp, compile, layout) for compile, amp, layout in combos]


def _forward(model: nn.Module, compile: bool) -> Forward:
    return torch.compile(model) if compile else model


def build_variants(
    base: nn.Module, x: torch.Tensor, y: torch.Tensor, autocast: Autocast, compile: bool = False
) -> tuple[dict[str, Callable[[], None]], dict[str, nn.Module], dict[str, torch.optim.Optimizer]]:
    """One step function per variant, each with its own copy of ``base`` and optimizer."""
    models = {name: copy.deepcopy(base) for name in VARIANTS}
    opts = {name: make_optimizer(name, models[name]) for name in VARIANTS}
    steps = {
        name: variant_step(
            name, models[name], opts[name], x, y, autocast, _forward(models[name], compile)
        )
        for name in VARIANTS
    }
    return steps, models, opts


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
    compile: bool = False,
) -> dict[str, Any]:
    """Median seconds of each phase of the SAM+AACE step, and the operators that
    ``SAM.first_step`` and ``SAM.second_step`` spend their time in (``torch.profiler``)."""
    model = copy.deepcopy(base)
    forward = _forward(model, compile)
    opt = make_optimizer("SAM+AACE", model)

    def phases(laps: harness.Laps) -> None:
        laps.start()
        sam_step(model, forward, opt, aace_loss, x, y, autocast, laps.lap)()

    seconds = harness.time_phases(
        {"SAM+AACE": phases}, repeats, warmup, harness.synchronizer(device)
    )
    phase_median_s = {phase: statistics.median(s) for phase, s in seconds["SAM+AACE"].items()}

    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    profiled_steps = min(repeats, 5)
    profiled = sam_step(model, forward, _Labelled(opt), aace_loss, x, y, autocast)
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(profiled_steps):
            profiled()
        harness.synchronizer(device)()
    events = prof.events()
    top_ops = {
        call: _ops_inside(events, call, profiled_steps)[:10]
        for call in ("SAM.first_step", "SAM.second_step")
    }
    return {"phase_median_s": phase_median_s, "top_operators": top_ops}


def _format_ratio(of_medians: float, paired: float) -> str:
    return f"{of_medians:.3f} ({paired:.3f})"


RATIO_PAIRS = {
    "SAM / (2 x SGD)": ("SAM", "SGD", 2.0),
    "SAM+AACE / (2 x SGD)": ("SAM+AACE", "SGD", 2.0),
    "LoopSAM / SAM+AACE": ("LoopSAM", "SAM+AACE", 1.0),
    "LoopSAM / SAM": ("LoopSAM", "SAM", 1.0),
}


def _raise_compile_limits() -> None:
    """Each variant compiles its own model instance, and SAM's second pass flips BatchNorm
    flags (a guard, hence a second graph): more cache entries than dynamo's default limit of 8,
    beyond which it would silently fall back to eager code."""
    import torch._dynamo.config as dynamo_config

    for name, floor in (
        ("recompile_limit", 64),
        ("cache_size_limit", 64),
        ("accumulated_recompile_limit", 512),
        ("accumulated_cache_size_limit", 512),
    ):
        if hasattr(dynamo_config, name):
            setattr(dynamo_config, name, max(getattr(dynamo_config, name), floor))


def _dynamo_counters() -> dict[str, dict[str, int]]:
    """Dynamo's own counts (graphs, graph breaks, recompiles) since the last reset."""
    try:
        from torch._dynamo.utils import counters
    except ImportError:
        return {}
    return {k: dict(v) for k, v in counters.items() if k in ("stats", "graph_break", "recompiles")}


def _clear_dynamo_counters() -> None:
    try:
        from torch._dynamo.utils import counters
    except ImportError:
        return
    counters.clear()


def parse_model(text: str, default_batch: int) -> tuple[str, int]:
    """``NAME`` or ``NAME:BATCH`` (a model with its own batch size) -> (name, batch)."""
    name, _, batch = text.partition(":")
    if not batch:
        return name, default_batch
    try:
        return name, harness.positive_int(batch)
    except (ValueError, argparse.ArgumentTypeError):
        raise ValueError(
            f"--model {text!r}: expected NAME or NAME:BATCH with BATCH an integer >= 1"
        ) from None


def measure_block(
    model_name: str,
    batch_size: int,
    setting: Setting,
    args: argparse.Namespace,
    device: torch.device,
) -> dict[str, Any]:
    """Time every variant of one (model, setting); on CUDA also their peak memory."""
    if setting.compile:
        import torch._dynamo as dynamo  # binds dynamo only, not a function-local torch

        dynamo.reset()  # no cache entries of the previous setting count against limits
        _clear_dynamo_counters()
    torch.manual_seed(0)
    base = create_model(model_name, num_classes=NUM_CLASSES, in_channels=3).to(device).train()
    base = base.to(memory_format=setting.memory_format)
    n_params = sum(p.numel() for p in base.parameters())
    x = torch.randn(batch_size, 3, 32, 32, device=device)
    x = x.contiguous(memory_format=setting.memory_format)
    y = torch.randint(0, NUM_CLASSES, (batch_size,), device=device)

    def autocast() -> AbstractContextManager[Any]:
        if setting.amp == "bf16":
            return torch.autocast(device.type, dtype=torch.bfloat16)
        return nullcontext()

    steps, models, opts = build_variants(base, x, y, autocast, setting.compile)
    synchronize = harness.synchronizer(device)
    # The first call pays the lazy set-up: cuDNN plans, and with compile the compilation.
    first_step_s = {name: harness.timed(steps[name], synchronize)[1] for name in VARIANTS}
    samples = harness.time_interleaved(steps, args.repeats, args.warmup, synchronize)
    peak: dict[str, int | None] = dict.fromkeys(VARIANTS)
    if device.type == "cuda":
        for name in VARIANTS:
            before, during = cuda_peak_bytes(steps[name], device)
            peak[name] = footprint_bytes(models[name], opts[name]) + during - before
    finite = {
        name: all(bool(torch.isfinite(p).all()) for p in models[name].parameters())
        for name in VARIANTS
    }
    block: dict[str, Any] = {
        "model": model_name,
        "batch_size": batch_size,
        "setting": setting,
        "parameters": n_params,
        "samples": samples,
        "first_step_s": first_step_s,
        "peak_bytes": peak,
        "finite": finite,
    }
    if setting.compile:
        block["dynamo"] = _dynamo_counters()
    if args.profile:
        block["profile"] = profile_sam_aace(
            base,
            x,
            y,
            autocast,
            device,
            max(3, args.repeats // 2),
            args.warmup,
            setting.compile,
        )
    del steps, models, opts, base
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return block


def _mib(value: int | None) -> str:
    return "n/a" if value is None else f"{value / 2**20:,.0f}"


def _batches(blocks: list[dict[str, Any]], args: argparse.Namespace) -> str:
    sizes = dict.fromkeys(f"{b['batch_size']} ({b['model']})" for b in blocks)
    if all(b["batch_size"] == args.batch_size for b in blocks):
        return str(args.batch_size)
    return ", ".join(sizes)


def write_blocks(
    blocks: list[dict[str, Any]],
    planned: int,
    args: argparse.Namespace,
    device: torch.device,
    settings: list[Setting],
    models: list[str],
) -> str:
    """Rows, ratios and tables of the finished blocks; rewrites the result files."""
    rows: list[dict[str, Any]] = []
    ratios: list[dict[str, Any]] = []
    profiles: dict[str, Any] = {}
    summary_rows, step_rows, ratio_rows, phase_rows, op_rows = [], [], [], [], []
    for block in blocks:
        model_name, setting, samples = block["model"], block["setting"], block["samples"]
        batch = block["batch_size"]
        label = setting.label
        summaries = {name: harness.summarize(samples[name]) for name in VARIANTS}
        median = {name: summaries[name]["median"] for name in VARIANTS}
        peak = block["peak_bytes"]
        for name in VARIANTS:
            s = summaries[name]
            rows.append(
                {
                    "model": model_name,
                    "parameters": block["parameters"],
                    "variant": name,
                    "setting": label,
                    **asdict(setting),
                    "batch_size": batch,
                    "seconds": s,
                    "samples_s": samples[name],
                    "images_per_s": batch / s["median"],
                    "first_step_s": block["first_step_s"][name],
                    "peak_bytes": peak[name],
                    "peak_over_sgd": (
                        None if peak[name] is None else peak[name] / peak["SGD"]  # type: ignore[operator]
                    ),
                    "weights_finite_after": block["finite"][name],
                }
            )
            step_rows.append(
                [
                    model_name,
                    label,
                    name,
                    harness.milliseconds(s["median"]),
                    f"{harness.milliseconds(s['q1'])}-{harness.milliseconds(s['q3'])}",
                    f"{harness.milliseconds(s['min'])}-{harness.milliseconds(s['max'])}",
                    f"{batch / s['median']:,.0f}",
                    _mib(peak[name]),
                    f"{block['first_step_s'][name]:.2f}",
                    s["n"],
                ]
            )
        block_ratios: dict[str, Any] = {"model": model_name, "setting": label}
        cells = [model_name, label]
        for pair, (num, den, scale) in RATIO_PAIRS.items():
            of_medians = median[num] / (scale * median[den])
            paired = harness.paired_ratio(samples[num], samples[den], scale)
            block_ratios[pair] = {"ratio_of_medians": of_medians, "median_paired_ratio": paired}
            cells.append(_format_ratio(of_medians, paired))
        ratios.append(block_ratios)
        ratio_rows.append(cells)
        aace_over_sgd = block_ratios["SAM+AACE / (2 x SGD)"]["ratio_of_medians"]
        loop_over_aace = block_ratios["LoopSAM / SAM+AACE"]["ratio_of_medians"]
        peak_ratio = "n/a" if peak["SGD"] is None else f"{peak['SAM+AACE'] / peak['SGD']:.2f}"
        summary_rows.append(
            [
                model_name,
                label,
                harness.milliseconds(median["SGD"]),
                harness.milliseconds(median["SAM+AACE"]),
                f"{batch / median['SAM+AACE']:,.0f}",
                f"{aace_over_sgd:.3f}",
                f"{loop_over_aace:.3f}",
                peak_ratio,
                f"{max(block['first_step_s'].values()):.1f}",
            ]
        )
        if "profile" in block:
            profile = block["profile"]
            profiles[f"{model_name} {label}"] = profile
            total = sum(profile["phase_median_s"].values())
            for phase, seconds in profile["phase_median_s"].items():
                phase_rows.append(
                    [
                        model_name,
                        label,
                        phase,
                        harness.milliseconds(seconds),
                        f"{seconds / total:.1%}",
                    ]
                )
            for call, ops in profile["top_operators"].items():
                for op in ops[:6]:
                    op_rows.append(
                        [
                            model_name,
                            label,
                            call,
                            op["operator"],
                            f"{op['calls_per_step']:g}",
                            f"{op['self_cpu_ms_per_step']:.3f}",
                            f"{op['self_device_ms_per_step']:.3f}",
                        ]
                    )

    done = f"{len(blocks)} of {planned} (setting, model) blocks"
    header = (
        f"Batch {_batches(blocks, args)}; {args.repeats} timed repetitions after one first step "
        f"and {args.warmup} warm-up rounds. Milliseconds per step; images/s = batch / median."
    )
    if len(blocks) < planned:
        header = f"**Partial: {done} finished** (cut off or still running). " + header
    tables = [
        header,
        "Summary (ratios of medians; peak = the variant's own footprint, see notes; first step "
        "= the slowest variant's first call, which includes compilation):",
        harness.markdown_table(
            [
                "model",
                "setting",
                "SGD ms",
                "SAM+AACE ms",
                "SAM+AACE images/s",
                "SAM+AACE / (2 x SGD)",
                "LoopSAM / SAM+AACE",
                "peak SAM+AACE / SGD",
                "first step s",
            ],
            summary_rows,
        ),
        "Every variant:",
        harness.markdown_table(
            [
                "model",
                "setting",
                "variant",
                "median ms",
                "IQR ms",
                "min-max ms",
                "images/s",
                "peak MiB",
                "first step s",
                "n",
            ],
            step_rows,
        ),
        "Ratios: ratio of medians (median of per-repetition ratios).",
        harness.markdown_table(["model", "setting", *RATIO_PAIRS], ratio_rows),
    ]
    if phase_rows:
        tables += [
            "SAM+AACE step by phase (medians of separately timed phases):",
            harness.markdown_table(["model", "setting", "phase", "median ms", "share"], phase_rows),
            "Top operators inside the SAM calls of the SAM+AACE step (torch.profiler, self time "
            "per step):",
            harness.markdown_table(
                ["model", "setting", "call", "operator", "calls", "self CPU ms", "self device ms"],
                op_rows,
            ),
        ]
    notes = (
        "SGD: one forward-backward + `opt.step()`. SAM: rho 0.05, CE perturbation. SAM+AACE: "
        'rho 0.2, `perturbation="aace"`, AACE loss in the first pass. LoopSAM: per-parameter '
        "loop in the style of davda54/sam (rho 0.05, CE). All SAM variants use "
        "`frozen_running_stats` in the second pass; base optimizer SGD(lr 0.1, momentum 0.9, "
        "weight decay 5e-4); random data, 10 classes. Settings: fp32/bf16 = no autocast / "
        "bf16 autocast of the forward passes and losses; compile = `torch.compile(model)` "
        "(default mode) per variant; channels-last = model and batch in `torch.channels_last`. "
        "Peak (CUDA only, n/a elsewhere): the variant's parameters, buffers and optimizer state "
        "plus the peak allocated above the pre-step level during one step "
        "(`torch.cuda.max_memory_allocated`, reset before it). Goals: SAM+AACE / (2 x SGD) "
        "<= 1.03 (the optimizer's own work is negligible next to the two passes) and "
        "LoopSAM / SAM+AACE >= 1.0 (no slower than the per-parameter loop)."
    )
    amps = sorted({s.amp for s in settings})
    config = {
        "models": models,
        "batch_size": args.batch_size,
        "batch_sizes": {b["model"]: b["batch_size"] for b in blocks},
        "repeats": args.repeats,
        "warmup": args.warmup,
        "device": str(device),
        "amp": amps[0] if len(amps) == 1 else amps,
        "settings": [dict(asdict(s), label=s.label) for s in settings],
        "threads": args.threads,
        "sgd": CIFAR_SGD_KWARGS,
        "profile": args.profile,
        "blocks_finished": len(blocks),
        "blocks_planned": planned,
    }
    extra: dict[str, Any] = {"ratios": ratios}
    if profiles:
        extra["profiles"] = profiles
    dynamo = {f"{b['model']} {b['setting'].label}": b["dynamo"] for b in blocks if "dynamo" in b}
    if dynamo:
        extra["dynamo_counters"] = dynamo
    return harness.write_results(
        args.name,
        rows,
        "\n\n".join(tables),
        args.out_dir,
        device=device,
        config=config,
        extra=extra,
        notes=notes,
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    harness.add_model_arguments(parser)  # here NAME or NAME:BATCH, e.g. pyramidnet272_200:64
    parser.add_argument(
        "--amp",
        choices=("off", "bf16"),
        action="append",
        default=None,
        help="bf16 autocast for the forward passes (default: off); repeat for several",
    )
    parser.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="torch.compile each variant's model (the first call compiles; default: off)",
    )
    parser.add_argument(
        "--channels-last",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="model and batch in torch.channels_last (default: off)",
    )
    parser.add_argument(
        "--setting",
        type=parse_setting,
        action="append",
        default=None,
        metavar="SPEC",
        help="a '+'-joined setting such as fp32, bf16+channels-last, bf16+compile; repeat for "
        "several; replaces --amp/--compile/--channels-last",
    )
    parser.add_argument(
        "--matrix",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="all eight settings: fp32|bf16 x eager|compile x contiguous|channels-last",
    )
    parser.add_argument(
        "--profile",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="also break the SAM+AACE step into phases and list its top operators",
    )
    parser.add_argument(
        "--outer",
        choices=("settings", "models"),
        default="settings",
        help="the outer loop: settings (every model's eager settings finish before the first "
        "compilation) or models (one model's settings, then the next); default: %(default)s",
    )
    harness.add_name_argument(parser, "step_time")
    harness.add_common_arguments(parser, repeats=20, warmup=3)
    args = parser.parse_args(argv)
    device = harness.setup(parser, args)
    if args.matrix and args.setting:
        parser.error("--matrix and --setting: give one of them")
    if args.matrix:
        settings = matrix_settings()
    elif args.setting:
        settings = list(dict.fromkeys(args.setting))
    else:
        amps = list(dict.fromkeys(args.amp or ["off"]))
        settings = [Setting(amp, args.compile, args.channels_last) for amp in amps]
    if any(s.compile for s in settings):
        _raise_compile_limits()
    try:
        model_batches = [parse_model(m, args.batch_size) for m in args.model or ["wrn16_4"]]
    except ValueError as error:
        parser.error(str(error))
    models = [name for name, _ in model_batches]

    # Settings outside, models inside by default: with --matrix the fast eager settings of
    # every model finish before the first compilation starts.
    if args.outer == "settings":
        planned = [(setting, model) for setting in settings for model in model_batches]
    else:
        planned = [(setting, model) for model in model_batches for setting in settings]
    blocks: list[dict[str, Any]] = []
    text = ""
    for setting, (model_name, batch_size) in planned:
        print(f"== {model_name} batch {batch_size} {setting.label}", flush=True)
        blocks.append(measure_block(model_name, batch_size, setting, args, device))
        text = write_blocks(blocks, len(planned), args, device, settings, models)
    print(text)


if __name__ == "__main__":
    main()
