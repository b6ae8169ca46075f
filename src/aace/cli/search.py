"""``aace sweep`` and ``aace tune``: their flags and handlers. Both train many runs in processes
of their own with ``aace train`` flags given after ``--``; the flags each sets for every run
itself are refused there (with the flag to use instead)."""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from aace.cli.arguments import EXIT_USAGE, Parser, add_deprecated, add_run_arguments, config_values
from aace.report import run_label
from aace.training import sweep, tune
from aace.training.config import OPTIMIZERS, ConfigError
from aace.training.workers import world_size

__all__ = ["add_sweep_parser", "add_tune_parser", "sweep_command", "tune_command"]


def add_sweep_parser(commands: argparse._SubParsersAction) -> None:
    """The ``aace sweep`` subcommand of ``commands``."""
    parser = commands.add_parser(
        "sweep",
        help="a grid of training runs (optimizers x rho x label noise x seeds), resumable, in "
        "parallel, with the comparison table at the end",
        description="Train a grid of runs into --out/NAME (e.g. sam-rho0.05-noise0.4-s1) and "
        "print 'aace compare' of them. Rerunning the same command trains only what is missing. "
        "Arguments after -- are 'aace train' arguments, the same for every run.",
    )
    parser.add_argument("--out", required=True, help="the sweep's folder")
    parser.add_argument(
        "--optimizers",
        default="sgd,sam,sam-aace",
        help=f"comma-separated optimizers ({', '.join(OPTIMIZERS)}), each optionally with :RHO "
        "(default sgd,sam,sam-aace; e.g. sgd,sam:0.05,sam:0.1,sam-aace:0.2)",
    )
    add_deprecated(parser, "--optimizer", "--optimizers")
    parser.add_argument(
        "--rhos", help="comma-separated rho values for the SAM optimizers given without :RHO"
    )
    add_deprecated(parser, "--rho", "--rhos")
    parser.add_argument(
        "--seed", type=int, default=0, help="the first seed (default 0); --seeds counts from it"
    )
    parser.add_argument(
        "--seeds",
        type=int,
        default=3,
        metavar="N",
        help="train every cell with N seeds: SEED ... SEED+N-1 (default 3)",
    )
    parser.add_argument(
        "--label-noise", metavar="RATES", help="comma-separated label-noise rates, e.g. 0,0.2,0.4"
    )
    parser.add_argument(
        "--jobs", type=int, default=1, help="runs trained at once; the CPUs are split between them"
    )
    parser.add_argument("--baseline", metavar="NAME", help="as in 'aace compare' (e.g. sgd)")
    parser.add_argument(
        "train_args", nargs="*", metavar="-- TRAIN_ARGS", help="aace train arguments"
    )


