"""The ``aace`` parser: the subcommands train, eval, compare, plot, sharpness and presets here,
sweep and tune from :mod:`aace.cli.search`."""

from __future__ import annotations

import argparse

import aace
from aace.cli.arguments import Parser, add_deprecated, add_run_arguments, add_sharpness_arguments
from aace.cli.search import add_sweep_parser, add_tune_parser
from aace.training.config import DEVICES

__all__ = ["build_parser"]


def build_parser() -> argparse.ArgumentParser:
    """The ``aace`` parser: every subcommand and its flags (the docs' CLI page is made from it)."""
    parser = Parser(prog="aace", description="Sharpness-aware training with SAM and AACE.")
    parser.add_argument("--version", action="version", version=f"aace {aace.__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of errors")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=Parser)

    train = commands.add_parser(
        "train",
        help="train a model; writes a run directory",
        description="Settings come from the defaults, then --preset, then --config FILE, then "
        "the flags given here (each overriding the ones before).",
    )
    add_run_arguments(train)

    evaluate = commands.add_parser("eval", help="test accuracy and loss of a checkpoint")
    evaluate.add_argument(
        "checkpoint",
        metavar="RUN_DIR_OR_CHECKPOINT",
        help="a run directory (its checkpoint.pt: the last epoch), a checkpoint.pt, or a best.pt "
        "(the epoch the validation split selected)",
    )
    evaluate.add_argument("--data-dir", help="override the dataset directory of the run")
    evaluate.add_argument("--device", choices=DEVICES, default="auto")

    compare = commands.add_parser(
        "compare",
        help="table of test accuracy over run directories: mean, std, 95 %% CI and n per row",
    )
    compare.add_argument(
        "runs", nargs="+", help="run directories, or folders of them (a sweep's --out)"
    )
    compare.add_argument(
        "--baseline",
        metavar="NAME",
        help="a row's optimizer as the table shows it (e.g. sgd, 'sam rho=0.05'): adds each "
        "row's difference to it and the p-value of Welch's t-test",
    )

    plot = commands.add_parser("plot", help="the paper's figures from run directories")
    plot.add_argument(
        "runs", nargs="+", help="run directories, or folders of them (a sweep's --out)"
    )
    plot.add_argument("--figure", metavar="FILE", help="the image to write, e.g. curves.png")
    add_deprecated(plot, "--out", "--figure")

    sharpness = commands.add_parser(
        "sharpness",
        help="Hessian eigenvalues and trace, adaptive sharpness, loss landscapes of a run's model",
    )
    add_sharpness_arguments(sharpness)
    add_deprecated(sharpness, "--out", "--output-file")

    add_sweep_parser(commands)
    add_tune_parser(commands)

    commands.add_parser("presets", help="list the presets")
    for subparser in commands.choices.values():  # --debug after the subcommand too
        subparser.add_argument(
            "--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks"
        )
    return parser
