"""What a tuning searches: the spaces, the configurations they make, the seeds, and the settings
stored in the studies so that every worker runs the same search."""

from __future__ import annotations

import itertools
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from aace.training.config import OPTIMIZERS, ConfigError, RunConfig
from aace.training.tune.scoring import SCORES

__all__ = [
    "DEFAULT_POINTS",
    "SEARCHABLE",
    "Space",
    "TuneSpec",
    "grid_points",
    "parse_space",
    "round_value",
    "run_name",
]

# What a study may search: the RunConfig field and the allowed interval of its values.
SEARCHABLE = {
    "rho": (0.0, math.inf),
    "lr": (0.0, math.inf),
    "weight_decay": (0.0, math.inf),
    "label_smoothing": (0.0, 1.0),
}
# Points of a one-dimensional range when --trials is not given.
DEFAULT_POINTS = 7


def round_value(value: float) -> float:
    """4 significant digits: run directories get readable names, and a grid point typed by a
    user and the same point computed from a range name the same run."""
    return float(f"{value:.4g}")


@dataclass(frozen=True)
class Space:
    """One searched hyperparameter: a range (``low``, ``high``, ``log``) or a list ``values``."""

    name: str
    low: float | None = None
    high: float | None = None
    log: bool = False
    values: tuple[float, ...] | None = None

    @property
    def is_list(self) -> bool:
        return self.values is not None


def parse_space(name: str, text: str) -> Space:
    """``"0.01:2:log"`` (a log-uniform range), ``"0.01:2"`` (uniform) or ``"0.05,0.1,0.2"``.

    Raises:
        ConfigError: the text is none of these, or a value is outside :data:`SEARCHABLE`'s
            interval for ``name``.
    """
    flag = "--" + name.replace("_", "-")
    low_bound, high_bound = SEARCHABLE[name]
    expected = (
        "LOW:HIGH, LOW:HIGH:log or a comma-separated list of values, e.g. 0.01:2:log or "
        "0.05,0.1,0.2"
    )

    def number(item: str) -> float:
        try:
            value = float(item)
        except ValueError:
            value = math.nan
        if not math.isfinite(value) or not low_bound <= value <= high_bound:
            raise ConfigError(
                f"{flag}: got {item.strip()!r}; expected numbers in "
                f"[{low_bound:g}, {high_bound:g}] as {expected}"
            )
        return value

    if ":" in text:
        parts = text.split(":")
        log = len(parts) == 3 and parts[2].strip() == "log"
        if len(parts) not in (2, 3) or (len(parts) == 3 and not log):
            raise ConfigError(f"{flag}: got {text!r}; expected {expected}")
        low, high = number(parts[0]), number(parts[1])
        if not low < high or (log and low <= 0):
            raise ConfigError(
                f"{flag}: got {text!r}; expected LOW < HIGH"
                + (" and LOW > 0 for :log" if log else "")
            )
        return Space(name, low, high, log)
    values = tuple(dict.fromkeys(number(item) for item in text.split(",")))
    return Space(name, values=values)


def grid_points(space: Space, points: int) -> list[float]:
    """A list space's values, or ``points`` values spread over a range: geometrically for a
    log range (equal ratios), evenly otherwise, ends included, each :func:`round_value`-ed."""
    if space.values is not None:
        return list(space.values)
    assert space.low is not None and space.high is not None
    if points == 1:
        middle = math.sqrt(space.low * space.high) if space.log else (space.low + space.high) / 2
        return [round_value(middle)]
    fractions = [k / (points - 1) for k in range(points)]
    if space.log:
        ratio = space.high / space.low
        return [round_value(space.low * ratio**f) for f in fractions]
    return [round_value(space.low + (space.high - space.low) * f) for f in fractions]


def run_name(optimizer: str, params: dict[str, float], seed: int | None = None) -> str:
    """``sam-aace-rho0.1234-lr0.05-s3``: the run directory's name, from the parameters."""
    name = optimizer + "".join(
        f"-{key.replace('_', '')}{params[key]:g}" for key in SEARCHABLE if key in params
    )
    return name if seed is None else f"{name}-s{seed}"


