"""Comparison tables and plots, made only from run directories (:mod:`aace.runs`): this module
imports nothing from :mod:`aace.training`."""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aace.runs import RunDirectory, RunError, find_runs, resolved_rho, selected_row
from aace.stats import confidence_interval, welch_test

# Columns of 'aace compare' for runs that have a sharpness.json: (key, header).
SHARPNESS_COLUMNS = (
    ("hessian_eigenvalues", "top Hessian eigenvalue"),
    ("hessian_trace", "Hessian trace"),
    ("adaptive_sharpness", "adaptive sharpness"),
)


class ReportError(RunError):
    """A run directory that cannot be read; the message names the path."""


@dataclass
class Run:
    """What a report reads of one run directory."""

    path: Path
    config: dict[str, Any]
    rows: list[dict[str, Any]]
    sharpness: dict[str, Any] | None = None  # sharpness.json, written by 'aace sharpness'
    rho: float | None = None  # the radius the run perturbed with; None without a perturbation

    @property
    def label(self) -> str:
        """Runs with the same label (and setting) are seeds of one row."""
        return run_label(self.config, self.rho)

    @property
    def setting(self) -> str:
        c = self.config
        text = f"{c['dataset']} / {c['model']} / {c['epochs']} epochs"
        if c.get("label_noise"):
            text += f" / {100 * c['label_noise']:g} % label noise"
        return text


def run_label(config: dict[str, Any], rho: float | None = None) -> str:
    """A run's optimizer as the tables name it: the optimizer, its rho and, when not every
    step is a SAM step, the schedule of SAM steps (``sam-aace rho=0.2 every=5``).

    ``rho`` is the radius the run used (``config.json``'s ``resolved_rho``); by default the
    config's ``rho``, or the default of the versions before ``resolved_rho`` was recorded
    (:func:`aace.runs.resolved_rho`). None: an optimizer without a perturbation (sgd)."""
    if rho is None:
        rho = resolved_rho({"config": config})
    if rho is None:
        return config["optimizer"]
    text = f"{config['optimizer']} rho={rho}"
    for key, name, default in (
        ("sam_every", "every", 1), ("sam_start", "start", 0), ("sam_adaptive", "adaptive", None)
    ):  # fmt: skip
        if config.get(key, default) != default:
            text += f" {name}={config[key]}"
    return text


def read_run(path: str | Path) -> Run:
    """One run directory's config, rows and sharpness; :class:`ReportError` naming the path
    when it is not a run directory or has no finished epoch yet."""
    run = RunDirectory(path)
    if not run.is_readable_run:
        raise ReportError(
            f"'{run}' is not an aace run directory (expected {run.config_file.name} and "
            f"{run.metrics_file.name} in it)"
        )
    try:
        record = run.read_record()
        rows = run.read_rows()
        sharpness = run.read_sharpness()
    except RunError as error:
        raise ReportError(str(error)) from error
    if not rows:
        raise ReportError(f"'{run}' has no finished epoch in {run.metrics_file.name} yet")
    return Run(run.path, record["config"], rows, sharpness, resolved_rho(record))


def read_runs(paths: list[str | Path]) -> list[Run]:
    """The runs of ``paths``, each a run directory or a folder of them (a sweep's)."""
    runs: list[Run] = []
    for path in paths:
        try:
            found = find_runs(path)
        except RunError as error:
            raise ReportError(str(error)) from error
        runs.extend(read_run(run.path) for run in found)
    return runs


def _mean_std(values: list[float]) -> str:
    """``"mean ± sd"`` in percent; the mean alone for one value (no spread to show)."""
    mean = statistics.fmean(values)
    if len(values) < 2:
        return f"{100 * mean:.2f}"
    return f"{100 * mean:.2f} ± {100 * statistics.stdev(values):.2f}"


MIN_INTERVAL_N = 3
INTERVAL_NOTE = (
    "95 % CI: Student-t interval of the mean over seeds; not shown below n = 3 (with n = 2 it is "
    "the mean ± 12.7 standard deviations: nearly meaningless); * a bound clipped to [0, 100] %, "
    "where a t-interval, which assumes normal errors, can reach past what an accuracy can be."
)


