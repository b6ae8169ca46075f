"""Where the studies live, and how a dead worker's trial comes back: through the storage's
public methods only, for every storage Optuna has.

* :func:`open_storage`: a journal file ``OUT/study.journal`` (safe for several processes, and
  for several machines over a shared filesystem), ``journal:PATH``, or an RDB URL (SQLite,
  PostgreSQL, MySQL).
* :class:`Heartbeat`: a thread in each worker that every ``interval`` seconds records the time
  in its running trial (a system attribute) and sweeps every study for running trials whose
  last beat is older than ``2 interval`` (:func:`requeue_stale`): such a trial is set FAIL (the
  storage refuses a second worker doing the same) and a copy is queued (:func:`requeue`) with
  the same parameters, hence the same run directories, which resume from their checkpoints.
  So a SIGKILLed worker's trial is back in the queue within about two heartbeats, whatever the
  other workers are doing. Clocks of machines sharing a storage must agree to well within
  ``interval``.
* :func:`requeue`: a queued copy carries the parameters, ``retry_of`` (the original trial's
  number, so it is not counted in the budget twice) and ``attempt`` (trials that raised are
  retried up to ``--retries`` times), nothing else: no intermediate values, no old heartbeat.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

from aace.integrations import MissingExtraError
from aace.training.config import ConfigError
from aace.training.tune.sampling import make_sampler, study_names
from aace.training.tune.spec import TuneSpec

__all__ = [
    "ATTEMPT", "ERROR", "HEARTBEAT", "JOURNAL", "PARAMS", "RETRY_OF", "RUNS", "SKIPPED",
    "Heartbeat", "finished_trial_error", "open_storage", "open_studies",
    "requeue", "requeue_stale",
]  # fmt: skip

JOURNAL = "study.journal"
HEARTBEAT = "aace_heartbeat"  # system attribute: the time of the trial's worker's last beat
RETRY_OF = "retry_of"  # user attribute: the number of the trial this one repeats
ATTEMPT = "attempt"  # user attribute: 0 for a first try; a retry after an error adds one
SPEC_ATTR = "aace_tune"  # study user attribute: the command's settings, to check joiners
# User attributes of a trial that the worker sets and the report reads.
PARAMS = "params"  # the configuration (a final trial's: the chosen one)
RUNS = "runs"  # the trial's runs: directory, seed, score, epochs, validation size
SKIPPED = "skipped"  # started past the budget by a race between workers: not run
ERROR = "error"  # the first line of the error a failed trial raised


def open_storage(spec: TuneSpec) -> Any:
    """The storage of ``spec``: the journal file ``OUT/study.journal`` (default),
    ``journal:PATH``, or an RDB URL.

    Raises:
        MissingExtraError: Optuna, or the database's driver, is not installed.
        ConfigError: the URL cannot be opened (bad URL, no server).
    """
    import optuna
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    if spec.storage is None or spec.storage.startswith("journal:"):
        path = Path(spec.out) / JOURNAL if spec.storage is None else Path(spec.storage[8:])
        path.parent.mkdir(parents=True, exist_ok=True)
        return JournalStorage(JournalFileBackend(str(path)))
    url = spec.storage
    if url.startswith(("postgresql://", "postgres://")):
        # SQLAlchemy 2.1 defaults to psycopg 3; aace[tune] brings psycopg2.
        url = "postgresql+psycopg2://" + url.split("://", 1)[1]
    try:
        return optuna.storages.RDBStorage(url, engine_kwargs={"pool_pre_ping": True})
    except ImportError as error:  # e.g. postgresql:// without psycopg2
        raise MissingExtraError(
            f"--storage {spec.storage}: {error}; pip install 'aace[tune]' brings psycopg2 for "
            "PostgreSQL (MySQL needs a driver such as PyMySQL)"
        ) from error
    except Exception as error:  # sqlalchemy's errors: a bad URL, no server, an unknown dialect
        kind = "an unknown database" if "plugin" in str(error).lower() else "no answer"
        raise ConfigError(
            f"--storage: cannot open {spec.storage!r} ({kind}); expected sqlite:///PATH, "
            "postgresql://USER@HOST/DB, mysql://... or journal:PATH"
        ) from error


def open_studies(spec: TuneSpec, storage: Any, create: bool) -> dict[str, Any]:
    """The studies of ``spec`` by name; created (``create``) or joined, refusing studies that
    were started with other settings.

    Raises:
        ConfigError: a study in the storage has other settings.
    """
    import optuna

    studies = {}
    stored = spec.stored()
    for name, optimizer in study_names(spec):
        study = optuna.create_study(
            study_name=name,
            storage=storage,
            direction="maximize",
            sampler=make_sampler(spec, name, optimizer),
            load_if_exists=True,
        )
        existing = study.user_attrs.get(SPEC_ATTR)
        if existing is None and create:
            study.set_user_attr(SPEC_ATTR, stored)
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


def finished_trial_error() -> type[Exception]:
    """The error a storage raises when a finished trial is updated: Optuna's
    ``UpdateFinishedTrialError`` (a ``RuntimeError``), or ``RuntimeError`` in Optuna versions
    before it existed (4.0 has none)."""
    import optuna.exceptions

    return getattr(optuna.exceptions, "UpdateFinishedTrialError", RuntimeError)


def trial_id(storage: Any, study: Any, number: int) -> int:
    """The storage's id of trial ``number`` of ``study``."""
    return storage.get_trial_id_from_study_id_trial_number(
        storage.get_study_id_from_name(study.study_name), number
    )