@dataclass
class TuneSpec:
    """Everything that determines a tuning; :meth:`stored` goes into every study, so that a
    second worker or machine is checked against it.

    Each optimizer (rule) gets a study of its own with the same budget. A *configuration* is
    one point of its space; each is trained with every search seed (``search_seeds`` runs) to
    the full epochs, and scored by ``score`` (:mod:`aace.training.tune.scoring`) averaged over
    those runs. With one searched dimension, or lists only, the configurations are a grid
    (a range gives ``trials`` points, default :data:`DEFAULT_POINTS`); with two or more and a
    range among them, ``trials`` configurations drawn by TPE.
    """

    out: str
    optimizers: list[str]
    spaces: list[Space]
    base: dict[str, Any]  # RunConfig fields after --, the same for every run
    trials: int | None = None
    search_seeds: int = 1
    score: str = "best-val-acc"
    val_split: float = 0.1
    val_split_seed: int = 0
    seed: int = 0
    final_seeds: int = 0
    storage: str | None = None  # None: the journal file OUT/study.journal
    # Not part of the stored settings: they may differ between workers.
    workers: int = 1
    heartbeat: int = 60
    retries: int = 2
    baseline: str | None = None
    margin: float = 1.0  # percentage points, for the equivalence test against the baseline
    progress: float = 30.0  # seconds between a running trial's progress lines

    def stored(self) -> dict[str, Any]:
        values = asdict(self)
        for name in (
            "workers", "heartbeat", "retries", "baseline", "margin", "progress", "storage", "out",
        ):  # fmt: skip
            values.pop(name)
        values["spaces"] = [asdict(s) for s in self.spaces]
        return json.loads(json.dumps(values))  # tuples become lists, as the storage returns

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TuneSpec:
        """The inverse of ``dataclasses.asdict`` (for a worker process)."""
        values = dict(values)
        values["spaces"] = [
            Space(**dict(s, values=tuple(s["values"]) if s.get("values") is not None else None))
            for s in values["spaces"]
        ]
        return cls(**values)

    # -- configurations ---------------------------------------------------------------------

    def spaces_for(self, optimizer: str) -> list[Space]:
        return [s for s in self.spaces if not (optimizer == "sgd" and s.name == "rho")]

    def is_grid(self, optimizer: str) -> bool:
        """Whether the optimizer's configurations are a grid (else TPE draws them)."""
        spaces = self.spaces_for(optimizer)
        return len(spaces) <= 1 or all(s.is_list for s in spaces)

    def grid(self, optimizer: str) -> dict[str, list[float]]:
        """The grid's values per searched name (only for :meth:`is_grid`)."""
        points = self.trials or DEFAULT_POINTS
        return {s.name: grid_points(s, points) for s in self.spaces_for(optimizer)}

    def configurations(self, optimizer: str) -> list[dict[str, float]] | None:
        """Every configuration of a grid, in grid order; None for a TPE search."""
        if not self.is_grid(optimizer):
            return None
        grid = self.grid(optimizer)
        return [dict(zip(grid, values)) for values in itertools.product(*grid.values())]

    def budget(self, optimizer: str) -> int:
        """Configurations per study: the grid's size, or ``trials`` for TPE."""
        configurations = self.configurations(optimizer)
        if configurations is not None:
            return len(configurations)
        assert self.trials is not None
        return self.trials

    @property
    def search_seed_values(self) -> list[int]:
        """The seeds every configuration of every rule is trained with: seed ... seed + S - 1."""
        return [self.seed + k for k in range(self.search_seeds)]

    @property
    def final_seed_values(self) -> list[int]:
        """The final runs' seeds, the same for every rule (so differences are paired) and none
        of the search's: seed + S ... seed + S + K - 1."""
        start = self.seed + self.search_seeds
        return [start + k for k in range(self.final_seeds)]

    @property
    def epochs(self) -> int:
        return RunConfig(**self.base).epochs

    def config(self, optimizer: str, params: dict[str, float], seed: int, out: Path) -> RunConfig:
        values = dict(self.base, optimizer=optimizer, seed=seed, out=str(out))
        values.update(val_split=self.val_split, val_split_seed=self.val_split_seed, **params)
        return RunConfig(**values).validate()

    def search_run(self, optimizer: str, params: dict[str, float], seed: int) -> Path:
        return Path(self.out) / optimizer / run_name(optimizer, params, seed)

    def final_run(self, optimizer: str, params: dict[str, float], seed: int) -> Path:
        return Path(self.out) / "final" / run_name(optimizer, params, seed)

    # -- checks -----------------------------------------------------------------------------

    def validate(self) -> TuneSpec:
        """Raises :class:`ConfigError` naming the flag, the value and what is allowed."""
        if not self.optimizers:
            raise ConfigError("--optimizer: got an empty list; expected e.g. sam,sam-aace")
        for name in self.optimizers:
            if name not in OPTIMIZERS:
                raise ConfigError(
                    f"--optimizer: got {name!r}; expected a comma-separated list of "
                    f"{', '.join(OPTIMIZERS)}"
                )
        if len(set(self.optimizers)) != len(self.optimizers):
            raise ConfigError(
                f"--optimizer: got {','.join(self.optimizers)}; name each optimizer once"
            )
        if not 0 < self.val_split < 1:
            raise ConfigError(
                f"--val-split: got {self.val_split!r}; expected a number in (0, 1): aace tune "
                "chooses on a validation split, never on the test set"
            )
        for name, value, low in (
            ("search-seeds", self.search_seeds, 1), ("final-seeds", self.final_seeds, 0),
            ("workers", self.workers, 1), ("heartbeat", self.heartbeat, 1),
            ("retries", self.retries, 0),
        ):  # fmt: skip
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ConfigError(f"--{name}: got {value!r}; expected an integer >= {low}")
        if self.score not in SCORES:
            raise ConfigError(f"--score: got {self.score!r}; expected one of {', '.join(SCORES)}")
        if not (isinstance(self.margin, (int, float)) and 0 < self.margin < 100):
            raise ConfigError(
                f"--margin: got {self.margin!r}; expected percentage points in (0, 100)"
            )
        if self.trials is not None and self.trials < 1:
            raise ConfigError(f"--trials: got {self.trials!r}; expected an integer >= 1")
        if any(not self.is_grid(o) for o in self.optimizers) and self.trials is None:
            raise ConfigError(
                "--trials: not given; expected an integer >= 1: two or more searched "
                "hyperparameters with a range are searched by TPE with that many configurations"
            )
        if self.baseline is not None and self.baseline not in self.optimizers:
            raise ConfigError(
                f"--baseline: got {self.baseline!r}; expected one of the optimizers "
                f"({', '.join(self.optimizers)})"
            )
        # Every corner of the space must make a valid run (the trials would all fail later).
        for optimizer in self.optimizers:
            for pick in (min, max):
                params = {
                    s.name: pick(s.values) if s.values is not None else pick(s.low, s.high)
                    for s in self.spaces_for(optimizer)
                }
                self.config(optimizer, params, self.seed, Path(self.out) / "check")
        return self
