"""The benchmarks' one clock and their result files: arguments, interleaved timing, summaries.

Not a benchmark itself; every script in :mod:`benchmarks.micro` and :mod:`benchmarks.studies`
imports it. Every published time is read by :class:`Laps` (through :func:`time_interleaved`,
:func:`time_phases` or :func:`timed`); only ``micro.pipeline``'s CUDA events read the device's
own clock. Every script writes ``<out-dir>/<name>.json`` (machine, command line, configuration,
raw samples and summaries) and ``<out-dir>/<name>.md`` (the same as tables), so reported numbers
are always made from files, never typed by hand.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TypeVar

import torch

import aace

# The repository root, from which every script runs (``python -m benchmarks.<kind>.<name>``).
REPOSITORY = Path(__file__).resolve().parent.parent
DEFAULT_OUT_DIR = Path(__file__).resolve().parent / "results"
T = TypeVar("T")


# -- arguments ------------------------------------------------------------------------------


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text}")
    return value


def non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {text}")
    return value


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """--model (repeatable; default wrn16_4) and --batch-size (default 128)."""
    parser.add_argument(
        "--model",
        action="append",
        default=None,
        help="model name for aace.models.create_model; repeat for several (default: wrn16_4)",
    )
    parser.add_argument("--batch-size", type=positive_int, default=128)


def add_common_arguments(
    parser: argparse.ArgumentParser, *, repeats: int | None = 20, warmup: int | None = 3
) -> None:
    """--device, --threads, --out-dir, and (unless None) --repeats/--warmup with these defaults."""
    if repeats is not None:
        parser.add_argument(
            "--repeats",
            type=positive_int,
            default=repeats,
            help="timed repetitions per variant (default: %(default)s)",
        )
    if warmup is not None:
        parser.add_argument(
            "--warmup",
            type=non_negative_int,
            default=warmup,
            help="untimed repetitions per variant before timing (default: %(default)s)",
        )
    parser.add_argument(
        "--device", default="cpu", help="torch device, e.g. cpu, cuda, cuda:1 (default: cpu)"
    )
    parser.add_argument(
        "--threads",
        type=positive_int,
        default=None,
        help="torch.set_num_threads(N); default: leave PyTorch's own choice",
    )
    parser.add_argument(
        "--out-dir",
        type=Path,
        default=DEFAULT_OUT_DIR,
        help="directory for <name>.json and <name>.md (default: benchmarks/results)",
    )


def add_name_argument(parser: argparse.ArgumentParser, default: str) -> None:
    """--name: the stem of the result files, so a run on other hardware does not overwrite."""
    parser.add_argument(
        "--name",
        default=default,
        help="write <out-dir>/<name>.json and .md (default: %(default)s)",
    )


def setup(parser: argparse.ArgumentParser, args: argparse.Namespace) -> torch.device:
    """Apply --threads, seed, and check the device; returns it."""
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    try:
        device = torch.device(args.device)
    except RuntimeError as error:
        parser.error(f"--device {args.device!r}: {error}")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {args.device!r}: CUDA is not available on this machine")
    torch.manual_seed(0)
    return device


def synchronizer(device: torch.device) -> Callable[[], None]:
    """A function that waits for all queued work of ``device`` (a no-op on the CPU)."""
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


# -- timing ---------------------------------------------------------------------------------


def _nothing() -> None:
    pass


class Laps:
    """The clock: seconds between :meth:`start` and each :meth:`lap`, per phase name.

    The clock is read after ``synchronize()``, so queued device work is counted. A variant of
    :func:`time_phases` calls ``start()`` before its first timed phase and ``lap(name)`` after
    each; work between a ``lap`` and the next ``start`` (setting gradients, say) is not timed.
    """

    def __init__(self, synchronize: Callable[[], None] = _nothing) -> None:
        self.synchronize = synchronize
        self.seconds: dict[str, list[float]] = {}
        self._last = 0.0

    def start(self) -> None:
        self.synchronize()
        self._last = time.perf_counter()

    def lap(self, phase: str) -> None:
        """Record the seconds since ``start()`` or the previous ``lap`` under ``phase``."""
        self.synchronize()
        now = time.perf_counter()
        self.seconds.setdefault(phase, []).append(now - self._last)
        self._last = now


@contextmanager
def _garbage_collector_off() -> Iterator[None]:
    """As in ``timeit``: no collection pauses inside a timed call."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def time_phases(
    variants: Mapping[str, Callable[[Laps], object]],
    repeats: int,
    warmup: int,
    synchronize: Callable[[], None] = _nothing,
) -> dict[str, dict[str, list[float]]]:
    """Seconds of each phase of each variant, per lap, measured round-robin.

    Each repetition calls every variant once with its own :class:`Laps`, so a change of machine
    load during the run hits all variants alike; the starting variant rotates from one
    repetition to the next, so no variant always runs right after the same other one.
    ``warmup`` untimed rounds come first. Python's garbage collector is off during each call.
    A variant may lap a phase several times per call (one lap per model it steps, say).
    """
    names = list(variants)
    laps = {name: Laps(synchronize) for name in names}
    for round_index in range(warmup + repeats):
        if round_index == warmup:  # the warm-up rounds' laps are not samples
            for clock in laps.values():
                clock.seconds.clear()
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            with _garbage_collector_off():
                variants[name](laps[name])
    return {name: clock.seconds for name, clock in laps.items()}


