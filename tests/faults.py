"""Run ``aace`` with a fault injected at a chosen point: the fault-injection entry of the tests.

    AACE_FAULTS="step:5@1,evaluate:1" python tests/faults.py train ...        # one process
    AACE_FAULTS=... torchrun --max-restarts=2 ... tests/faults.py train ...   # under torchrun

``AACE_FAULTS`` is a comma-separated list with one fault per launch: entry i applies to the
i-th launch of the process (torchrun's ``TORCHELASTIC_RESTART_COUNT``, else ``AACE_LAUNCH``);
an empty entry, or none, means no fault. A fault is ``POINT:N[@RANK]``: at the N-th time this
process reaches POINT (on rank RANK only, default 0), it is

* ``startup``  (N ignored): SIGKILLed before it loads the dataset;
* ``step``: SIGKILLed as it starts its N-th training step;
* ``evaluate``: SIGKILLed as it starts its N-th evaluation;
* ``save``: SIGKILLed in its N-th checkpoint write, after the data went to the temporary file
  and before the rename;
* ``sigterm``: receives SIGTERM at the start of its N-th step (this process only; under
  torchrun the other ranks learn of it through the trainer's stop agreement);
* ``sigint``: receives SIGINT (Ctrl-C) at the start of its N-th step;
* ``delay``: sleeps N seconds before it starts aace (a rank slow to start, as one still
  importing torch on a busy machine).

Faults are real signals at deterministic points: no timing is involved, except that ``delay``
makes one rank late on purpose.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time

import torch

import aace.training.checkpoint as checkpoint
import aace.training.trainer as trainer
from aace.cli import main
from aace.training.step import TrainStep


def _fault() -> tuple[str, int] | None:
    launch = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", os.environ.get("AACE_LAUNCH", "0")))
    faults = os.environ.get("AACE_FAULTS", "").split(",")
    entry = faults[launch].strip() if launch < len(faults) else ""
    if not entry:
        return None
    spec, _, rank = entry.partition("@")
    if int(os.environ.get("RANK", "0")) != int(rank or 0):
        return None
    point, _, count = spec.partition(":")
    return point, int(count or 1)


def _kill() -> None:
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def _at_nth_call(function, n: int, action):
    calls = 0

    def wrapper(*args, **kwargs):
        nonlocal calls
        calls += 1
        if calls == n:
            action()
        return function(*args, **kwargs)

    return wrapper


def _sigterm() -> None:
    """SIGTERM to this process's main thread (under torchrun: to this worker only, as a
    scheduler that signals every process of a job reaches each at its own moment). A signal a
    thread sends itself is delivered before ``pthread_kill`` returns, so the handler runs
    before this step does. (A process-directed ``os.kill`` may land on another thread, and the
    handler then runs a little later.)"""
    signal.pthread_kill(threading.main_thread().ident, signal.SIGTERM)


def _sigint() -> None:
    """SIGINT (Ctrl-C) to this process's main thread, as :func:`_sigterm`."""
    signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)


def _killed_mid_write(path, payload) -> None:
    payload = {"format": checkpoint.FORMAT, "format_version": checkpoint.FORMAT_VERSION, **payload}

    def write(f):
        torch.save(payload, f)
        f.flush()
        _kill()

    checkpoint.atomic_write(path, write)


def install(point: str, n: int) -> None:
    if point == "delay":
        time.sleep(n)
    elif point == "startup":
        trainer.load_dataset = _at_nth_call(trainer.load_dataset, 1, _kill)
    elif point == "step":
        TrainStep.__call__ = _at_nth_call(TrainStep.__call__, n, _kill)
    elif point == "sigterm":
        TrainStep.__call__ = _at_nth_call(TrainStep.__call__, n, _sigterm)
    elif point == "sigint":  # Ctrl-C, to this process alone
        TrainStep.__call__ = _at_nth_call(TrainStep.__call__, n, _sigint)
    elif point == "evaluate":
        trainer.evaluate = _at_nth_call(trainer.evaluate, n, _kill)
    elif point == "save":
        real = checkpoint.save_checkpoint
        calls = 0

        def save(path, payload):
            nonlocal calls
            calls += 1
            (_killed_mid_write if calls == n else real)(path, payload)

        checkpoint.save_checkpoint = save
    else:
        raise SystemExit(f"faults.py: unknown fault point {point!r}")


if __name__ == "__main__":
    fault = _fault()
    if fault is not None:
        install(*fault)
    sys.exit(main(sys.argv[1:]))
