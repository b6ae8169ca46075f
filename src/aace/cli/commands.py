"""``aace``'s entry point: :func:`main` parses the command line, runs the subcommand and turns
every error into one line on stderr and an exit status (``--debug`` shows the traceback):

* 2: bad input (a flag, a file, a missing extra), :data:`~aace.cli.arguments.EXIT_USAGE`;
* 3: training diverged (a non-finite loss);
* 4: under torchrun, another process of the job was lost;
* 75: stopped by SIGTERM after writing a checkpoint, 130: by Ctrl-C (rerun with ``--resume``).

Under torchrun every process reports as :mod:`aace.training.workers` says.
"""

from __future__ import annotations

import argparse
import dataclasses
import signal
from collections.abc import Sequence
from pathlib import Path

from aace.cli.arguments import EXIT_USAGE, config_from_args, sharpness_settings
from aace.cli.parser import build_parser
from aace.cli.search import sweep_command, tune_command
from aace.integrations import MissingExtraError
from aace.report import compare_table, plot_runs
from aace.runs import RunDirectory
from aace.training.build import build_loader, resolve_device
from aace.training.config import PRESETS, ConfigError, RunConfig
from aace.training.distributed import on_all_ranks
from aace.training.evaluate import evaluate, load_trained_model
from aace.training.preemption import EXIT_INTERRUPTED, EXIT_PREEMPTED, Preempted, defer_sigterm
from aace.training.sharpness_run import run_sharpness
from aace.training.step import NonFiniteError
from aace.training.trainer import Trainer
from aace.training.workers import first_line, lost_contact, report_failure, world_size

__all__ = ["EXIT_LOST_PROCESS", "EXIT_NONFINITE", "main"]

EXIT_NONFINITE = 3
EXIT_LOST_PROCESS = 4


def _train(args: argparse.Namespace) -> int:
    if args.config is None and all(
        getattr(args, field.name) is None for field in dataclasses.fields(RunConfig)
    ):
        # The defaults alone are 200 epochs of WRN-16-1 on digits: hours nobody asked for.
        raise on_all_ranks(
            ConfigError(
                "aace train: no run given; try --preset digits-demo (8 epochs on digits, a "
                "minute or two on a CPU), --config FILE, or flags such as --dataset cifar10 "
                "--epochs 200 ('aace train --help' lists them)"
            )
        )
    try:
        config = config_from_args(args)
    except ConfigError as error:  # a function of the command line: the same on every rank
        raise on_all_ranks(error) from None
    args.run_out = config.out  # for the line of a Ctrl-C
    trainer = Trainer(config, log=lambda line: print(line, flush=True))
    summary = trainer.fit(resume=args.resume)
    if not trainer.is_main:
        return 0
    if summary.get("selected_epoch") is not None:
        print(
            f"selected epoch {summary['selected_epoch']} (validation accuracy "
            f"{summary['selected_val_acc']:.4f}): test accuracy "
            f"{summary['test_acc_at_selected']:.4f}, its model in "
            f"{Path(config.out) / 'best.pt'}; final test accuracy {summary['final_test_acc']:.4f}"
        )
        return 0
    print(
        f"final test accuracy {summary['final_test_acc']:.4f}, best {summary['best_test_acc']:.4f} "
        f"(epoch {summary['best_epoch']}); run directory {config.out}"
    )
    return 0


def _eval(args: argparse.Namespace) -> int:
    device = resolve_device(args.device)
    model, config, dataset, checkpoint = load_trained_model(args.checkpoint, args.data_dir)
    model.to(device)
    test_loader = build_loader(dataset, "test", device)
    loss_sum, correct, count = evaluate(model, test_loader, config.amp)
    n = int(count)
    print(
        f"{config.dataset} test set, {n} images, epoch {checkpoint['epoch']}: "
        f"accuracy {int(correct) / n:.4f}, loss {float(loss_sum) / n:.4f}"
    )
    return 0


def _presets() -> int:
    for name, values in PRESETS.items():
        settings = ", ".join(f"{k}={v}" for k, v in values.items())
        print(f"{name:28s} {settings}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    if world_size() > 1:
        defer_sigterm()
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # usage errors (status 2) and --help (status 0)
        return exit_.code if isinstance(exit_.code, int) else EXIT_USAGE
    try:
        return _run(args)
    except KeyboardInterrupt as error:
        return report_failure(
            on_all_ranks(error), _interrupted(args), EXIT_INTERRUPTED, debug=False, prefix="aace: "
        )
    except Preempted as error:
        status = EXIT_INTERRUPTED if error.signum == signal.SIGINT else EXIT_PREEMPTED
        return report_failure(error, str(error), status, args.debug, prefix="aace: ")
    except NonFiniteError as error:
        return report_failure(error, str(error), EXIT_NONFINITE, args.debug)
    except RuntimeError as error:
        if not lost_contact(error):
            raise
        message = (
            f"lost contact with another process of the job ({first_line(error)}); its own "
            "error says why. torchrun --max-restarts restarts the job, or rerun with --resume"
        )
        return report_failure(error, message, EXIT_LOST_PROCESS, args.debug)
    except (ValueError, OSError, MissingExtraError) as error:
        # ConfigError, DatasetError, CheckpointError, ReportError are ValueErrors.
        message = str(error).strip().splitlines()[0] if str(error).strip() else repr(error)
        if isinstance(error, OSError) and not isinstance(error, ValueError):
            message = f"{error.strerror or error}: {error.filename or ''}".rstrip(": ")
        return report_failure(error, message, EXIT_USAGE, args.debug)


def _run(args: argparse.Namespace) -> int:
    if args.command == "train":
        return _train(args)
    if args.command == "eval":
        return _eval(args)
    if args.command == "compare":
        print(compare_table(args.runs, args.baseline))
        return 0
    if args.command == "sharpness":
        settings = sharpness_settings(args)
        path = run_sharpness(
            args.run, settings, args.output_file, log=lambda line: print(line, flush=True)
        )
        print(f"wrote {path}")
        return 0
    if args.command == "sweep":
        return sweep_command(args)
    if args.command == "tune":
        return tune_command(args)
    if args.command == "plot":
        if args.figure is None:
            raise ConfigError("--figure: missing; expected the image to write, e.g. curves.png")
        print(f"wrote {plot_runs(args.runs, args.figure)}")
        return 0
    return _presets()


def _interrupted(args: argparse.Namespace) -> str:
    """The line of a Ctrl-C: for ``aace train``, how to continue, as a SIGTERM's line says."""
    out = getattr(args, "run_out", None)
    if out is None:
        return "interrupted"
    run = RunDirectory(out)
    if run.has_checkpoint:
        return (
            f"interrupted; the last checkpoint is '{run.checkpoint_file}'. Run the same command "
            "with --resume to continue from it"
        )
    return (
        "interrupted before the first checkpoint; run the same command with --resume to start over"
    )