def time_interleaved(
    variants: Mapping[str, Callable[[], object]],
    repeats: int,
    warmup: int,
    synchronize: Callable[[], None] = _nothing,
) -> dict[str, list[float]]:
    """Seconds per call of each variant, measured round-robin (:func:`time_phases` with one
    phase, the whole call)."""

    def whole(call: Callable[[], object]) -> Callable[[Laps], None]:
        def run(laps: Laps) -> None:
            laps.start()
            call()
            laps.lap("call")

        return run

    samples = time_phases({n: whole(c) for n, c in variants.items()}, repeats, warmup, synchronize)
    return {name: phases.get("call", []) for name, phases in samples.items()}


def timed(call: Callable[[], T], synchronize: Callable[[], None] = _nothing) -> tuple[T, float]:
    """``(call(), seconds)`` of one call, read by :class:`Laps` with the collector off: for a
    quantity measured once (a first call that compiles, a whole training process)."""
    laps = Laps(synchronize)
    with _garbage_collector_off():
        laps.start()
        result = call()
        laps.lap("call")
    return result, laps.seconds["call"][0]


def summarize(samples: Sequence[float]) -> dict[str, float | int]:
    """Median, quartiles (inclusive method), min, max, mean and n of ``samples``."""
    values = sorted(samples)
    if len(values) >= 2:
        q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive")
    else:
        q1 = q3 = values[0]
    return {
        "n": len(values),
        "median": statistics.median(values),
        "q1": q1,
        "q3": q3,
        "min": values[0],
        "max": values[-1],
        "mean": statistics.fmean(values),
    }


def over_runs(values: Sequence[float]) -> dict[str, float | int]:
    """Median, min, max and number of a figure measured once per run (``--runs`` runs, each its
    own interleaved measurement)."""
    return {
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
        "n_runs": len(values),
    }


def over_runs_text(name: str, summary: Mapping[str, float | int]) -> str:
    """``"NAME: median 0.981 over 5 runs (range 0.970-0.990)"`` of :func:`over_runs`."""
    return (
        f"{name}: median {summary['median']:.3f} over {summary['n_runs']} runs "
        f"(range {summary['min']:.3f}-{summary['max']:.3f})"
    )


def paired_ratio(
    numerator: Sequence[float], denominator: Sequence[float], scale: float = 1.0
) -> float:
    """Median over repetitions of numerator[i] / (scale * denominator[i]).

    With interleaved runs sample i of both variants was taken at nearly the same time, so this
    ratio is less affected by slow drifts of machine load than the ratio of the two medians.
    """
    return statistics.median(n / (scale * d) for n, d in zip(numerator, denominator))


