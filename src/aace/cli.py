"""The ``aace`` command line: train, sweep, tune, eval, compare, plot, sharpness, presets.

Every user error becomes one line on stderr and exit status 2; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import signal
import sys
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import aace
from aace.integrations import MissingExtraError
from aace.report import compare_table, plot_runs, run_label
from aace.runs import RunDirectory
from aace.training import sweep
from aace.training.build import build_loader, resolve_device
from aace.training.config import (
    DEVICES,
    OPTIMIZERS,
    PRESETS,
    ConfigError,
    RunConfig,
    preset,
    read_config_file,
)
from aace.training.distributed import on_all_ranks
from aace.training.evaluate import evaluate, load_trained_model
from aace.training.preemption import (
    EXIT_INTERRUPTED,
    EXIT_PREEMPTED,
    Preempted,
    defer_sigterm,
)
from aace.training.sharpness_run import add_arguments as add_sharpness_arguments
from aace.training.sharpness_run import run_sharpness, settings_from_args
from aace.training.step import NonFiniteError
from aace.training.trainer import Trainer
from aace.training.workers import (
    await_rank_zero,
    first_line,
    lost_contact,
    rank,
    report_failure,
    world_size,
)

EXIT_USAGE = 2
EXIT_NONFINITE = 3
EXIT_LOST_PROCESS = 4


class _Parser(argparse.ArgumentParser):
    """argparse, but its usage errors are one line like every other error of the CLI."""

    def error(self, message: str) -> None:  # type: ignore[override]
        this_rank = rank()  # every rank of a torchrun job parses the same command line
        if this_rank and not await_rank_zero(EXIT_USAGE):
            raise SystemExit(EXIT_USAGE)  # rank 0 reports it
        print(
            f"aace: error: {f'[rank {this_rank}] ' if this_rank else ''}{message}", file=sys.stderr
        )
        print(f"hint: {self.prog} --help lists the options", file=sys.stderr, flush=True)
        raise SystemExit(EXIT_USAGE)


def _add_deprecated(parser: argparse.ArgumentParser, old: str, new: str, **kwargs: Any) -> None:
    """``old``, the flag's spelling before ``new``, still works for one release: it sets what
    ``new`` sets and prints one deprecation line. Hidden from --help."""

    class Deprecated(argparse.Action):
        def __call__(self, parser, namespace, values, option_string=None):  # type: ignore[override]
            print(f"aace: warning: {old} is deprecated; use {new}", file=sys.stderr, flush=True)
            setattr(namespace, self.dest, values)

    dest = new.lstrip("-").replace("-", "_")
    parser.add_argument(old, dest=dest, action=Deprecated, help=argparse.SUPPRESS, **kwargs)


def _default_text(field: dataclasses.Field) -> str:
    if field.metadata.get("default_text"):
        return field.metadata["default_text"]
    default = field.default
    if isinstance(default, bool):
        return "on" if default else "off"
    if isinstance(default, tuple):
        return " ".join(map(str, default))
    return str(default)


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``aace train`` flags, generated from :class:`RunConfig`'s fields (their help,
    choices and defaults: :func:`aace.training.config.option`), plus ``--config`` and
    ``--resume``. Every default is None, so that a preset and a config file fill what the
    command line leaves out (:func:`config_values`)."""
    hints = typing.get_type_hints(RunConfig)
    fields = {field.name: field for field in dataclasses.fields(RunConfig)}
    order = ["preset", *(name for name in fields if name != "preset")]
    for name in order:
        field, hint = fields[name], hints[name]
        meta = field.metadata
        flag = "--" + name.replace("_", "-")
        help = f"{meta['help']} (default {_default_text(field)})"
        kwargs: dict[str, Any] = {"help": help}
        if meta.get("metavar"):
            kwargs["metavar"] = meta["metavar"]
        if hint is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **kwargs)
            continue
        if meta.get("choices"):
            kwargs["choices"] = meta["choices"]
        if typing.get_origin(hint) is tuple:
            kwargs.update(type=typing.get_args(hint)[0], nargs=len(typing.get_args(hint)))
        else:
            types = [t for t in typing.get_args(hint) or (hint,) if t is not type(None)]
            if types[0] is not str:
                kwargs["type"] = types[0]
        parser.add_argument(flag, **kwargs)
        if name == "preset":
            parser.add_argument(
                "--config",
                metavar="FILE",
                help="a run's settings from a file: JSON of RunConfig fields (a run's own "
                "config.json reruns it) or TOML (.toml); flags given here override it, and it "
                "overrides --preset",
            )
    parser.add_argument(
        "--resume", action="store_true", help="continue the run in --out from its checkpoint"
    )


