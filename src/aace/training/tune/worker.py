"""The workers of ``aace tune``: a loop that takes trials from the studies (asking Optuna, with
ask-and-tell), trains each trial's runs, and tells the score; and the command that starts them.

A trial is one configuration: its runs (one per search seed, or one final seed) are trained in
turn, each resuming its run directory, and the trial's value is the mean of their scores
(:mod:`aace.training.tune.scoring`). What can happen to a trial:

* It completes, or its runs diverge: COMPLETE, a diverged run scoring
  :data:`~aace.training.tune.scoring.DIVERGED`.
* A stop signal (SIGTERM, or SIGINT: Ctrl-C) stops its run at a checkpoint: FAIL, and a copy
  goes back in the queue at once (not counted as a try); the command exits 75 (130 for SIGINT).
* Its worker dies: the heartbeat sweep of another worker requeues it
  (:mod:`aace.training.tune.storage`).
* It raises (a file briefly missing, out of memory): FAIL, and a copy is queued while fewer than
  ``--retries`` tries have failed; a retry is not counted in the budget.
"""

from __future__ import annotations

import contextlib
import fcntl
import math
import multiprocessing
import os
import signal
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from aace.integrations import MissingExtraError
from aace.runs import RunDirectory
from aace.training.config import ConfigError
from aace.training.preemption import EXIT_PREEMPTED, Preempted, deferred_signal
from aace.training.step import NonFiniteError
from aace.training.trainer import Trainer
from aace.training.tune import report
from aace.training.tune.sampling import FINAL, study_names
from aace.training.tune.scoring import run_score
from aace.training.tune.spec import TuneSpec, round_value
from aace.training.tune.storage import (
    ATTEMPT,
    ERROR,
    JOURNAL,
    PARAMS,
    RETRY_OF,
    RUNS,
    SKIPPED,
    Heartbeat,
    finished_trial_error,
    open_storage,
    open_studies,
    requeue,
)
from aace.training.workers import (
    STOP_SIGNALS,
    TRAINING,
    ForwardSignals,
    available_cpus,
    watch_parent,
)

__all__ = ["LOG", "run_tune", "work"]

LOG = "train.log"


def _require_optuna() -> Any:
    try:
        import optuna
    except ImportError as error:
        raise MissingExtraError(
            "aace tune needs Optuna: pip install 'aace[tune]' (Optuna, and psycopg2 for a "
            "PostgreSQL storage)"
        ) from error
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    return optuna


# -- budget -------------------------------------------------------------------------------------


def counted(trials: list[Any]) -> list[Any]:
    """The trials that use the budget: neither a retry of another nor skipped."""
    return [t for t in trials if RETRY_OF not in t.user_attrs and not t.user_attrs.get(SKIPPED)]


def _busy(trials: list[Any]) -> bool:
    return any(t.state.name in ("RUNNING", "WAITING") for t in trials)


def is_done(study: Any, budget: int) -> bool:
    trials = study.get_trials(deepcopy=False)
    return not _busy(trials) and len(counted(trials)) >= budget


def _can_start(study: Any, budget: int) -> bool:
    trials = study.get_trials(deepcopy=False)
    return any(t.state.name == "WAITING" for t in trials) or len(counted(trials)) < budget


# -- one trial ----------------------------------------------------------------------------------