def add_tune_parser(commands: argparse._SubParsersAction) -> None:
    """The ``aace tune`` subcommand of ``commands``."""
    parser = commands.add_parser(
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
    parser.add_argument("--out", required=True, help="the tuning's folder (runs, journal, report)")
    parser.add_argument(
        "--optimizers",
        default="sam,sam-aace",
        help="comma-separated optimizers, each searched on its own (default sam,sam-aace)",
    )
    add_deprecated(parser, "--optimizer", "--optimizers")
    for name, what in (
        ("rho", "the perturbation radius (SAM optimizers)"),
        ("lr", "the base learning rate"),
        ("weight-decay", "the weight decay"),
        ("label-smoothing", "the label smoothing of the update loss"),
    ):
        parser.add_argument(
            f"--{name}",
            metavar="SPACE",
            help=f"search {what}: LOW:HIGH:log or LOW:HIGH (a range) or V1,V2,... (a list)",
        )
    parser.add_argument(
        "--trials",
        type=int,
        metavar="K",
        help="points of a one-dimensional range (default 7, geometric for :log), or "
        "configurations drawn by TPE when two or more ranged hyperparameters are searched",
    )
    parser.add_argument(
        "--search-seeds",
        type=int,
        default=1,
        metavar="S",
        help="train every configuration with S seeds: SEED ... SEED+S-1, and score their mean "
        "(default 1)",
    )
    parser.add_argument(
        "--score",
        choices=tune.SCORES,
        default="best-val-acc",
        help="what ranks configurations: the best validation accuracy over the epochs "
        "(default), the mean over the last 3 epochs, or the lowest validation loss",
    )
    parser.add_argument(
        "--val-split",
        type=float,
        default=0.1,
        metavar="F",
        help="fraction of the training set held out to choose on, 0 < F < 1 (default 0.1, as "
        "in SAM; aace train's default 0 holds out nothing, but tune needs a split)",
    )
    parser.add_argument("--val-split-seed", type=int, default=0, metavar="S", help="default 0")
    parser.add_argument(
        "--seed",
        type=int,
        default=0,
        help="the first seed (default 0); --search-seeds counts from it, --final-seeds from "
        "where the search's end",
    )
    parser.add_argument(
        "--final-seeds",
        type=int,
        default=0,
        metavar="K",
        help="train each optimizer's chosen configuration with the K seeds that follow the "
        "search's: SEED+S ... SEED+S+K-1, the same for every optimizer, and report its test "
        "accuracy at the validation-selected epoch (default 0)",
    )
    parser.add_argument(
        "--baseline",
        metavar="OPTIMIZER",
        help="compare every optimizer's final runs with this one's, paired by seed",
    )
    parser.add_argument(
        "--margin",
        type=float,
        default=1.0,
        metavar="PP",
        help="equivalence margin for --baseline, in percentage points (default 1.0)",
    )
    parser.add_argument(
        "--workers", type=int, default=1, help="trials trained at once by this command"
    )
    parser.add_argument(
        "--storage",
        metavar="URL",
        help="Optuna storage (default: the journal file OUT/study.journal): sqlite:///PATH, "
        "postgresql://USER:PASSWORD@HOST/DB, mysql://..., or journal:PATH",
    )
    parser.add_argument(
        "--heartbeat",
        type=int,
        default=60,
        metavar="SECONDS",
        help="a worker records that its trial lives every SECONDS and requeues trials silent "
        "for twice that; they continue from their checkpoints (default 60)",
    )
    parser.add_argument(
        "--retries",
        type=int,
        default=2,
        metavar="N",
        help="a trial that raises an error is queued again up to N times (default 2)",
    )
    parser.add_argument(
        "--progress",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="at most one progress line per SECONDS while trials train (default 30; 0: every "
        "epoch)",
    )
    # Removed with pruning (every configuration now trains in full): --pruner none is accepted.
    parser.add_argument("--pruner", help=argparse.SUPPRESS)
    parser.add_argument("--min-epochs", help=argparse.SUPPRESS)
    parser.add_argument(
        "train_args", nargs="*", metavar="-- TRAIN_ARGS", help="aace train arguments"
    )


def _train_args_after_dashes(command: str, argv: list[str]) -> argparse.Namespace | int:
    """The ``aace train`` flags given after ``--`` to ``aace sweep`` or ``aace tune``, parsed;
    or the exit status when parsing ended (a usage error, reported in one line, or --help)."""
    if world_size() > 1:
        raise ConfigError(f"aace {command} starts its own processes; run it without torchrun")
    if "--debug" in argv:
        raise ConfigError(
            f"--debug after --: it is a flag of aace {command} itself, not of the runs; "
            "put it before --"
        )
    train_parser = Parser(prog="aace train")
    add_run_arguments(train_parser)
    try:
        return train_parser.parse_args(argv)
    except SystemExit as exit_:
        return exit_.code if isinstance(exit_.code, int) else EXIT_USAGE


# The sweep sets these itself; after -- they would be ambiguous.
_SWEEP_OWNED = ("optimizer", "rho", "seed", "out", "resume", "label_noise")
_SWEEP_FLAGS = {"seed": " (--seed, --seeds N)", "optimizer": " (--optimizers)", "rho": " (--rhos)"}


def sweep_command(args: argparse.Namespace) -> int:
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
        seed=args.seed,
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


def tune_command(args: argparse.Namespace) -> int:
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
        optimizers=[o.strip() for o in args.optimizers.split(",") if o.strip()],
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
