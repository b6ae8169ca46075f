"""Epochs, evaluation, metrics rows, checkpoints and resume for ``aace train``.

A run directory holds ``config.json`` (the resolved configuration and versions),
``metrics.jsonl`` (one JSON object per finished epoch), ``checkpoint.pt`` (the latest state) and
``summary.json`` (final and best test accuracy, written when the run ends). A run with a
validation split (``--val-split``) also keeps ``best.pt``: the model of the epoch with the
highest ``val_acc`` (the earliest of equals), the one a user would keep; ``summary.json`` then
names that epoch and its test accuracy.

Order of writes at the end of an epoch: the metrics row is appended, then ``best.pt`` when the
epoch is the best so far, then the checkpoint (which also carries all rows so far) replaces the
previous one. A resume rewrites ``metrics.jsonl``
from the checkpoint, so the file never holds an epoch twice or an epoch past the checkpoint.

Under torchrun every process runs :meth:`Trainer.fit` on its shard of the data; rank 0 alone
writes these files and logs, with metrics reduced over all ranks once per epoch (see
:mod:`aace.training.distributed` and ``docs/distributed.md``).
"""

from __future__ import annotations

import gc
import json
import os
import platform
import signal
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import aace
from aace.data import (
    BatchLoader,
    InMemoryDataset,
    load_dataset,
    symmetric_label_noise,
    validation_split,
)
from aace.data.loader import _derive_seed
from aace.integrations.tensorboard import TensorBoardLog
from aace.models import create_model
from aace.training import distributed
from aace.training.checkpoint import (
    CheckpointError,
    atomic_write_json,
    atomic_write_text,
    load_checkpoint,
    save_checkpoint,
)
from aace.training.config import ConfigError, RunConfig
from aace.training.distributed import Distributed, on_all_ranks
from aace.training.metrics import EpochSums, Progress, json_safe, selected_row, summarize
from aace.training.preemption import Preempted, StopRequest
from aace.training.step import (
    NonFiniteError,
    TrainStep,
    autocast,
    build_optimizer,
    build_schedule,
)

CHECKPOINT = "checkpoint.pt"
BEST = "best.pt"  # the model of the epoch a validation split selects
CONFIG = "config.json"
METRICS = "metrics.jsonl"
SUMMARY = "summary.json"
# Fields that may change between a run and its resume without changing its result. The number
# of processes is not a field: it may change too (the global batch stays --batch-size), and so
# may --accumulate, which splits the same batch differently (BatchNorm sees smaller batches).
RESUMABLE_CHANGES = (
    "out", "device", "data_dir", "download", "compile", "nonfinite", "accumulate",
    "checkpoint_every", "tensorboard", "log_every",
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
        image_size=dataset.image_size,
        pretrained=config.pretrained,
    )


def training_labels(config: RunConfig, dataset: InMemoryDataset) -> torch.Tensor:
    """The labels the model is trained on: the dataset's, with ``config.label_noise`` of them
    changed (:func:`aace.data.symmetric_label_noise`, seeded by ``label_noise_seed``)."""
    if not config.label_noise:
        return dataset.y_train
    return symmetric_label_noise(
        dataset.y_train, config.label_noise, dataset.num_classes, config.label_noise_seed
    )


def load_trained_model(
    path: str | Path, data_dir: str | None = None
) -> tuple[nn.Module, RunConfig, InMemoryDataset, dict[str, Any]]:
    """The model of a checkpoint (on the CPU), built from the config saved in it; that config
    (``data_dir`` overridden when given), the run's dataset and the checkpoint itself."""
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


def load_model_state(
    model: nn.Module, checkpoint: dict[str, Any], path: str | Path, name: str
) -> None:
    try:
        model.load_state_dict(checkpoint["model"])
    except RuntimeError as error:
        raise CheckpointError(
            f"checkpoint '{path}' does not match model {name} ({str(error).splitlines()[0]})"
        ) from error


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


