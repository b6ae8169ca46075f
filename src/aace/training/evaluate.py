"""Evaluating a model and loading a trained one: what ``aace eval``, ``aace sharpness`` and the
trainer's per-epoch evaluation share."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from aace.data import BatchLoader, InMemoryDataset, load_dataset
from aace.runs import RunDirectory
from aace.training.build import build_model
from aace.training.checkpoint import CheckpointError, load_checkpoint
from aace.training.config import ConfigError, RunConfig
from aace.training.step import autocast

__all__ = [
    "evaluate", "evaluate_sums", "load_model_state", "load_trained_model", "resolve_checkpoint"
]  # fmt: skip


@torch.no_grad()
def evaluate_sums(
    model: nn.Module, loader: BatchLoader, amp: str = "off"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Summed CE loss, correct count, correct count against the loader's clean labels (the
    labels themselves when it has none) and sample count over the loader, as device tensors
    (over this rank's shard; the trainer sums them across ranks)."""
    model.eval()
    device = next(model.parameters()).device
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    correct = torch.zeros((), device=device, dtype=torch.int64)
    clean_correct = torch.zeros((), device=device, dtype=torch.int64)
    count = torch.zeros((), device=device, dtype=torch.int64)
    for x, y, *clean in loader:  # (x, y), or (x, y, clean_y) with noisy labels
        with autocast(device, amp):
            logits = model(x)
        loss_sum += F.cross_entropy(logits.float(), y, reduction="sum")
        predicted = logits.argmax(1)
        correct += (predicted == y).sum()
        clean_correct += (predicted == (clean[0] if clean else y)).sum()
        count += y.numel()
    return loss_sum, correct, clean_correct, count


def evaluate(
    model: nn.Module, loader: BatchLoader, amp: str = "off"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Summed CE loss, correct count and sample count over the loader (see
    :func:`evaluate_sums`)."""
    loss_sum, correct, _, count = evaluate_sums(model, loader, amp)
    return loss_sum, correct, count


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A checkpoint file, or a run directory's ``checkpoint.pt`` (its last epoch)."""
    path = Path(path)
    if path.is_dir():
        run = RunDirectory(path)
        if not run.has_checkpoint:
            raise CheckpointError(
                f"'{path}' has no {run.checkpoint_file.name}; expected an aace run directory "
                "or a checkpoint file"
            )
        return run.checkpoint_file
    return path


def load_model_state(
    model: nn.Module, checkpoint: dict[str, Any], path: str | os.PathLike, name: str
) -> None:
    try:
        model.load_state_dict(checkpoint["model"])
    except RuntimeError as error:
        raise CheckpointError(
            f"checkpoint '{path}' does not match model {name} ({str(error).splitlines()[0]})"
        ) from error


def load_trained_model(
    path: str | os.PathLike, data_dir: str | None = None
) -> tuple[nn.Module, RunConfig, InMemoryDataset, dict[str, Any]]:
    """The model of a checkpoint (a file, or a run directory's ``checkpoint.pt``) on the CPU,
    built from the config saved in it; that config (``data_dir`` overridden when given), the
    run's dataset and the checkpoint itself."""
    path = resolve_checkpoint(path)
    checkpoint = load_checkpoint(path)
    try:
        config = RunConfig.from_dict(checkpoint["config"])
    except (ConfigError, TypeError) as error:
        raise CheckpointError(f"checkpoint '{path}' has an invalid config") from error
    if data_dir:
        config.data_dir = data_dir
    dataset = load_dataset(config.dataset, config.data_dir, False, config.image_size)
    if checkpoint.get("num_classes") not in (None, dataset.num_classes):
        raise CheckpointError(
            f"checkpoint '{path}' has {checkpoint['num_classes']} classes but "
            f"{dataset.name} has {dataset.num_classes}"
        )
    config.pretrained = False  # the checkpoint holds the weights
    model = build_model(config, dataset)
    load_model_state(model, checkpoint, path, config.model)
    return model, config, dataset, checkpoint