def percent_interval(values: list[float]) -> str:
    """The 95 % t-interval of a mean accuracy (values in [0, 1]) as ``[low, high]`` in percent:
    ``"n < 3"`` for fewer than 3 values, and bounds clipped to [0, 100] and marked ``*``
    (:data:`INTERVAL_NOTE` says why)."""
    if len(values) < MIN_INTERVAL_N:
        return f"n < {MIN_INTERVAL_N}"
    low, high = confidence_interval(values)
    clipped = low < 0 or high > 1
    low, high = max(low, 0.0), min(high, 1.0)
    return f"[{100 * low:.2f}, {100 * high:.2f}]" + ("*" if clipped else "")


def _sharpness_value(run: Run, key: str) -> float | None:
    value = (run.sharpness or {}).get(key)
    if isinstance(value, list):  # the eigenvalues, descending: the top one
        value = value[0] if value else None
    return value if isinstance(value, (int, float)) else None


def _mean_std_plain(values: list[float], of: int) -> str:
    if not values:
        return "–"
    mean = statistics.fmean(values)
    text = f"{mean:.4g}" if len(values) < 2 else f"{mean:.4g} ± {statistics.stdev(values):.2g}"
    return text if len(values) == of else f"{text} (n={len(values)})"


def _final_test_acc(run: Run) -> float:
    return run.rows[-1]["test_acc"]


def selected_test_acc(run: Run) -> float | None:
    """The test accuracy at the epoch the run's validation split selects (the highest
    ``val_acc``, the earliest of equals); None for a run without a validation split."""
    row = selected_row(run.rows)
    return None if row is None else row["test_acc"]


def _validated(members: list[Run]) -> bool:
    """Whether the runs of a row have a validation split (all or none of them may)."""
    has = [any(row.get("val_acc") is not None for row in r.rows) for r in members]
    if any(has) and not all(has):
        raise ReportError(
            f"'{members[has.index(False)].path}' has no validation split but "
            f"'{members[has.index(True)].path}' of the same row has; compare runs of one kind"
        )
    return all(has)


def group_runs(runs: list[Run]) -> dict[tuple[str, str], list[Run]]:
    """Runs by (setting, label), in the order first seen: the rows of :func:`compare_table`."""
    groups: dict[tuple[str, str], list[Run]] = {}
    for run in runs:
        groups.setdefault((run.setting, run.label), []).append(run)
    return groups


