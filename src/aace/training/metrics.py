"""What an epoch reports: step statistics summed on the device, reduced across ranks once per
epoch into a ``metrics.jsonl`` row; the run's summary; the progress bar."""

from __future__ import annotations

import math
import sys
import time
from typing import Any

import torch

from aace.runs import json_safe, selected_row
from aace.training.config import RunConfig
from aace.training.distributed import Distributed
from aace.training.step import NonFiniteError, StepStats

__all__ = [
    "TIMING_FIELDS", "EpochSums", "Progress", "format_row", "json_safe", "selected_row",
    "summarize",
]  # fmt: skip

# Columns that differ between two runs with the same result.
TIMING_FIELDS = ("seconds", "images_per_second")

PASSES = ("perturbation", "update")


def _nonfinite_error(first_bad: float) -> NonFiniteError:
    step, pass_index = divmod(int(first_bad), 2)
    return NonFiniteError(
        f"non-finite {PASSES[pass_index]}-pass loss or gradient at step {step} of epoch {{epoch}}"
    )


def _to(value: Any, device: torch.device) -> Any:
    """``value`` with its tensors (also inside a dict) copied to ``device``."""
    if isinstance(value, torch.Tensor):
        return value.detach().to(device, copy=True)
    if isinstance(value, dict):
        return {k: _to(v, device) for k, v in value.items()}
    return value


