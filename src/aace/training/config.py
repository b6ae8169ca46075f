"""One dataclass for a training run (its fields carry their ``aace train`` flags' help), the
table of optimizer names, the presets of the paper's experiments, and reading a config file."""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from aace.losses import AACE_MODES

# The optimizer that makes the update, alone ("sgd" below) or inside SAM (every other rule).
BASE_OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("step", "cosine")
DEVICES = ("auto", "cpu", "cuda", "mps")
AMP_MODES = ("off", "bf16", "fp16")
NONFINITE = ("stop", "skip")
# Under DDP, SAM's perturbation from each replica's own gradient ("local", the m-sharpness of
# Foret et al., ICLR 2021, Sec. 4.1) or from the gradient averaged over all replicas ("global").
PERTURBATION_SYNCS = ("local", "global")


@dataclass(frozen=True)
class OptimizerInfo:
    """What an ``--optimizer`` name means: the one table the config's validation, the training
    step, the sweep and the CLI's choices read."""

    name: str
    rule: str | None  # SAM's perturbation rule (aace.SAM's ``perturbation``); None: no SAM
    adaptive: bool = False  # ASAM's scale-invariant perturbation (Kwon et al., ICML 2021)
    default_rho: float | None = None  # rho when --rho is not given; None without a perturbation
    perturbation_loss: str = "ce"  # the loss the perturbation ascends: "ce", "aace" or "bisam"

    @property
    def second_pass(self) -> bool:
        """Whether a step takes SAM's two passes (a perturbation, then the update)."""
        return self.rule is not None


# rho when --rho is not given: SAM's 0.05 (Foret et al.), AACE's 0.2 (Ratchatorn & Tanaka),
# ASAM's 0.5 for CIFAR-10 (Kwon et al.), BiSAM's 0.05 for CIFAR-10 (Xie et al.: the default
# and README example of their code, the SAM rho of the Kwon et al. setup they follow).
OPTIMIZER_TABLE: dict[str, OptimizerInfo] = {
    info.name: info
    for info in (
        OptimizerInfo("sgd", rule=None),
        OptimizerInfo("sam", rule="sam", default_rho=0.05),
        OptimizerInfo("sam-aace", rule="aace", default_rho=0.2, perturbation_loss="aace"),
        OptimizerInfo(
            "sam-aace-normalized",
            rule="aace-normalized",
            default_rho=0.05,
            perturbation_loss="aace",
        ),
        OptimizerInfo("asam", rule="sam", adaptive=True, default_rho=0.5),
        OptimizerInfo("sam-bisam", rule="sam", default_rho=0.05, perturbation_loss="bisam"),
    )
}
OPTIMIZERS = tuple(OPTIMIZER_TABLE)
SAM_OPTIMIZERS = tuple(name for name, info in OPTIMIZER_TABLE.items() if info.second_pass)


def optimizer_info(name: str) -> OptimizerInfo:
    """The table's entry for ``name``; :class:`ConfigError` naming the choices otherwise."""
    if name not in OPTIMIZER_TABLE:
        raise ConfigError(f"--optimizer: got {name!r}; expected one of {', '.join(OPTIMIZERS)}")
    return OPTIMIZER_TABLE[name]


class ConfigError(ValueError):
    """A run configuration that cannot be trained; the message names the field and value."""


def _paper(model: str, dataset: str, **overrides: Any) -> dict[str, Any]:
    # The AACE paper's recipe (its code builds on the SAM example code of davda54/sam):
    # SGD, momentum 0.9, weight decay 5e-4, lr 0.1, 200 epochs, step schedule,
    # label smoothing 0.1 in the update loss, SAM+AACE with rho 0.2.
    values = dict(
        model=model, dataset=dataset, optimizer="sam-aace", rho=0.2, lr=0.1, momentum=0.9,
        weight_decay=5e-4, epochs=200, schedule="step", label_smoothing=0.1, batch_size=256,
    )  # fmt: skip
    values.update(overrides)
    return values


_DATASETS = ("cifar10", "cifar100", "fashion-mnist", "food101")

