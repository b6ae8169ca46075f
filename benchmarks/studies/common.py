"""What several studies share: the data sets they make, the mechanism table, the sharpness of a
finished run. Not a study itself; the studies import it, never each other.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
from pathlib import Path
from typing import Any

import numpy as np

from aace.cli.arguments import add_sharpness_arguments, sharpness_settings
from aace.report import read_run
from aace.runs import RunDirectory
from aace.training.sharpness_run import run_sharpness
from benchmarks.harness import REPOSITORY, markdown_table

# The team's CIFAR-10 subset (5,085 training images), beside the repository.
CIFAR5K = REPOSITORY.parent / "shared" / "data" / "cifar10_5k.npz"
SUBSETS = {"cifar10_2k": 200}  # images per class taken from the shared CIFAR-10 subset


def dataset_spec(name: str) -> str:
    """``cifar10_2k`` -> an npz spec of the balanced subset (written once); others unchanged.

    ``cifar10_2k`` is the first 200 training images of each class of the shared CIFAR-10 subset
    (written to ``benchmarks/out/data/cifar10_2k.npz``) with the file's whole test set."""
    if name not in SUBSETS:
        return name
    path = REPOSITORY / "benchmarks" / "out" / "data" / f"{name}.npz"
    if not path.is_file():
        if not CIFAR5K.is_file():
            raise SystemExit(f"--dataset {name} needs {CIFAR5K}")
        data = np.load(CIFAR5K)
        y = data["y_train"]
        per_class = SUBSETS[name]
        index = np.sort(np.concatenate([np.flatnonzero(y == c)[:per_class] for c in range(10)]))
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez(
            path, x_train=data["x_train"][index], y_train=y[index], x_test=data["x_test"],
            y_test=data["y_test"], classes=data["classes"],
        )  # fmt: skip
    return f"npz:{path.relative_to(Path.cwd()) if path.is_relative_to(Path.cwd()) else path}"


def mechanism_table(paths: list[Path]) -> tuple[str, list[dict]]:
    """Mean over seeds of grad_norm and perturbation_cosine in the first and last thirds.

    The paper's mechanism (Ratchatorn & Tanaka, ICIP 2024): near convergence the CE gradient
    used by SAM shrinks and its direction becomes unstable, while AACE's gradient grows and its
    direction stays consistent."""
    groups: dict[str, list] = {}
    for path in paths:
        run = read_run(path)
        if run.config["optimizer"] == "sgd":
            continue
        groups.setdefault(run.label, []).append(run)
    rows = []
    for label, runs in groups.items():
        values: dict[str, list[float]] = {}
        for run in runs:
            n = len(run.rows)
            third = max(1, n // 3)
            for part, chosen in (("first", run.rows[:third]), ("last", run.rows[-third:])):
                for key in ("grad_norm", "perturbation_cosine"):
                    values.setdefault(f"{key}_{part}", []).append(
                        statistics.fmean(r[key] for r in chosen if r[key] is not None)
                    )
        row = {"optimizer": label, "n": len(runs)}
        row.update({k: statistics.fmean(v) for k, v in values.items()})
        rows.append(row)
    table = markdown_table(
        [
            "optimizer",
            "n",
            "grad norm, first third",
            "grad norm, last third",
            "cosine, first third",
            "cosine, last third",
        ],
        [
            [
                r["optimizer"],
                r["n"],
                f"{r['grad_norm_first']:.3g}",
                f"{r['grad_norm_last']:.3g}",
                f"{r['perturbation_cosine_first']:.3f}",
                f"{r['perturbation_cosine_last']:.3f}",
            ]
            for r in rows
        ],
    )
    return table, rows


def measure_sharpness(run: Path, sharpness_argv: list[str]) -> dict[str, Any]:
    """``aace sharpness RUN *sharpness_argv``, unless the run's ``sharpness.json`` was made with
    the same settings; returns that file's content."""
    parser = argparse.ArgumentParser(prog="aace sharpness")
    add_sharpness_arguments(parser)
    settings = sharpness_settings(parser.parse_args([str(run), *sharpness_argv]))
    wanted = dataclasses.asdict(settings)
    saved = RunDirectory(run).read_sharpness()
    if saved is not None:
        made_with = saved.get("settings", {})
        if {k: v for k, v in made_with.items() if k != "images_measured"} == wanted:
            return saved
    print(f"== {run}", flush=True)
    run_sharpness(run, settings, log=lambda line: print(f"   {line}", flush=True))
    return RunDirectory(run).read_sharpness()
