"""One dataclass for a training run, and the presets of the paper's experiments."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from aace.losses import AACE_MODES

OPTIMIZERS = ("sgd", "sam", "sam-aace", "sam-aace-normalized", "asam", "sam-bisam")
# The optimizer that makes the update, alone ("sgd" above) or inside SAM (every other rule).
BASE_OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("step", "cosine")
DEVICES = ("auto", "cpu", "cuda", "mps")
AMP_MODES = ("off", "bf16", "fp16")
NONFINITE = ("stop", "skip")
# Under DDP, SAM's perturbation from each replica's own gradient ("local", the m-sharpness of
# Foret et al., ICLR 2021, Sec. 4.1) or from the gradient averaged over all replicas ("global").
PERTURBATION_SYNCS = ("local", "global")

# rho when --rho is not given: SAM's 0.05 (Foret et al.), AACE's 0.2 (Ratchatorn & Tanaka),
# ASAM's 0.5 for CIFAR-10 (Kwon et al.), BiSAM's 0.05 for CIFAR-10 (Xie et al.: the default
# and README example of their code, the SAM rho of the Kwon et al. setup they follow).
DEFAULT_RHO = {
    "sgd": 0.0,
    "sam": 0.05,
    "sam-aace": 0.2,
    "sam-aace-normalized": 0.05,
    "asam": 0.5,
    "sam-bisam": 0.05,
}


class ConfigError(ValueError):
    """A run configuration that cannot be trained; the message names the field and value."""


@dataclass
class RunConfig:
    """Everything that determines a run. Saved as ``config.json`` and in every checkpoint."""

    dataset: str = "digits"
    data_dir: str = "data"
    download: bool = False
    image_size: int = 32
    # Symmetric label noise on the training set (aace.data.symmetric_label_noise); the seed of
    # the corruption is its own, so that --seed varies training but not which labels are wrong.
    label_noise: float = 0.0
    label_noise_seed: int = 0
    # A validation split held out of the (noisy) training set, stratified per class
    # (aace.data.validation_split), under a seed of its own; 0: no split.
    val_split: float = 0.0
    val_split_seed: int = 0
    model: str = "wrn16_1"
    dropout: float = 0.0
    shakedrop: float = 0.0
    optimizer: str = "sam-aace"
    rho: float | None = None  # None: DEFAULT_RHO[optimizer]
    label_smoothing: float = 0.0
    aace_threshold: float = 0.0
    aace_mode: str = "ada"
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 5e-4
    # SAM optimizers: perturb along the gradient of the loss + this/2 ||w||^2 (google-research/sam
    # perturbs with its weight decay: set it to weight_decay); 0: the loss's gradient alone.
    perturbation_weight_decay: float = 0.0
    base_optimizer: str = "sgd"  # see BASE_OPTIMIZERS; momentum and nesterov are SGD's
    betas: tuple[float, float] = (0.9, 0.999)  # AdamW's
    batch_size: int = 128
    epochs: int = 200
    schedule: str = "step"
    cutout: int | None = None  # None: the dataset's default
    augment: bool = True  # False: no crop, flip or Cutout (e.g. to study memorization quickly)
    seed: int = 0
    device: str = "auto"
    amp: str = "off"  # "bf16" autocast, or "fp16" autocast with a GradScaler
    compile: bool = False
    perturbation_sync: str = "local"  # under DDP: see PERTURBATION_SYNCS
    sync_bn: bool = False  # SyncBatchNorm under DDP (CUDA only)
    accumulate: int = 1  # micro-batches per pass: batch_size = processes x accumulate x micro-batch
    nonfinite: str = "stop"  # a NaN/inf loss or gradient stops the run, or the step is skipped
    checkpoint_every: int = 0  # also checkpoint every N optimizer steps (0: at epoch ends only)
    # Which steps of a SAM run are SAM steps (aace.schedule); the others are plain SGD steps.
    sam_every: int = 1  # a SAM step every sam_every-th step
    sam_start: float = 0.0  # plain steps before this fraction of training
    sam_adaptive: float | None = None  # AE-SAM's threshold c (lagged; see aace.schedule)
    out: str = "runs/run"
    preset: str | None = None
    pretrained: bool = False  # timm models only: weights from the local cache, never downloaded
    tensorboard: bool = False  # TensorBoard event files under out/tensorboard
    log_every: int = 50  # with tensorboard: the training loss every N steps

    def __post_init__(self) -> None:
        # JSON (config.json) and argparse give lists; keep one type so that runs compare equal.
        if isinstance(self.betas, list):
            self.betas = tuple(self.betas)

    @property
    def resolved_rho(self) -> float:
        return DEFAULT_RHO[self.optimizer] if self.rho is None else self.rho

    def validate(self) -> RunConfig:
        def fail(name: str, value: Any, allowed: str) -> None:
            raise ConfigError(f"--{name.replace('_', '-')}: got {value!r}; expected {allowed}")

        def finite(x: Any) -> bool:
            return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)

        if self.optimizer not in OPTIMIZERS:
            fail("optimizer", self.optimizer, f"one of {', '.join(OPTIMIZERS)}")
        if self.schedule not in SCHEDULES:
            fail("schedule", self.schedule, f"one of {', '.join(SCHEDULES)}")
        if self.device not in DEVICES:
            fail("device", self.device, f"one of {', '.join(DEVICES)}")
        if self.amp not in AMP_MODES:
            fail("amp", self.amp, f"one of {', '.join(AMP_MODES)}")
        if self.perturbation_sync not in PERTURBATION_SYNCS:
            allowed = f"one of {', '.join(PERTURBATION_SYNCS)}"
            fail("perturbation_sync", self.perturbation_sync, allowed)
        if not isinstance(self.sync_bn, bool):
            fail("sync_bn", self.sync_bn, "True or False")
        if self.nonfinite not in NONFINITE:
            fail("nonfinite", self.nonfinite, f"one of {', '.join(NONFINITE)}")
        if self.base_optimizer not in BASE_OPTIMIZERS:
            fail("base_optimizer", self.base_optimizer, f"one of {', '.join(BASE_OPTIMIZERS)}")
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
        for name in ("pretrained", "tensorboard", "augment"):
            if not isinstance(getattr(self, name), bool):
                fail(name, getattr(self, name), "True or False")
        if self.pretrained and not self.model.startswith("timm:"):
            fail("pretrained", self.pretrained, "False unless --model timm:NAME")
        if self.aace_mode not in AACE_MODES:
            fail("aace_mode", self.aace_mode, f"one of {', '.join(AACE_MODES)}")
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
        if given and self.optimizer == "sgd":
            raise ConfigError(
                f"{given[0]}: schedules SAM steps, but --optimizer is sgd; "
                f"expected a SAM optimizer ({', '.join(o for o in OPTIMIZERS if o != 'sgd')})"
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
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"unknown configuration field(s) {unknown}")
        return cls(**values)

    def differences(self, other: RunConfig, ignore: tuple[str, ...] = ()) -> list[str]:
        """Names of the fields whose values differ, for refusing to mix two runs."""
        a, b = self.to_dict(), other.to_dict()
        return [k for k in a if k not in ignore and a[k] != b[k]]


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


def preset(name: str) -> dict[str, Any]:
    if name not in PRESETS:
        raise ConfigError(
            f"--preset: unknown preset {name!r}; expected one of {', '.join(PRESETS)}"
        )
    return dict(PRESETS[name], preset=name)
