"""Which configuration a trial trains: Optuna's samplers, seeded per study and per trial.

* A grid (one searched dimension, or lists only): Optuna's
  :class:`~optuna.samplers.GridSampler`; each configuration is one trial.
* Two or more dimensions with a range: TPE (Bergstra et al., NeurIPS 2011; Optuna's
  :class:`~optuna.samplers.TPESampler`, multivariate, with the constant liar for trials still
  running) after a third of the budget of random configurations.
* Final seeds: a grid over the seeds.

Seeds are drawn from NumPy's ``SeedSequence([seed, study, trial number])``: two rules never share
a random stream (their first draws do not land at the same place of their ranges), and workers
that share a study draw different points for concurrent trials (one sampler seeded alike in
every worker draws the same point in each).
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from typing import Any

import numpy as np

from aace.training.tune.spec import TuneSpec

__all__ = ["final_study", "make_sampler", "study_names", "study_seed"]

FINAL = "-final"


def final_study(optimizer: str) -> str:
    return optimizer + FINAL


def study_names(spec: TuneSpec) -> list[tuple[str, str]]:
    """(study name, optimizer): the searches, then the final seeds."""
    names = [(optimizer, optimizer) for optimizer in spec.optimizers]
    if spec.final_seeds:
        names += [(final_study(optimizer), optimizer) for optimizer in spec.optimizers]
    return names


def study_seed(seed: int, study: str, trial: int | None = None) -> int:
    """A 32-bit seed of ``(seed, study name, trial number)``."""
    entropy = [seed, zlib.crc32(study.encode())] + ([] if trial is None else [trial])
    return int(np.random.SeedSequence(entropy).generate_state(1)[0])


def make_sampler(spec: TuneSpec, name: str, optimizer: str) -> Any:
    """The sampler of study ``name``."""
    import optuna

    if name.endswith(FINAL):
        return _grid_sampler({"seed": spec.final_seed_values}, study_seed(spec.seed, name))
    if spec.is_grid(optimizer):
        grid = spec.grid(optimizer) or {"configuration": [0]}
        return _grid_sampler(grid, study_seed(spec.seed, name))
    budget = spec.budget(optimizer)

    def tpe(seed: int) -> Any:
        return optuna.samplers.TPESampler(
            n_startup_trials=max(2, budget // 3),
            seed=seed,
            multivariate=True,
            constant_liar=True,  # concurrent trials: running ones count as bad, not unseen
        )

    return _trial_seeded(tpe, spec.seed, name)


def _grid_sampler(grid: dict[str, list], seed: int) -> Any:
    """Optuna's GridSampler, less its ``after_trial``, which calls ``study.stop()`` once the
    grid is exhausted: that works inside ``study.optimize`` only, and aace's workers ask and
    tell, and know from the budget when a study is done."""
    import optuna

    class AskTellGridSampler(optuna.samplers.GridSampler):
        def after_trial(self, study: Any, trial: Any, state: Any, values: Any) -> None:
            pass

    return AskTellGridSampler(grid, seed=seed)


def _trial_seeded(make: Callable[[int], Any], seed: int, study: str) -> Any:
    """An Optuna sampler whose randomness is fixed by ``(seed, study, trial number)``: each
    trial gets a fresh ``make(seed_k)``. The inner sampler still reads the whole study history
    (TPE's model)."""
    import optuna

    class TrialSeededSampler(optuna.samplers.BaseSampler):
        def __init__(self) -> None:
            self._number: int | None = None
            self._inner: Any = None

        def _for(self, trial: Any) -> Any:
            if trial.number != self._number:
                seed_k = study_seed(seed, study, trial.number)
                self._number, self._inner = trial.number, make(seed_k)
            return self._inner

        def infer_relative_search_space(self, study: Any, trial: Any) -> dict[str, Any]:
            return self._for(trial).infer_relative_search_space(study, trial)

        def sample_relative(self, study: Any, trial: Any, search_space: dict[str, Any]) -> dict:
            return self._for(trial).sample_relative(study, trial, search_space)

        def sample_independent(
            self, study: Any, trial: Any, param_name: str, param_distribution: Any
        ) -> Any:
            return self._for(trial).sample_independent(study, trial, param_name, param_distribution)

        def before_trial(self, study: Any, trial: Any) -> None:
            self._for(trial).before_trial(study, trial)

        def after_trial(self, study: Any, trial: Any, state: Any, values: Any) -> None:
            self._for(trial).after_trial(study, trial, state, values)

    return TrialSeededSampler()