def compare_table(paths: list[str | Path], baseline: str | None = None) -> str:
    """Markdown table of final and best test accuracy (%) per setting and optimizer: mean ± std
    over seeds, the 95 % confidence interval of the final accuracy's mean (Student t) and n.

    For runs with a validation split (``--val-split``) the "best" column is not the maximum
    over epochs of the test accuracy (which reads the test set to pick the epoch) but the test
    accuracy at the epoch with the best validation accuracy, with its own 95 % interval; the
    header says which the table shows, and a row mixing both kinds is refused.

    ``baseline``, an optimizer label as the table shows it (``sgd``, ``sam rho=0.05``), adds
    each row's difference in final accuracy to that row of its setting, in percentage points,
    with the p-value of Welch's t-test. Label-noise runs add the final training accuracy
    against the noisy and the true labels. Runs with a ``sharpness.json``
    (``aace sharpness``) add the top Hessian eigenvalue, the Hessian trace and the adaptive
    worst-case sharpness, mean ± std over the runs that have them (their n in brackets when
    not all runs of the row have them)."""
    runs = read_runs(paths)
    groups = group_runs(runs)
    if baseline is not None and baseline not in {label for _, label in groups}:
        labels = ", ".join(sorted({repr(label) for _, label in groups}))
        raise ReportError(f"--baseline: got {baseline!r}; expected a row's optimizer: {labels}")
    noisy = any(run.config.get("label_noise") for run in runs)
    columns = SHARPNESS_COLUMNS if any(run.sharpness for run in runs) else ()
    validated = {(s, label): _validated(members) for (s, label), members in groups.items()}
    if all(validated.values()):
        best_header = "test acc at val-selected epoch (%) | 95 % CI"
    elif any(validated.values()):
        best_header = "best test acc (%), or † at the val-selected epoch | 95 % CI †"
    else:
        best_header = "best test acc (%)"
    header = f"| setting | optimizer | final test acc (%) | 95 % CI | {best_header} | n | epochs |"
    if baseline is not None:
        header += f" Δ final vs {baseline} (pp) | p (Welch) |"
    if noisy:
        header += " train acc, noisy labels (%) | train acc, true labels (%) |"
    header += "".join(f" {title} |" for _, title in columns)
    lines = [header, "|---" * header.count(" |") + "|"]
    for (setting, label), members in groups.items():
        final = [_final_test_acc(r) for r in members]
        epochs = sorted({len(r.rows) for r in members})
        if validated[(setting, label)]:
            selected = [selected_test_acc(r) for r in members]
            best_cell = f"{_mean_std(selected)} | {percent_interval(selected)}"
            best_cell = best_cell if all(validated.values()) else f"{best_cell} †"
        else:
            best = [max(row["test_acc"] for row in r.rows) for r in members]
            best_cell = _mean_std(best) + (" | –" if any(validated.values()) else "")
        line = (
            f"| {setting} | {label} | {_mean_std(final)} | {percent_interval(final)} "
            f"| {best_cell} | {len(members)} | {', '.join(map(str, epochs))} |"
        )
        if baseline is not None:
            reference = groups.get((setting, baseline))
            if reference is None or label == baseline:
                line += " – | – |"
            else:
                difference, p = welch_test(final, [_final_test_acc(r) for r in reference])
                line += f" {100 * difference:+.2f} | {'–' if math.isnan(p) else f'{p:.3g}'} |"
        if noisy:
            for key in ("train_acc", "train_acc_clean"):
                values = [r.rows[-1].get(key) for r in members]
                known = [v for v in values if v is not None]
                line += f" {_mean_std(known) if known else '–'} |"
        for key, _ in columns:
            values = [v for r in members if (v := _sharpness_value(r, key)) is not None]
            line += f" {_mean_std_plain(values, len(members))} |"
        lines.append(line)
    return "\n".join(lines) + "\n\n" + INTERVAL_NOTE


PLOTTED = (
    ("test_acc", "test accuracy (%)"),
    ("ce_loss", "cross-entropy (train, at w)"),
    ("aace_loss", "AACE loss (train, at w)"),
    ("grad_norm", "perturbation-loss gradient norm"),
    ("perturbation_norm", "perturbation norm"),
    ("perturbation_cosine", "cosine of consecutive perturbations"),
)


def _counts(runs: list[Run]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for run in runs:
        counts[run.label] = counts.get(run.label, 0) + 1
    return counts


def plot_runs(paths: list[str | Path], out: str | Path) -> Path:
    """The paper's figures: one panel per quantity against epoch, one line per run; the title
    names the setting and the number of runs per optimizer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = read_runs(paths)
    figure, axes = plt.subplots(2, 3, figsize=(15, 8), constrained_layout=True)
    colors: dict[str, Any] = {}
    for ax, (key, title) in zip(axes.flat, PLOTTED):
        for run in runs:
            scale = 100 if key == "test_acc" else 1  # in percent, as the tables
            points = [(r["epoch"], scale * r[key]) for r in run.rows if r.get(key) is not None]
            if not points:
                continue
            color = colors.setdefault(run.label, f"C{len(colors) % 10}")
            ax.plot(*zip(*points), color=color, alpha=0.8, label=run.label)
        ax.set_title(title)
        ax.set_xlabel("epoch")
        if key in ("grad_norm", "perturbation_norm"):
            ax.set_yscale("log")
    handles, labels = [], []
    for ax in axes.flat:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            if label not in labels:
                handles.append(handle)
                labels.append(label)
    figure.legend(handles, labels, loc="outside lower center", ncols=max(1, len(labels)))
    settings = sorted({run.setting for run in runs})
    seeds = ", ".join(f"{label}: n = {n}" for label, n in _counts(runs).items())
    figure.suptitle(f"{'; '.join(settings)}. One line per run ({seeds}); x: epoch")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=110)
    plt.close(figure)
    return out
