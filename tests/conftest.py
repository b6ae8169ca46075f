"""Under pytest-xdist (``make test`` runs ``pytest -n auto``), each worker takes its share of
the CPUs: torch's intra-op threads in the worker, and ``OMP_NUM_THREADS`` for the processes
its tests start, so two workers on two cores do not run four busy threads."""

from __future__ import annotations

import os

import torch

from aace.training.workers import available_cpus

if "PYTEST_XDIST_WORKER_COUNT" in os.environ:
    _threads = max(1, available_cpus() // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))
    torch.set_num_threads(_threads)
    os.environ.setdefault("OMP_NUM_THREADS", str(_threads))
