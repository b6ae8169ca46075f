"""``aace sweep``: a grid of training runs (optimizers x rho x label noise x seeds), one folder.

* **Names.** Each run is a directory ``{optimizer}[-rho{rho}][-noise{rate}]-s{seed}`` of the
  sweep's folder (``sam-aace-rho0.2-noise0.4-s1``): rho when the grid sets it, the noise rate when
  the grid has ``--label-noise``.
* **Resume.** Rerunning the same sweep trains nothing that is finished (a ``summary.json`` and
  the same configuration); an interrupted run continues from its last checkpoint; a run
  directory whose configuration differs from the grid's is refused before anything runs.
* **Jobs.** ``jobs`` runs train at once, each in a process of its own (``spawn``), with the
  machine's CPUs split between them (``torch.set_num_threads``, ``OMP_NUM_THREADS``). A run's
  log goes to ``train.log`` in its directory; one that fails (bad setting, divergence) is
  reported and the others go on.
* **Stopping.** A SIGTERM (Slurm, ``kill``) or SIGINT (Ctrl-C) to the sweep is passed on to its
  runs (:mod:`aace.training.workers`): each writes a checkpoint at its next step boundary and
  stops, no other run starts, and the sweep exits with status 75 (rerun the same command to
  continue). A worker whose sweep died without a word (SIGKILL, out of memory) stops its run
  the same way within a second and exits, rather than training on unobserved.
* **Deadline.** ``run_sweep(deadline=..., min_start=...)`` (a ``time.monotonic()`` value, for a
  session with a time limit): no run starts with ``min_start`` seconds or fewer left, and when
  the deadline passes the runs still going are stopped as on SIGTERM (a checkpoint each); the
  sweep then returns, the stopped and the unstarted runs unfinished (rerun to continue).
* **Order.** Seed by seed, and within a seed every noise rate and optimizer, so that a sweep
  stopped halfway still compares like with like.
* **Result.** The :func:`aace.report.compare_table` of all runs, printed and written to
  ``compare.md``.
"""

from __future__ import annotations

import contextlib
import math
import multiprocessing
import os
import signal
import time
import traceback
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from aace.report import compare_table
from aace.runs import RunDirectory, RunError, atomic_write_text, describe_differences
from aace.training.config import (
    OPTIMIZER_TABLE,
    OPTIMIZERS,
    RESUMABLE_CHANGES,
    ConfigError,
    RunConfig,
)
from aace.training.preemption import Preempted
from aace.training.trainer import Trainer
from aace.training.workers import (
    STOP_SIGNALS,
    TRAINING,
    ForwardSignals,
    available_cpus,
    stop_children,
    watch_parent,
)

COMPARE = "compare.md"
LOG = "train.log"
_SAM_SCHEDULE = {"sam_every": 1, "sam_start": 0.0, "sam_adaptive": None}  # plain-SGD values


@dataclass(frozen=True)
class SweepRun:
    """One cell of the grid: its directory name and the run's configuration."""

    name: str
    config: RunConfig

    @property
    def out(self) -> Path:
        return Path(self.config.out)

    @property
    def directory(self) -> RunDirectory:
        return RunDirectory(self.config.out)

    @property
    def finished(self) -> bool:
        return self.directory.finished


@dataclass
class Outcome:
    """What became of a run: ``summary`` when it finished, else ``error`` (one line)."""

    run: SweepRun
    summary: dict[str, Any] | None = None
    error: str | None = None
    seconds: float = 0.0
    trained: bool = True  # False: finished before this sweep started
    stopped: bool = False  # stopped on a signal after writing a checkpoint