def split_training_set(
    config: RunConfig, dataset: InMemoryDataset
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The training labels (:func:`training_labels`, noisy or not) and the indices of the
    training and validation parts (:func:`aace.data.validation_split` of those labels: the
    noise comes first, so validation labels are as noisy as training labels). The same on
    every rank."""
    labels = training_labels(config, dataset)
    train, validation = validation_split(
        labels, config.val_split, dataset.num_classes, config.val_split_seed
    )
    return labels, train, validation


@dataclass
class _Position:
    """Where a run stands: ``epoch`` epochs finished and ``step`` steps into the next one,
    the metrics rows so far, and (mid-epoch) the training seconds and this rank's partial
    sums of the unfinished epoch."""

    epoch: int = 0
    step: int = 0
    rows: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0
    sums: dict[str, Any] | None = None


@dataclass
class _Run:
    """The objects of one run that the epoch loop and the checkpoints share."""

    context: Distributed
    device: torch.device
    dataset: InMemoryDataset
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    step: TrainStep
    train_loader: BatchLoader
    test_loader: BatchLoader
    stop: StopRequest
    val_loader: BatchLoader | None = None  # the validation split, when the run has one
    rows: list[dict[str, Any]] = field(default_factory=list)
    kept: str = "no checkpoint written"  # what a stop on a non-finite value leaves behind


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
    if not is_main:
        merged["samples"] = 0
    else:
        merged["samples"] = sum(s["samples"] for s in states)
    return merged


class Trainer:
    """Trains one run described by a :class:`RunConfig` into its run directory."""

    def __init__(
        self,
        config: RunConfig,
        log: Callable[[str], None] = print,
        on_epoch: Callable[[dict[str, Any], list[dict[str, Any]]], None] | None = None,
        stop_signals: tuple[int, ...] = (signal.SIGTERM,),
    ) -> None:
        """``on_epoch(row, rows)`` is called (on every rank) after each epoch's checkpoint with
        that epoch's metrics row and all rows so far; an exception it raises ends :meth:`fit`
        with the checkpoint of that epoch on disk. ``stop_signals``: the signals that stop the
        run at the next step boundary with a checkpoint (``aace tune`` adds SIGINT)."""
        self.config = config.validate()
        self.log = log
        self.on_epoch = on_epoch
        self.stop_signals = stop_signals
        self.out = Path(config.out)
        self.is_main = True  # False on ranks > 0 once fit() knows
        self.tensorboard: TensorBoardLog | None = None  # rank 0 with --tensorboard

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
        SIGTERM stops the run at the next step boundary with a checkpoint and raises
        :class:`~aace.training.preemption.Preempted` (see :mod:`aace.training.preemption`).
        """
        context, device = distributed.setup(resolve_device(self.config.device))
        self.is_main = context.is_main
        try:
            with StopRequest(context, self.stop_signals) as stop:
                return self._fit(context, device, resume, stop)
        except BaseException as error:
            # The traceback's frames hold the DDP wrapper, whose reducer holds the process
            # group; free them before the group is destroyed, or the group's threads outlive
            # it and the process aborts at exit ("terminate called without an active
            # exception"). The traceback keeps its lines for --debug.
            traceback.clear_frames(error.__traceback__)
            gc.collect()
            raise
        finally:
            if self.tensorboard is not None:
                self.tensorboard.close()
            context.close()

    def _fit(
        self, context: Distributed, device: torch.device, resume: bool, stop: StopRequest
    ) -> dict[str, Any]:
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
        try:
            labels, train_part, val_part = split_training_set(config, dataset)
        except ValueError as error:  # a function of the data and the config: alike on all ranks
            raise on_all_ranks(error) from None
        if config.batch_size > len(train_part):
            what = "training part" if config.val_split else "training set"
            raise on_all_ranks(
                ConfigError(
                    f"--batch-size: got {config.batch_size}, larger than the {dataset.name} "
                    f"{what} ({len(train_part)} images); expected at most {len(train_part)}"
                )
            )
        model = build_model(config, dataset).to(device)
        model, ddp = distributed.wrap_model(model, context, device, config.sync_bn)
        if context.enabled:
            # Dropout masks and AACE's "rand" weights differ across ranks.
            torch.manual_seed(_derive_seed(config.seed, context.rank))
        optimizer = build_optimizer(model, config)
        cutout = dataset.cutout if config.cutout is None else config.cutout
        augment = config.augment
        whole = len(train_part) == len(labels)  # no split: no copy
        train_loader = BatchLoader(
            dataset.x_train if whole else dataset.x_train[train_part],
            labels if whole else labels[train_part],
            clean_labels=(dataset.y_train if whole else dataset.y_train[train_part])
            if config.label_noise
            else None,
            batch_size=batch_size,
            mean=dataset.mean,
            std=dataset.std,
            train=True,
            crop_padding=dataset.crop_padding if augment else 0,
            hflip=dataset.hflip and augment,
            cutout=cutout if augment else 0,
            seed=config.seed,
            rank=context.rank,
            world_size=context.world_size,
            device=device,
        )
        step_model = ddp if ddp is not None else model
        if config.compile:
            step_model = torch.compile(step_model)
        run = _Run(
            context=context,
            device=device,
            dataset=dataset,
            model=model,
            optimizer=optimizer,
            scheduler=build_scheduler(optimizer, config),
            step=TrainStep(
                step_model,
                optimizer,
                config,
                device,
                ddp=ddp,
                schedule=build_schedule(config, config.epochs * len(train_loader)),
            ),  # fmt: skip
            train_loader=train_loader,
            test_loader=build_test_loader(dataset, device, context.rank, context.world_size),
            stop=stop,
        )
        if len(val_part):
            run.val_loader = BatchLoader(
                dataset.x_train[val_part],
                labels[val_part],
                clean_labels=dataset.y_train[val_part] if config.label_noise else None,
                batch_size=EVAL_BATCH_SIZE,
                mean=dataset.mean,
                std=dataset.std,
                train=False,
                rank=context.rank,
                world_size=context.world_size,
                device=device,
            )

        position = _Position()
        if checkpoint is not None:
            position = self._restore(checkpoint, run)
            where = f"after epoch {position.epoch}"
            if position.step:
                where += f" and step {position.step} of epoch {position.epoch + 1}"
            log(f"resumed from '{self.out / CHECKPOINT}' {where}")
        if config.tensorboard and context.is_main:
            steps_done = position.epoch * len(train_loader) + position.step
            self.tensorboard = TensorBoardLog(
                self.out, config.log_every, position.epoch, steps_done
            )
        if context.is_main:
            atomic_write_json(
                self.out / CONFIG,
                {"config": config.to_dict(), **self._environment(device, context)},
            )
            atomic_write_text(
                self.out / METRICS,
                "".join(json.dumps(json_safe(r)) + "\n" for r in position.rows),
            )
        processes = f", {context.world_size} processes" if context.enabled else ""
        split = f"{len(train_part)} train / {len(val_part)} validation" if len(val_part) else ""
        log(
            f"{config.optimizer} on {dataset.name} ({split or f'{len(train_part)} train'} / "
            f"{len(dataset.y_test)} test, {dataset.num_classes} classes), {config.model} "
            f"({sum(p.numel() for p in model.parameters()):,} parameters), {device}"
            f"{processes}, {config.epochs} epochs -> {self.out}"
        )

        rows = run.rows = position.rows
        run.kept = self._kept(position) if checkpoint is not None else "no checkpoint written"
        for epoch in range(position.epoch, config.epochs):
            row = self._train_epoch(run, epoch, position if epoch == position.epoch else None)
            rows.append(row)
            run.scheduler.step()
            if context.is_main:
                with open(self.out / METRICS, "a") as f:
                    f.write(json.dumps(json_safe(row)) + "\n")
                    f.flush()
                    os.fsync(f.fileno())
            if self.tensorboard is not None:
                self.tensorboard.log_epoch(json_safe(row))
            if run.val_loader is not None and selected_row(rows) is row and context.is_main:
                self._save_best(run, epoch + 1)
            self._save(run, _Position(epoch=epoch + 1, rows=rows))
            log(self._format_row(row))
            if self.on_epoch is not None:
                self.on_epoch(row, rows)
            if epoch + 1 < config.epochs and stop.agreed():
                raise on_all_ranks(
                    Preempted(
                        self._stopped_message(stop, f"after epoch {epoch + 1}"),
                        stop.requested or signal.SIGTERM,
                    )
                )

        summary = summarize(rows, config)
        if context.is_main:
            atomic_write_json(self.out / SUMMARY, summary)
        return summary

    def _save_best(self, run: _Run, epoch: int) -> None:
        """``best.pt``: the model after ``epoch``, the best by validation accuracy so far, in
        the checkpoint format (``aace eval`` and :func:`load_trained_model` read it)."""
        save_checkpoint(
            self.out / BEST,
            {
                "config": self.config.to_dict(),
                "epoch": epoch,
                "model": run.model.state_dict(),
                "num_classes": run.dataset.num_classes,
                "in_channels": run.dataset.in_channels,
                "aace_version": aace.__version__,
                "selected_by": "val_acc",
            },
        )

    def _save(self, run: _Run, position: _Position, sums: EpochSums | None = None) -> None:
        """Write the checkpoint of ``position`` (rank 0 writes; every rank contributes its
        random streams and, mid-epoch, its loader position and partial sums). A mid-epoch
        checkpoint is written only if no rank has seen a non-finite value in the epoch so far
        (a host sync, at checkpoints only); otherwise the run stops as at the epoch's end."""
        if self.tensorboard is not None:
            self.tensorboard.flush()  # the events up to this checkpoint reach the disk first
        per_rank: dict[str, Any] = self._rng_state(run.device)
        optimizer_state = run.optimizer.state_dict()
        if position.step:
            per_rank["loader"] = run.train_loader.state_dict()
            per_rank["sums"] = sums.state_dict() if sums is not None else None
            # SAM's previous perturbation, for the cosine: each rank's own under DDP.
            per_rank["sam_stats"] = optimizer_state.pop("sam_stats", None)
        states = run.context.gather_objects(per_rank)
        if position.step:
            error = EpochSums.first_nonfinite([s["sums"] for s in states])
            if error is not None:
                raise self._nonfinite(error, position.epoch, run.kept)
        run.kept = self._kept(position)
        if not run.context.is_main:
            return
        payload = {
            "config": self.config.to_dict(),
            "epoch": position.epoch,
            "step_in_epoch": position.step,
            "model": run.model.state_dict(),
            "optimizer": optimizer_state,
            "scheduler": run.scheduler.state_dict(),
            "rng": dict(states[0], ranks=states) if run.context.enabled else states[0],
            "world_size": run.context.world_size,
            "metrics": position.rows,
            "epoch_seconds": position.seconds,
            "num_classes": run.dataset.num_classes,
            "in_channels": run.dataset.in_channels,
            "aace_version": aace.__version__,
        }
        if run.step.fp16:
            payload["scaler"] = run.step.scaler.state_dict()
        if run.step.schedule is not None:
            payload["sam_schedule"] = run.step.schedule.state_dict()
        save_checkpoint(self.out / CHECKPOINT, payload)

    def _train_epoch(self, run: _Run, epoch: int, resumed: _Position | None) -> dict[str, Any]:
        """Train one epoch (from ``resumed.step`` when a mid-epoch checkpoint was restored),
        checkpointing every ``--checkpoint-every`` steps and on a stop request; evaluate."""
        config, model, step, loader = self.config, run.model, run.step, run.train_loader
        lr = run.optimizer.param_groups[0]["lr"]
        sums = EpochSums(run.device)
        done, seconds_before = 0, 0.0
        if resumed is not None and resumed.step:
            done, seconds_before = resumed.step, resumed.seconds
            sums.load_state_dict(resumed.sums)
        else:
            loader.set_epoch(epoch)
        steps = len(loader)
        progress = Progress(steps, epoch + 1, config.epochs, run.context.is_main, initial=done)
        start = time.perf_counter()
        model.train()
        for batch in loader:  # (x, y), or (x, y, clean_y) in a label-noise run
            stats = step(*batch)
            if self.tensorboard is not None:
                self.tensorboard.log_step(stats.train_loss)
            batch_size = batch[1].shape[0]
            sums.add(stats, batch_size)
            progress.update(stats, batch_size)
            done += 1
            if done == steps:
                continue  # the epoch's end checkpoints
            global_step = epoch * steps + done
            due = config.checkpoint_every and global_step % config.checkpoint_every == 0
            stopping = run.stop.agreed()
            if due or stopping:
                seconds = seconds_before + time.perf_counter() - start
                self._save(run, _Position(epoch, done, run.rows, seconds), sums)
                model.train()
            if stopping:
                progress.close()
                where = f"at step {done} of epoch {epoch + 1}"
                raise on_all_ranks(
                    Preempted(
                        self._stopped_message(run.stop, where), run.stop.requested or signal.SIGTERM
                    )
                )
        if step.is_sam:
            run.optimizer.reset_stats()  # the next epoch's cosine starts afresh
        if run.device.type == "cuda":
            torch.cuda.synchronize(run.device)
        train_seconds = seconds_before + time.perf_counter() - start
        progress.close()
        distributed.broadcast_buffers(model, run.context)
        test = evaluate(model, run.test_loader, config.amp)
        validation = None
        if run.val_loader is not None:
            validation = evaluate_sums(model, run.val_loader, config.amp)
        row: dict[str, Any] = {"epoch": epoch + 1, "lr": lr}
        try:
            values, samples = sums.row(
                step.is_sam, test, run.context, validation, noisy=bool(config.label_noise)
            )
        except NonFiniteError as error:
            raise self._nonfinite(error, epoch, run.kept) from None
        row.update(values)
        row["seconds"] = seconds_before + time.perf_counter() - start
        row["images_per_second"] = samples / train_seconds if train_seconds > 0 else None
        return row

    @staticmethod
    def _kept(position: _Position) -> str:
        if position.step:
            return f"checkpoint of step {position.step} of epoch {position.epoch + 1} kept"
        return f"checkpoint of epoch {position.epoch} kept"

    @staticmethod
    def _nonfinite(error: NonFiniteError, epoch: int, kept: str) -> BaseException:
        return on_all_ranks(
            NonFiniteError(
                f"{str(error).format(epoch=epoch + 1)}; stopped, {kept}. Lower --lr or --rho, "
                "or pass --nonfinite skip to skip such steps"
            )
        )

    def _stopped_message(self, stop: StopRequest, where: str) -> str:
        return (
            f"stopped by {stop.reason} {where}; checkpoint written to "
            f"'{self.out / CHECKPOINT}'. Run the same command with --resume to continue"
        )

    @staticmethod
    def _rng_state(device: torch.device) -> dict[str, Any]:
        state: dict[str, Any] = {"torch": torch.get_rng_state()}
        if device.type == "cuda":
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def _restore(self, checkpoint: dict[str, Any], run: _Run) -> _Position:
        path = self.out / CHECKPOINT
        context = run.context
        rng = checkpoint.get("rng", {})
        states = rng.get("ranks", [rng])
        same_ranks = len(states) == context.world_size
        optimizer_state = dict(checkpoint["optimizer"])
        if same_ranks and states[context.rank].get("sam_stats") is not None:
            optimizer_state["sam_stats"] = states[context.rank]["sam_stats"]
        try:
            run.model.load_state_dict(checkpoint["model"])
            run.optimizer.load_state_dict(optimizer_state)
            run.scheduler.load_state_dict(checkpoint["scheduler"])
            if run.step.scaler.is_enabled() and "scaler" in checkpoint:
                run.step.scaler.load_state_dict(checkpoint["scaler"])
            if run.step.schedule is not None:
                run.step.schedule.load_state_dict(checkpoint["sam_schedule"])
        except (RuntimeError, KeyError, ValueError) as error:
            first_line = str(error).strip().splitlines()[0]
            raise on_all_ranks(
                CheckpointError(
                    f"checkpoint '{path}' does not fit this model/optimizer ({first_line})"
                )
            ) from error
        position = _Position(
            epoch=int(checkpoint["epoch"]),
            step=int(checkpoint.get("step_in_epoch", 0)),
            rows=list(checkpoint.get("metrics", [])),
            seconds=float(checkpoint.get("epoch_seconds", 0.0)),
        )
        if same_ranks:
            mine = states[context.rank]
            if "torch" in mine:
                torch.set_rng_state(mine["torch"])
            if "cuda" in mine and run.device.type == "cuda":
                torch.cuda.set_rng_state_all(mine["cuda"])
            if position.step:
                run.train_loader.load_state_dict(mine["loader"])
                position.sums = mine["sums"]
            return position
        # Another number of processes than the checkpoint's: same global batch and data
        # order, fresh (but seeded) random streams for dropout, augmentation and AACE's "rand"
        # mode. Mid-epoch, global step s covers the same samples whatever the number of
        # processes, so the epoch continues at its step with the old ranks' sums merged.
        torch.manual_seed(_derive_seed(self.config.seed, context.rank, position.epoch))
        if position.step:
            loader_state = dict(states[0]["loader"], augment_state=None)
            run.train_loader.load_state_dict(loader_state)
            position.sums = _merged_sums([s["sums"] for s in states], context.is_main)
        if context.is_main:
            self.log(
                f"notice: the checkpoint was written by {len(states)} process(es), this run "
                f"has {context.world_size}; dropout, augmentation and random AACE weights will "
                "not repeat the uninterrupted run"
            )
        return position

    @staticmethod
    def _format_row(row: dict[str, Any]) -> str:
        text = (
            f"epoch {row['epoch']:>3}  lr {row['lr']:.4g}  train loss {row['train_loss']:.4f} "
            f"acc {row['train_acc']:.4f}  test loss {row['test_loss']:.4f} "
            f"acc {row['test_acc']:.4f}"
        )
        if row.get("val_acc") is not None:
            text += f"  val loss {row['val_loss']:.4f} acc {row['val_acc']:.4f}"
        if row.get("train_acc_clean") not in (None, row["train_acc"]):  # label noise
            text += f"  train acc on true labels {row['train_acc_clean']:.4f}"
        if row["grad_norm"] is not None:
            cosine = row["perturbation_cosine"]
            text += f"  |g| {row['grad_norm']:.3g}  |e| {row['perturbation_norm']:.3g}"
            text += f"  cos {cosine:.3f}" if cosine is not None else ""
        if row["images_per_second"]:
            text += f"  {row['images_per_second']:.0f} img/s"
        return text
