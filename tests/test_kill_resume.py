"""SIGKILL a real `aace train` process at random moments, resume each time with the same command
line, and check the result equals an uninterrupted run's exactly (CPU, deterministic)."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from aace.training.checkpoint import load_checkpoint
from aace.training.metrics import TIMING_FIELDS

# Kill points: while starting up (0), then shortly after the metrics file reached epoch k:
# mid-epoch, during evaluation, or while the checkpoint is being written.
KILL_AFTER_EPOCHS = (0, 1, 2, 2, 4, 5, 7)


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


def command(dataset, out):
    return [
        sys.executable, "-m", "aace", "train", "--dataset", f"npz:{dataset}", "--model", "wrn10_1",
        "--epochs", "8", "--batch-size", "16", "--optimizer", "sam-aace", "--dropout", "0.2",
        "--aace-mode", "rand", "--seed", "5", "--out", str(out), "--resume",
    ]  # fmt: skip


def finished_epochs(out):
    try:
        return len((out / "metrics.jsonl").read_text().splitlines())
    except FileNotFoundError:
        return 0


def rows_without_timing(out):
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in row.items() if k not in TIMING_FIELDS} for row in rows]


def test_sigkill_at_random_moments_then_resume_equals_uninterrupted(dataset, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    reference = tmp_path / "reference"
    start = time.perf_counter()
    subprocess.run(command(dataset, reference), env=env, check=True, capture_output=True)
    timeout = 10 * (time.perf_counter() - start)

    out = tmp_path / "killed"
    rng = random.Random(1234)
    kills = 0
    epochs_at_kill = []
    for target in KILL_AFTER_EPOCHS:
        process = subprocess.Popen(
            command(dataset, out), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        deadline = time.perf_counter() + timeout
        while target and finished_epochs(out) < target and process.poll() is None:
            assert time.perf_counter() < deadline, "the run made no progress"
            time.sleep(0.01)
        time.sleep(rng.uniform(0.1, 1.5) if target == 0 else rng.uniform(0.0, 0.4))
        if process.poll() is not None:
            assert process.returncode == 0, process.stderr.read().decode()
            continue
        process.send_signal(signal.SIGKILL)
        process.wait()
        kills += 1
        # At every instant a complete checkpoint exists (or none yet).
        if (out / "checkpoint.pt").exists():
            checkpoint = load_checkpoint(out / "checkpoint.pt")
            epochs_at_kill.append(checkpoint["epoch"])
            rows = rows_without_timing(out)
            epochs = [row["epoch"] for row in rows]
            assert epochs == sorted(set(epochs)), "an epoch appears twice in metrics.jsonl"
            assert len(rows) in (checkpoint["epoch"], checkpoint["epoch"] + 1)
    assert kills >= len(KILL_AFTER_EPOCHS) - 2, f"only {kills} kills landed; lengthen the run"
    result = subprocess.run(command(dataset, out), env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr

    assert rows_without_timing(out) == rows_without_timing(reference)
    assert not list(out.glob(".*.tmp")), "a temporary file of an interrupted write was left"
    final = load_checkpoint(out / "checkpoint.pt")
    expected = load_checkpoint(reference / "checkpoint.pt")
    for key, tensor in expected["model"].items():
        assert torch.equal(final["model"][key], tensor), key
    for a, b in zip(final["optimizer"]["state"].values(), expected["optimizer"]["state"].values()):
        assert torch.equal(a["momentum_buffer"], b["momentum_buffer"])
    print(f"{kills} kills, checkpoint epochs at the kills: {epochs_at_kill}")