def parse_optimizers(text: str) -> list[tuple[str, float | None]]:
    """``"sgd,sam:0.05,sam-aace"`` -> ``[("sgd", None), ("sam", 0.05), ("sam-aace", None)]``."""
    entries: list[tuple[str, float | None]] = []
    for item in text.split(","):
        name, _, rho_text = item.strip().partition(":")
        if name not in OPTIMIZERS:
            raise ConfigError(
                f"--optimizers: got {name!r}{_within(name, text)}; expected a comma-separated "
                f"list of {', '.join(OPTIMIZERS)}, each optionally with :RHO (e.g. sam:0.05)"
            )
        rho = None
        if rho_text:
            rho = _number("optimizers", rho_text, text)
            if not OPTIMIZER_TABLE[name].second_pass:
                raise ConfigError(f"--optimizers: got {item!r}; {name} has no rho")
        entries.append((name, rho))
    return entries


def parse_numbers(option: str, text: str, low: float, high: float) -> list[float]:
    """A comma-separated list of numbers in ``[low, high]``, for ``--rhos`` and
    ``--label-noise``."""
    values = [_number(option, item, text) for item in text.split(",")]
    for value in values:
        if not low <= value <= high:
            raise ConfigError(
                f"--{option}: got {value:g}{_within(f'{value:g}', text)}; expected numbers in "
                f"[{low:g}, {high:g}]"
            )
    return values


def _within(item: str, text: str) -> str:
    """`` in 'sgd,adam'`` when the bad item is one of several, else nothing (not "'x' in 'x'")."""
    return "" if item == text.strip() else f" in {text!r}"


def _number(option: str, item: str, text: str) -> float:
    try:
        value = float(item)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise ConfigError(
            f"--{option}: got {item.strip()!r}{_within(item.strip(), text)}; expected a "
            "comma-separated list of numbers"
        )
    return value


def plan(
    base: dict[str, Any],
    out: str | Path,
    optimizers: list[tuple[str, float | None]],
    rhos: list[float] | None = None,
    seeds: int = 3,
    label_noise: list[float] | None = None,
    seed: int = 0,
) -> list[SweepRun]:
    """The grid's runs, validated, in training order (seed, then noise rate, then optimizer).

    ``base`` holds the other :class:`RunConfig` fields, the same for every run. The seeds are
    ``seed`` ... ``seed + seeds - 1``, as everywhere in the CLI: ``--seed`` is the first seed,
    counts follow it. An optimizer entry with a rho keeps it; the others take each of ``rhos``
    (default: their own default rho); SGD runs once per seed and noise rate, without the
    SAM-step schedule of ``base``.
    """
    if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
        raise ConfigError(f"--seeds: got {seeds!r}; expected an integer >= 1")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ConfigError(f"--seed: got {seed!r}; expected an integer >= 0")
    cells: list[tuple[str, float | None, bool]] = []  # optimizer, rho, rho in the name
    for name, rho in optimizers:
        if not OPTIMIZER_TABLE[name].second_pass:
            choices = [(None, False)]
        elif rho is not None:
            choices = [(rho, True)]
        elif rhos:
            choices = [(r, True) for r in rhos]
        else:
            choices = [(None, False)]
        for rho_value, named in choices:
            if (name, rho_value, named) not in cells:
                cells.append((name, rho_value, named))
    runs, names = [], set()
    for run_seed in range(seed, seed + seeds):
        for noise in label_noise if label_noise is not None else [None]:
            for optimizer, rho, named in cells:
                name = optimizer + (f"-rho{rho:g}" if named else "")
                name += "" if noise is None else f"-noise{noise:g}"
                name += f"-s{run_seed}"
                if name in names:
                    continue
                names.add(name)
                values = dict(base, optimizer=optimizer, rho=rho, seed=run_seed)
                values["out"] = str(Path(out) / name)
                if noise is not None:
                    values["label_noise"] = noise
                if not OPTIMIZER_TABLE[optimizer].second_pass:
                    values.update(_SAM_SCHEDULE)
                runs.append(SweepRun(name, RunConfig(**values).validate()))
    return runs


