"""The epoch loop of ``aace train``: steps, evaluation, metrics rows, checkpoints, resume.

The run directory's files are :mod:`aace.runs`'s; the checkpoint's contents are
:mod:`aace.training.checkpoint`'s; what the config builds is :mod:`aace.training.build`'s.
A run with a validation split (``--val-split``) also keeps ``best.pt``: the model of the epoch
with the highest ``val_acc`` (the earliest of equals), the one a user would keep;
``summary.json`` then names that epoch and its test accuracy.

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

import aace
from aace.data import InMemoryDataset, load_dataset
from aace.integrations.tensorboard import TensorBoardLog
from aace.runs import RunDirectory, RunError, json_safe, selected_row
from aace.training import checkpoint as checkpoint_format
from aace.training import distributed
from aace.training.build import TrainingParts, build_training, resolve_device
from aace.training.checkpoint import CheckpointError, Position, load_checkpoint
from aace.training.config import RESUMABLE_CHANGES, ConfigError, RunConfig
from aace.training.distributed import Distributed, on_all_ranks
from aace.training.evaluate import evaluate, evaluate_sums
from aace.training.metrics import EpochSums, Progress, format_row, summarize
from aace.training.preemption import Preempted, StopRequest
from aace.training.step import NonFiniteError

__all__ = ["Trainer"]


def _silent(_: str) -> None:
    """The log of ranks other than 0."""


@dataclass
class _Run:
    """The objects of one run that the epoch loop and the checkpoints share."""

    context: Distributed
    device: torch.device
    dataset: InMemoryDataset
    stop: StopRequest
    parts: TrainingParts
    rows: list[dict[str, Any]] = field(default_factory=list)
    kept: str = "no checkpoint written"  # what a stop on a non-finite value leaves behind


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
        self.run_directory = RunDirectory(config.out)
        self.is_main = True  # False on ranks > 0 once fit() knows
        self.tensorboard: TensorBoardLog | None = None  # rank 0 with --tensorboard

    # -- run directory -----------------------------------------------------------------------

    def _prepare_directory(self, resume: bool) -> dict[str, Any] | None:
        """Create or check the run directory; return the checkpoint to resume from, if any."""
        run = self.run_directory
        try:
            run.prepare(resume)
            if not resume:
                return None
            if not run.has_checkpoint:
                if run.config_file.exists():
                    self._check_same_run(run.read_config(), f"'{run.config_file}'")
                self.log(f"notice: no checkpoint in '{run}' yet; starting from the beginning")
                return None
        except RunError as error:
            raise ConfigError(str(error)) from None
        checkpoint = load_checkpoint(run.checkpoint_file)
        self._check_same_run(checkpoint["config"], f"the checkpoint in '{run}'")
        return checkpoint

    def _check_same_run(self, saved: dict[str, Any], where: str) -> None:
        # A field added since the run was saved takes its default there (from_dict).
        try:
            saved = RunConfig.from_dict(saved).to_dict()
        except (ConfigError, TypeError) as error:
            raise ConfigError(f"--out: {where} is not a readable aace config") from error
        try:
            self.run_directory.check_same_run(
                self.config.to_dict(), RESUMABLE_CHANGES, saved=saved, where=where
            )
        except RunError as error:
            raise ConfigError(str(error)) from None

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
        config.per_rank_batch_size(context.world_size)  # refused before any file is touched
        checkpoint = context.run_on_main(lambda: self._prepare_directory(resume))

        dataset = context.main_first(
            lambda: load_dataset(
                config.dataset, config.data_dir, config.download, config.image_size
            )
        )
        parts = build_training(config, dataset, device, context)
        run = _Run(context, device, dataset, stop, parts)
        model, train_loader = parts.model, parts.train_loader

        position = Position()
        if checkpoint is not None:
            position = self._restore(checkpoint, run)
            log(f"resumed from '{self.run_directory.checkpoint_file}' {position.describe()}")
        if config.tensorboard and context.is_main:
            steps_done = position.epoch * len(train_loader) + position.step
            self.tensorboard = TensorBoardLog(
                self.out, config.log_every, position.epoch, steps_done
            )
        if context.is_main:
            self.run_directory.write_record(
                config.to_dict(), config.perturbation_rho, **self._environment(device, context)
            )
            self.run_directory.write_rows(position.rows)
        processes = f", {context.world_size} processes" if context.enabled else ""
        train_size, val_size = parts.train_size, parts.val_size
        split = f"{train_size} train / {val_size} validation" if val_size else f"{train_size} train"
        log(
            f"{config.optimizer} on {dataset.name} ({split} / "
            f"{len(dataset.y_test)} test, {dataset.num_classes} classes), {config.model} "
            f"({sum(p.numel() for p in model.parameters()):,} parameters), {device}"
            f"{processes}, {config.epochs} epochs -> {self.out}"
        )

        rows = run.rows = position.rows
        run.kept = position.kept() if checkpoint is not None else "no checkpoint written"
        for epoch in range(position.epoch, config.epochs):
            row = self._train_epoch(run, epoch, position if epoch == position.epoch else None)
            rows.append(row)
            run.parts.scheduler.step()
            if context.is_main:
                self.run_directory.append_row(row)
            if self.tensorboard is not None:
                self.tensorboard.log_epoch(json_safe(row))
            if run.parts.val_loader is not None and selected_row(rows) is row and context.is_main:
                checkpoint_format.save_model(
                    self.run_directory.best_file, config, model, dataset, epoch + 1
                )
            self._save(run, Position(epoch=epoch + 1, rows=rows))
            log(format_row(row))
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
            self.run_directory.write_summary(summary)
        return summary

    def _save(self, run: _Run, position: Position, sums: EpochSums | None = None) -> None:
        """Write the checkpoint of ``position`` (rank 0 writes; every rank contributes its
        random streams and, mid-epoch, its loader position and partial sums). A mid-epoch
        checkpoint is written only if no rank has seen a non-finite value in the epoch so far
        (a host sync, at checkpoints only); otherwise the run stops as at the epoch's end."""
        if self.tensorboard is not None:
            self.tensorboard.flush()  # the events up to this checkpoint reach the disk first
        optimizer_state = run.parts.optimizer.state_dict()
        mid_epoch = bool(position.step)
        per_rank = checkpoint_format.rank_state(
            run.device,
            loader=run.parts.train_loader if mid_epoch else None,
            sums=(sums.state_dict() if sums is not None else None) if mid_epoch else None,
            optimizer_state=optimizer_state,
        )
        states = run.context.gather_objects(per_rank)
        if mid_epoch:
            error = EpochSums.first_nonfinite([s["sums"] for s in states])
            if error is not None:
                raise self._nonfinite(error, position.epoch, run.kept)
        run.kept = position.kept()
        if not run.context.is_main:
            return
        checkpoint_format.save_training_state(
            self.run_directory.checkpoint_file,
            config=self.config,
            position=position,
            model=run.parts.model,
            optimizer_state=optimizer_state,
            scheduler=run.parts.scheduler,
            dataset=run.dataset,
            rank_states=states,
            distributed=run.context.enabled,
            scaler=run.parts.step.scaler if run.parts.step.fp16 else None,
            sam_schedule=run.parts.step.schedule,
        )

    def _train_epoch(self, run: _Run, epoch: int, resumed: Position | None) -> dict[str, Any]:
        """Train one epoch (from ``resumed.step`` when a mid-epoch checkpoint was restored),
        checkpointing every ``--checkpoint-every`` steps and on a stop request; evaluate."""
        config, model, step, loader = (
            self.config,
            run.parts.model,
            run.parts.step,
            run.parts.train_loader,
        )
        lr = run.parts.optimizer.param_groups[0]["lr"]
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
                self._save(run, Position(epoch, done, run.rows, seconds), sums)
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
            run.parts.optimizer.reset_stats()  # the next epoch's cosine starts afresh
        if run.device.type == "cuda":
            torch.cuda.synchronize(run.device)
        train_seconds = seconds_before + time.perf_counter() - start
        progress.close()
        distributed.broadcast_buffers(model, run.context)
        test = evaluate(model, run.parts.test_loader, config.amp)
        validation = None
        if run.parts.val_loader is not None:
            validation = evaluate_sums(model, run.parts.val_loader, config.amp)
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
            f"'{self.run_directory.checkpoint_file}'. Run the same command with --resume to "
            "continue"
        )

    def _restore(self, checkpoint: dict[str, Any], run: _Run) -> Position:
        try:
            return checkpoint_format.restore_training_state(
                checkpoint,
                self.run_directory.checkpoint_file,
                seed=self.config.seed,
                model=run.parts.model,
                optimizer=run.parts.optimizer,
                scheduler=run.parts.scheduler,
                train_loader=run.parts.train_loader,
                rank=run.context.rank,
                world_size=run.context.world_size,
                device=run.device,
                scaler=run.parts.step.scaler,
                sam_schedule=run.parts.step.schedule,
                log=self.log,
            )
        except CheckpointError as error:
            raise on_all_ranks(error)  # noqa: B904 (its cause is the loading error)