@contextlib.contextmanager
def _run_lock(out: Path) -> Iterator[None]:
    """One process at a time in a run directory (a retry may meet its original's worker, not
    yet known dead): an advisory lock, released by the kernel when its holder dies."""
    out.mkdir(parents=True, exist_ok=True)
    with open(out / ".lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _params(spec: TuneSpec, study: Any, name: str, optimizer: str, trial: Any) -> dict:
    """The trial's configuration: suggested (a queued retry's are fixed), or for a final
    trial the configuration the search chose."""
    if name.endswith(FINAL):
        trial.suggest_categorical("seed", spec.final_seed_values)
        return dict(study.user_attrs[report.CHOSEN])
    params = {}
    grid = spec.grid(optimizer) if spec.is_grid(optimizer) else None
    for space in spec.spaces_for(optimizer):
        if grid is not None:
            value = trial.suggest_categorical(space.name, grid[space.name])
        elif space.values is not None:
            value = trial.suggest_categorical(space.name, list(space.values))
        else:
            value = round_value(
                trial.suggest_float(space.name, space.low, space.high, log=space.log)
            )
        params[space.name] = value
    return params


class _Progress:
    """Lines while trials run: a throttled one per epoch, one per finished trial with the runs
    and epochs done of those planned and an ETA at this worker's pace; a tqdm bar on a
    terminal (one worker)."""

    def __init__(self, spec: TuneSpec, log: Callable[[str], None], bar: bool) -> None:
        self.spec, self.log = spec, log
        self.started = time.monotonic()
        self.trained = 0  # epochs this worker trained
        self.last_line = -math.inf
        self.bar = None
        if bar:
            from tqdm import tqdm

            self.bar = tqdm(total=self.planned_epochs(), unit="epoch", file=sys.stderr)
            self.log = lambda line: self.bar.write(line)  # type: ignore[union-attr]

    def planned_epochs(self) -> int:
        spec = self.spec
        runs = sum(spec.budget(o) * spec.search_seeds for o in spec.optimizers)
        return (runs + spec.final_seeds * len(spec.optimizers)) * spec.epochs

    def epoch(self, label: str, row: dict[str, Any]) -> None:
        self.trained += 1
        if self.bar is not None:
            self.bar.update(1)
        now = time.monotonic()
        if now - self.last_line >= self.spec.progress:
            self.last_line = now
            val = row.get("val_acc")
            self.log(
                f"  {label}: epoch {row['epoch']}/{self.spec.epochs}"
                + (f", val acc {val:.4f}" if val is not None else "")
            )

    def trial_done(self, line: str, studies: dict[str, Any]) -> None:
        from optuna.trial import TrialState

        runs = epochs = 0
        for study in studies.values():
            for trial in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
                for run in trial.user_attrs.get(RUNS, []):
                    runs += 1
                    epochs += run["epochs"]
        planned = self.planned_epochs()
        eta = ""
        if self.trained:
            seconds = (time.monotonic() - self.started) / self.trained
            left = max(0, planned - epochs) * seconds / self.spec.workers
            eta = f", ETA {left / 60:.0f} min" if left < 5400 else f", ETA {left / 3600:.1f} h"
        planned_runs = planned // max(1, self.spec.epochs)
        self.log(f"{line}  [{runs}/{planned_runs} runs, {epochs}/{planned} epochs{eta}]")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _train_trial(
    spec: TuneSpec, name: str, optimizer: str, params: dict, seeds: list[int], progress: _Progress
) -> list[dict[str, Any]]:
    """Train (or resume) the trial's runs in turn; each run's directory, seed and score."""

    final = name.endswith(FINAL)
    results = []
    for seed in seeds:
        out = (spec.final_run if final else spec.search_run)(optimizer, params, seed)
        config = spec.config(optimizer, params, seed, out)
        label = f"[{name}] {_text(params)} seed {seed}"
        with _run_lock(out), open(out / LOG, "a") as log_file:
            trainer = Trainer(
                config,
                log=lambda line: print(line, file=log_file, flush=True),
                on_epoch=lambda row, rows, label=label: progress.epoch(label, row),
                stop_signals=STOP_SIGNALS,
            )
            diverged = False
            with contextlib.redirect_stderr(log_file):
                try:
                    trainer.fit(resume=True)
                except NonFiniteError as error:
                    print(f"aace tune: {error}", file=log_file, flush=True)
                    diverged = True
        score = run_score(
            RunDirectory(out).read_rows(missing_ok=True), spec.score, diverged=diverged
        )
        results.append({"run": str(out), "seed": seed, **score.to_dict()})
    return results


def _text(params: dict[str, float]) -> str:
    return ", ".join(f"{k}={v:g}" for k, v in params.items()) or "defaults"


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _frozen(study: Any, number: int) -> Any:
    (trial,) = [t for t in study.get_trials(deepcopy=False) if t.number == number]
    return trial


def _run_one(spec: TuneSpec, studies: dict, name: str, optimizer: str, heartbeat: Heartbeat,
             progress: _Progress, log: Callable[[str], None]) -> None:  # fmt: skip
    """Ask the study for a trial, train it, tell the result."""
    from optuna.trial import TrialState

    finished = finished_trial_error()
    study = studies[name]
    trial = study.ask()
    budget = spec.final_seeds if name.endswith(FINAL) else spec.budget(optimizer)
    attrs = trial.user_attrs  # a queued retry's (its RETRY_OF and ATTEMPT)
    if RETRY_OF not in attrs:
        earlier = [t for t in counted(study.get_trials(deepcopy=False)) if t.number < trial.number]
        if len(earlier) >= budget:  # trial numbers are unique: exactly `budget` first tries run
            trial.set_user_attr(SKIPPED, True)
            study.tell(trial, state=TrialState.FAIL)
            return
    heartbeat.beat(study, trial.number)
    try:
        params = _params(spec, study, name, optimizer, trial)
        trial.set_user_attr(PARAMS, params)
        final = name.endswith(FINAL)
        seeds = [trial.params["seed"]] if final else spec.search_seed_values
        runs = _train_trial(spec, name, optimizer, params, seeds, progress)
    except Preempted:
        heartbeat.beat(None, None)
        with contextlib.suppress(finished):
            study.tell(trial, state=TrialState.FAIL)
            requeue(study, _frozen(study, trial.number), attrs.get(ATTEMPT, 0))
        raise
    except Exception as error:
        heartbeat.beat(None, None)
        attempt = attrs.get(ATTEMPT, 0)
        trial.set_user_attr(ERROR, _first_line(error))
        with contextlib.suppress(finished):
            study.tell(trial, state=TrialState.FAIL)
            again = attempt < spec.retries
            if again:
                requeue(study, _frozen(study, trial.number), attempt + 1)
            log(
                f"[{name}] trial {trial.number} failed: {_first_line(error)} "
                + (f"(try {attempt + 1}; queued again)" if again else "(no tries left)")
            )
        return
    heartbeat.beat(None, None)
    value = sum(r["score"] for r in runs) / len(runs)
    trial.set_user_attr(RUNS, runs)
    try:
        study.tell(trial, value)
    except finished:  # failed as stale meanwhile: its retry finds the runs done
        log(f"[{name}] trial {trial.number}: taken over by another worker (heartbeat missed)")
        return
    diverged = sum(r["diverged"] for r in runs)
    done = len([t for t in counted(study.get_trials(deepcopy=False)) if t.state.is_finished()])
    progress.trial_done(
        f"[{name} {done}/{budget}] trial {trial.number} {_text(params)}: score {value:.4f} "
        f"({spec.score}, {len(runs)} run(s)" + (f", {diverged} diverged" if diverged else "") + ")",
        studies,
    )


def work(
    spec: TuneSpec,
    log: Callable[[str], None] = print,
    poll: float = 2.0,
    stopped: Callable[[], int | None] = deferred_signal,
    bar: bool = False,
) -> None:
    """One worker: run trials of the studies (round robin) until every study is done, waiting
    for other workers' trials while there is nothing to start. ``stopped()`` names a stop
    signal received between trials. Raises :class:`Preempted` after a stop signal, with the
    stopped trial back in the queue."""
    _require_optuna()
    storage = open_storage(spec)
    studies = open_studies(spec, storage, create=False)
    progress = _Progress(spec, log, bar)
    with Heartbeat(storage, list(studies.values()), spec.heartbeat, progress.log) as heartbeat:
        try:
            while True:
                heartbeat.sweep()
                started, pending = False, False
                for name, optimizer in study_names(spec):
                    study = studies[name]
                    if name.endswith(FINAL):
                        search = studies[optimizer]
                        if not is_done(search, spec.budget(optimizer)):
                            pending = True
                            continue
                        if report.CHOSEN not in study.user_attrs:
                            chosen = report.choose(spec, optimizer, search)
                            if chosen is None:
                                continue  # no configuration finished: nothing to train again
                            study.set_user_attr(report.CHOSEN, chosen)
                        budget = spec.final_seeds
                    else:
                        budget = spec.budget(optimizer)
                    signum = stopped()
                    if signum is not None:
                        raise Preempted("stopped between trials; rerun the same command", signum)
                    if not _can_start(study, budget):
                        pending = pending or not is_done(study, budget)
                        continue
                    started = True
                    with TRAINING:  # see workers.watch_parent: an exit waits for the requeue
                        _run_one(spec, studies, name, optimizer, heartbeat, progress, progress.log)
                if not started and not pending:
                    return
                if not started:
                    time.sleep(poll)
        finally:
            progress.close()


# -- the command --------------------------------------------------------------------------------


def _worker_process(spec_values: dict[str, Any], threads: int, parent: int) -> None:
    watch_parent(parent)
    torch.set_num_threads(threads)
    spec = TuneSpec.from_dict(spec_values)
    try:
        work(spec, log=lambda line: print(line, flush=True))
    except Preempted:
        sys.exit(EXIT_PREEMPTED)
    except Exception as error:
        print(f"aace tune: error: worker {os.getpid()}: {_first_line(error)}", file=sys.stderr,
              flush=True)  # fmt: skip
        sys.exit(1)


def run_tune(spec: TuneSpec, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Create or join the studies, run ``spec.workers`` workers until every study is done, and
    write the report (:func:`aace.training.tune.report.write_report`); returns it.

    Raises:
        Preempted: a stop signal (its ``signum``) stopped the workers; their trials are back in
            the queue.
        ConfigError: bad settings, or a worker process failed.
    """
    _require_optuna()
    spec.validate()
    storage = open_storage(spec)
    open_studies(spec, storage, create=True)
    where = spec.storage or str(Path(spec.out) / JOURNAL)
    log(
        f"tune: {', '.join(f'{o} ({spec.budget(o)} configurations)' for o in spec.optimizers)}"
        f" x {spec.search_seeds} search seed(s), {spec.epochs} epochs each; "
        f"{spec.final_seeds} final seeds each; study in {where}; {spec.workers} worker(s)"
    )
    try:
        _run_workers(spec, log)
    except Preempted as error:
        name = signal.Signals(error.signum).name
        raise Preempted(
            f"tune stopped by {name}: its trials wrote a checkpoint and went back to the queue; "
            "rerun the same command to continue",
            error.signum,
        ) from None
    return report.write_report(spec, open_studies(spec, open_storage(spec), create=False))


def _run_workers(spec: TuneSpec, log: Callable[[str], None]) -> None:
    with ForwardSignals() as stop:
        if spec.workers == 1:
            work(
                spec, log, stopped=lambda: stop.received or deferred_signal(),
                bar=sys.stderr.isatty(),
            )  # fmt: skip
        else:
            threads = max(1, available_cpus() // spec.workers)
            context = multiprocessing.get_context("spawn")
            values = asdict(spec)
            processes = [
                context.Process(target=_worker_process, args=(values, threads, os.getpid()))
                for _ in range(spec.workers)
            ]
            for process in processes:
                process.start()
            for process in processes:
                process.join()
            codes = [process.exitcode for process in processes]
            if stop.received is not None or EXIT_PREEMPTED in codes:
                raise Preempted("stopped", stop.received or signal.SIGTERM)
            if any(codes):
                raise ConfigError(
                    f"{sum(1 for c in codes if c)} of {len(codes)} workers failed (exit status "
                    f"{codes}); rerun the same command to continue: their trials come back from "
                    "their checkpoints"
                )
