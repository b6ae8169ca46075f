"""Process lifecycle: worker processes of ``aace sweep`` and ``aace tune`` (CPU shares, stop
signals passed on to them, workers that notice their parent died), and how the processes of a
torchrun job report an error.

Worker processes, shared by ``aace sweep`` and ``aace tune``:

* The parent runs its workers inside :class:`ForwardSignals`: a SIGTERM (Slurm, ``kill``) or
  SIGINT (Ctrl-C) to the parent is passed on to every live child as SIGTERM, and the parent
  starts no other work. Each child's run writes a checkpoint at its next step boundary and
  stops (see :mod:`aace.training.preemption`).
* Each worker calls :func:`watch_parent` first: a stop signal between runs is remembered (the
  next run stops at once) instead of killing the worker, and when the parent is gone without a
  word (SIGKILL, out of memory) the worker stops its run the same way and exits with
  :data:`~aace.training.preemption.EXIT_PREEMPTED`, rather than training on unobserved.
  A worker holds :data:`TRAINING` while it trains, so the exit waits for the checkpoint.

The torchrun error protocol (``WORLD_SIZE > 1``): one error, one line, one exit status.

* The CLI defers SIGTERM first thing (:func:`~aace.training.preemption.defer_sigterm`): torchrun
  SIGTERMs every other worker as soon as one exits, and a worker about to report the same error
  must exit with that error's status, not die of the signal.
* An error every rank meets alike (a bad argument, an agreed stop: marked by
  :func:`~aace.training.distributed.on_all_ranks`) is reported by rank 0 alone. Another rank on
  rank 0's node waits (:func:`await_rank_zero`) for the SIGTERM with which torchrun stops it once
  rank 0 has printed the line and exited; exiting at once would let torchrun stop rank 0, perhaps
  still importing torch, before it printed anything. An error of one rank is reported by that
  rank, its line prefixed ``[rank N]``.
* :func:`report_failure` prints the line and returns the status; while it does, a SIGTERM ends
  the process with that status, and afterwards SIGTERM is ignored (at shutdown Python resets
  its handlers, so a late SIGTERM would otherwise turn the status into -15).
* A collective that fails because another rank died (:func:`lost_contact`) is reported as
  such: that rank's own line says why.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import sys
import threading
import time
import traceback
from typing import Any

import torch.distributed as dist

from aace.training.distributed import raised_on_all_ranks
from aace.training.preemption import EXIT_PREEMPTED, defer_signals, deferred_signal

__all__ = [
    "RANK_ZERO_GRACE", "STOP_SIGNALS", "TRAINING", "ForwardSignals", "available_cpus",
    "await_rank_zero", "first_line", "lost_contact", "rank", "report_failure", "stop_children",
    "watch_parent", "world_size",
]  # fmt: skip

# The signals that stop a command at a checkpoint: SIGTERM (schedulers) and SIGINT (Ctrl-C).
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)

# Held by a worker while it trains a run (see watch_parent).
TRAINING = threading.Lock()


def available_cpus() -> int:
    """The CPUs this process may run on (its affinity mask, else the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on every platform
        return os.cpu_count() or 1


def stop_children() -> None:
    """SIGTERM to every live child process: each worker's run writes a checkpoint at its next
    step boundary and stops (an idle worker remembers it for its next run)."""
    for child in multiprocessing.active_children():
        child.terminate()  # SIGTERM


class ForwardSignals:
    """While active (in the main thread), a stop signal to this process is passed on to its
    worker processes as SIGTERM; ``received`` holds the first signal's number (None while none
    came), so the parent starts no other work."""

    def __init__(self, signals: tuple[int, ...] = STOP_SIGNALS) -> None:
        self.signals = signals
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.received is None:
            self.received = signum
        stop_children()

    def __enter__(self) -> ForwardSignals:
        if threading.current_thread() is threading.main_thread():
            for signum in self.signals:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc_info: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()


def watch_parent(parent: int, signals: tuple[int, ...] = STOP_SIGNALS) -> None:
    """Worker initializer: remember stop signals between runs (:func:`defer_signals`), and start
    a thread that, once ``parent`` is gone, stops a run in progress (SIGTERM to this process,
    so it writes a checkpoint at its next step boundary) and exits with ``EXIT_PREEMPTED``."""
    defer_signals(signals)

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        if TRAINING.locked():
            os.kill(os.getpid(), signal.SIGTERM)
        with TRAINING:  # the run has stopped (its checkpoint is on disk) or none was going
            os._exit(EXIT_PREEMPTED)

    threading.Thread(target=watch, name="aace-watch-parent", daemon=True).start()


# -- the torchrun error protocol -----------------------------------------------------------------

# How long a rank other than 0 waits, after an error that every rank meets alike, for rank 0
# to report it and exit (rank 0 may still be importing torch).
RANK_ZERO_GRACE = 60.0


def world_size() -> int:
    """The processes of this torchrun job (``WORLD_SIZE``); 1 without torchrun, or where the
    variable is not an integer (:func:`aace.training.distributed.setup` says so later)."""
    return _environment_int("WORLD_SIZE", 1)


def rank() -> int:
    """This process's rank in its torchrun job (``RANK``); 0 without torchrun."""
    return _environment_int("RANK", 0)


def _environment_int(name: str, default: int) -> int:
    try:
        return int(os.environ.get(name, "") or default)
    except ValueError:
        return default


def report_failure(
    error: BaseException, message: str, status: int, debug: bool, prefix: str = "aace: error: "
) -> int:
    """Report ``error`` as ``prefix`` + ``message`` in one line on stderr (``debug``: after its
    traceback) and return ``status``, the process's exit status.

    Under torchrun an error that every rank raised alike is reported by rank 0 alone (see
    :func:`await_rank_zero`); an error of one rank names it (``[rank N]``). From here on a
    SIGTERM (torchrun stopping the other workers once one has exited) does not change the
    status: while the error is reported it ends the process with that status, afterwards it is
    ignored.
    """
    _exit_on_sigterm(status)
    this_rank = rank()
    if this_rank and raised_on_all_ranks(error) and not await_rank_zero(status):
        _ignore_sigterm()
        return status  # rank 0 reports it
    if debug:
        traceback.print_exception(error)
    line = f"{prefix}{f'[rank {this_rank}] ' if this_rank else ''}{message}"
    print(line, file=sys.stderr, flush=True)
    _ignore_sigterm()
    return status


def lost_contact(error: RuntimeError) -> bool:
    """Whether ``error`` is a collective that failed because another rank died (gloo raises a
    plain RuntimeError naming the closed connection)."""
    text = str(error)
    return world_size() > 1 and (
        isinstance(error, dist.DistError)
        or "Connection closed by peer" in text
        or "Connection reset by peer" in text
    )


def first_line(error: BaseException) -> str:
    """The gist of ``error`` for a one-line message: its first line without the ``[file:line]``
    prefix and the advice sentences of torch's distributed errors; its type name if empty."""
    text = str(error).strip()
    return text.splitlines()[0].split("] ")[-1].split(". ")[0] if text else type(error).__name__


def await_rank_zero(status: int) -> bool:
    """On a rank other than 0 that met an error every rank meets alike: whether this rank must
    report it itself.

    Ranks that torchrun runs on rank 0's node (``GROUP_RANK`` 0) wait for the SIGTERM with which
    torchrun stops the other workers once rank 0 has printed the error and exited; the SIGTERM
    ends this process with ``status``. Exiting at once would let torchrun stop rank 0, perhaps
    still importing torch, before it printed anything: the job would fail without a word.
    After :data:`RANK_ZERO_GRACE` seconds without a SIGTERM, True: rank 0 did not end, so this
    rank reports the error. On another node (whose exit does not stop rank 0 at once) False at
    once, as it is without torchrun.
    """
    if (
        world_size() <= 1
        or os.environ.get("GROUP_RANK", "0") != "0"
        or threading.current_thread() is not threading.main_thread()
    ):
        return False
    if deferred_signal():  # torchrun's SIGTERM came already (remembered): rank 0 ended
        return False
    _exit_on_sigterm(status)
    if deferred_signal():  # it came while the handler was being replaced
        return False
    time.sleep(RANK_ZERO_GRACE)
    return True


def _exit_on_sigterm(status: int) -> None:
    if world_size() <= 1 or threading.current_thread() is not threading.main_thread():
        return

    def exit_now(signum: int, frame: object) -> None:
        sys.stderr.flush()
        os._exit(status)

    signal.signal(signal.SIGTERM, exit_now)


def _ignore_sigterm() -> None:
    """Under torchrun, once the error is reported: nothing is left to do but exit. At shutdown
    Python resets the handlers it installed to the default action, so a SIGTERM arriving then
    would end the process with -15 instead of its status; an ignored signal stays ignored."""
    if world_size() > 1 and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
