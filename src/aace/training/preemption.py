"""Stopping a run at a step boundary when the job is preempted (SIGTERM), on every rank at once.

Slurm (``--signal``, ``scancel``, a requeue) and Kubernetes send SIGTERM and, after a grace
period, SIGKILL; torchrun forwards the SIGTERM it receives to its workers and kills them after
``--shutdown-timeout`` seconds (default 30). :class:`StopRequest` turns the signal into a flag;
the trainer asks :meth:`StopRequest.agreed` at every step boundary, writes a checkpoint where all
ranks agree to stop, and raises :class:`Preempted`, which the CLI turns into exit status
:data:`EXIT_PREEMPTED`. The same command line with ``--resume`` continues without losing a step.

Ranks receive the signal at slightly different times, so under DDP the flag is max-reduced over a
host-side gloo group with one step of delay: the all-reduce started at boundary s is read at
boundary s + 1, so it never stalls a step, and every rank reads the same value at the same
boundary. The cost is one small asynchronous host collective per step; no GPU synchronization.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType
from typing import Any

import torch
import torch.distributed as dist

from aace.training.distributed import Distributed

__all__ = [
    "EXIT_INTERRUPTED", "EXIT_PREEMPTED", "Preempted", "StopRequest", "defer_signals",
    "defer_sigterm", "deferred_signal",
]  # fmt: skip

# EX_TEMPFAIL of sysexits.h: "a temporary failure; the user is invited to retry".
EXIT_PREEMPTED = 75
# The shell's status for a process ended by SIGINT (Ctrl-C): a run stopped by it exits so.
EXIT_INTERRUPTED = 130


# Stop signals received while only deferred (before a run's StopRequest was active).
_deferred: list[int] = []


def defer_signals(signals: tuple[int, ...] = (signal.SIGTERM,)) -> None:
    """From now on each of ``signals`` is remembered instead of ending the process; a run
    started later stops at its first step boundary (:func:`deferred_signal` tells which came).
    Under torchrun the CLI defers SIGTERM first thing: torchrun SIGTERMs the other workers as
    soon as one exits, and a worker that is about to report the same error (a bad argument every
    rank checks) should exit with that error's status, not die of the signal. Worker processes
    of ``aace sweep`` and ``aace tune`` defer SIGTERM and SIGINT. Only from the main thread
    (Python's rule for handlers)."""
    if threading.current_thread() is threading.main_thread():
        for signum in signals:
            signal.signal(signum, lambda signum, frame: _deferred.append(signum))


def defer_sigterm() -> None:
    """:func:`defer_signals` for SIGTERM alone."""
    defer_signals((signal.SIGTERM,))


def deferred_signal() -> int | None:
    """The first stop signal remembered by :func:`defer_signals`, or None."""
    return _deferred[0] if _deferred else None


class Preempted(Exception):
    """The run stopped on a signal after writing a checkpoint; ``--resume`` continues it.
    ``signum`` is the signal that asked (SIGTERM unless said otherwise)."""

    def __init__(self, message: str = "", signum: int = signal.SIGTERM) -> None:
        super().__init__(message)
        self.signum = signum


class StopRequest:
    """A context manager: while active, SIGTERM (and the other ``signals``) request a stop
    instead of killing the process. Handlers are installed only from the main thread (Python's
    rule); elsewhere :meth:`request` is the only way to ask."""

    def __init__(self, context: Distributed, signals: tuple[int, ...] = (signal.SIGTERM,)) -> None:
        self.context = context
        self.signals = signals
        self.requested: int | None = None  # the number of the signal that asked
        self._previous: dict[int, Any] = {}
        self._pending: tuple[Any, torch.Tensor] | None = None

    def request(self, signum: int = signal.SIGTERM) -> None:
        """Ask the run to stop at the next step boundary (what the signal handler does)."""
        if self.requested is None:
            self.requested = signum

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.request(signum)

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for signum in self.signals:
                self._previous[signum] = signal.signal(signum, self._handle)
        if _deferred:
            self.request(_deferred[0])
        return self

    def __exit__(self, exc_type: type | None, *exc_info: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()
        if exc_type is None:
            self.finish()
        self._pending = None  # on an error, another rank may never answer

    def agreed(self) -> bool:
        """Whether every rank stops at this step boundary. Call it at every boundary, on every
        rank: under DDP it returns the requests of the previous boundary, max-reduced (so every
        rank also learns which signal asked)."""
        if not self.context.enabled:
            return self.requested is not None
        agreed = 0
        if self._pending is not None:
            work, flag = self._pending
            work.wait()
            agreed = int(flag[0])  # a CPU tensor: no device synchronization
        self._pending = None
        if agreed:  # every rank stops here: no collective is left outstanding
            if self.requested is None:
                self.requested = agreed  # another rank's signal
            return True
        flag = torch.tensor([self.requested or 0], dtype=torch.int32)
        work = dist.all_reduce(
            flag, op=dist.ReduceOp.MAX, group=self.context.control_group, async_op=True
        )
        self._pending = (work, flag)
        return False

    def finish(self) -> None:
        """Complete the outstanding all-reduce (all ranks call this at the same point)."""
        if self._pending is not None:
            work, _ = self._pending
            self._pending = None
            work.wait()

    @property
    def reason(self) -> str:
        try:
            return signal.Signals(self.requested).name
        except ValueError:
            return f"signal {self.requested}"