_train_arguments = add_run_arguments  # the name aace tune's handler calls


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="aace", description="Sharpness-aware training with SAM and AACE.")
    parser.add_argument("--version", action="version", version=f"aace {aace.__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of errors")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

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
    _add_deprecated(plot, "--out", "--figure")

    sharpness = commands.add_parser(
        "sharpness",
        help="Hessian eigenvalues and trace, adaptive sharpness, loss landscapes of a run's model",
    )
    add_sharpness_arguments(sharpness)

    sweep = commands.add_parser(
        "sweep",
        help="a grid of training runs (optimizers x rho x label noise x seeds), resumable, in "
        "parallel, with the comparison table at the end",
        description="Train a grid of runs into --out/NAME (e.g. sam-rho0.05-noise0.4-s1) and "
        "print 'aace compare' of them. Rerunning the same command trains only what is missing. "
        "Arguments after -- are 'aace train' arguments, the same for every run.",
    )
    sweep.add_argument("--out", required=True, help="the sweep's folder")
    sweep.add_argument(
        "--optimizers",
        default="sgd,sam,sam-aace",
        help=f"comma-separated optimizers ({', '.join(OPTIMIZERS)}), each optionally with :RHO "
        "(default sgd,sam,sam-aace; e.g. sgd,sam:0.05,sam:0.1,sam-aace:0.2)",
    )
    _add_deprecated(sweep, "--optimizer", "--optimizers")
    sweep.add_argument(
        "--rhos", help="comma-separated rho values for the SAM optimizers given without :RHO"
    )
    _add_deprecated(sweep, "--rho", "--rhos")
    sweep.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 (default 3)")
    sweep.add_argument(
        "--label-noise", metavar="RATES", help="comma-separated label-noise rates, e.g. 0,0.2,0.4"
    )
    sweep.add_argument(
        "--jobs", type=int, default=1, help="runs trained at once; the CPUs are split between them"
    )
    sweep.add_argument("--baseline", metavar="NAME", help="as in 'aace compare' (e.g. sgd)")
    sweep.add_argument(
        "train_args", nargs="*", metavar="-- TRAIN_ARGS", help="aace train arguments"
    )

    tune = commands.add_parser(
        "tune",
        help="choose hyperparameters (rho, lr, ...) on a validation split: every configuration "
        "trained in full with every search seed, then each optimizer's choice with new seeds; "
        "many workers and machines may share it",
        description="Each optimizer gets its own search with the same budget; every run is "
        "a run directory in --out. A one-dimensional range becomes --trials points, each "
        "trained to the full epochs with every search seed (nothing is pruned); two or more "
        "ranged hyperparameters are searched by TPE. The same command on another machine (same "
        "--storage) joins the search. Arguments after -- are 'aace train' arguments, the same "
        "for every run. Needs pip install 'aace[tune]'. See docs/tuning.md.",
    )
    tune.add_argument("--out", required=True, help="the tuning's folder (runs, journal, report)")
    tune.add_argument(
        "--optimizer",
        default="sam,sam-aace",
        help="comma-separated optimizers, each searched on its own (default sam,sam-aace)",
    )
    for name, what in (
        ("rho", "the perturbation radius (SAM optimizers)"),
        ("lr", "the base learning rate"),
        ("weight-decay", "the weight decay"),
        ("label-smoothing", "the label smoothing of the update loss"),
    ):
        tune.add_argument(
            f"--{name}",
            metavar="SPACE",
            help=f"search {what}: LOW:HIGH:log or LOW:HIGH (a range) or V1,V2,... (a list)",
        )
    tune.add_argument(
        "--trials",
        type=int,
        metavar="K",
        help="points of a one-dimensional range (default 7, geometric for :log), or "
        "configurations drawn by TPE when two or more ranged hyperparameters are searched",
    )
    tune.add_argument(
        "--search-seeds",
        type=int,
        default=1,
        metavar="S",
        help="train every configuration with seeds SEED ... SEED+S-1 and score their mean "
        "(default 1)",
    )
    tune.add_argument(
        "--score",
        choices=tune_scores(),
        default="best-val-acc",
        help="what ranks configurations: the best validation accuracy over the epochs "
        "(default), the mean over the last 3 epochs, or the lowest validation loss",
    )
    tune.add_argument(
        "--val-split",
        type=float,
        default=0.1,
        metavar="F",
        help="fraction of the training set held out to choose on (default 0.1, as in SAM)",
    )
    tune.add_argument("--val-split-seed", type=int, default=0, metavar="S", help="default 0")
    tune.add_argument(
        "--seed", type=int, default=0, help="the first search seed (default 0); see --final-seeds"
    )
    tune.add_argument(
        "--final-seeds",
        type=int,
        default=0,
        metavar="K",
        help="train each optimizer's chosen configuration with the same K new seeds "
        "(SEED+S ... SEED+S+K-1) and report its test accuracy at the validation-selected epoch "
        "(default 0)",
    )
    tune.add_argument(
        "--baseline",
        metavar="OPTIMIZER",
        help="compare every optimizer's final runs with this one's, paired by seed",
    )
    tune.add_argument(
        "--margin",
        type=float,
        default=1.0,
        metavar="PP",
        help="equivalence margin for --baseline, in percentage points (default 1.0)",
    )
    tune.add_argument(
        "--workers", type=int, default=1, help="trials trained at once by this command"
    )
    tune.add_argument(
        "--storage",
        metavar="URL",
        help="Optuna storage (default: the journal file OUT/study.journal): sqlite:///PATH, "
        "postgresql://USER:PASSWORD@HOST/DB, mysql://..., or journal:PATH",
    )
    tune.add_argument(
        "--heartbeat",
        type=int,
        default=60,
        metavar="SECONDS",
        help="a worker records that its trial lives every SECONDS and requeues trials silent "
        "for twice that; they continue from their checkpoints (default 60)",
    )
    tune.add_argument(
        "--retries",
        type=int,
        default=2,
        metavar="N",
        help="a trial that raises an error is queued again up to N times (default 2)",
    )
    tune.add_argument(
        "--progress",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="at most one progress line per SECONDS while trials train (default 30; 0: every "
        "epoch)",
    )
    # Removed with pruning (every configuration now trains in full): --pruner none is accepted.
    tune.add_argument("--pruner", help=argparse.SUPPRESS)
    tune.add_argument("--min-epochs", help=argparse.SUPPRESS)
    tune.add_argument("train_args", nargs="*", metavar="-- TRAIN_ARGS", help="aace train arguments")

    commands.add_parser("presets", help="list the presets")
    for subparser in commands.choices.values():  # --debug after the subcommand too
        subparser.add_argument(
            "--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks"
        )
    return parser


