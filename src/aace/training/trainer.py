"""Epochs, evaluation, metrics rows, checkpoints and resume for ``aace train``.

A run directory holds ``config.json`` (the resolved configuration and versions),
``metrics.jsonl`` (one JSON object per finished epoch), ``checkpoint.pt`` (the latest state) and
``summary.json`` (final and best test accuracy, written when the run ends).

Order of writes at the end of an epoch: the metrics row is appended, then the checkpoint (which
also carries all rows so far) replaces the previous one. A resume rewrites ``metrics.jsonl``
from the checkpoint, so the file never holds an epoch twice or an epoch past the checkpoint.
"""

from __future__ import annotations

import json
import math
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
from aace.models import create_model
from aace.training.checkpoint import (
    CheckpointError,
    atomic_write_json,
    atomic_write_text,
    load_checkpoint,
    save_checkpoint,
)
from aace.training.config import ConfigError, RunConfig
from aace.training.step import NonFiniteError, StepStats, TrainStep, build_optimizer

CHECKPOINT = "checkpoint.pt"
CONFIG = "config.json"
METRICS = "metrics.jsonl"
SUMMARY = "summary.json"
# Fields that may change between a run and its resume without changing its result.
RESUMABLE_CHANGES = ("out", "device", "data_dir", "download", "compile", "nonfinite")
TIMING_FIELDS = ("seconds", "images_per_second")
EVAL_BATCH_SIZE = 1024


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
    """Summed CE loss, correct count and sample count over the loader, as device tensors."""
    model.eval()
    device = next(model.parameters()).device
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    correct = torch.zeros((), device=device, dtype=torch.int64)
    count = torch.zeros((), device=device, dtype=torch.int64)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp == "bf16")
    for x, y in loader:
        with autocast:
            logits = model(x)
        loss_sum += F.cross_entropy(logits.float(), y, reduction="sum")
        correct += (logits.argmax(1) == y).sum()
        count += y.numel()
    return loss_sum, correct, count


PASSES = ("perturbation", "update")


class _EpochSums:
    """Running sums of the step statistics, kept on the device until the epoch ends."""

    def __init__(self, device: torch.device) -> None:
        zero = lambda: torch.zeros((), device=device, dtype=torch.float64)  # noqa: E731
        self.sums = {name: zero() for name in ("train_loss", "ce_loss", "aace_loss", "correct")}
        self.sam = {name: zero() for name in ("grad_norm", "perturbation_norm")}
        self.cosine_sum, self.cosine_count = zero(), zero()
        # First step (in this epoch) with a non-finite value and its pass (index into PASSES).
        self.first_bad_step, self.bad_pass = zero() - 1, zero() - 1
        self.steps = 0
        self.samples = 0
        self.skipped = 0

    def add(self, stats: StepStats, batch_size: int) -> None:
        self.steps += 1
        if stats.skipped_pass is not None:
            self.skipped += 1
            return
        self.samples += batch_size
        finite_first = (
            stats.first_pass_finite if stats.first_pass_finite is not None else torch.tensor(True)
        )
        bad = ~(finite_first & stats.update_pass_finite)
        new = bad & (self.first_bad_step < 0)
        self.first_bad_step = torch.where(new, self.steps, self.first_bad_step)
        self.bad_pass = torch.where(new, torch.where(finite_first, 1.0, 0.0), self.bad_pass)
        for name in ("train_loss", "ce_loss", "aace_loss"):
            self.sums[name] += getattr(stats, name).double() * batch_size
        self.sums["correct"] += stats.correct
        if stats.grad_norm is not None:
            self.sam["grad_norm"] += stats.grad_norm.double()
            self.sam["perturbation_norm"] += stats.perturbation_norm.double()
            cosine = stats.perturbation_cosine.double()
            defined = ~torch.isnan(cosine)
            self.cosine_sum += torch.where(defined, cosine, torch.zeros_like(cosine))
            self.cosine_count += defined.double()

    def row(self, is_sam: bool) -> dict[str, float | None]:
        """One host transfer for the whole epoch."""
        names = list(self.sums) + list(self.sam)
        names += ["cosine_sum", "cosine_count", "first_bad_step", "bad_pass"]
        extra = [self.cosine_sum, self.cosine_count, self.first_bad_step, self.bad_pass]
        values = torch.stack(list(self.sums.values()) + list(self.sam.values()) + extra).tolist()
        v = dict(zip(names, values))
        if v["first_bad_step"] >= 0:
            raise NonFiniteError(
                f"non-finite {PASSES[int(v['bad_pass'])]}-pass loss or gradient "
                f"at step {int(v['first_bad_step'])} of epoch {{epoch}}"
            )
        n, steps = max(self.samples, 1), max(self.steps, 1)
        row: dict[str, float | None] = {
            "train_loss": v["train_loss"] / n,
            "train_acc": v["correct"] / n,
            "ce_loss": v["ce_loss"] / n,
            "aace_loss": v["aace_loss"] / n,
            "grad_norm": None,
            "perturbation_norm": None,
            "perturbation_cosine": None,
            "skipped_steps": self.skipped,
        }
        if is_sam:
            row["grad_norm"] = v["grad_norm"] / steps
            row["perturbation_norm"] = v["perturbation_norm"] / steps
            if v["cosine_count"] > 0:
                row["perturbation_cosine"] = v["cosine_sum"] / v["cosine_count"]
        return row


