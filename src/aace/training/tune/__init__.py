"""``aace tune``: choose hyperparameters (ρ first) on a validation split, with Optuna.

Each optimizer (rule) gets a study of its own with the same budget. A one-dimensional range
(``--rho 0.01:2:log``) becomes ``--trials`` points (default 7) on Optuna's grid sampler, every
one trained to the full epochs with every search seed (``--search-seeds``); two or more ranged
dimensions are searched by TPE. Nothing is pruned: every configuration is compared at full
budget. The report gives each configuration's score with its standard error, the set the
validation split cannot tell from the best, and, with ``--final-seeds``, the chosen
configurations trained with the same new seeds and compared with ``--baseline``, paired.

The package, in Optuna's own shape:

* :mod:`~aace.training.tune.spec`: the spaces, configurations and seeds (:class:`TuneSpec`);
* :mod:`~aace.training.tune.scoring`: a run's score and the ranking of configurations;
* :mod:`~aace.training.tune.sampling`: the samplers, seeded per study and per trial;
* :mod:`~aace.training.tune.storage`: storages, heartbeats and requeued trials (public APIs);
* :mod:`~aace.training.tune.worker`: the worker loop and the command (:func:`run_tune`);
* :mod:`~aace.training.tune.report`: ``tune.md``, ``tune.json``, ``tune.png``.
"""

from aace.training.tune.report import REPORT_JSON, REPORT_MD, REPORT_PLOT, write_report
from aace.training.tune.scoring import SCORES, run_score
from aace.training.tune.spec import SEARCHABLE, Space, TuneSpec, parse_space, run_name
from aace.training.tune.worker import run_tune, work

__all__ = [
    "REPORT_JSON", "REPORT_MD", "REPORT_PLOT", "SCORES", "SEARCHABLE",
    "Space", "TuneSpec", "parse_space", "run_name", "run_score", "run_tune", "work",
    "write_report",
]  # fmt: skip