# -- output ---------------------------------------------------------------------------------


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A GitHub-flavoured Markdown table; the first column left-aligned, the others right."""
    align = [":---"] + ["---:"] * (len(headers) - 1)
    lines = ["| " + " | ".join(headers) + " |", "| " + " | ".join(align) + " |"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def _program() -> list[str]:
    """``["-m", "benchmarks.micro.step_time"]`` for a script run as a module (as they are
    meant to be), else its path as given."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    return ["-m", spec.name] if spec is not None and spec.name else sys.argv[:1]


def command_line() -> str:
    """The command that ran this script, runnable from the repository root."""
    return shlex.join([Path(sys.executable).name, *_program(), *sys.argv[1:]])


def _argv() -> list[str]:
    """``sys.argv`` with the script's path relative to the working directory (the repository
    root), so the results name no machine's folders."""
    script = Path(sys.argv[0]) if sys.argv and sys.argv[0] else None
    if script is not None and script.is_absolute() and script.is_relative_to(Path.cwd()):
        return [str(script.relative_to(Path.cwd())), *sys.argv[1:]]
    return list(sys.argv)


def machine_info(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "argv": _argv(),
        "command": command_line(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "aace": aace.__version__,
        "device": str(device),
    }
    if hasattr(os, "sched_getaffinity"):
        info["cpus_available"] = len(os.sched_getaffinity(0))
    if hasattr(os, "getloadavg"):
        # Recorded because timings on a shared machine are only as good as its idleness.
        info["load_average_1_5_15min"] = [round(x, 2) for x in os.getloadavg()]
    if device.type == "cuda":
        info["device_name"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
        props = torch.cuda.get_device_properties(device)
        info["device_memory_gib"] = round(props.total_memory / 2**30, 1)
        info["device_capability"] = f"{props.major}.{props.minor}"
        info["cudnn"] = torch.backends.cudnn.version()
        # Recorded because "fp32" on an NVIDIA GPU means TF32 convolutions unless turned off.
        info["cudnn_allow_tf32"] = torch.backends.cudnn.allow_tf32
        info["cudnn_benchmark"] = torch.backends.cudnn.benchmark
        info["float32_matmul_precision"] = torch.get_float32_matmul_precision()
    return info


def write_results(
    name: str,
    rows: list[dict[str, Any]],
    markdown_table: str,
    out_dir: Path | str = DEFAULT_OUT_DIR,
    *,
    device: torch.device,
    config: Mapping[str, Any],
    extra: Mapping[str, Any] | None = None,
    notes: str = "",
) -> str:
    """Write ``<out_dir>/<name>.json`` and ``<out_dir>/<name>.md``; return the Markdown text.

    The JSON holds the machine description (with the exact command line), the configuration,
    ``rows`` and ``extra``; the Markdown holds the command, a one-line machine summary,
    ``markdown_table`` (which may be several tables) and ``notes``.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    machine = machine_info(device)
    payload = {"benchmark": name, "machine": machine, "config": dict(config), "rows": rows}
    if extra:
        payload.update(extra)
    _write_atomically(out_dir / f"{name}.json", json.dumps(payload, indent=2) + "\n")

    where = machine.get("device_name", machine["processor"])
    summary = (
        f"{machine['date']}; {machine['platform']}; {where}; device {machine['device']}; "
        f"{machine['cpu_count']} CPUs, {machine['torch_threads']} torch threads; "
        f"torch {machine['torch']}; aace {machine['aace']}"
    )
    if "load_average_1_5_15min" in machine:
        summary += f"; load average at the end {machine['load_average_1_5_15min']}"
    parts = [
        f"# {name}",
        f"Command: `{machine['command']}`",
        f"Machine: {summary}",
        markdown_table,
    ]
    if notes:
        parts.append(notes)
    text = "\n\n".join(parts) + "\n"
    _write_atomically(out_dir / f"{name}.md", text)
    return text


def _write_atomically(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` via a temporary file and a rename, so a benchmark killed by a
    time limit while it rewrites its results leaves the previous complete file, never half."""
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(text)
    os.replace(temporary, path)


def milliseconds(seconds: float) -> str:
    return f"{seconds * 1e3:.2f}"