def _json_safe(row: dict[str, Any]) -> dict[str, Any]:
    """JSON has no NaN/inf: store them as null (and say so in the docs)."""
    return {
        k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()
    }


class Trainer:
    """Trains one run described by a :class:`RunConfig` into its run directory."""

    def __init__(self, config: RunConfig, log: Callable[[str], None] = print) -> None:
        self.config = config.validate()
        self.log = log
        self.out = Path(config.out)

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

    def _environment(self, device: torch.device) -> dict[str, Any]:
        return {
            "aace_version": aace.__version__,
            "torch_version": torch.__version__,
            "python_version": platform.python_version(),
            "device": str(device),
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
            "platform": platform.platform(),
            "command": sys.argv,
        }

    # -- the run -----------------------------------------------------------------------------

    def fit(self, resume: bool = False) -> dict[str, Any]:
        config = self.config
        device = resolve_device(config.device)
        checkpoint = self._prepare_directory(resume)

        torch.manual_seed(config.seed)
        dataset = load_dataset(config.dataset, config.data_dir, config.download, config.image_size)
        model = build_model(config, dataset).to(device)
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
            batch_size=config.batch_size,
            mean=dataset.mean,
            std=dataset.std,
            train=True,
            crop_padding=dataset.crop_padding,
            hflip=dataset.hflip,
            cutout=cutout,
            seed=config.seed,
            device=device,
        )
        test_loader = BatchLoader(
            dataset.x_test,
            dataset.y_test,
            batch_size=EVAL_BATCH_SIZE,
            mean=dataset.mean,
            std=dataset.std,
            train=False,
            device=device,
        )
        step_model = torch.compile(model) if config.compile else model
        step = TrainStep(step_model, optimizer, config, device)

        rows: list[dict[str, Any]] = []
        start_epoch = 0
        if checkpoint is not None:
            start_epoch, rows = self._restore(checkpoint, model, optimizer, scheduler, device)
            self.log(f"resumed from '{self.out / CHECKPOINT}' after epoch {start_epoch}")
        atomic_write_json(
            self.out / CONFIG, {"config": config.to_dict(), **self._environment(device)}
        )
        atomic_write_text(
            self.out / METRICS, "".join(json.dumps(_json_safe(r)) + "\n" for r in rows)
        )
        self.log(
            f"{config.optimizer} on {dataset.name} ({len(dataset.y_train)} train / "
            f"{len(dataset.y_test)} test, {dataset.num_classes} classes), {config.model} "
            f"({sum(p.numel() for p in model.parameters()):,} parameters), {device}, "
            f"{config.epochs} epochs -> {self.out}"
        )

        for epoch in range(start_epoch, config.epochs):
            row = self._train_epoch(epoch, step, model, optimizer, train_loader, test_loader)
            rows.append(row)
            with open(self.out / METRICS, "a") as f:
                f.write(json.dumps(_json_safe(row)) + "\n")
                f.flush()
                os.fsync(f.fileno())
            scheduler.step()
            save_checkpoint(
                self.out / CHECKPOINT,
                {
                    "config": config.to_dict(),
                    "epoch": epoch + 1,
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "rng": self._rng_state(device),
                    "metrics": rows,
                    "num_classes": dataset.num_classes,
                    "in_channels": dataset.in_channels,
                    "aace_version": aace.__version__,
                },
            )
            self.log(self._format_row(row))

        summary = summarize(rows, config)
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
    ) -> dict[str, Any]:
        device = next(model.parameters()).device
        lr = optimizer.param_groups[0]["lr"]
        train_loader.set_epoch(epoch)
        if step.is_sam:
            optimizer.reset_stats()
        sums = _EpochSums(device)
        progress = _Progress(len(train_loader), epoch + 1, self.config.epochs)
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
        test_loss, test_correct, test_count = evaluate(model, test_loader, self.config.amp)
        row: dict[str, Any] = {"epoch": epoch + 1, "lr": lr}
        try:
            row.update(sums.row(step.is_sam))
        except NonFiniteError as error:
            kept = f"checkpoint of epoch {epoch} kept" if epoch else "no checkpoint written"
            raise NonFiniteError(
                f"{str(error).format(epoch=epoch + 1)}; stopped, {kept}. Lower --lr or --rho, "
                "or pass --nonfinite skip to skip such steps"
            ) from None
        count = max(int(test_count), 1)
        row["test_loss"] = float(test_loss) / count
        row["test_acc"] = int(test_correct) / count
        row["seconds"] = time.perf_counter() - start
        row["images_per_second"] = sums.samples / train_seconds if train_seconds > 0 else None
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
        device: torch.device,
    ) -> tuple[int, list[dict[str, Any]]]:
        path = self.out / CHECKPOINT
        try:
            model.load_state_dict(checkpoint["model"])
            optimizer.load_state_dict(checkpoint["optimizer"])
            scheduler.load_state_dict(checkpoint["scheduler"])
        except (RuntimeError, KeyError, ValueError) as error:
            first_line = str(error).strip().splitlines()[0]
            raise CheckpointError(
                f"checkpoint '{path}' does not fit this model/optimizer ({first_line})"
            ) from error
        rng = checkpoint.get("rng", {})
        if "torch" in rng:
            torch.set_rng_state(rng["torch"])
        if "cuda" in rng and device.type == "cuda":
            torch.cuda.set_rng_state_all(rng["cuda"])
        rows = list(checkpoint.get("metrics", []))
        return int(checkpoint["epoch"]), rows

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


