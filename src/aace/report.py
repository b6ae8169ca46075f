"""Comparison tables and plots, made only from run directories (config.json, metrics.jsonl)."""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SHARPNESS = "sharpness.json"
# Columns of 'aace compare' for runs that have a sharpness.json: (key, header).
SHARPNESS_COLUMNS = (
    ("hessian_eigenvalues", "top Hessian eigenvalue"),
    ("hessian_trace", "Hessian trace"),
    ("adaptive_sharpness", "adaptive sharpness"),
)


class ReportError(ValueError):
    """A run directory that cannot be read; the message names the path."""


@dataclass
class Run:
    path: Path
    config: dict[str, Any]
    rows: list[dict[str, Any]]
    sharpness: dict[str, Any] | None = None  # sharpness.json, written by 'aace sharpness'

    @property
    def label(self) -> str:
        """Runs with the same label are seeds of one setting."""
        c = self.config
        rho = "" if c["optimizer"] == "sgd" else f" rho={_rho(c)}"
        return f"{c['optimizer']}{rho}"

    @property
    def setting(self) -> str:
        c = self.config
        return f"{c['dataset']} / {c['model']} / {c['epochs']} epochs"


def _rho(config: dict[str, Any]) -> float:
    from aace.training.config import DEFAULT_RHO

    return DEFAULT_RHO[config["optimizer"]] if config.get("rho") is None else config["rho"]


def read_run(path: str | Path) -> Run:
    path = Path(path)
    config_file, metrics_file = path / "config.json", path / "metrics.jsonl"
    if not config_file.is_file() or not metrics_file.is_file():
        raise ReportError(
            f"'{path}' is not an aace run directory (expected {config_file.name} and "
            f"{metrics_file.name} in it)"
        )
    try:
        config = json.loads(config_file.read_text())["config"]
        rows = [json.loads(line) for line in metrics_file.read_text().splitlines() if line]
    except (ValueError, KeyError, TypeError) as error:
        raise ReportError(f"'{path}': unreadable config.json or metrics.jsonl ({error})") from error
    if not rows:
        raise ReportError(f"'{path}' has no finished epoch in metrics.jsonl yet")
    sharpness = None
    if (path / SHARPNESS).is_file():
        try:
            sharpness = json.loads((path / SHARPNESS).read_text())
        except ValueError as error:
            raise ReportError(f"'{path / SHARPNESS}' is not valid JSON ({error})") from error
    return Run(path, config, rows, sharpness)


def _mean_std(values: list[float]) -> str:
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{100 * mean:.2f} ± {100 * std:.2f}"


def _sharpness_value(run: Run, key: str) -> float | None:
    value = (run.sharpness or {}).get(key)
    if isinstance(value, list):  # the eigenvalues, descending: the top one
        value = value[0] if value else None
    return value if isinstance(value, (int, float)) else None


def _mean_std_plain(values: list[float], of: int) -> str:
    if not values:
        return "–"
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    text = f"{mean:.4g} ± {std:.2g}"
    return text if len(values) == of else f"{text} (n={len(values)})"


def compare_table(paths: list[str | Path]) -> str:
    """Markdown table of final and best test accuracy (%) per setting: mean ± std over seeds.

    Runs with a ``sharpness.json`` (``aace sharpness``) add the top Hessian eigenvalue, the
    Hessian trace and the adaptive worst-case sharpness, mean ± std over the runs that have
    them (their n in brackets when not all runs of the row have them)."""
    runs = [read_run(p) for p in paths]
    groups: dict[tuple[str, str], list[Run]] = {}
    for run in runs:
        groups.setdefault((run.setting, run.label), []).append(run)
    columns = SHARPNESS_COLUMNS if any(run.sharpness for run in runs) else ()
    header = "| setting | optimizer | final test acc (%) | best test acc (%) | n | epochs |"
    header += "".join(f" {title} |" for _, title in columns)
    lines = [header, "|---|---|---|---|---|---|" + "---|" * len(columns)]
    for (setting, label), members in groups.items():
        final = [r.rows[-1]["test_acc"] for r in members]
        best = [max(row["test_acc"] for row in r.rows) for r in members]
        epochs = sorted({len(r.rows) for r in members})
        line = (
            f"| {setting} | {label} | {_mean_std(final)} | {_mean_std(best)} | {len(members)} "
            f"| {', '.join(map(str, epochs))} |"
        )
        for key, _ in columns:
            values = [v for r in members if (v := _sharpness_value(r, key)) is not None]
            line += f" {_mean_std_plain(values, len(members))} |"
        lines.append(line)
    return "\n".join(lines)


PLOTTED = (
    ("test_acc", "test accuracy"),
    ("ce_loss", "cross-entropy (train, at w)"),
    ("aace_loss", "AACE loss (train, at w)"),
    ("grad_norm", "perturbation-loss gradient norm"),
    ("perturbation_norm", "perturbation norm"),
    ("perturbation_cosine", "cosine of consecutive perturbations"),
)


def plot_runs(paths: list[str | Path], out: str | Path) -> Path:
    """The paper's figures: one panel per quantity against epoch, one line per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [read_run(p) for p in paths]
    figure, axes = plt.subplots(2, 3, figsize=(15, 8), constrained_layout=True)
    colors: dict[str, Any] = {}
    for ax, (key, title) in zip(axes.flat, PLOTTED):
        for run in runs:
            points = [(r["epoch"], r.get(key)) for r in run.rows if r.get(key) is not None]
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
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=110)
    plt.close(figure)
    return out
