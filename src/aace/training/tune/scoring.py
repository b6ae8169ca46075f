"""How a run is scored on the validation split, and how configurations are ranked.

A run's score is read from its ``metrics.jsonl`` rows; higher is better for every score:

* ``best-val-acc``: the highest validation accuracy over the epochs (the epoch a user keeps:
  the final runs report test accuracy at that epoch); second measure: minus the validation
  loss at that epoch.
* ``last-val-acc``: the mean validation accuracy over the last ``LAST_EPOCHS`` epochs (less
  sensitive to one lucky epoch); second measure: minus the mean validation loss there.
* ``best-val-loss``: minus the lowest validation loss over the epochs; second measure: the
  validation accuracy at that epoch.

A configuration's score is the mean over its search seeds. Configurations are ranked by score,
then by the second measure (equal scores are common: the validation split counts images), then
by their parameters (smaller first), never by trial number. A run that diverged (non-finite
loss) scores ``DIVERGED``, so that a sampler sees it as bad rather than ignoring it.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Any

__all__ = ["DIVERGED", "LAST_EPOCHS", "SCORES", "RunScore", "rank_key", "run_score"]

SCORES = ("best-val-acc", "last-val-acc", "best-val-loss")
LAST_EPOCHS = 3
# The score of a run that diverged: below any accuracy, and below any loss seen in practice.
DIVERGED = {"best-val-acc": 0.0, "last-val-acc": 0.0, "best-val-loss": -1e6}


@dataclass(frozen=True)
class RunScore:
    """One run's score and second measure (both higher-is-better), its epochs and validation
    size, and whether it diverged."""

    score: float
    secondary: float
    epochs: int
    val_count: int | None
    diverged: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {
            "score": self.score, "secondary": self.secondary, "epochs": self.epochs,
            "val_count": self.val_count, "diverged": self.diverged,
        }  # fmt: skip


def run_score(rows: list[dict[str, Any]], score: str, diverged: bool = False) -> RunScore:
    """The score of a run with these metrics rows (all epochs so far).

    Raises:
        ValueError: ``score`` is not one of ``SCORES``, or no row has a validation score.
    """
    if score not in SCORES:
        raise ValueError(f"score: got {score!r}; expected one of {', '.join(SCORES)}")
    scored = [r for r in rows if r.get("val_acc") is not None]
    val_count = next((r.get("val_count") for r in reversed(scored) if r.get("val_count")), None)
    if diverged:
        return RunScore(DIVERGED[score], -math.inf, len(rows), val_count, diverged=True)
    if not scored:
        raise ValueError("run_score: no epoch has a validation accuracy (no --val-split?)")

    def loss(row: dict[str, Any]) -> float:
        value = row.get("val_loss")
        return math.inf if value is None or not math.isfinite(value) else value

    if score == "best-val-acc":
        best = max(scored, key=lambda r: r["val_acc"])  # the earliest of equals
        return RunScore(best["val_acc"], -loss(best), len(rows), val_count)
    if score == "last-val-acc":
        last = scored[-LAST_EPOCHS:]
        return RunScore(
            statistics.fmean(r["val_acc"] for r in last),
            -statistics.fmean(loss(r) for r in last),
            len(rows),
            val_count,
        )
    best = min(scored, key=loss)
    return RunScore(-loss(best), best["val_acc"], len(rows), val_count)


def rank_key(score: float, secondary: float, params: dict[str, float]) -> tuple:
    """Sort key, best first: higher score, then higher second measure, then smaller
    parameters (in their order)."""
    return (-score, -secondary, tuple(params[k] for k in sorted(params)))