class EpochSums:
    """Running sums of the step statistics, kept on the device until the epoch ends, then
    reduced across ranks and read to the host at once (:meth:`row`)."""

    def __init__(self, device: torch.device) -> None:
        zero = lambda: torch.zeros((), device=device, dtype=torch.float64)  # noqa: E731
        self.device = device
        names = ("train_loss", "ce_loss", "aace_loss", "correct", "clean_correct")
        self.sums = {name: zero() for name in names}
        self.sam = {name: zero() for name in ("grad_norm", "perturbation_norm")}
        self.cosine_sum, self.cosine_count = zero(), zero()
        # First step (in this epoch) with a non-finite value, as 2 * step + pass (index into
        # PASSES), so that the minimum over ranks names the earliest; -1: none.
        self.first_bad = zero() - 1
        self.finite = torch.ones((), dtype=torch.bool, device=device)
        self.steps = 0
        self.samples = 0
        self.skipped = 0
        self.sam_steps = 0  # steps that were (or, if skipped, were to be) SAM steps
        self.sam_steps_taken = 0  # SAM steps not skipped: what the SAM statistics average over

    @staticmethod
    def first_nonfinite(states: list[dict[str, Any]]) -> NonFiniteError | None:
        """The error for the earliest non-finite step recorded in the ranks' :meth:`state_dict`
        (its message has an ``{epoch}`` field), or None."""
        bad = [float(s["first_bad"]) for s in states if float(s["first_bad"]) >= 0]
        return _nonfinite_error(min(bad)) if bad else None

    def state_dict(self) -> dict[str, Any]:
        """The partial sums of an unfinished epoch, on the CPU (for a mid-epoch checkpoint)."""
        return {
            name: _to(value, torch.device("cpu"))
            for name, value in vars(self).items()
            if name != "device"
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for name, value in state.items():
            value = _to(value, self.device)
            if name == "sums":  # a checkpoint of an older version may lack some sums
                value = {**self.sums, **value}
            setattr(self, name, value)

    def add(self, stats: StepStats, batch_size: int) -> None:
        self.steps += 1
        self.sam_steps += int(stats.sam_step)
        if stats.first_pass_finite is not None or stats.update_pass_finite is not None:
            finite_first, finite_update = stats.first_pass_finite, stats.update_pass_finite
            finite_first = self.finite if finite_first is None else finite_first
            finite_update = self.finite if finite_update is None else finite_update
            bad = ~(finite_first & finite_update)
            key = 2 * self.steps + torch.where(finite_first, 1.0, 0.0)
            self.first_bad = torch.where(bad & (self.first_bad < 0), key, self.first_bad)
        if stats.skipped_pass is not None:
            self.skipped += 1
            return
        self.samples += batch_size
        for name in ("train_loss", "ce_loss", "aace_loss"):
            self.sums[name] += getattr(stats, name).double() * batch_size
        self.sums["correct"] += stats.correct
        clean = stats.correct if stats.clean_correct is None else stats.clean_correct
        self.sums["clean_correct"] += clean
        if stats.grad_norm is not None:
            self.sam_steps_taken += 1
            self.sam["grad_norm"] += stats.grad_norm.double()
            self.sam["perturbation_norm"] += stats.perturbation_norm.double()
            cosine = stats.perturbation_cosine.double()
            defined = ~torch.isnan(cosine)
            self.cosine_sum += torch.where(defined, cosine, torch.zeros_like(cosine))
            self.cosine_count += defined.double()

    def row(
        self,
        is_sam: bool,
        test: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
        context: Distributed,
        validation: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
        noisy: bool = False,
    ) -> tuple[dict[str, float | None], int]:
        """The epoch's training, validation and test metrics over all ranks, and the number of
        training samples of all ranks: one collective and one host transfer per epoch. Raises
        :class:`NonFiniteError` on every rank if any rank saw a non-finite value (its message has
        an ``{epoch}`` field for the caller).

        ``validation`` (summed loss, correct, correct against the true labels, count; see
        :func:`aace.training.evaluate.evaluate_sums`) adds ``val_loss`` and ``val_acc``, and with
        ``noisy`` labels ``val_acc_clean``."""
        names = [*self.sums, *self.sam, "cosine_sum", "cosine_count"]
        names += ["test_loss", "test_correct", "test_count", "samples", "skipped"]
        local = [*self.sums.values(), *self.sam.values(), self.cosine_sum, self.cosine_count]
        local += [t.to(self.device, torch.float64) for t in test]
        local += [torch.tensor(float(n), device=self.device) for n in (self.samples, self.skipped)]
        if validation is not None:
            names += ["val_loss", "val_correct", "val_clean_correct", "val_count"]
            local += [t.to(self.device, torch.float64) for t in validation]
        table = context.gather(torch.stack([*local, self.first_bad]))  # (ranks, len(names) + 1)
        bad = table[:, -1]
        first_bad = torch.where(bad >= 0, bad, torch.inf).min()
        *values, first_bad_value = torch.cat([table[:, :-1].sum(0), first_bad[None]]).tolist()
        v = dict(zip(names, values))
        if math.isfinite(first_bad_value):
            raise _nonfinite_error(first_bad_value)
        ranks = context.world_size
        skipped = round(v["skipped"] / ranks)  # the ranks agree on which steps they skip
        # The ranks take the same kind of step at each step (aace.schedule under DDP).
        n, done = max(v["samples"], 1), max(ranks * self.sam_steps_taken, 1)
        test_count = max(v["test_count"], 1)
        row: dict[str, float | None] = {
            "train_loss": v["train_loss"] / n,
            "train_acc": v["correct"] / n,  # against the labels trained on (noisy or not)
            "train_acc_clean": v["clean_correct"] / n,  # against the true labels
            "ce_loss": v["ce_loss"] / n,
            "aace_loss": v["aace_loss"] / n,
            "grad_norm": None,
            "perturbation_norm": None,
            "perturbation_cosine": None,
            "skipped_steps": skipped,
            "sam_step_fraction": self.sam_steps / self.steps if self.steps else None,
            "test_loss": v["test_loss"] / test_count,
            "test_acc": v["test_correct"] / test_count,
        }
        if validation is not None:
            val_count = max(v["val_count"], 1)
            row["val_loss"] = v["val_loss"] / val_count
            row["val_acc"] = v["val_correct"] / val_count  # against the labels (noisy or not)
            row["val_count"] = round(v["val_count"])  # what one image is worth: 1 / val_count
            if noisy:
                row["val_acc_clean"] = v["val_clean_correct"] / val_count  # the true labels
        if is_sam and self.sam_steps_taken:
            # Means over the SAM steps taken and, under DDP, over the ranks' own perturbations.
            row["grad_norm"] = v["grad_norm"] / done
            row["perturbation_norm"] = v["perturbation_norm"] / done
            if v["cosine_count"] > 0:
                row["perturbation_cosine"] = v["cosine_sum"] / v["cosine_count"]
        return row, int(v["samples"])


def summarize(rows: list[dict[str, Any]], config: RunConfig) -> dict[str, Any]:
    best = max(rows, key=lambda r: r["test_acc"]) if rows else None
    selected = selected_row(rows)
    validation = {}
    if config.val_split:
        validation = {
            "val_split": config.val_split,
            "selected_epoch": selected["epoch"] if selected else None,
            "selected_val_acc": selected["val_acc"] if selected else None,
            "test_acc_at_selected": selected["test_acc"] if selected else None,
        }
    return {
        "optimizer": config.optimizer,
        "rho": config.perturbation_rho,
        "dataset": config.dataset,
        "model": config.model,
        "seed": config.seed,
        "epochs": len(rows),
        "final_test_acc": rows[-1]["test_acc"] if rows else None,
        "best_test_acc": best["test_acc"] if best else None,
        "best_epoch": best["epoch"] if best else None,
        "final_test_loss": rows[-1]["test_loss"] if rows else None,
        "seconds": sum(r["seconds"] for r in rows),
        **validation,
    }


def format_row(row: dict[str, Any]) -> str:
    """The log line of an epoch's metrics row."""
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


class Progress:
    """A tqdm bar with loss, accuracy and images/s when stderr is a terminal; else nothing.

    The bar reads the loss from the device at most about twice a second, so the training loop
    stays free of per-step host syncs.
    """

    def __init__(
        self, total: int, epoch: int, epochs: int, enabled: bool = True, initial: int = 0
    ) -> None:
        self.bar = None
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            desc = f"epoch {epoch}/{epochs}"
            self.bar = tqdm(total=total, initial=initial, desc=desc, leave=False)
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
