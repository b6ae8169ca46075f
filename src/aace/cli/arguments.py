"""What the subcommands share: the one-line usage errors of :class:`Parser`, deprecated flag
spellings, and the ``aace train`` flags with the :class:`RunConfig` they make (also given after
``--`` to ``aace sweep`` and ``aace tune``); the ``aace sharpness`` flags with the
:class:`~aace.training.sharpness_run.SharpnessSettings` they make."""

from __future__ import annotations

import argparse
import dataclasses
import sys
import typing
from pathlib import Path
from typing import Any

from aace.runs import SHARPNESS
from aace.training.config import DEVICES, ConfigError, RunConfig, preset, read_config_file
from aace.training.sharpness_run import DTYPES, LANDSCAPES, SharpnessSettings
from aace.training.workers import await_rank_zero, rank

__all__ = [
    "EXIT_USAGE", "Parser", "add_deprecated", "add_run_arguments", "add_sharpness_arguments",
    "config_from_args", "config_values", "sharpness_settings",
]  # fmt: skip

# A usage error or any other error of the user's input (--debug shows its traceback).
EXIT_USAGE = 2


class Parser(argparse.ArgumentParser):
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


def add_deprecated(parser: argparse.ArgumentParser, old: str, new: str, **kwargs: Any) -> None:
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


def add_sharpness_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``aace sharpness`` flags; their defaults are :class:`SharpnessSettings`'."""
    defaults = SharpnessSettings()
    add = parser.add_argument

    def number(flag: str, help: str, skip: bool = False) -> None:
        """A flag of a numeric field, its type and default the field's; ``skip``: 0 skips it."""
        default = getattr(defaults, flag[2:].replace("-", "_"))
        note = "0: skip; " if skip else ""
        add(flag, type=type(default), default=default, help=f"{help} ({note}default {default:g})")

    add("run", metavar="RUN_DIR_OR_CHECKPOINT", help="a run directory or its checkpoint.pt")
    number("--images", "training images measured on")
    number("--batch-size", "batch size; the m of m-sharpness")
    number("--top-k", "Hessian eigenvalues to compute", skip=True)
    number("--max-iter", "most Lanczos iterations")
    number("--tol", "Lanczos relative residual tolerance")
    number("--samples", "Hutchinson probes for the trace", skip=True)
    number("--rho", "radius of the adaptive worst-case sharpness")
    add(
        "--norm",
        choices=("linf", "l2"),
        default=defaults.norm,
        help=f"its norm (default {defaults.norm})",
    )
    number("--steps", "its gradient-ascent steps", skip=True)
    number("--average-rho", "relative noise scale of the adaptive average sharpness")
    number("--average-samples", "its noise draws per batch", skip=True)
    add(
        "--landscape",
        choices=LANDSCAPES,
        help="1d: the interpolation to --against, or a filter-normalized random line without it; "
        "2d: a filter-normalized random plane. Written as landscape-1d.png / landscape-2d.png",
    )
    add("--against", help="another checkpoint of the same model, for --landscape 1d")
    number("--span", "random line/plane: coordinates in [-span, span]")
    add("--resolution", type=int, help="points per axis (default 21 for 1d, 11 for 2d)")
    add(
        "--mode",
        choices=("eval", "train"),
        default=defaults.mode,
        help=f"model mode (default {defaults.mode})",
    )
    add("--dtype", choices=tuple(DTYPES), default=defaults.dtype, help=f"default {defaults.dtype}")
    number("--seed", "image subset, probes, directions")
    add("--device", choices=DEVICES, default=defaults.device)
    add("--data-dir", help="override the dataset directory of the run")
    add(
        "--output-file",
        metavar="FILE",
        help=f"the JSON to write (default RUN_DIR/{SHARPNESS}); a landscape PNG goes beside it",
    )


def sharpness_settings(args: argparse.Namespace) -> SharpnessSettings:
    """The settings of parsed ``aace sharpness`` flags."""
    return SharpnessSettings(
        **{field.name: getattr(args, field.name) for field in dataclasses.fields(SharpnessSettings)}
    )