def check_existing(runs: list[SweepRun]) -> None:
    """Refuse a run directory that holds a run with another configuration than the grid's."""
    for run in runs:
        directory = run.directory
        if not directory.config_file.is_file():
            continue
        try:
            saved = RunConfig.from_dict(directory.read_config())
        except (RunError, ConfigError, TypeError) as error:
            raise ConfigError(
                f"--out: '{directory.config_file}' is not a readable aace config"
            ) from error
        differences = run.config.differences(saved, ignore=RESUMABLE_CHANGES)
        if differences:
            details = describe_differences(saved.to_dict(), run.config.to_dict(), differences)
            raise ConfigError(
                f"--out: '{run.out}' holds a run with other settings ({details}); use the "
                "sweep's original arguments or another --out"
            )


def run_sweep(
    runs: list[SweepRun],
    jobs: int = 1,
    log: Callable[[str], None] = print,
    *,
    deadline: float | None = None,
    min_start: float = 0.0,
) -> list[Outcome]:
    """Train the runs that are not finished, ``jobs`` at a time; the outcome of every run.

    With a ``deadline`` (a :func:`time.monotonic` value) no run starts with ``min_start``
    seconds or fewer left, and the runs still going at the deadline write a checkpoint and
    stop; a run that did not start has an outcome with ``trained=False`` and no summary.
    Raises :class:`~aace.training.preemption.Preempted` after a stop signal.
    """
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise ConfigError(f"--jobs: got {jobs!r}; expected an integer >= 1")
    if min_start < 0:
        raise ConfigError(f"min_start: got {min_start!r}; expected seconds >= 0")
    check_existing(runs)
    outcomes = {run.name: Outcome(run, trained=False) for run in runs if run.finished}
    for outcome in outcomes.values():
        outcome.summary = outcome.run.directory.read_summary()
    todo = [run for run in runs if not run.finished]
    jobs = min(jobs, max(1, len(todo)))
    threads = max(1, available_cpus() // jobs)
    resuming = sum(run.directory.has_checkpoint for run in todo)
    log(
        f"sweep: {len(runs)} runs, {len(outcomes)} finished, {resuming} to resume, "
        f"{len(todo) - resuming} to start; {jobs} job(s) x {threads} thread(s)"
    )
    if todo:
        with ForwardSignals() as stop:
            for outcome in _train_all(
                todo, jobs, threads, log, stop, len(outcomes), len(runs), deadline, min_start
            ):
                outcomes[outcome.run.name] = outcome
        if stop.received is not None:
            stopped = sum(outcome.stopped for outcome in outcomes.values())
            raise Preempted(
                f"sweep stopped by {signal.Signals(stop.received).name}: {stopped} run(s) wrote "
                "a checkpoint and stopped; rerun the same command to continue",
                stop.received,
            )
    unstarted = [run.name for run in runs if run.name not in outcomes]
    if unstarted:
        log(
            f"sweep: {len(unstarted)} run(s) not started: {min_start:g} s or fewer were left "
            "before the deadline; rerun the same command to continue"
        )
    return [outcomes.get(run.name) or Outcome(run, trained=False) for run in runs]


def _train_all(
    todo: list[SweepRun],
    jobs: int,
    threads: int,
    log: Callable[[str], None],
    stop: ForwardSignals,
    done: int,
    total: int,
    deadline: float | None = None,
    min_start: float = 0.0,
) -> list[Outcome]:
    results: list[Outcome] = []
    out_of_time = False  # the deadline passed: the runs were told to stop

    def stopping() -> bool:
        return stop.received is not None or out_of_time

    def may_start() -> bool:
        return not stopping() and (deadline is None or deadline - time.monotonic() > min_start)

    previous = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = str(threads)  # read by the workers' OpenMP at start
    context = multiprocessing.get_context("spawn")

    def new_pool() -> ProcessPoolExecutor:
        return ProcessPoolExecutor(
            max_workers=jobs, mp_context=context, initializer=watch_parent, initargs=(os.getpid(),)
        )

    pool = new_pool()
    try:
        pending: dict[Future, SweepRun] = {}
        queue = list(todo)
        while (queue and may_start()) or pending:
            while queue and len(pending) < jobs and may_start():
                run = queue.pop(0)
                run.out.mkdir(parents=True, exist_ok=True)
                pending[pool.submit(_train_one, run.config.to_dict(), threads)] = run
            if not pending:  # the deadline came too near to start the next run
                continue
            timeout = None
            if deadline is not None and not stopping():
                timeout = max(0.0, deadline - time.monotonic())
            finished, _ = wait(pending, timeout=timeout, return_when=FIRST_COMPLETED)
            if not finished:  # the deadline: every run writes a checkpoint and stops
                log(f"sweep: the deadline has come: stopping {len(pending)} run(s)")
                out_of_time = True
                stop_children()
                continue
            broken = False
            for future in finished:
                run = pending.pop(future)
                try:
                    outcome = Outcome(run, **future.result())
                except BrokenProcessPool:  # a worker was killed (by a signal, out of memory)
                    outcome = Outcome(run, error="its process was killed", stopped=stopping())
                    broken = True
                results.append(outcome)
                done += 1
                log(f"[{done}/{total}] {_describe(outcome)}")
            if broken:  # the pool is unusable: the runs it still held are lost with it
                for run in pending.values():
                    results.append(Outcome(run, error="its process was killed", stopped=stopping()))
                    done += 1
                    log(f"[{done}/{total}] {_describe(results[-1])}")
                pending.clear()
                pool.shutdown(wait=True, cancel_futures=True)
                pool = new_pool()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        if previous is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = previous
    return results


def _describe(outcome: Outcome) -> str:
    name = outcome.run.name
    if outcome.stopped:
        return f"{name}: stopped on SIGTERM or SIGINT ({outcome.error or 'checkpoint written'})"
    if outcome.error is not None:
        return f"{name}: failed: {outcome.error} (log: {outcome.run.out / LOG})"
    summary = outcome.summary or {}
    return (
        f"{name}: final test acc {summary.get('final_test_acc', math.nan):.4f}, best "
        f"{summary.get('best_test_acc', math.nan):.4f} ({outcome.seconds:.0f} s)"
    )


def _train_one(values: dict[str, Any], threads: int) -> dict[str, Any]:
    """One run, in a worker process: its summary, or its error in one line. Its log, warnings
    and tracebacks go to ``train.log`` in its directory."""
    torch.set_num_threads(threads)
    config = RunConfig.from_dict(values)
    started = time.perf_counter()
    with (
        TRAINING,
        open(Path(config.out) / LOG, "a") as log_file,
        contextlib.redirect_stdout(log_file),
        contextlib.redirect_stderr(log_file),
    ):
        print(f"aace sweep: pid {os.getpid()}, {torch.get_num_threads()} torch thread(s)")
        try:
            summary = Trainer(
                config, log=lambda line: print(line, flush=True), stop_signals=STOP_SIGNALS
            ).fit(resume=True)
        except Preempted as error:
            print(f"aace sweep: {error}")
            return {"stopped": True, "seconds": time.perf_counter() - started}
        except Exception as error:  # reported by the sweep, which goes on with the others
            traceback.print_exc()
            text = str(error).strip()
            message = text.splitlines()[0] if text else type(error).__name__
            return {"error": message, "seconds": time.perf_counter() - started}
    return {"summary": summary, "seconds": time.perf_counter() - started}


def write_comparison(runs: list[SweepRun], out: str | Path, baseline: str | None) -> str:
    """The comparison table of the runs with at least one finished epoch, also written to
    ``out/compare.md``."""
    paths = [run.out for run in runs if run.directory.read_rows(missing_ok=True)]
    table = compare_table(paths, baseline) if paths else "(no finished epoch yet)"
    atomic_write_text(Path(out) / COMPARE, table + "\n")
    return table