def _train_args_after_dashes(command: str, argv: list[str]) -> argparse.Namespace | int:
    """The ``aace train`` flags given after ``--`` to ``aace sweep`` or ``aace tune``, parsed;
    or the exit status when parsing ended (a usage error, reported in one line, or --help)."""
    if world_size() > 1:
        raise ConfigError(f"aace {command} starts its own processes; run it without torchrun")
    train_parser = _Parser(prog="aace train")
    _train_arguments(train_parser)
    try:
        return train_parser.parse_args(argv)
    except SystemExit as exit_:
        return exit_.code if isinstance(exit_.code, int) else EXIT_USAGE


# The sweep sets these itself; after -- they would be ambiguous.
_SWEEP_OWNED = ("optimizer", "rho", "seed", "out", "resume", "label_noise")
_SWEEP_FLAGS = {"seed": " (--seeds N)", "optimizer": " (--optimizers)", "rho": " (--rhos)"}


def _sweep(args: argparse.Namespace) -> int:
    train_args = _train_args_after_dashes("sweep", args.train_args)
    if isinstance(train_args, int):
        return train_args
    for name in _SWEEP_OWNED:
        if getattr(train_args, name) not in (None, False):
            flag = "--" + name.replace("_", "-")
            raise ConfigError(
                f"{flag} after --: the sweep sets it for each run; give it to 'aace sweep' "
                "before -- instead" + _SWEEP_FLAGS.get(name, "")
            )
    runs = sweep.plan(
        config_values(train_args),
        args.out,
        sweep.parse_optimizers(args.optimizers),
        sweep.parse_numbers("rhos", args.rhos, 0, math.inf) if args.rhos else None,
        args.seeds,
        sweep.parse_numbers("label-noise", args.label_noise, 0, 1) if args.label_noise else None,
    )
    labels = {run_label(run.config.to_dict()) for run in runs}
    if args.baseline is not None and args.baseline not in labels:
        raise ConfigError(
            f"--baseline: got {args.baseline!r}; expected one of the sweep's optimizers: "
            + ", ".join(sorted(map(repr, labels)))
        )
    outcomes = sweep.run_sweep(runs, args.jobs, log=lambda line: print(line, flush=True))
    print(sweep.write_comparison(runs, args.out, args.baseline))
    print(f"wrote {Path(args.out) / sweep.COMPARE}")
    failed = [outcome for outcome in outcomes if outcome.error is not None]
    if failed:
        names = ", ".join(outcome.run.name for outcome in failed)
        print(
            f"aace: error: {len(failed)} of {len(runs)} runs failed ({names}); their train.log "
            "says why; rerun the same command to retry them",
            file=sys.stderr,
        )
        return 1
    return 0


