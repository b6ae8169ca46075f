"""The checkpoint format: what a checkpoint holds, written and restored side by side.

A checkpoint is a dict saved with ``torch.save`` and read with ``torch.load(weights_only=True)``
(tensors and plain containers only), marked ``format: "aace-checkpoint"``, ``format_version: 1``.
Two kinds share the format:

* ``checkpoint.pt`` (:func:`save_training_state` / :func:`restore_training_state`): everything
  to continue a run exactly: ``config``, ``epoch`` (finished), ``step_in_epoch`` (mid-epoch
  checkpoints), ``model``, ``optimizer``, ``scheduler``, ``rng`` (the random streams, under
  torchrun one entry per rank in ``rng["ranks"]``; mid-epoch also each rank's loader position,
  partial sums and SAM's previous perturbation), ``world_size``, ``metrics`` (the rows so far),
  ``epoch_seconds``, ``num_classes``, ``in_channels``, ``aace_version``, and when used
  ``scaler`` (fp16) and ``sam_schedule``.
* ``best.pt`` (:func:`save_model`): ``config``, ``epoch``, ``model``, ``num_classes``,
  ``in_channels``, ``aace_version``, ``selected_by``.

Writes are atomic (:func:`aace.runs.atomic_write`): at every instant a complete checkpoint
exists.
"""

from __future__ import annotations

import os
import pickle
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

import aace
from aace.data.loader import BatchLoader, derive_seed
from aace.runs import atomic_write, atomic_write_json, atomic_write_text
from aace.training.config import RunConfig

__all__ = [
    "FORMAT", "FORMAT_VERSION", "CheckpointError", "Position", "atomic_write", "atomic_write_json",
    "atomic_write_text", "load_checkpoint", "rank_state", "restore_training_state",
    "save_checkpoint", "save_model", "save_training_state",
]  # fmt: skip

FORMAT = "aace-checkpoint"
FORMAT_VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the file and the problem."""


def save_checkpoint(path: str | os.PathLike, payload: dict[str, Any]) -> None:
    payload = {"format": FORMAT, "format_version": FORMAT_VERSION, **payload}
    atomic_write(path, lambda f: torch.save(payload, f))


def load_checkpoint(path: str | os.PathLike, map_location: Any = "cpu") -> dict[str, Any]:
    """Load and check a checkpoint written by :func:`save_checkpoint`. Nothing is unpickled
    beyond tensors and plain containers (``weights_only=True``)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint '{path}' does not exist or is not a file")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except (
        RuntimeError,
        pickle.UnpicklingError,
        EOFError,
        zipfile.BadZipFile,
        ValueError,
        OSError,
    ) as error:
        text = str(error).strip() or type(error).__name__
        first_line = text.splitlines()[0].split(". ")[0]
        raise CheckpointError(
            f"checkpoint '{path}' is truncated, corrupted or not a PyTorch file ({first_line})"
        ) from error
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(
            f"checkpoint '{path}' was not written by aace (no '{FORMAT}' marker); "
            "expected a checkpoint.pt from an 'aace train' run directory"
        )
    if payload.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"checkpoint '{path}' has format version {payload.get('format_version')!r}; "
            f"this aace reads version {FORMAT_VERSION}"
        )
    for key in ("config", "model", "epoch"):
        if key not in payload:
            raise CheckpointError(f"checkpoint '{path}' lacks the entry '{key}'")
    return payload


@dataclass
class Position:
    """Where a run stands: ``epoch`` epochs finished and ``step`` steps into the next one,
    the metrics rows so far, and (mid-epoch) the training seconds and this rank's partial
    sums of the unfinished epoch."""

    epoch: int = 0
    step: int = 0
    rows: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0
    sums: dict[str, Any] | None = None

    def describe(self) -> str:
        """``"after epoch 3"`` or ``"after epoch 3 and step 5 of epoch 4"``."""
        where = f"after epoch {self.epoch}"
        return where + (f" and step {self.step} of epoch {self.epoch + 1}" if self.step else "")

    def kept(self) -> str:
        """What a stop leaves on disk when this position's checkpoint is the last."""
        if self.step:
            return f"checkpoint of step {self.step} of epoch {self.epoch + 1} kept"
        return f"checkpoint of epoch {self.epoch} kept"


def _model_entries(config: RunConfig, model: nn.Module, dataset: Any, epoch: int) -> dict:
    return {
        "config": config.to_dict(),
        "epoch": epoch,
        "model": model.state_dict(),
        "num_classes": dataset.num_classes,
        "in_channels": dataset.in_channels,
        "aace_version": aace.__version__,
    }


def save_model(
    path: str | os.PathLike, config: RunConfig, model: nn.Module, dataset: Any, epoch: int
) -> None:
    """``best.pt``: the model after ``epoch``, the best by validation accuracy so far
    (``aace eval`` and :func:`aace.training.evaluate.load_trained_model` read it)."""
    entries = _model_entries(config, model, dataset, epoch)
    save_checkpoint(path, {**entries, "selected_by": "val_acc"})


