"""Epochs, evaluation, metrics rows, checkpoints and resume for ``aace train``.

A run directory holds ``config.json`` (the resolved configuration and versions),
``metrics.jsonl`` (one JSON object per finished epoch), ``checkpoint.pt`` (the latest state) and
``summary.json`` (final and best test accuracy, written when the run ends).

Order of writes at the end of an epoch: the metrics row is appended, then the checkpoint (which
also carries all rows so far) replaces the previous one. A resume rewrites ``metrics.jsonl``
from the checkpoint, so the file never holds an epoch twice or an epoch past the checkpoint.

Under torchrun every process runs :meth:`Trainer.fit` on its shard of the data; rank 0 alone
writes these files and logs, with metrics reduced over all ranks once per epoch (see
:mod:`aace.training.distributed` and ``docs/distributed.md``).
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import aace
from aace.data import BatchLoader, InMemoryDataset, load_dataset
from aace.data.loader import _derive_seed
from aace.models import create_model
from aace.schedule import SAMSchedule
from aace.training import distributed
from aace.training.checkpoint import (
    CheckpointError,
    atomic_write_json,
    atomic_write_text,
    load_checkpoint,
    save_checkpoint,
)
from aace.training.config import ConfigError, RunConfig
from aace.training.distributed import Distributed
from aace.training.metrics import EpochSums, Progress, json_safe, summarize
from aace.training.step import (
    NonFiniteError,
    TrainStep,
    autocast,
    build_optimizer,
    build_schedule,
)

CHECKPOINT = "checkpoint.pt"
CONFIG = "config.json"
METRICS = "metrics.jsonl"
SUMMARY = "summary.json"
# Fields that may change between a run and its resume without changing its result. The number
# of processes is not a field: it may change too (the global batch stays --batch-size), and so
# may --accumulate, which splits the same batch differently (BatchNorm sees smaller batches).
RESUMABLE_CHANGES = (
    "out", "device", "data_dir", "download", "compile", "nonfinite", "accumulate",
)  # fmt: skip
EVAL_BATCH_SIZE = 1024


def _silent(_: str) -> None:
    """The log of ranks other than 0."""


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device: got 'cuda' but no CUDA device is available; use auto or cpu")
    if name == "mps" and not (
        getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()
    ):
        raise ConfigError("--device: got 'mps' but MPS is not available; use auto or cpu")
    return torch.device(name)


def build_model(config: RunConfig, dataset: InMemoryDataset) -> nn.Module:
    return create_model(
        config.model,
        num_classes=dataset.num_classes,
        in_channels=dataset.in_channels,
        dropout=config.dropout,
        shakedrop=config.shakedrop,
    )


def build_test_loader(
    dataset: InMemoryDataset, device: torch.device, rank: int = 0, world_size: int = 1
) -> BatchLoader:
    """The test set in order, unaugmented, this rank's shard."""
    return BatchLoader(
        dataset.x_test,
        dataset.y_test,
        batch_size=EVAL_BATCH_SIZE,
        mean=dataset.mean,
        std=dataset.std,
        train=False,
        rank=rank,
        world_size=world_size,
        device=device,
    )


def lr_milestones(config: RunConfig) -> list[int]:
    """The paper code's step schedule: x0.2 at 30 %, 60 % and 80 % of training."""
    return [max(1, round(config.epochs * f)) for f in (0.3, 0.6, 0.8)]


def build_scheduler(
    optimizer: torch.optim.Optimizer, config: RunConfig
) -> torch.optim.lr_scheduler.LRScheduler:
    if config.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.epochs)
    return torch.optim.lr_scheduler.MultiStepLR(optimizer, lr_milestones(config), gamma=0.2)