PRESETS: dict[str, dict[str, Any]] = {
    **{f"wrn28-10-{d}": _paper("wrn28_10", d) for d in _DATASETS},
    **{f"pyramidnet272-{d}": _paper("pyramidnet272_200", d, batch_size=64) for d in _DATASETS},
    # What fits a laptop CPU: the package's own demo.
    "digits-demo": dict(
        dataset="digits", model="wrn16_1", epochs=8, batch_size=64, lr=0.05, schedule="cosine"
    ),
}


def option(
    default: Any,
    help: str,
    *,
    choices: tuple[str, ...] | None = None,
    metavar: str | tuple[str, ...] | None = None,
    default_text: str | None = None,
    resumable: bool = False,
) -> Any:
    """A :class:`RunConfig` field with what its ``aace train`` flag says about it.

    ``help`` describes the flag; the parser (:func:`aace.cli.add_run_arguments`) appends
    "(default ...)" from ``default``, or ``default_text`` where the default depends on other
    fields. ``resumable``: the field may change between a run and its resume without changing
    its result (:data:`RESUMABLE_CHANGES`)."""
    metadata = {
        "help": help, "choices": choices, "metavar": metavar, "default_text": default_text,
        "resumable": resumable,
    }  # fmt: skip
    if isinstance(default, (list, dict)):
        raise TypeError(f"option: a mutable default {default!r}; use a tuple")
    return dataclasses.field(default=default, metadata=metadata)


def seed_option(what: str) -> Any:
    """A :class:`RunConfig` seed (default 0) of ``what`` alone, independent of ``--seed``."""
    return option(0, f"seed of {what}, independent of --seed", metavar="S")