_TUNE_OWNED = ("optimizer", "seed", "out", "resume", "val_split", "val_split_seed")
_TUNE_SEARCHABLE = ("rho", "lr", "weight_decay", "label_smoothing")


def tune_scores() -> tuple[str, ...]:
    from aace.training.tune.scoring import SCORES

    return SCORES


def _tune(args: argparse.Namespace) -> int:
    from aace.training import tune

    if args.pruner not in (None, "none") or args.min_epochs is not None:
        flag = "--pruner" if args.pruner not in (None, "none") else "--min-epochs"
        raise ConfigError(
            f"{flag}: pruning was removed from aace tune (it ranked radii after one epoch at "
            "peak learning rate and chose among the few trials it let finish); every "
            "configuration now trains in full: use --trials for fewer points"
        )
    if args.pruner == "none":
        print("aace tune: --pruner none is the only behaviour now; drop the flag", file=sys.stderr)
    train_args = _train_args_after_dashes("tune", args.train_args)
    if isinstance(train_args, int):
        return train_args
    for name in _TUNE_OWNED + _TUNE_SEARCHABLE:
        given = getattr(train_args, name)
        if given in (None, False):
            continue
        flag = "--" + name.replace("_", "-")
        if name in _TUNE_SEARCHABLE and getattr(args, name) is None:
            continue  # not searched: fixed for every trial
        raise ConfigError(
            f"{flag} after --: aace tune sets it for each trial; give it to 'aace tune' "
            "before -- instead"
        )
    spaces = [
        tune.parse_space(name, getattr(args, name))
        for name in _TUNE_SEARCHABLE
        if getattr(args, name) is not None
    ]
    base = config_values(train_args)
    for name in ("optimizer", "rho"):
        base.pop(name, None)  # a preset's; the tuning sets them
    spec = tune.TuneSpec(
        out=args.out,
        optimizers=[o.strip() for o in args.optimizer.split(",") if o.strip()],
        spaces=spaces,
        base=base,
        trials=args.trials,
        search_seeds=args.search_seeds,
        score=args.score,
        val_split=args.val_split,
        val_split_seed=args.val_split_seed,
        seed=args.seed,
        final_seeds=args.final_seeds,
        storage=args.storage,
        workers=args.workers,
        heartbeat=args.heartbeat,
        retries=args.retries,
        baseline=args.baseline,
        margin=args.margin,
        progress=args.progress,
    )
    tune.run_tune(spec, log=lambda line: print(line, flush=True))
    out = Path(args.out)
    print((out / tune.REPORT_MD).read_text(), end="")
    print(f"wrote {out / tune.REPORT_MD}, {out / tune.REPORT_JSON}, {out / tune.REPORT_PLOT}")
    return 0


def config_values(args: argparse.Namespace) -> dict[str, Any]:
    """The RunConfig fields that the preset, then the ``--config`` file, then the flags given on
    the command line set (each overriding the ones before)."""
    file_values = read_config_file(args.config) if getattr(args, "config", None) else {}
    name = args.preset or file_values.get("preset")
    values: dict[str, Any] = preset(name) if name else {}
    values.update(file_values)
    if args.preset:
        values["preset"] = args.preset
    for field in dataclasses.fields(RunConfig):
        given = getattr(args, field.name, None)
        if given is not None and field.name != "preset":
            values[field.name] = given
    return values


def config_from_args(args: argparse.Namespace) -> RunConfig:
    """RunConfig defaults, then the preset, then the ``--config`` file, then the flags given on
    the command line; with no ``out`` from any of them, ``runs/DATASET-MODEL-OPTIMIZER-sSEED``."""
    values = config_values(args)
    config = RunConfig(**values)
    if getattr(args, "momentum", None) is not None and config.base_optimizer != "sgd":
        raise ConfigError(
            f"--momentum: got {args.momentum}; it is SGD's, not {config.base_optimizer}'s "
            "(use --betas for AdamW's moment decay)"
        )
    if "out" not in values:
        config.out = str(
            Path("runs") / f"{config.dataset}-{config.model}-{config.optimizer}-s{config.seed}"
        )
    return config.validate()


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
        settings = settings_from_args(args)
        path = run_sharpness(args.run, settings, args.out, log=lambda line: print(line, flush=True))
        print(f"wrote {path}")
        return 0
    if args.command == "sweep":
        return _sweep(args)
    if args.command == "tune":
        return _tune(args)
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


if __name__ == "__main__":
    sys.exit(main())