@torch.no_grad()
def evaluate(
    model: nn.Module, loader: BatchLoader, amp: str = "off"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Summed CE loss, correct count and sample count over the loader, as device tensors
    (over this rank's shard; the trainer sums them across ranks)."""
    model.eval()
    device = next(model.parameters()).device
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    correct = torch.zeros((), device=device, dtype=torch.int64)
    count = torch.zeros((), device=device, dtype=torch.int64)
    for x, y in loader:
        with autocast(device, amp):
            logits = model(x)
        loss_sum += F.cross_entropy(logits.float(), y, reduction="sum")
        correct += (logits.argmax(1) == y).sum()
        count += y.numel()
    return loss_sum, correct, count


class Trainer:
    """Trains one run described by a :class:`RunConfig` into its run directory."""

    def __init__(self, config: RunConfig, log: Callable[[str], None] = print) -> None:
        self.config = config.validate()
        self.log = log
        self.out = Path(config.out)
        self.is_main = True  # False on ranks > 0 once fit() knows

    # -- run directory -----------------------------------------------------------------------

    def _prepare_directory(self, resume: bool) -> dict[str, Any] | None:
        """Create or check the run directory; return the checkpoint to resume from, if any."""
        out = self.out
        if out.exists() and not out.is_dir():
            raise ConfigError(f"--out: '{out}' exists and is not a directory")
        try:
            out.mkdir(parents=True, exist_ok=True)
            probe = out / ".write-test"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as error:
            raise ConfigError(
                f"--out: cannot write to '{out}' ({error.strerror or error})"
            ) from error
        for leftover in out.glob(".*.tmp"):  # from a write that a kill interrupted
            leftover.unlink(missing_ok=True)
        has_run = (out / CONFIG).exists() or (out / CHECKPOINT).exists()
        if not resume:
            if has_run:
                raise ConfigError(
                    f"--out: '{out}' already holds a run; pass --resume to continue it "
                    "or choose another --out"
                )
            return None
        if not (out / CHECKPOINT).exists():
            if (out / CONFIG).exists():
                self._check_same_run(out / CONFIG)
            self.log(f"notice: no checkpoint in '{out}' yet; starting from the beginning")
            return None
        checkpoint = load_checkpoint(out / CHECKPOINT)
        saved = RunConfig.from_dict(checkpoint["config"])
        self._check_same_config(saved, f"the checkpoint in '{out}'")
        return checkpoint

    def _check_same_run(self, config_path: Path) -> None:
        try:
            saved = RunConfig.from_dict(json.loads(config_path.read_text())["config"])
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise ConfigError(f"--out: '{config_path}' is not a readable aace config") from error
        self._check_same_config(saved, f"'{config_path}'")

    def _check_same_config(self, saved: RunConfig, where: str) -> None:
        differences = self.config.differences(saved, ignore=RESUMABLE_CHANGES)
        if differences:
            details = ", ".join(
                f"{k}: {getattr(saved, k)!r} there, {getattr(self.config, k)!r} now"
                for k in differences
            )
            raise ConfigError(
                f"--resume: {where} belongs to a different run ({details}); "
                "use the same settings or another --out"
            )

    def _environment(self, device: torch.device, context: Distributed) -> dict[str, Any]:
        return {
            "aace_version": aace.__version__,
            "torch_version": torch.__version__,
            "python_version": platform.python_version(),
            "device": str(device),
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
            "world_size": context.world_size,
            "platform": platform.platform(),
            "command": sys.argv,
        }

    # -- the run -----------------------------------------------------------------------------

    def fit(self, resume: bool = False) -> dict[str, Any]:
        """Train (or, with ``resume``, continue) the run; returns the summary.

        Under torchrun every process calls ``fit``: see :mod:`aace.training.distributed`.
        """
        context, device = distributed.setup(resolve_device(self.config.device))
        self.is_main = context.is_main
        try:
            return self._fit(context, device, resume)
        finally:
            context.close()

    def _fit(self, context: Distributed, device: torch.device, resume: bool) -> dict[str, Any]:
        config = self.config
        log = self.log if context.is_main else _silent
        batch_size = config.per_rank_batch_size(context.world_size)
        checkpoint = context.run_on_main(lambda: self._prepare_directory(resume))

        torch.manual_seed(config.seed)  # the same initial model on every rank
        dataset = context.main_first(
            lambda: load_dataset(
                config.dataset, config.data_dir, config.download, config.image_size
            )
        )
        model = build_model(config, dataset).to(device)
        model, ddp = distributed.wrap_model(model, context, device, config.sync_bn)
        if context.enabled:
            # Dropout masks and AACE's "rand" weights differ across ranks.
            torch.manual_seed(_derive_seed(config.seed, context.rank))
        optimizer = build_optimizer(model, config)
        scheduler = build_scheduler(optimizer, config)
        cutout = dataset.cutout if config.cutout is None else config.cutout
        if config.batch_size > len(dataset.y_train):
            raise ConfigError(
                f"--batch-size: got {config.batch_size}, larger than the {dataset.name} training "
                f"set ({len(dataset.y_train)} images); expected at most {len(dataset.y_train)}"
            )
        train_loader = BatchLoader(
            dataset.x_train,
            dataset.y_train,
            batch_size=batch_size,
            mean=dataset.mean,
            std=dataset.std,
            train=True,
            crop_padding=dataset.crop_padding,
            hflip=dataset.hflip,
            cutout=cutout,
            seed=config.seed,
            rank=context.rank,
            world_size=context.world_size,
            device=device,
        )
        test_loader = build_test_loader(dataset, device, context.rank, context.world_size)
        step_model = ddp if ddp is not None else model
        if config.compile:
            step_model = torch.compile(step_model)
        schedule = build_schedule(config, config.epochs * len(train_loader))
        step = TrainStep(step_model, optimizer, config, device, ddp=ddp, schedule=schedule)

        rows: list[dict[str, Any]] = []
        start_epoch = 0
        if checkpoint is not None:
            start_epoch, rows = self._restore(
                checkpoint, model, optimizer, scheduler, step.scaler, device, context, schedule
            )
            log(f"resumed from '{self.out / CHECKPOINT}' after epoch {start_epoch}")
        if context.is_main:
            atomic_write_json(
                self.out / CONFIG,
                {"config": config.to_dict(), **self._environment(device, context)},
            )
            atomic_write_text(
                self.out / METRICS, "".join(json.dumps(json_safe(r)) + "\n" for r in rows)
            )
        processes = f", {context.world_size} processes" if context.enabled else ""
        log(
            f"{config.optimizer} on {dataset.name} ({len(dataset.y_train)} train / "
            f"{len(dataset.y_test)} test, {dataset.num_classes} classes), {config.model} "
            f"({sum(p.numel() for p in model.parameters()):,} parameters), {device}"
            f"{processes}, {config.epochs} epochs -> {self.out}"
        )

        for epoch in range(start_epoch, config.epochs):
            row = self._train_epoch(
                epoch, step, model, optimizer, train_loader, test_loader, context
            )
            rows.append(row)
            scheduler.step()
            rng = context.gather_objects(self._rng_state(device))
            if not context.is_main:
                continue
            with open(self.out / METRICS, "a") as f:
                f.write(json.dumps(json_safe(row)) + "\n")
                f.flush()
                os.fsync(f.fileno())
            payload = {
                "config": config.to_dict(),
                "epoch": epoch + 1,
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "rng": dict(rng[0], ranks=rng) if context.enabled else rng[0],
                "world_size": context.world_size,
                "metrics": rows,
                "num_classes": dataset.num_classes,
                "in_channels": dataset.in_channels,
                "aace_version": aace.__version__,
            }
            if step.fp16:
                payload["scaler"] = step.scaler.state_dict()
            if schedule is not None:
                payload["sam_schedule"] = schedule.state_dict()
            save_checkpoint(self.out / CHECKPOINT, payload)
            log(self._format_row(row))

        summary = summarize(rows, config)
        if context.is_main:
            atomic_write_json(self.out / SUMMARY, summary)
        return summary

    def _train_epoch(
        self,
        epoch: int,
        step: TrainStep,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        train_loader: BatchLoader,
        test_loader: BatchLoader,
        context: Distributed,
    ) -> dict[str, Any]:
        device = next(model.parameters()).device
        lr = optimizer.param_groups[0]["lr"]
        train_loader.set_epoch(epoch)
        if step.is_sam:
            optimizer.reset_stats()
        sums = EpochSums(device)
        progress = Progress(len(train_loader), epoch + 1, self.config.epochs, context.is_main)
        start = time.perf_counter()
        model.train()
        for x, y in train_loader:
            stats = step(x, y)
            sums.add(stats, y.shape[0])
            progress.update(stats, y.shape[0])
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        train_seconds = time.perf_counter() - start
        progress.close()
        distributed.broadcast_buffers(model, context)
        test = evaluate(model, test_loader, self.config.amp)
        row: dict[str, Any] = {"epoch": epoch + 1, "lr": lr}
        try:
            values, samples = sums.row(step.is_sam, test, context)
        except NonFiniteError as error:
            kept = f"checkpoint of epoch {epoch} kept" if epoch else "no checkpoint written"
            raise NonFiniteError(
                f"{str(error).format(epoch=epoch + 1)}; stopped, {kept}. Lower --lr or --rho, "
                "or pass --nonfinite skip to skip such steps"
            ) from None
        row.update(values)
        row["seconds"] = time.perf_counter() - start
        row["images_per_second"] = samples / train_seconds if train_seconds > 0 else None
        return row

    @staticmethod
    def _rng_state(device: torch.device) -> dict[str, Any]:
        state: dict[str, Any] = {"torch": torch.get_rng_state()}
        if device.type == "cuda":
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def _restore(
        self,
        checkpoint: dict[str, Any],
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
        scaler: torch.amp.GradScaler,
        device: torch.device,
        context: Distributed,
        schedule: SAMSchedule | None = None,
    ) -> tuple[int, list[dict[str, Any]]]:
        path = self.out / CHECKPOINT
        try:
            model.load_state_dict(checkpoint["model"])
            optimizer.load_state_dict(checkpoint["optimizer"])
            scheduler.load_state_dict(checkpoint["scheduler"])
            if scaler.is_enabled() and "scaler" in checkpoint:
                scaler.load_state_dict(checkpoint["scaler"])
            if schedule is not None:
                schedule.load_state_dict(checkpoint["sam_schedule"])
        except (RuntimeError, KeyError, ValueError) as error:
            first_line = str(error).strip().splitlines()[0]
            raise CheckpointError(
                f"checkpoint '{path}' does not fit this model/optimizer ({first_line})"
            ) from error
        epoch = int(checkpoint["epoch"])
        rng = checkpoint.get("rng", {})
        states = rng.get("ranks", [rng])
        if len(states) == context.world_size:
            rng = states[context.rank]
            if "torch" in rng:
                torch.set_rng_state(rng["torch"])
            if "cuda" in rng and device.type == "cuda":
                torch.cuda.set_rng_state_all(rng["cuda"])
        else:
            # Another number of processes than the checkpoint's: same global batch and data
            # order, fresh (but seeded) random streams for dropout and AACE's "rand" mode.
            torch.manual_seed(_derive_seed(self.config.seed, context.rank, epoch))
            if context.is_main:
                self.log(
                    f"notice: the checkpoint was written by {len(states)} process(es), this run "
                    f"has {context.world_size}; dropout and random AACE weights will not repeat "
                    "the uninterrupted run"
                )
        rows = list(checkpoint.get("metrics", []))
        return epoch, rows

    @staticmethod
    def _format_row(row: dict[str, Any]) -> str:
        text = (
            f"epoch {row['epoch']:>3}  lr {row['lr']:.4g}  train loss {row['train_loss']:.4f} "
            f"acc {row['train_acc']:.4f}  test loss {row['test_loss']:.4f} "
            f"acc {row['test_acc']:.4f}"
        )
        if row["grad_norm"] is not None:
            cosine = row["perturbation_cosine"]
            text += f"  |g| {row['grad_norm']:.3g}  |e| {row['perturbation_norm']:.3g}"
            text += f"  cos {cosine:.3f}" if cosine is not None else ""
        if row["images_per_second"]:
            text += f"  {row['images_per_second']:.0f} img/s"
        return text
