"""Sharpness of finished runs: ``aace sharpness`` on every run directory given, then a table of the
top Hessian eigenvalue, trace and adaptive sharpness per optimizer (mean ± std over seeds, n).

    python benchmarks/sharpness_of_runs.py benchmarks/out/replicate/digits/*-s? --name digits \\
        -- --images 1024 --samples 20

Arguments after ``--`` go to ``aace sharpness`` unchanged (see ``aace sharpness --help``). A run
whose ``sharpness.json`` was made with the same settings is not measured again. Writes
``benchmarks/results/sharpness-<name>.{json,md}``; the table is made from the runs'
``sharpness.json`` files only.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
from pathlib import Path

import torch
from _common import DEFAULT_OUT_DIR, markdown_table, write_results

from aace.report import read_run
from aace.runs import SHARPNESS
from aace.training.sharpness_run import add_arguments, run_sharpness, settings_from_args

QUANTITIES = (
    ("hessian_eigenvalues", "top Hessian eigenvalue"),
    ("hessian_trace", "Hessian trace"),
    ("adaptive_sharpness", "adaptive worst-case sharpness"),
    ("adaptive_average_sharpness", "adaptive average sharpness"),
    ("loss", "train loss (measured images)"),
)


def _value(result: dict, key: str) -> float | None:
    value = result.get(key)
    return value[0] if isinstance(value, list) else value


def measure(run: Path, sharpness_argv: list[str]) -> dict:
    parser = argparse.ArgumentParser(prog="aace sharpness")
    add_arguments(parser)
    settings = settings_from_args(parser.parse_args([str(run), *sharpness_argv]))
    wanted = dataclasses.asdict(settings)
    path = run / SHARPNESS
    if path.is_file():
        saved = json.loads(path.read_text())
        settings = {k: v for k, v in saved.get("settings", {}).items() if k != "images_measured"}
        if settings == wanted:
            return saved
    print(f"== {run}", flush=True)
    run_sharpness(run, settings, log=lambda line: print(f"   {line}", flush=True))
    return json.loads(path.read_text())


def main() -> int:
    argv = sys.argv[1:]
    sharpness_argv = argv[argv.index("--") + 1 :] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run directories")
    parser.add_argument("--name", required=True, help="results go to sharpness-<name>.{json,md}")
    parser.add_argument("--out-dir", type=Path, default=DEFAULT_OUT_DIR)
    args = parser.parse_args(argv)

    groups: dict[str, list[dict]] = {}
    for path in args.runs:
        run = read_run(path)
        result = measure(path, sharpness_argv)
        result["test_acc"] = run.rows[-1]["test_acc"]
        groups.setdefault(run.label, []).append(result)

    headers = ["optimizer", "n", "final test acc (%)"] + [title for _, title in QUANTITIES]
    rows, table = [], []
    for label, results in groups.items():
        summary: dict = {"optimizer": label, "n": len(results)}
        cells: list[object] = [label, len(results)]
        accuracy = [100 * r["test_acc"] for r in results]
        cells.append(f"{statistics.fmean(accuracy):.2f} ± {statistics.stdev(accuracy):.2f}")
        for key, _ in QUANTITIES:
            values = [v for r in results if (v := _value(r, key)) is not None]
            if not values:
                cells.append("–")
                continue
            mean = statistics.fmean(values)
            std = statistics.stdev(values) if len(values) > 1 else 0.0
            summary[key] = {"mean": mean, "std": std, "n": len(values), "values": values}
            cells.append(f"{mean:.4g} ± {std:.2g}")
        rows.append(summary)
        table.append(cells)
    first = next(iter(groups.values()))[0]
    settings = ", ".join(f"{k}={v}" for k, v in first["settings"].items() if v is not None)
    text = (
        f"### Sharpness of the final models (mean ± std over seeds)\n\n"
        f"{markdown_table(headers, table)}\n\nSettings of `aace sharpness`: {settings}.\n"
    )
    print(
        write_results(
            f"sharpness-{args.name}",
            rows,
            text,
            args.out_dir,
            device=torch.device(first["device"]),
            config={"runs": [str(p) for p in args.runs], "sharpness_argv": sharpness_argv},
            notes="The CPU was shared with other jobs while this ran.",
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
