"""Sharpness of finished runs: ``aace sharpness`` on every run directory given, then a table of the
top Hessian eigenvalue, trace and adaptive sharpness per optimizer (mean ± std over seeds, n).

    python -m benchmarks.studies.sharpness_of_runs benchmarks/out/replicate/digits/*-s? \\
        --name digits
        -- --images 1024 --samples 20

Arguments after ``--`` go to ``aace sharpness`` unchanged (see ``aace sharpness --help``). A run
whose ``sharpness.json`` was made with the same settings is not measured again. Writes
``benchmarks/results/sharpness-<name>.{json,md}``; the table is made from the runs'
``sharpness.json`` files only.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

from aace.report import read_run
from benchmarks.harness import DEFAULT_OUT_DIR, markdown_table, write_results
from benchmarks.studies.common import measure_sharpness

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
        result = measure_sharpness(path, sharpness_argv)
        result["test_acc"] = run.rows[-1]["test_acc"]
        groups.setdefault(run.label, []).append(result)

    headers = ["optimizer", "n", "final test acc (%)"] + [title for _, title in QUANTITIES]
    rows, table = [], []
    for label, results in groups.items():
        summary: dict = {"optimizer": label, "n": len(results)}
        cells: list[object] = [label, len(results)]
        accuracy = [100 * r["test_acc"] for r in results]
        spread = statistics.stdev(accuracy) if len(accuracy) > 1 else 0.0
        cells.append(f"{statistics.fmean(accuracy):.2f} ± {spread:.2f}")
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
