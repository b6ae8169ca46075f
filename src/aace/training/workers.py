"""Worker processes of ``aace sweep`` and ``aace tune``: CPU shares, stop signals passed on to
them, and workers that notice their parent died.

The protocol, shared by both commands:

* The parent runs its workers inside :class:`ForwardSignals`: a SIGTERM (Slurm, ``kill``) or
  SIGINT (Ctrl-C) to the parent is passed on to every live child as SIGTERM, and the parent
  starts no other work. Each child's run writes a checkpoint at its next step boundary and
  stops (see :mod:`aace.training.preemption`).
* Each worker calls :func:`watch_parent` first: a stop signal between runs is remembered (the
  next run stops at once) instead of killing the worker, and when the parent is gone without a
  word (SIGKILL, out of memory) the worker stops its run the same way and exits with
  :data:`~aace.training.preemption.EXIT_PREEMPTED`, rather than training on unobserved.
  A worker holds :data:`TRAINING` while it trains, so the exit waits for the checkpoint.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import threading
import time
from typing import Any

from aace.training.preemption import EXIT_PREEMPTED, defer_signals

__all__ = ["STOP_SIGNALS", "TRAINING", "ForwardSignals", "available_cpus", "watch_parent"]

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
        for child in multiprocessing.active_children():
            child.terminate()  # SIGTERM

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
