"""Shared fixtures (below), and thread counts under xdist.

Under pytest-xdist (``make test`` runs ``pytest -n auto``), each worker takes its share of
the CPUs: torch's intra-op threads in the worker, and ``OMP_NUM_THREADS`` for the processes
its tests start, so two workers on two cores do not run four busy threads."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from aace.runs import RunDirectory
from aace.training import checkpoint as checkpoint_module
from aace.training.config import RunConfig
from aace.training.metrics import TIMING_FIELDS
from aace.training.workers import available_cpus

if "PYTEST_XDIST_WORKER_COUNT" in os.environ:
    _threads = max(1, available_cpus() // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))
    torch.set_num_threads(_threads)
    os.environ.setdefault("OMP_NUM_THREADS", str(_threads))


# -- shared fixtures: tiny data in the real format, a run config, an interrupted run ----------


def write_tiny_npz(path: Path, n_train: int = 48, n_test: int = 16, seed: int = 0) -> Path:
    """Four classes of 8x8 RGB images whose brightness depends on the class (so that a few
    epochs learn something), in the ``npz:PATH`` format of :mod:`aace.data`."""
    rng = np.random.default_rng(seed)
    y_train, y_test = rng.integers(0, 4, n_train), rng.integers(0, 4, n_test)

    def images(y):
        noise = rng.integers(0, 40, (len(y), 8, 8, 3))
        return (y[:, None, None, None] * 60 + noise).astype(np.uint8)

    np.savez(path, x_train=images(y_train), y_train=y_train, x_test=images(y_test), y_test=y_test)
    return path


@pytest.fixture(scope="session")
def npz_path(tmp_path_factory) -> Path:
    """The tiny dataset of :func:`write_tiny_npz` (48 training, 16 test images)."""
    return write_tiny_npz(tmp_path_factory.mktemp("data") / "tiny.npz")


def tiny_config(npz_path: Path, out: Path, **overrides: Any) -> RunConfig:
    """A 3-epoch WRN-10-1 run on the tiny dataset, writing to ``out``."""
    values: dict[str, Any] = dict(
        dataset=f"npz:{npz_path}", model="wrn10_1", epochs=3, batch_size=16, lr=0.05,
        out=str(out), seed=1,
    )  # fmt: skip
    values.update(overrides)
    return RunConfig(**values)


@pytest.fixture
def make_config(npz_path: Path, tmp_path: Path) -> Callable[..., RunConfig]:
    """``make_config(name="run", **overrides)``: :func:`tiny_config` into ``tmp_path / name``."""

    def make(name: str = "run", **overrides: Any) -> RunConfig:
        return tiny_config(npz_path, tmp_path / name, **overrides)

    return make


def read_rows(out: str | Path) -> list[dict[str, Any]]:
    return RunDirectory(out).read_rows()


def without_timing(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows without the columns that differ between two runs with the same result."""
    return [{k: v for k, v in r.items() if k not in TIMING_FIELDS} for r in rows]


class Killed(Exception):
    """What :func:`interrupt_after` raises in place of a kill."""


@pytest.fixture
def interrupt_after(monkeypatch) -> Callable[..., None]:
    """``interrupt_after(when)``: every checkpoint write goes through, and once ``when(payload,
    calls)`` is true for one (``calls``: writes so far, this one included) the run raises
    :class:`Killed` right after writing it, as if killed there. ``when`` may be an int n:
    after the n-th write. Writes of ``best.pt`` count too. Undone by ``monkeypatch.undo()``
    or at the test's end; ``interrupt_after(None)`` undoes it at once."""
    real = checkpoint_module.save_checkpoint

    def install(when: int | Callable[[dict, int], bool] | None) -> None:
        if when is None:
            monkeypatch.setattr(checkpoint_module, "save_checkpoint", real)
            return
        calls = 0
        due = (lambda payload, n: n == when) if isinstance(when, int) else when

        def save_then_die(path, payload):
            nonlocal calls
            real(path, payload)
            calls += 1
            if due(payload, calls):
                raise Killed

        monkeypatch.setattr(checkpoint_module, "save_checkpoint", save_then_die)

    return install
