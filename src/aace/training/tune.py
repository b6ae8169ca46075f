"""``aace tune``: choose hyperparameters (rho first) on a validation split, with Optuna.

* **What is searched.** Each optimizer gets a study of its own with the same budget, so that
  each rule is compared at its own best radius. :data:`SEARCHABLE` lists the hyperparameters a
  study may search; each is a range ``LOW:HIGH[:log]`` (Optuna's TPE sampler, ``--trials``
  trials) or a list ``V1,V2,...``. When every searched value is a list the study is a grid on
  Optuna's :class:`~optuna.samplers.GridSampler` (one trial per point). Sampled values are
  rounded to 4 significant digits, so that run directories have readable names.
* **Objective.** The best validation accuracy over the epochs of the trial's run (the epoch a
  user would keep). Each epoch's ``val_acc`` is reported to Optuna; the pruner (asynchronous
  successive halving by default, see :func:`make_pruner`) stops trials that cannot win. A pruned
  trial keeps its run directory and metrics.
* **Runs.** Every trial is an ordinary run directory ``OUT/OPTIMIZER/rho0.1234[-lr0.05]``, named
  from its parameters; a trial with the parameters of an earlier one (a retry) continues that
  run from its last checkpoint, exactly. ``aace compare`` reads them.
* **Storage and workers.** The study lives in an Optuna storage: by default a journal file
  ``OUT/study.journal`` (safe for several processes, and for several machines over a shared
  filesystem), or any ``--storage`` URL Optuna accepts (SQLite, PostgreSQL, MySQL). The same
  command on another machine joins the studies and runs other trials; a command whose settings
  differ from the stored ones is refused. Workers send a heartbeat while they train; the trial
  of a worker that went silent (SIGKILL, a lost node) is failed by the next worker that looks
  and put back in the queue with the same parameters, so it continues from its checkpoint.
  Optuna's RDB storage has the heartbeat built in; its journal storage gets the same from
  :class:`_HeartbeatJournalStorage`. SIGTERM stops every trial of the command at a checkpoint,
  puts them back in the queue and exits 75.
* **Final seeds.** When an optimizer's search is done, its best configuration is trained with
  ``--final-seeds K`` new seeds (seed + 1 ... seed + K; the search's own run is not reused,
  since it was chosen for its validation score) in a grid study of its own, so final runs too
  are shared among workers and machines. The report (``tune.md``, ``tune.json``,
  ``tune.png``) gives their test accuracy at the validation-selected epoch with 95 % intervals
  and Welch p-values against ``--baseline``.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import json
import math
import multiprocessing
import os
import statistics
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from aace.integrations import MissingExtraError
from aace.training.config import OPTIMIZERS, ConfigError, RunConfig

__all__ = [
    "SEARCHABLE",
    "Space",
    "TuneSpec",
    "make_pruner",
    "parse_space",
    "run_tune",
    "write_report",
]

JOURNAL = "study.journal"
REPORT_MD, REPORT_JSON, REPORT_PLOT = "tune.md", "tune.json", "tune.png"
LOG = "train.log"
PRUNERS = ("asha", "median", "none")
# What a study may search: the flag, its RunConfig field and the allowed interval.
SEARCHABLE = {
    "rho": (0.0, math.inf),
    "lr": (0.0, math.inf),
    "weight_decay": (0.0, math.inf),
    "label_smoothing": (0.0, 1.0),
}
_SPEC_ATTR = "aace_tune"  # the command's settings, stored in every study to check joiners
_PARAMS_ATTR = "aace_params"  # a final study's configuration: the search's best
_SKIPPED_ATTR = "aace_skipped"  # a trial started past the budget by a race between workers


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


@dataclass(frozen=True)
class Space:
    """One searched hyperparameter: a range (``low``, ``high``, ``log``) or a list ``values``."""

    name: str
    low: float | None = None
    high: float | None = None
    log: bool = False
    values: tuple[float, ...] | None = None

    @property
    def is_grid(self) -> bool:
        return self.values is not None


def parse_space(name: str, text: str) -> Space:
    """``"0.01:2:log"`` (a log-uniform range), ``"0.01:2"`` (uniform) or ``"0.05,0.1,0.2"``."""
    flag = "--" + name.replace("_", "-")
    low_bound, high_bound = SEARCHABLE[name]
    expected = (
        "LOW:HIGH, LOW:HIGH:log or a comma-separated list of values, e.g. 0.01:2:log or "
        "0.05,0.1,0.2"
    )

    def number(item: str) -> float:
        try:
            value = float(item)
        except ValueError:
            value = math.nan
        if not math.isfinite(value) or not low_bound <= value <= high_bound:
            raise ConfigError(
                f"{flag}: got {item.strip()!r} in {text!r}; expected numbers in "
                f"[{low_bound:g}, {high_bound:g}] as {expected}"
            )
        return value

    if ":" in text:
        parts = text.split(":")
        log = len(parts) == 3 and parts[2].strip() == "log"
        if len(parts) not in (2, 3) or (len(parts) == 3 and not log):
            raise ConfigError(f"{flag}: got {text!r}; expected {expected}")
        low, high = number(parts[0]), number(parts[1])
        if not low < high or (log and low <= 0):
            raise ConfigError(
                f"{flag}: got {text!r}; expected LOW < HIGH"
                + (" and LOW > 0 for :log" if log else "")
            )
        return Space(name, low, high, log)
    values = tuple(dict.fromkeys(number(item) for item in text.split(",")))
    return Space(name, values=values)


@dataclass
class TuneSpec:
    """Everything that determines a tuning: stored in the studies, so that a second worker or
    machine can be checked against it."""

    out: str
    optimizers: list[str]
    spaces: list[Space]
    base: dict[str, Any]  # RunConfig fields after --, the same for every trial
    trials: int | None = None  # per study with a range; a grid has one trial per point
    val_split: float = 0.1
    val_split_seed: int = 0
    seed: int = 0
    final_seeds: int = 0
    pruner: str = "asha"
    min_epochs: int | None = None  # ASHA's first rung; None: max(1, epochs // 27)
    storage: str | None = None  # None: the journal file OUT/study.journal
    # Not part of the stored settings: they may differ between workers.
    workers: int = 1
    heartbeat: int = 60
    baseline: str | None = None

    def stored(self) -> dict[str, Any]:
        values = asdict(self)
        for name in ("workers", "heartbeat", "baseline", "storage", "out"):
            values.pop(name)
        values["spaces"] = [asdict(s) for s in self.spaces]
        return json.loads(json.dumps(values))  # tuples become lists, as the storage returns

    def spaces_for(self, optimizer: str) -> list[Space]:
        return [s for s in self.spaces if not (optimizer == "sgd" and s.name == "rho")]

    def is_grid(self, optimizer: str) -> bool:
        return all(s.is_grid for s in self.spaces_for(optimizer))

    def budget(self, optimizer: str) -> int:
        if self.is_grid(optimizer):
            return math.prod(len(s.values or ()) for s in self.spaces_for(optimizer))
        assert self.trials is not None
        return self.trials

    @property
    def epochs(self) -> int:
        return RunConfig(**self.base).epochs

    @property
    def final_seed_values(self) -> list[int]:
        return [self.seed + 1 + k for k in range(self.final_seeds)]

    def config(self, optimizer: str, params: dict[str, float], seed: int, out: Path) -> RunConfig:
        values = dict(self.base, optimizer=optimizer, seed=seed, out=str(out))
        values.update(val_split=self.val_split, val_split_seed=self.val_split_seed, **params)
        return RunConfig(**values).validate()

    def validate(self) -> TuneSpec:
        if not self.optimizers:
            raise ConfigError("--optimizer: got an empty list; expected e.g. sam,sam-aace")
        for name in self.optimizers:
            if name not in OPTIMIZERS:
                raise ConfigError(
                    f"--optimizer: got {name!r}; expected a comma-separated list of "
                    f"{', '.join(OPTIMIZERS)}"
                )
        if len(set(self.optimizers)) != len(self.optimizers):
            raise ConfigError(f"--optimizer: got {self.optimizers}; each optimizer once")
        if not 0 < self.val_split < 1:
            raise ConfigError(
                f"--val-split: got {self.val_split!r}; expected a number in (0, 1): aace tune "
                "chooses on a validation split, never on the test set"
            )
        for name, value, low in (
            ("final-seeds", self.final_seeds, 0), ("workers", self.workers, 1),
            ("heartbeat", self.heartbeat, 1),
        ):  # fmt: skip
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ConfigError(f"--{name}: got {value!r}; expected an integer >= {low}")
        if self.pruner not in PRUNERS:
            raise ConfigError(f"--pruner: got {self.pruner!r}; expected one of {PRUNERS}")
        if self.min_epochs is not None and self.min_epochs < 1:
            raise ConfigError(f"--min-epochs: got {self.min_epochs!r}; expected an integer >= 1")
        if any(not self.is_grid(o) for o in self.optimizers):
            if self.trials is None or self.trials < 1:
                raise ConfigError(
                    f"--trials: got {self.trials!r}; expected an integer >= 1 (a range such "
                    "as --rho 0.01:2:log is searched with that many trials per optimizer)"
                )
        if self.baseline is not None and self.baseline not in self.optimizers:
            raise ConfigError(
                f"--baseline: got {self.baseline!r}; expected one of the optimizers "
                f"({', '.join(self.optimizers)})"
            )
        # Every corner of the space must make a valid run (the trials would all fail later).
        for optimizer in self.optimizers:
            for corner in ("low", "high"):
                params = {s.name: _corner(s, corner) for s in self.spaces_for(optimizer)}
                self.config(optimizer, params, self.seed, Path(self.out) / "check")
        return self


def _corner(space: Space, which: str) -> float:
    if space.values is not None:
        return min(space.values) if which == "low" else max(space.values)
    return space.low if which == "low" else space.high  # type: ignore[return-value]


def run_name(optimizer: str, params: dict[str, float], seed: int | None = None) -> str:
    """``sam-aace-rho0.1234-lr0.05`` (and ``-s3`` for a final seed): from the parameters."""
    name = optimizer + "".join(
        f"-{key.replace('_', '')}{params[key]:g}" for key in SEARCHABLE if key in params
    )
    return name if seed is None else f"{name}-s{seed}"


def make_pruner(spec: TuneSpec) -> Any:
    """The pruner of the search studies.

    ``asha`` (default): Optuna's :class:`~optuna.pruners.SuccessiveHalvingPruner`, the
    asynchronous successive halving of Li et al. (MLSys 2020), reduction factor 3. A trial is
    checked at epochs r, 3r, 9r, ... and continues only if its validation accuracy there is in
    the top third of all trials that reached that epoch. It needs no finished trials to start
    pruning and never makes a worker wait for another, which suits many workers on many
    machines, and it bounds the epochs spent: most trials stop after r or 3r epochs.
    ``median``: :class:`~optuna.pruners.MedianPruner` (stop a trial below the median of earlier
    trials at the same epoch), which trains its first trials in full and so saves less on small
    budgets. ``none``: every trial to the end.
    """
    optuna = _require_optuna()
    if spec.pruner == "none":
        return optuna.pruners.NopPruner()
    first = spec.min_epochs or max(1, spec.epochs // 27)
    if spec.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=first - 1)
    return optuna.pruners.SuccessiveHalvingPruner(min_resource=first, reduction_factor=3)


# -- storage ----------------------------------------------------------------------------------


def _heartbeat_journal(path: str, interval: int, callback: Callable[..., None]) -> Any:
    """Optuna's journal storage on a file, with the heartbeat its RDB storage has: a running
    trial's worker records the time every ``interval`` seconds (a system attribute in the
    journal), and a trial silent for ``2 interval`` seconds is stale."""
    optuna = _require_optuna()
    from optuna.storages._heartbeat import BaseHeartbeat
    from optuna.storages.journal import JournalFileBackend, JournalStorage
    from optuna.trial import TrialState

    class _HeartbeatJournalStorage(JournalStorage, BaseHeartbeat):
        def record_heartbeat(self, trial_id: int) -> None:
            self.set_trial_system_attr(trial_id, "aace_heartbeat", time.time())

        def _get_stale_trial_ids(self, study_id: int) -> list[int]:
            now = time.time()
            stale = []
            for trial in self.get_all_trials(
                study_id, deepcopy=False, states=(TrialState.RUNNING,)
            ):
                beat = trial.system_attrs.get("aace_heartbeat")
                if beat is None and trial.datetime_start is not None:
                    beat = trial.datetime_start.timestamp()
                if beat is not None and now - beat > 2 * interval:
                    stale.append(trial._trial_id)
            return stale

        def get_heartbeat_interval(self) -> int:
            return interval

        def get_heartbeat_stale_trial_callback(self) -> Callable[..., None]:
            return callback

    del optuna
    return _HeartbeatJournalStorage(JournalFileBackend(path))


def open_storage(spec: TuneSpec) -> Any:
    """The storage of ``spec``: a journal file in ``out`` or ``--storage URL``, with heartbeats
    and stale trials put back in the queue (same parameters, so the same run directory)."""
    optuna = _require_optuna()
    retry = optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=None)
    if spec.storage is None or spec.storage.startswith("journal:"):
        path = Path(spec.out) / JOURNAL if spec.storage is None else Path(spec.storage[8:])
        path.parent.mkdir(parents=True, exist_ok=True)
        return _heartbeat_journal(str(path), spec.heartbeat, retry)
    url = spec.storage
    if url.startswith(("postgresql://", "postgres://")):
        # SQLAlchemy 2.1 defaults to psycopg 3; aace[tune] brings psycopg2.
        url = "postgresql+psycopg2://" + url.split("://", 1)[1]
    try:
        return optuna.storages.RDBStorage(
            url,
            heartbeat_interval=spec.heartbeat,
            grace_period=2 * spec.heartbeat,
            heartbeat_stale_trial_callback=retry,
            engine_kwargs={"pool_pre_ping": True},
        )
    except ImportError as error:  # e.g. postgresql:// without psycopg2
        raise MissingExtraError(
            f"--storage {spec.storage}: {error}; pip install 'aace[tune]' brings psycopg2 for "
            "PostgreSQL (MySQL needs a driver such as PyMySQL)"
        ) from error
    except Exception as error:  # sqlalchemy's errors: a bad URL, no server
        first = str(error).strip().splitlines()[0] if str(error).strip() else repr(error)
        raise ConfigError(f"--storage: cannot open {spec.storage!r} ({first})") from error


def _study_names(spec: TuneSpec) -> list[tuple[str, str]]:
    """(study name, optimizer): the searches, then the final seeds."""
    names = [(optimizer, optimizer) for optimizer in spec.optimizers]
    if spec.final_seeds:
        names += [(f"{optimizer}-final", optimizer) for optimizer in spec.optimizers]
    return names


def _sampler(spec: TuneSpec, name: str, optimizer: str) -> Any:
    optuna = _require_optuna()
    if name.endswith("-final"):
        return optuna.samplers.GridSampler({"seed": spec.final_seed_values}, seed=spec.seed)
    spaces = spec.spaces_for(optimizer)
    if spec.is_grid(optimizer):
        return optuna.samplers.GridSampler(
            {s.name: list(s.values or ()) for s in spaces}, seed=spec.seed
        )
    budget = spec.budget(optimizer)

    # TPE (Bergstra et al., NeurIPS 2011) after a third of the budget of random trials.
    def tpe(seed: int) -> Any:
        return optuna.samplers.TPESampler(
            n_startup_trials=max(2, budget // 3), seed=seed, multivariate=True
        )

    return _trial_seeded_sampler()(tpe, spec.seed)


@functools.cache
def _trial_seeded_sampler() -> type:
    """The class of :class:`TrialSeededSampler` (defined on first use: Optuna is optional)."""
    optuna = _require_optuna()

    class TrialSeededSampler(optuna.samplers.BaseSampler):
        """A sampler whose randomness is fixed by ``(seed, trial number)``: each trial gets a
        fresh ``make(seed_k)`` with ``seed_k`` drawn from NumPy's ``SeedSequence([seed,
        number])``, so that workers sharing a study draw different points (one seeded sampler
        per worker draws the same point in each worker: duplicated trials), and trial ``k``
        draws the same random-phase point whatever the number of workers. The inner sampler
        still reads the whole study history (TPE's model)."""

        def __init__(self, make: Callable[[int], Any], seed: int) -> None:
            self._make, self._seed = make, seed
            self._number: int | None = None
            self._inner: Any = None

        def _for(self, trial: Any) -> Any:
            if trial.number != self._number:
                import numpy as np

                seed_k = int(
                    np.random.SeedSequence([self._seed, trial.number]).generate_state(1)[0]
                )
                self._number, self._inner = trial.number, self._make(seed_k)
            return self._inner

        def infer_relative_search_space(self, study: Any, trial: Any) -> dict[str, Any]:
            return self._for(trial).infer_relative_search_space(study, trial)

        def sample_relative(self, study: Any, trial: Any, search_space: dict[str, Any]) -> dict:
            return self._for(trial).sample_relative(study, trial, search_space)

        def sample_independent(
            self, study: Any, trial: Any, param_name: str, param_distribution: Any
        ) -> Any:
            return self._for(trial).sample_independent(study, trial, param_name, param_distribution)

        def before_trial(self, study: Any, trial: Any) -> None:
            self._for(trial).before_trial(study, trial)

        def after_trial(self, study: Any, trial: Any, state: Any, values: Any) -> None:
            self._for(trial).after_trial(study, trial, state, values)

    return TrialSeededSampler


def open_studies(spec: TuneSpec, storage: Any, create: bool) -> dict[str, Any]:
    """The studies of ``spec`` by name; created (``create``) or joined, refusing studies that
    were started with other settings."""
    optuna = _require_optuna()
    studies = {}
    stored = spec.stored()
    for name, optimizer in _study_names(spec):
        study = optuna.create_study(
            study_name=name,
            storage=storage,
            direction="maximize",
            sampler=_sampler(spec, name, optimizer),
            pruner=make_pruner(spec) if not name.endswith("-final") else None,
            load_if_exists=True,
        )
        existing = study.user_attrs.get(_SPEC_ATTR)
        if existing is None and create:
            study.set_user_attr(_SPEC_ATTR, stored)
        elif existing is not None and existing != stored:
            differing = sorted(k for k in stored if existing.get(k) != stored.get(k))
            details = ", ".join(
                f"{k}: {existing.get(k)!r} there, {stored[k]!r} now" for k in differing
            )
            raise ConfigError(
                f"the study {name!r} in the storage was started with other settings "
                f"({details}); use the same command or another --out / --storage"
            )
        studies[name] = study
    return studies


# -- trials -----------------------------------------------------------------------------------


class _Skipped(Exception):
    """A trial that a race between workers started past the study's budget."""


def _counted(trials: list[Any]) -> list[Any]:
    """The trials that use the budget: not a retry of another, not skipped."""
    from optuna.storages import RetryHeartbeatStaleTrialCallback as Retry

    return [
        t
        for t in trials
        if Retry.retried_trial_number(t) is None and not t.user_attrs.get(_SKIPPED_ATTR)
    ]


def _is_done(study: Any, budget: int) -> bool:
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    busy = any(t.state in (TrialState.RUNNING, TrialState.WAITING) for t in trials)
    return not busy and len(_counted(trials)) >= budget


def _can_start(study: Any, budget: int) -> bool:
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    return any(t.state == TrialState.WAITING for t in trials) or len(_counted(trials)) < budget


@contextlib.contextmanager
def _run_lock(out: Path) -> Iterator[None]:
    """One process at a time in a run directory (two trials with the same rounded parameters
    share it): an advisory lock, released by the kernel when its holder dies."""
    out.mkdir(parents=True, exist_ok=True)
    with open(out / ".lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _read_rows(out: Path) -> list[dict[str, Any]]:
    path = out / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class _Objective:
    """Train the trial's run (resuming its directory) and return its best ``val_acc``."""

    def __init__(
        self, spec: TuneSpec, name: str, optimizer: str, study: Any, log: Callable
    ) -> None:
        self.spec, self.name, self.optimizer, self.study, self.log = (
            spec,
            name,
            optimizer,
            study,
            log,
        )
        self.final = name.endswith("-final")
        self.number: int | None = None  # the number of the trial this objective last ran

    def __call__(self, trial: Any) -> float:
        optuna = _require_optuna()
        from optuna.storages import RetryHeartbeatStaleTrialCallback as Retry

        self.number = trial.number

        trials = self.study.get_trials(deepcopy=False)
        (frozen,) = [t for t in trials if t.number == trial.number]
        if Retry.retried_trial_number(frozen) is None:
            # Trial numbers are unique across workers: exactly the first `budget` run.
            budget = self.spec.final_seeds if self.final else self.spec.budget(self.optimizer)
            earlier = [t for t in _counted(trials) if t.number < trial.number]
            if len(earlier) >= budget:
                trial.set_user_attr(_SKIPPED_ATTR, True)
                raise _Skipped(f"trial {trial.number} started past the budget")
        if self.final:
            seed = trial.suggest_categorical("seed", self.spec.final_seed_values)
            params = dict(self.study.user_attrs[_PARAMS_ATTR])
            out = Path(self.spec.out) / "final" / run_name(self.optimizer, params, seed)
        else:
            seed = self.spec.seed
            params = {}
            for space in self.spec.spaces_for(self.optimizer):
                if space.values is not None:
                    value = trial.suggest_categorical(space.name, list(space.values))
                else:
                    value = trial.suggest_float(space.name, space.low, space.high, log=space.log)
                    value = float(f"{value:.4g}")
                params[space.name] = value
            out = Path(self.spec.out) / self.optimizer / run_name(self.optimizer, params)
        trial.set_user_attr("run", str(out))
        trial.set_user_attr("params", params)
        config = self.spec.config(self.optimizer, params, seed, out)
        reported: set[int] = set()

        def report(row: dict[str, Any], rows: list[dict[str, Any]]) -> None:
            for r in rows:
                if r["epoch"] in reported:
                    continue
                reported.add(r["epoch"])
                trial.report(r["val_acc"], r["epoch"])
                if not self.final and trial.should_prune():
                    raise optuna.TrialPruned(f"pruned after epoch {r['epoch']}")

        from aace.training.trainer import Trainer

        with _run_lock(out), open(out / LOG, "a") as log_file:
            rows = _read_rows(out)
            if rows and (out / "checkpoint.pt").is_file():
                report(rows[-1], rows)  # a retry: replay what the run already reported
            trainer = Trainer(
                config, log=lambda line: print(line, file=log_file, flush=True), on_epoch=report
            )
            with contextlib.redirect_stderr(log_file):
                summary = trainer.fit(resume=True)
            report(_read_rows(out)[-1], _read_rows(out))
        trial.set_user_attr("test_acc_at_selected", summary["test_acc_at_selected"])
        trial.set_user_attr("selected_epoch", summary["selected_epoch"])
        return float(summary["selected_val_acc"])


def _describe(name: str, budget: int, done: int, trial: Any) -> str:
    params = trial.user_attrs.get("params") or trial.params
    text = ", ".join(f"{k}={v:g}" for k, v in params.items()) or "defaults"
    rows = _read_rows(Path(trial.user_attrs["run"])) if "run" in trial.user_attrs else []
    epochs = f"{len(rows)} epochs"
    state = trial.state.name.lower()
    if trial.user_attrs.get(_SKIPPED_ATTR):
        return f"[{name}] trial {trial.number}: not run (the budget was used by other workers)"
    if state == "complete":
        what = (
            f"best val acc {trial.value:.4f} (epoch {trial.user_attrs.get('selected_epoch')}), "
            f"test acc there {trial.user_attrs.get('test_acc_at_selected', math.nan):.4f}"
        )
    elif state == "pruned":
        best = max((r["val_acc"] for r in rows), default=math.nan)
        what = f"pruned, best val acc {best:.4f}"
    else:
        what = "failed (its train.log says why)"
    return f"[{name} {done}/{budget}] trial {trial.number} {text}: {what}, {epochs}"


def _stop_received() -> bool:
    from aace.training.preemption import _deferred

    return bool(_deferred)


def work(spec: TuneSpec, log: Callable[[str], None] = print, poll: float = 2.0) -> None:
    """One worker: run trials of the studies (round robin) until every study is done, waiting
    for trials of other workers while there is nothing to start (a silent worker's trial comes
    back to the queue after its heartbeat's grace period). Raises
    :class:`~aace.training.preemption.Preempted` after a SIGTERM, with the stopped trial back in
    the queue."""
    optuna = _require_optuna()
    from aace.training import sweep
    from aace.training.preemption import Preempted, defer_sigterm
    from aace.training.step import NonFiniteError

    defer_sigterm()  # a SIGTERM between trials is remembered; the next run stops at once
    storage = open_storage(spec)
    studies = open_studies(spec, storage, create=False)
    retry = optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=None)
    while True:
        started, pending = False, False
        for name, optimizer in _study_names(spec):
            study = studies[name]
            if name.endswith("-final"):
                search = studies[optimizer]
                if not _is_done(search, spec.budget(optimizer)):
                    pending = True
                    continue
                if _PARAMS_ATTR not in study.user_attrs:
                    best = _best_trial(search)
                    if best is None:
                        continue  # no trial finished: nothing to train with more seeds
                    study.set_user_attr(_PARAMS_ATTR, best.user_attrs["params"])
                budget = spec.final_seeds
            else:
                budget = spec.budget(optimizer)
            optuna.storages.fail_stale_trials(study)
            if _stop_received():
                raise Preempted("stopped by SIGTERM between trials; rerun the same command")
            if not _can_start(study, budget):
                pending = pending or not _is_done(study, budget)
                continue
            started = True
            objective = _Objective(spec, name, optimizer, study, log)
            with sweep._training:  # see sweep._watch_parent: a stop waits for the retry below
                try:
                    study.optimize(objective, n_trials=1, catch=(NonFiniteError, _Skipped))
                except Preempted:
                    # This worker's trial back in the queue with its parameters: not the
                    # study's last failed trial, which may be that of another worker stopped
                    # at the same moment (then one trial was queued twice, the other lost).
                    mine = [
                        t
                        for t in study.get_trials(deepcopy=False)
                        if t.number == objective.number and t.state.name == "FAIL"
                    ]
                    if mine:
                        retry(study, mine[0])
                    raise
            trials = study.get_trials(deepcopy=False)
            last = max(
                (t for t in trials if t.state.is_finished()), key=lambda t: t.datetime_complete
            )
            log(
                _describe(
                    name, budget, len([t for t in _counted(trials) if t.state.is_finished()]), last
                )
            )
        if not started and not pending:
            return
        if not started:
            time.sleep(poll)


def _best_trial(study: Any) -> Any:
    from optuna.trial import TrialState

    complete = [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE]
    # The highest validation accuracy; the earliest trial of equals.
    return max(complete, key=lambda t: (t.value, -t.number)) if complete else None


# -- the command --------------------------------------------------------------------------------


def _worker_process(spec_values: dict[str, Any], threads: int, parent: int) -> None:
    import sys

    import torch

    from aace.training import sweep
    from aace.training.preemption import EXIT_PREEMPTED, Preempted

    sweep._watch_parent(parent)
    torch.set_num_threads(threads)
    spec = _spec_from_dict(spec_values)
    try:
        work(spec, log=lambda line: print(line, flush=True))
    except Preempted:
        sys.exit(EXIT_PREEMPTED)
    except Exception as error:
        text = str(error).strip()
        print(
            f"aace tune: error: worker {os.getpid()}: "
            + (text.splitlines()[0] if text else repr(error)),
            file=sys.stderr,
            flush=True,
        )
        sys.exit(1)


def _spec_from_dict(values: dict[str, Any]) -> TuneSpec:
    values = dict(values)
    values["spaces"] = [
        Space(**dict(s, values=tuple(s["values"]) if s.get("values") is not None else None))
        for s in values["spaces"]
    ]
    return TuneSpec(**values)


def run_tune(spec: TuneSpec, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Create or join the studies, run ``spec.workers`` workers until every study is done, and
    write the report; returns it. SIGTERM: :class:`Preempted` after every worker stopped."""
    from aace.training import sweep
    from aace.training.preemption import Preempted

    spec.validate()
    storage = open_storage(spec)
    open_studies(spec, storage, create=True)
    where = spec.storage or str(Path(spec.out) / JOURNAL)
    log(
        f"tune: {', '.join(f'{o} ({spec.budget(o)} trials)' for o in spec.optimizers)}, "
        f"{spec.final_seeds} final seeds each; study in {where}; {spec.workers} worker(s)"
    )
    if spec.workers == 1:
        work(spec, log)
    else:
        threads = max(1, sweep.available_cpus() // spec.workers)
        context = multiprocessing.get_context("spawn")
        values = asdict(spec)
        processes = [
            context.Process(target=_worker_process, args=(values, threads, os.getpid()))
            for _ in range(spec.workers)
        ]
        with sweep._ForwardSigterm() as stop:
            for process in processes:
                process.start()
            for process in processes:
                process.join()
        codes = [process.exitcode for process in processes]
        if stop.received or 75 in codes:
            raise Preempted(
                "tune stopped by SIGTERM: its trials wrote a checkpoint and went back to the "
                "queue; rerun the same command to continue"
            )
        if any(codes):
            raise ConfigError(
                f"{sum(1 for c in codes if c)} of {len(codes)} workers failed (exit status "
                f"{codes}); rerun the same command to continue: their trials come back from "
                "their checkpoints"
            )
    return write_report(spec, open_studies(spec, open_storage(spec), create=False))


# -- report -------------------------------------------------------------------------------------


def _trial_record(trial: Any) -> dict[str, Any]:
    rows = _read_rows(Path(trial.user_attrs["run"])) if "run" in trial.user_attrs else []
    vals = [r["val_acc"] for r in rows if r.get("val_acc") is not None]
    return {
        "number": trial.number,
        "state": trial.state.name.lower(),
        "params": trial.user_attrs.get("params", trial.params),
        "value": trial.value,
        "best_val_acc": max(vals) if vals else None,
        "epochs": len(rows),
        "run": trial.user_attrs.get("run"),
        "retry_of": trial.system_attrs.get("failed_trial"),
        "test_acc_at_selected": trial.user_attrs.get("test_acc_at_selected"),
    }


def write_report(spec: TuneSpec, studies: dict[str, Any]) -> dict[str, Any]:
    """``tune.json``, ``tune.md`` and ``tune.png`` in ``spec.out``, from the studies and their
    run directories; returns the JSON."""
    from aace.report import confidence_interval, welch_test
    from aace.training.checkpoint import atomic_write_json, atomic_write_text

    report: dict[str, Any] = {"settings": spec.stored(), "storage": spec.storage, "optimizers": {}}
    for optimizer in spec.optimizers:
        trials = [
            t
            for t in studies[optimizer].get_trials(deepcopy=False)
            if not t.user_attrs.get(_SKIPPED_ATTR)
        ]
        records = [_trial_record(t) for t in trials]
        runs = {r["run"]: r["epochs"] for r in records if r["run"]}
        best = _best_trial(studies[optimizer])
        entry: dict[str, Any] = {
            "trials": records,
            "epochs_trained": sum(runs.values()),
            "best": _trial_record(best) if best is not None else None,
        }
        final_name = f"{optimizer}-final"
        if final_name in studies:
            # One result per run directory: two complete trials of one seed (a stopped trial
            # queued twice by aace before 2026-12) trained one run, not two samples.
            finals: dict[str, Any] = {}
            for t in studies[final_name].get_trials(deepcopy=False):
                if t.state.name == "COMPLETE":
                    finals.setdefault(t.user_attrs["run"], t)
            tests = [t.user_attrs.get("test_acc_at_selected") for t in finals.values()]
            low, high = confidence_interval(tests) if tests else (math.nan, math.nan)
            entry["final"] = {
                "runs": list(finals),
                "seeds": [t.params.get("seed") for t in finals.values()],
                "test_acc_at_selected": tests,
                "mean": statistics.fmean(tests) if tests else None,
                "sd": statistics.stdev(tests) if len(tests) > 1 else None,
                "ci95": [low, high] if tests and not math.isnan(low) else None,
                "n": len(tests),
            }
        report["optimizers"][optimizer] = entry
    if spec.baseline is not None and spec.final_seeds:
        reference = report["optimizers"][spec.baseline]["final"]["test_acc_at_selected"]
        for optimizer, entry in report["optimizers"].items():
            final = entry["final"]
            if optimizer == spec.baseline or not final["test_acc_at_selected"] or not reference:
                continue
            difference, p = welch_test(final["test_acc_at_selected"], reference)
            final["difference_vs_baseline"] = difference
            final["p_welch"] = None if math.isnan(p) else p
    out = Path(spec.out)
    atomic_write_json(out / REPORT_JSON, _json_safe(report))
    atomic_write_text(out / REPORT_MD, _markdown(spec, report))
    _plot(spec, report, out / REPORT_PLOT)
    return report


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def _percent(value: float | None) -> str:
    return (
        "–"
        if value is None or (isinstance(value, float) and math.isnan(value))
        else f"{100 * value:.2f}"
    )


def _markdown(spec: TuneSpec, report: dict[str, Any]) -> str:
    from aace.report import INTERVAL_NOTE, percent_interval

    spaces = ", ".join(
        f"{s.name} in {list(s.values)}"
        if s.values is not None
        else f"{s.name} in [{s.low:g}, {s.high:g}]{' (log)' if s.log else ''}"
        for s in spec.spaces
    )
    base = RunConfig(**spec.base)
    lines = [
        f"# aace tune: {base.dataset} / {base.model} / {base.epochs} epochs"
        + (f" / {100 * base.label_noise:g} % label noise" if base.label_noise else ""),
        "",
        f"Searched {spaces}; validation split {spec.val_split:g} (seed {spec.val_split_seed}), "
        f"pruner {spec.pruner}. Objective: the best validation accuracy over a trial's epochs.",
        "",
        "| optimizer | trials (complete / pruned / failed) | epochs trained | chosen "
        "| best val acc (%) |",
        "|---|---|---|---|---|",
    ]
    for optimizer, entry in report["optimizers"].items():
        states = [
            t["state"] for t in entry["trials"] if t["retry_of"] is None or t["state"] != "fail"
        ]
        counts = " / ".join(str(states.count(s)) for s in ("complete", "pruned", "fail"))
        best = entry["best"]
        chosen = ", ".join(f"{k}={v:g}" for k, v in best["params"].items()) if best else "–"
        lines.append(
            f"| {optimizer} | {counts} | {entry['epochs_trained']} | {chosen} | "
            f"{_percent(best['value']) if best else '–'} |"
        )
    if spec.final_seeds:
        lines += [
            "",
            f"Final runs of each optimizer's chosen configuration, {spec.final_seeds} new seeds: "
            "test accuracy at the epoch the validation split selects.",
            "",
            "| optimizer | chosen | test acc at val-selected epoch (%) | 95 % CI | n |"
            + (f" Δ vs {spec.baseline} (pp) | p (Welch) |" if spec.baseline else ""),
            "|---|---|---|---|---|" + ("---|---|" if spec.baseline else ""),
        ]
        for optimizer, entry in report["optimizers"].items():
            final, best = entry.get("final") or {}, entry["best"]
            chosen = ", ".join(f"{k}={v:g}" for k, v in best["params"].items()) if best else "–"
            if not final.get("n"):
                lines.append(
                    f"| {optimizer} | {chosen} | – | – | 0 |"
                    + (" – | – |" if spec.baseline else "")
                )
                continue
            line = (
                f"| {optimizer} | {chosen} | {_percent(final['mean'])} ± "
                f"{_percent(final['sd'] or 0.0)} | "
                f"{percent_interval(final['test_acc_at_selected'])} | {final['n']} |"
            )
            if spec.baseline:
                if "difference_vs_baseline" in final:
                    p = final.get("p_welch")
                    p_text = "–" if p is None else f"{p:.3g}"
                    line += f" {100 * final['difference_vs_baseline']:+.2f} | {p_text} |"
                else:
                    line += " – | – |"
            lines.append(line)
    if spec.final_seeds:
        lines += ["", INTERVAL_NOTE]
    return "\n".join(lines) + "\n"


def _plot(spec: TuneSpec, report: dict[str, Any], path: Path) -> None:
    """Validation accuracy against rho (log axis): every trial a point, pruned ones hollow,
    each optimizer's chosen rho a star."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x_name = (
        "rho"
        if any(s.name == "rho" for s in spec.spaces)
        else (spec.spaces[0].name if spec.spaces else None)
    )
    figure, ax = plt.subplots(figsize=(7, 4.5), constrained_layout=True)
    for index, (optimizer, entry) in enumerate(report["optimizers"].items()):
        color = f"C{index % 10}"
        for state, marker in (("complete", "o"), ("pruned", "x")):
            points = [
                (t["params"][x_name], t["best_val_acc"])
                for t in entry["trials"]
                if t["state"] == state and t["best_val_acc"] is not None and x_name in t["params"]
            ]
            if points:
                ax.scatter(*zip(*points), color=color, marker=marker, alpha=0.8,
                           label=f"{optimizer} ({state})")  # fmt: skip
        best = entry["best"]
        if best and x_name in best["params"]:
            chosen = best["params"][x_name]
            ax.scatter(
                [chosen], [best["value"]], color=color, marker="*", s=250, edgecolors="black",
                zorder=5, label=f"{optimizer}: chosen {x_name}={chosen:g}",
            )  # fmt: skip
    if x_name is not None:
        ax.set_xscale("log")
        ax.set_xlabel(x_name)
    ax.set_ylabel("best validation accuracy of the trial")
    ax.set_title("aace tune: validation accuracy per trial (x: pruned)")
    ax.legend(fontsize=8)
    figure.savefig(path, dpi=110)
    plt.close(figure)
