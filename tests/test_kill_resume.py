"""Kill a real `aace train` process at chosen moments (SIGKILL at start-up, mid-epoch, during
evaluation and during a checkpoint write; SIGTERM mid-epoch), resume each time with the same
command line, and check the result equals an uninterrupted run's exactly (CPU, with dropout and
AACE's random mode, so every random stream matters). Faults are injected by tests/faults.py at
deterministic points: no timing is involved."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from aace.training.checkpoint import load_checkpoint
from aace.training.metrics import TIMING_FIELDS
from aace.training.preemption import EXIT_PREEMPTED

FAULTS = str(Path(__file__).with_name("faults.py"))
EPOCHS, STEPS_PER_EPOCH = 4, 6  # 96 images, batch 16
# One fault per launch, each counted from the launch's start; with --checkpoint-every 4 a
# checkpoint is written after global steps 4, 8, 16, 20 and at every epoch's end (6, 12, ...).
LAUNCHES = [
    ("startup", -9),  # before the dataset is loaded: nothing written
    ("step:5", -9),  # kill in step 5, after the checkpoint of step 4
    ("step:6", -9),  # steps 5..9 run (checkpoints at 6 and 8), kill in step 10
    ("evaluate:1", -9),  # steps 9..12 run, kill in the evaluation of epoch 2
    ("save:2", -9),  # epoch 2 ends (checkpoint), kill while writing the checkpoint of step 16
    ("sigterm:3", EXIT_PREEMPTED),  # SIGTERM in step 15: checkpoint after it, exit 75
    ("", 0),
]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    rng = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("data") / "tiny.npz"
    y, y_test = rng.integers(0, 4, 96), rng.integers(0, 4, 32)

    def images(labels):
        noise = rng.integers(0, 40, (len(labels), 8, 8, 3))
        return (labels[:, None, None, None] * 60 + noise).astype(np.uint8)

    np.savez(path, x_train=images(y), y_train=y, x_test=images(y_test), y_test=y_test)
    return path


def command(dataset, out, *extra):
    return [
        sys.executable, FAULTS, "train", "--dataset", f"npz:{dataset}", "--model", "wrn10_1",
        "--epochs", str(EPOCHS), "--batch-size", "16", "--optimizer", "sam-aace",
        "--dropout", "0.2", "--aace-mode", "rand", "--seed", "5", "--out", str(out), "--resume",
        *extra,
    ]  # fmt: skip


def rows_without_timing(out):
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in row.items() if k not in TIMING_FIELDS} for row in rows]


def position(out) -> tuple[int, int]:
    """(epochs finished, steps into the next) of the run's checkpoint; (0, 0) without one."""
    if not (out / "checkpoint.pt").exists():
        return 0, 0
    checkpoint = load_checkpoint(out / "checkpoint.pt")
    return checkpoint["epoch"], checkpoint["step_in_epoch"]


def test_faults_at_every_stage_then_resume_equals_uninterrupted(dataset, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    reference = tmp_path / "reference"
    subprocess.run(command(dataset, reference), env=env, check=True, capture_output=True)

    out = tmp_path / "faulted"
    positions = []
    for fault, status in LAUNCHES:
        env.update(AACE_FAULTS=fault, AACE_LAUNCH="0")
        result = subprocess.run(
            command(dataset, out, "--checkpoint-every", "4"), env=env, capture_output=True,
            text=True,
        )  # fmt: skip
        assert result.returncode == status, (fault, result.stderr)
        assert "Traceback" not in result.stderr
        positions.append(position(out))
        # At every instant a complete checkpoint exists (or none yet), and metrics.jsonl never
        # holds an epoch twice.
        if (out / "metrics.jsonl").exists():
            epochs = [row["epoch"] for row in rows_without_timing(out)]
            assert epochs == list(range(1, len(epochs) + 1))
    # Where each fault left the run (epochs finished, step into the next epoch): a kill loses
    # at most --checkpoint-every steps; SIGTERM loses none.
    assert positions == [(0, 0), (0, 4), (1, 2), (1, 2), (2, 0), (2, 3), (EPOCHS, 0)]
    result = subprocess.run(command(dataset, out), env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr  # a finished run resumes to nothing

    assert rows_without_timing(out) == rows_without_timing(reference)
    assert not list(out.glob(".*.tmp")), "a temporary file of an interrupted write was left"
    final = load_checkpoint(out / "checkpoint.pt")
    expected = load_checkpoint(reference / "checkpoint.pt")
    for key, tensor in expected["model"].items():
        assert torch.equal(final["model"][key], tensor), key
    for a, b in zip(final["optimizer"]["state"].values(), expected["optimizer"]["state"].values()):
        assert torch.equal(a["momentum_buffer"], b["momentum_buffer"])


def test_sigterm_message_and_status(dataset, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "AACE_FAULTS": "sigterm:2", "AACE_LAUNCH": "0"}
    result = subprocess.run(command(dataset, tmp_path / "run"), env=env, capture_output=True,
                            text=True)  # fmt: skip
    assert result.returncode == EXIT_PREEMPTED
    lines = result.stderr.strip().splitlines()
    assert lines == [
        f"aace: stopped by SIGTERM at step 2 of epoch 1; checkpoint written to "
        f"'{tmp_path / 'run' / 'checkpoint.pt'}'. Run the same command with --resume to continue"
    ]
    assert position(tmp_path / "run") == (0, 2)