def summarize(rows: list[dict[str, Any]], config: RunConfig) -> dict[str, Any]:
    best = max(rows, key=lambda r: r["test_acc"]) if rows else None
    return {
        "optimizer": config.optimizer,
        "rho": config.resolved_rho if config.optimizer != "sgd" else None,
        "dataset": config.dataset,
        "model": config.model,
        "seed": config.seed,
        "epochs": len(rows),
        "final_test_acc": rows[-1]["test_acc"] if rows else None,
        "best_test_acc": best["test_acc"] if best else None,
        "best_epoch": best["epoch"] if best else None,
        "final_test_loss": rows[-1]["test_loss"] if rows else None,
        "seconds": sum(r["seconds"] for r in rows),
    }


class _Progress:
    """A tqdm bar with loss, accuracy and images/s when stderr is a terminal; else nothing.

    The bar reads the loss from the device at most about twice a second, so the training loop
    stays free of per-step host syncs.
    """

    def __init__(self, total: int, epoch: int, epochs: int) -> None:
        self.bar = None
        if sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=f"epoch {epoch}/{epochs}", leave=False)
        self.last = time.perf_counter()
        self.start = self.last
        self.samples = 0

    def update(self, stats: StepStats, batch_size: int) -> None:
        self.samples += batch_size
        if self.bar is None:
            return
        self.bar.update(1)
        now = time.perf_counter()
        if now - self.last > 0.5:
            self.last = now
            self.bar.set_postfix(
                loss=f"{float(stats.train_loss):.3f}",
                acc=f"{float(stats.correct) / batch_size:.3f}",
                img_s=f"{self.samples / (now - self.start):.0f}",
            )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
