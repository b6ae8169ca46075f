"""TensorBoard event files for ``aace train --tensorboard`` (``pip install 'aace[tensorboard]'``).

Two runs under ``OUT/tensorboard``, written through ``torch.utils.tensorboard``:

* ``epochs``: every numeric ``metrics.jsonl`` column under its own name (``test_acc``,
  ``grad_norm``, ``perturbation_cosine``, ``lr``, ...), at x = the epoch (1, 2, ...); columns
  that are null in ``metrics.jsonl`` (SGD's perturbation statistics) are not written.
* ``steps``: ``step/train_loss``, the update loss of one step's batch (rank 0's shard under DDP),
  every ``log_every`` steps, at x = the training step counted from the start of the run
  (1, 2, ...). Reading it is the only host synchronization, once every ``log_every`` steps.

Resume continues the same curves without duplicates: a run killed after writing events but
before its checkpoint leaves events past the checkpoint; each writer starts with
``purge_step`` = the checkpoint's position + 1 (the next epoch, the next step), and TensorBoard
discards every earlier-written event at or after it when it reads the files. The trainer writes
(and flushes) an epoch's events before the checkpoint that covers them, so none are missing.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from aace.integrations import require

__all__ = ["TENSORBOARD_DIR", "TensorBoardLog"]

TENSORBOARD_DIR = "tensorboard"
"""The folder of a run directory that holds the TensorBoard events (``epochs/``, ``steps/``)."""
STEP_LOSS_TAG = "step/train_loss"


class TensorBoardLog:
    """Per-epoch metrics and the per-step training loss of one run, as TensorBoard events.

    Args:
        out: the run directory; events go to ``out/tensorboard/{epochs,steps}``.
        log_every: write the training loss every this many steps.
        epochs_done: the epochs finished in the checkpoint the run starts from (0 for a fresh
            run); epoch events an earlier attempt wrote after it are purged.
        steps_done: the training steps finished in that checkpoint (0 for a fresh run); step
            events an earlier attempt wrote after it are purged.

    Raises:
        MissingExtraError: the ``tensorboard`` package is not installed.
        ValueError: ``log_every`` is not an integer >= 1.
    """

    def __init__(self, out: Path, log_every: int, epochs_done: int = 0, steps_done: int = 0):
        tensorboard = require(
            "torch.utils.tensorboard", "tensorboard", "--tensorboard", package="tensorboard"
        )
        if not isinstance(log_every, int) or log_every < 1:
            raise ValueError(f"log_every must be an integer >= 1, got {log_every!r}")
        root = Path(out) / TENSORBOARD_DIR
        self.log_every = log_every
        self.steps = steps_done
        self.epoch_writer = tensorboard.SummaryWriter(
            str(root / "epochs"), purge_step=epochs_done + 1
        )
        self.step_writer = tensorboard.SummaryWriter(str(root / "steps"), purge_step=steps_done + 1)

    def log_step(self, train_loss: torch.Tensor | None) -> None:
        """Count one training step; every ``log_every`` steps, write its loss (a skipped step,
        whose loss is None, writes nothing)."""
        self.steps += 1
        if self.steps % self.log_every == 0 and train_loss is not None:
            self.step_writer.add_scalar(STEP_LOSS_TAG, float(train_loss), self.steps)

    def log_epoch(self, row: dict[str, Any]) -> None:
        """Write the epoch's ``metrics.jsonl`` row and flush both writers to disk."""
        epoch = int(row["epoch"])
        for name, value in row.items():
            if name == "epoch" or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            if math.isfinite(value):  # metrics.jsonl stores NaN/inf as null
                self.epoch_writer.add_scalar(name, value, epoch)
        self.flush()

    def flush(self) -> None:
        self.epoch_writer.flush()
        self.step_writer.flush()

    def close(self) -> None:
        self.epoch_writer.close()
        self.step_writer.close()