@dataclass
class RunConfig:
    """Everything that determines a run. Saved as ``config.json`` and in every checkpoint.

    Each field carries its ``aace train`` flag's help, choices and default
    (:func:`option`); the parser is generated from them."""

    dataset: str = option("digits", "cifar10, cifar100, fashion-mnist, food101, digits or npz:PATH")
    data_dir: str = option("data", "where datasets are read from / downloaded to", resumable=True)
    download: bool = option(False, "download missing datasets", resumable=True)
    image_size: int = option(32, "Food101 resize target in pixels")
    # Symmetric label noise on the training set (aace.data.symmetric_label_noise); the seed of
    # the corruption is its own, so that --seed varies training but not which labels are wrong.
    label_noise: float = option(
        0.0,
        "change exactly round(RATE x n) training labels, each to another class drawn uniformly "
        "(symmetric noise; test set untouched)",
        metavar="RATE",
    )
    label_noise_seed: int = seed_option("the label corruption")
    # A validation split held out of the (noisy) training set, stratified per class
    # (aace.data.validation_split), under a seed of its own; 0: no split.
    val_split: float = option(
        0.0,
        "hold out fraction F of the training set (after --label-noise), stratified per class, "
        "as a validation split: metrics gain val_loss/val_acc, the run keeps the weights of its "
        "best-val_acc epoch in best.pt (0 <= F < 1; 0: no split; aace tune, which needs one, "
        "defaults to 0.1)",
        metavar="F",
    )
    val_split_seed: int = seed_option("the validation split")
    model: str = option(
        "wrn16_1",
        "wrn{depth}_{width}, pyramidnet{depth}_{alpha}[_basic], or timm:NAME for any timm "
        "architecture (pip install 'aace[timm]')",
    )
    dropout: float = option(0.0, "WideResNet dropout probability")
    shakedrop: float = option(0.0, "PyramidNet ShakeDrop probability of the last block")
    optimizer: str = option("sam-aace", "the training rule", choices=OPTIMIZERS)
    rho: float | None = option(
        None,
        "perturbation radius",
        default_text=", ".join(
            f"{info.default_rho:g} {name}" for name, info in OPTIMIZER_TABLE.items()
            if info.default_rho is not None
        ),
    )  # fmt: skip
    label_smoothing: float = option(0.0, "label smoothing of the update loss only")
    aace_threshold: float = option(0.0, "AACE threshold in [0, 1]")
    aace_mode: str = option("ada", "AACE mode", choices=AACE_MODES)
    lr: float = option(0.1, "base learning rate")
    momentum: float = option(0.9, "SGD momentum")
    nesterov: bool = option(False, "Nesterov momentum (SGD)")
    weight_decay: float = option(5e-4, "weight decay (AdamW's is decoupled: try 0.05)")
    perturbation_weight_decay: float = option(
        0.0,
        "SAM optimizers: perturb along the gradient of the loss + WD/2 ||w||^2, as "
        "google-research/sam does with its weight decay (0: the loss's gradient alone)",
        metavar="WD",
    )
    base_optimizer: str = option(
        "sgd",
        "the optimizer that makes the update, alone (--optimizer sgd) or inside SAM: sgd "
        "(--momentum, --nesterov) or adamw (--betas)",
        choices=BASE_OPTIMIZERS,
    )
    betas: tuple[float, float] = option((0.9, 0.999), "AdamW's betas", metavar=("BETA1", "BETA2"))
    batch_size: int = option(
        128,
        "global batch of one step; with N processes and --accumulate K each process runs K "
        "micro-batches of batch-size / (N K)",
    )
    epochs: int = option(200, "epochs to train")
    schedule: str = option(
        "step", "learning-rate schedule: step (x0.2 at 30/60/80%% of training) or cosine",
        choices=SCHEDULES,
    )  # fmt: skip
    cutout: int | None = option(
        None, "Cutout square side in pixels (0 = off)", default_text="per dataset"
    )
    augment: bool = option(
        True,
        "the dataset's training augmentation: random crop, flip, Cutout (off: none of them, "
        "e.g. to study memorization quickly)",
    )
    seed: int = option(0, "seed of the initial model, the data order and augmentation")
    device: str = option("auto", "where to train", choices=DEVICES, resumable=True)
    amp: str = option(
        "off",
        "bf16 autocast; fp16 autocast with a GradScaler (overflowing steps are skipped); or off",
        choices=AMP_MODES,
    )
    compile: bool = option(False, "torch.compile the model", resumable=True)
    perturbation_sync: str = option(
        "local",
        "under torchrun: each process perturbs with its own gradient (local, SAM's m-sharpness) "
        "or with the gradient averaged over all processes (global)",
        choices=PERTURBATION_SYNCS,
    )
    sync_bn: bool = option(
        False, "under torchrun on CUDA: SyncBatchNorm (batch statistics over all processes)"
    )
    # The number of processes is not a field: it may change on resume too (the global batch
    # stays --batch-size), and so may --accumulate, which splits the same batch differently.
    accumulate: int = option(
        1,
        "micro-batches per pass, for a batch that does not fit in memory",
        resumable=True,
    )
    nonfinite: str = option(
        "stop",
        "on a NaN/inf loss or gradient: stop the run (last good checkpoint kept) or skip the step "
        "(counted as skipped_steps in the metrics; costs a host sync per pass)",
        choices=NONFINITE,
        resumable=True,
    )
    checkpoint_every: int = option(
        0,
        "also write a checkpoint every N optimizer steps, so a kill loses at most N steps "
        "(0: at epoch ends only); a resume continues mid-epoch exactly",
        metavar="N",
        resumable=True,
    )
    # Which steps of a SAM run are SAM steps (aace.schedule); the others are plain SGD steps.
    sam_every: int = option(
        1, "SAM optimizers: a SAM step every K-th step, plain SGD steps between", metavar="K"
    )
    sam_start: float = option(
        0.0,
        "SAM optimizers: plain SGD steps before fraction F of training, SAM steps after "
        "(combines with --sam-every)",
        metavar="F",
    )
    sam_adaptive: float | None = option(
        None,
        "SAM optimizers: a SAM step after a step whose squared gradient norm exceeded its "
        "moving average by C moving standard deviations (AE-SAM, one step late; costs a host "
        "sync per step)",
        metavar="C",
        default_text="off",
    )
    out: str = option(
        "runs/run",
        "run directory",
        default_text="runs/<dataset>-<model>-<optimizer>-s<seed>",
        resumable=True,
    )
    preset: str | None = option(
        None,
        f"one of the paper's runs (see 'aace presets'): {', '.join(PRESETS)}",
        default_text="none",
    )
    pretrained: bool = option(
        False,
        "timm:NAME only: start from the pretrained weights in the local cache (never downloaded)",
    )
    tensorboard: bool = option(
        False,
        "also write TensorBoard events to OUT/tensorboard (pip install 'aace[tensorboard]')",
        resumable=True,
    )
    log_every: int = option(
        50, "with --tensorboard: log the training loss every N steps", resumable=True
    )

    def __post_init__(self) -> None:
        # JSON (config.json) and argparse give lists; keep one type so that runs compare equal.
        if isinstance(self.betas, list):
            self.betas = tuple(self.betas)

    @property
    def info(self) -> OptimizerInfo:
        """The optimizer table's entry of ``optimizer``."""
        return optimizer_info(self.optimizer)

    @property
    def resolved_rho(self) -> float:
        """``rho``, or the optimizer's default when it is None (0 for plain SGD)."""
        if self.rho is not None:
            return self.rho
        return self.info.default_rho or 0.0

    @property
    def perturbation_rho(self) -> float | None:
        """The radius the run perturbs with; None for an optimizer without a perturbation
        (what ``config.json`` records as ``resolved_rho``)."""
        return self.resolved_rho if self.info.second_pass else None

    def validate(self) -> RunConfig:
        def fail(name: str, value: Any, allowed: str) -> None:
            shown = "null" if value is None else repr(value)  # None comes from a config file
            raise ConfigError(f"--{name.replace('_', '-')}: got {shown}; expected {allowed}")

        def finite(x: Any) -> bool:
            return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)

        for name, choices in (
            ("optimizer", OPTIMIZERS), ("schedule", SCHEDULES), ("device", DEVICES),
            ("amp", AMP_MODES), ("perturbation_sync", PERTURBATION_SYNCS), ("nonfinite", NONFINITE),
            ("base_optimizer", BASE_OPTIMIZERS), ("aace_mode", AACE_MODES),
        ):  # fmt: skip
            if getattr(self, name) not in choices:
                fail(name, getattr(self, name), f"one of {', '.join(choices)}")
        if (
            not isinstance(self.betas, tuple)
            or len(self.betas) != 2
            or not all(finite(b) and 0 <= b < 1 for b in self.betas)
        ):
            fail("betas", self.betas, "two numbers in [0, 1), e.g. --betas 0.9 0.999")
        if self.base_optimizer != "adamw" and self.betas != (0.9, 0.999):
            fail("betas", self.betas, "the default (0.9, 0.999) unless --base-optimizer adamw")
        if self.base_optimizer != "sgd" and self.nesterov:
            fail("nesterov", self.nesterov, "False unless --base-optimizer sgd")
        for name in ("sync_bn", "pretrained", "tensorboard", "augment"):
            if not isinstance(getattr(self, name), bool):
                fail(name, getattr(self, name), "True or False")
        if self.pretrained and not self.model.startswith("timm:"):
            fail("pretrained", self.pretrained, "False unless --model timm:NAME")
        for name in ("lr", "weight_decay", "momentum", "perturbation_weight_decay"):
            value = getattr(self, name)
            if not finite(value) or value < 0:
                fail(name, value, "a finite number >= 0")
        if self.lr == 0:
            fail("lr", self.lr, "a finite number > 0")
        if self.perturbation_weight_decay and self.optimizer == "sgd":
            fail(
                "perturbation_weight_decay",
                self.perturbation_weight_decay,
                "0 with --optimizer sgd",
            )
        if self.rho is not None and (not finite(self.rho) or self.rho < 0):
            fail("rho", self.rho, "a finite number >= 0")
        for name in ("aace_threshold", "label_smoothing", "dropout", "shakedrop", "label_noise"):
            value = getattr(self, name)
            if not finite(value) or not 0 <= value <= 1:
                fail(name, value, "a number in [0, 1]")
        if not finite(self.val_split) or not 0 <= self.val_split < 1:
            fail("val_split", self.val_split, "a number in [0, 1) (0: no validation split)")
        for name in ("batch_size", "epochs", "image_size", "accumulate", "log_every"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                fail(name, value, "an integer >= 1")
        if self.cutout is not None and (not isinstance(self.cutout, int) or self.cutout < 0):
            fail("cutout", self.cutout, "an integer >= 0")
        if not self.augment and self.cutout:
            fail("cutout", self.cutout, "0 or unset with --no-augment")
        for name in ("seed", "checkpoint_every", "label_noise_seed", "val_split_seed"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                fail(name, value, "an integer >= 0")
        self._validate_sam_schedule(fail, finite)
        self.per_rank_batch_size(1)
        return self

    def _validate_sam_schedule(self, fail: Any, finite: Any) -> None:
        every, start, adaptive = self.sam_every, self.sam_start, self.sam_adaptive
        if not isinstance(every, int) or isinstance(every, bool) or every < 1:
            fail("sam_every", every, "an integer >= 1")
        if not finite(start) or not 0 <= start < 1:
            fail("sam_start", start, "a number in [0, 1)")
        if adaptive is not None and not finite(adaptive):
            fail("sam_adaptive", adaptive, "a finite number (AE-SAM's threshold c)")
        given = [
            f"--{name} {value}"
            for name, value, default in (
                ("sam-every", every, 1), ("sam-start", start, 0), ("sam-adaptive", adaptive, None)
            )
            if value != default
        ]  # fmt: skip
        if given and not self.info.second_pass:
            raise ConfigError(
                f"{given[0]}: schedules SAM steps, but --optimizer is {self.optimizer}; "
                f"expected a SAM optimizer ({', '.join(SAM_OPTIMIZERS)})"
            )
        if adaptive is not None and len(given) > 1:
            raise ConfigError(
                f"--sam-adaptive: got {adaptive!r} together with {given[0]}; the adaptive rule "
                "decides every step itself, expected --sam-every 1 and --sam-start 0"
            )

    def per_rank_batch_size(self, world_size: int) -> int:
        """The batch of one process per step, from the global ``batch_size``.

        ``batch_size`` is the global batch of one optimizer step (what the paper's recipes state),
        split evenly over ``world_size`` processes and, within a process, over ``accumulate``
        micro-batches; so it must be a multiple of ``world_size * accumulate``.
        """
        parts = world_size * self.accumulate
        if self.batch_size % parts:
            raise ConfigError(
                f"--batch-size: got {self.batch_size}; expected a multiple of {parts} = "
                f"{world_size} process(es) x --accumulate {self.accumulate} (the global batch is "
                "split evenly over processes and micro-batches)"
            )
        return self.batch_size // world_size

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> RunConfig:
        check_fields(values, "configuration")
        return cls(**values)

    def differences(self, other: RunConfig, ignore: tuple[str, ...] = ()) -> list[str]:
        """Names of the fields whose values differ, for refusing to mix two runs."""
        a, b = self.to_dict(), other.to_dict()
        return [k for k in a if k not in ignore and a[k] != b[k]]


# Fields that may change between a run and its resume without changing its result.
RESUMABLE_CHANGES = tuple(f.name for f in dataclasses.fields(RunConfig) if f.metadata["resumable"])


def check_fields(values: dict[str, Any], where: str) -> None:
    """Refuse names that are not :class:`RunConfig` fields, naming them and ``where``."""
    known = [f.name for f in dataclasses.fields(RunConfig)]
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ConfigError(
            f"{where}: unknown field(s) {', '.join(unknown)}; expected RunConfig fields "
            f"({', '.join(known)})"
        )


def read_config_file(path: str | Path) -> dict[str, Any]:
    """The :class:`RunConfig` fields a ``--config`` file sets: a JSON object of fields, a
    run's own ``config.json`` (its ``config`` object), or a TOML table of fields (``.toml``).
    Names may be spelled with dashes as on the command line (``batch-size``)."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as error:
        raise ConfigError(f"--config: cannot read '{path}' ({error.strerror or error})") from error
    try:
        if path.suffix.lower() == ".toml":
            values = tomllib.loads(data.decode())
        else:
            values = json.loads(data)
    except (ValueError, UnicodeDecodeError) as error:
        kind = "TOML" if path.suffix.lower() == ".toml" else "JSON"
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ConfigError(f"--config: '{path}' is not valid {kind} ({first})") from error
    if isinstance(values, dict) and isinstance(values.get("config"), dict):
        values = values["config"]  # a run directory's config.json
    if not isinstance(values, dict):
        raise ConfigError(
            f"--config: '{path}' holds a {type(values).__name__}; expected an object of fields"
        )
    values = {str(k).replace("-", "_"): v for k, v in values.items()}
    check_fields(values, f"--config '{path}'")
    if "betas" in values and isinstance(values["betas"], list):
        values["betas"] = tuple(values["betas"])
    return values


def preset(name: str) -> dict[str, Any]:
    if name not in PRESETS:
        raise ConfigError(
            f"--preset: unknown preset {name!r}; expected one of {', '.join(PRESETS)}"
        )
    return dict(PRESETS[name], preset=name)