def rank_state(
    device: torch.device,
    loader: BatchLoader | None = None,
    sums: dict[str, Any] | None = None,
    optimizer_state: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """This rank's part of a checkpoint: its random streams and, mid-epoch (``loader`` given),
    its loader position, its partial sums and SAM's previous perturbation (for the cosine:
    each rank's own under DDP), which is taken out of ``optimizer_state``."""
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state_all()
    if loader is not None:
        state["loader"] = loader.state_dict()
        state["sums"] = sums
        state["sam_stats"] = (optimizer_state or {}).pop("sam_stats", None)
    return state


def save_training_state(
    path: str | os.PathLike,
    *,
    config: RunConfig,
    position: Position,
    model: nn.Module,
    optimizer_state: dict[str, Any],
    scheduler: Any,
    dataset: Any,
    rank_states: list[dict[str, Any]],
    distributed: bool,
    scaler: torch.amp.GradScaler | None = None,
    sam_schedule: Any = None,
) -> None:
    """Write ``checkpoint.pt`` of ``position`` (rank 0; ``rank_states`` from every rank's
    :func:`rank_state`, in rank order)."""
    payload = {
        **_model_entries(config, model, dataset, position.epoch),
        "step_in_epoch": position.step,
        "optimizer": optimizer_state,
        "scheduler": scheduler.state_dict(),
        "rng": dict(rank_states[0], ranks=rank_states) if distributed else rank_states[0],
        "world_size": len(rank_states),
        "metrics": position.rows,
        "epoch_seconds": position.seconds,
    }
    if scaler is not None:
        payload["scaler"] = scaler.state_dict()
    if sam_schedule is not None:
        payload["sam_schedule"] = sam_schedule.state_dict()
    save_checkpoint(path, payload)


def restore_training_state(
    checkpoint: dict[str, Any],
    path: str | os.PathLike,
    *,
    seed: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    train_loader: BatchLoader,
    rank: int,
    world_size: int,
    device: torch.device,
    scaler: torch.amp.GradScaler | None = None,
    sam_schedule: Any = None,
    log: Callable[[str], None] = print,
) -> Position:
    """Load what :func:`save_training_state` wrote into the run's objects, restore this rank's
    random streams, and return the position to continue from.

    With another number of processes than the checkpoint's the run keeps its global batch and
    data order but gets fresh (seeded) random streams; mid-epoch, the old ranks' partial sums
    are merged into rank 0's. Raises :class:`CheckpointError` when the checkpoint does not fit
    the objects."""
    rng = checkpoint.get("rng", {})
    states = rng.get("ranks", [rng])
    same_ranks = len(states) == world_size
    optimizer_state = dict(checkpoint["optimizer"])
    if same_ranks and states[rank].get("sam_stats") is not None:
        optimizer_state["sam_stats"] = states[rank]["sam_stats"]
    try:
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(optimizer_state)
        scheduler.load_state_dict(checkpoint["scheduler"])
        if scaler is not None and scaler.is_enabled() and "scaler" in checkpoint:
            scaler.load_state_dict(checkpoint["scaler"])
        if sam_schedule is not None:
            sam_schedule.load_state_dict(checkpoint["sam_schedule"])
    except (RuntimeError, KeyError, ValueError) as error:
        first_line = str(error).strip().splitlines()[0]
        raise CheckpointError(
            f"checkpoint '{path}' does not fit this model/optimizer ({first_line})"
        ) from error
    position = Position(
        epoch=int(checkpoint["epoch"]),
        step=int(checkpoint.get("step_in_epoch", 0)),
        rows=list(checkpoint.get("metrics", [])),
        seconds=float(checkpoint.get("epoch_seconds", 0.0)),
    )
    if same_ranks:
        mine = states[rank]
        if "torch" in mine:
            torch.set_rng_state(mine["torch"])
        if "cuda" in mine and device.type == "cuda":
            torch.cuda.set_rng_state_all(mine["cuda"])
        if position.step:
            train_loader.load_state_dict(mine["loader"])
            position.sums = mine["sums"]
        return position
    # Another number of processes than the checkpoint's: same global batch and data
    # order, fresh (but seeded) random streams for dropout, augmentation and AACE's "rand"
    # mode. Mid-epoch, global step s covers the same samples whatever the number of
    # processes, so the epoch continues at its step with the old ranks' sums merged.
    torch.manual_seed(derive_seed(seed, rank, position.epoch))
    if position.step:
        train_loader.load_state_dict(dict(states[0]["loader"], augment_state=None))
        position.sums = _merged_sums([s["sums"] for s in states], rank == 0)
    if rank == 0:
        log(
            f"notice: the checkpoint was written by {len(states)} process(es), this run "
            f"has {world_size}; dropout, augmentation and random AACE weights will "
            "not repeat the uninterrupted run"
        )
    return position


def _merged_sums(states: list[dict[str, Any]], is_main: bool) -> dict[str, Any]:
    """The partial sums of a checkpoint's ranks as one rank's (rank 0 of a run with another
    number of processes); the others start from zero but keep the shared step counts."""
    merged = dict(states[0])
    for name, value in merged.items():
        if isinstance(value, torch.Tensor) and name != "first_bad":
            merged[name] = sum(s[name] for s in states) if is_main else torch.zeros_like(value)
        elif isinstance(value, dict):
            merged[name] = {
                k: sum(s[name][k] for s in states) if is_main else torch.zeros_like(v)
                for k, v in value.items()
            }
    merged["samples"] = sum(s["samples"] for s in states) if is_main else 0
    return merged