def requeue(study: Any, trial: Any, attempt: int) -> None:
    """Queue a copy of ``trial`` (same parameters, so the same run directories) as try number
    ``attempt``; its ``retry_of`` names the first trial of the chain."""
    origin = trial.user_attrs.get(RETRY_OF, trial.number)
    study.enqueue_trial(dict(trial.params), user_attrs={RETRY_OF: origin, ATTEMPT: attempt})


def requeue_stale(storage: Any, study: Any, grace: float) -> list[int]:
    """Fail and requeue the running trials of ``study`` whose worker has not beaten for
    ``grace`` seconds (or, never having beaten, started that long ago); the numbers of the
    trials this call requeued. A trial another worker failed first is left to it."""
    from optuna.trial import TrialState

    finished = finished_trial_error()
    now, requeued = time.time(), []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        beat = trial.system_attrs.get(HEARTBEAT)
        if beat is None and trial.datetime_start is not None:
            beat = trial.datetime_start.timestamp()
        if beat is None or now - beat <= grace:
            continue
        try:
            failed = storage.set_trial_state_values(
                trial_id(storage, study, trial.number), TrialState.FAIL
            )
        except finished:
            continue
        if failed:
            requeue(study, trial, trial.user_attrs.get(ATTEMPT, 0))
            requeued.append(trial.number)
    return requeued


class Heartbeat:
    """A worker's heartbeat thread (a context manager): every ``interval`` seconds it records
    the time in the trial set by :meth:`beat` and requeues the stale trials of ``studies``
    (older than ``2 interval``). ``log`` gets one line per requeued trial."""

    def __init__(self, storage: Any, studies: list[Any], interval: float, log: Any) -> None:
        self.storage, self.studies, self.interval, self.log = storage, studies, interval, log
        self._current: int | None = None  # the storage id of this worker's running trial
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="aace-tune-heartbeat", daemon=True)

    def beat(self, study: Any | None, number: int | None) -> None:
        """Beat for trial ``number`` of ``study`` from now on (None: no trial); beats once at
        once."""
        with self._lock:
            self._current = None if study is None else trial_id(self.storage, study, number)
            self._beat()

    def _beat(self) -> None:
        if self._current is not None:
            self.storage.set_trial_system_attr(self._current, HEARTBEAT, time.time())

    def sweep(self) -> None:
        """Requeue the stale trials of every study now."""
        for study in self.studies:
            for number in requeue_stale(self.storage, study, 2 * self.interval):
                self.log(
                    f"[{study.study_name}] trial {number}: its worker went silent; back in the "
                    "queue (it resumes from its checkpoints)"
                )

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                with self._lock:
                    self._beat()
                self.sweep()
            except Exception as error:  # a storage hiccup: the next beat tries again
                self.log(f"heartbeat: {type(error).__name__}: {str(error)[:200]}")

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join()
