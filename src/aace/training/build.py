"""What a :class:`~aace.training.config.RunConfig` builds: the device, the model, the labels and
split of the training set, the data loaders (one builder for every split), the optimizer, the
schedule of SAM steps and the learning-rate scheduler. No training happens here."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from aace.data import BatchLoader, InMemoryDataset, symmetric_label_noise, validation_split
from aace.data.loader import derive_seed
from aace.models import create_model
from aace.sam import SAM
from aace.schedule import SAMSchedule
from aace.training import distributed
from aace.training.config import ConfigError, RunConfig
from aace.training.distributed import Distributed, on_all_ranks
from aace.training.step import TrainStep

__all__ = [
    "EVAL_BATCH_SIZE", "TrainingParts", "base_optimizer", "build_loader", "build_model",
    "build_optimizer", "build_schedule", "build_scheduler", "build_training", "lr_milestones",
    "resolve_device", "split_training_set", "training_labels",
]  # fmt: skip

EVAL_BATCH_SIZE = 1024


def resolve_device(name: str) -> torch.device:
    """``--device``: ``auto`` picks CUDA, then MPS, then the CPU; a named device must exist."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device: got 'cuda' but no CUDA device is available; use auto or cpu")
    if name == "mps" and not (
        getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()
    ):
        raise ConfigError("--device: got 'mps' but MPS is not available; use auto or cpu")
    return torch.device(name)


def build_model(config: RunConfig, dataset: InMemoryDataset) -> nn.Module:
    return create_model(
        config.model,
        num_classes=dataset.num_classes,
        in_channels=dataset.in_channels,
        dropout=config.dropout,
        shakedrop=config.shakedrop,
        image_size=dataset.image_size,
        pretrained=config.pretrained,
    )


def training_labels(config: RunConfig, dataset: InMemoryDataset) -> torch.Tensor:
    """The labels the model is trained on: the dataset's, with ``config.label_noise`` of them
    changed (:func:`aace.data.symmetric_label_noise`, seeded by ``label_noise_seed``)."""
    if not config.label_noise:
        return dataset.y_train
    return symmetric_label_noise(
        dataset.y_train, config.label_noise, dataset.num_classes, config.label_noise_seed
    )


def split_training_set(
    config: RunConfig, dataset: InMemoryDataset
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The training labels (:func:`training_labels`, noisy or not) and the indices of the
    training and validation parts (:func:`aace.data.validation_split` of those labels: the
    noise comes first, so validation labels are as noisy as training labels). The same on
    every rank."""
    labels = training_labels(config, dataset)
    train, validation = validation_split(
        labels, config.val_split, dataset.num_classes, config.val_split_seed
    )
    return labels, train, validation


def build_loader(
    dataset: InMemoryDataset,
    part: str,
    device: torch.device,
    *,
    config: RunConfig | None = None,
    labels: torch.Tensor | None = None,
    index: torch.Tensor | None = None,
    batch_size: int = EVAL_BATCH_SIZE,
    rank: int = 0,
    world_size: int = 1,
) -> BatchLoader:
    """The loader of one part of ``dataset``, this rank's shard.

    ``part`` is ``"test"`` (the test set in order, unaugmented), ``"train"`` (shuffled, with the
    dataset's augmentation unless ``config.augment`` is off, seeded by ``config.seed``) or
    ``"eval"`` (training images in order, unaugmented: a validation split, a measurement
    subset). ``labels`` are the training labels the model sees (noisy or not; default the
    dataset's), ``index`` selects images, in its order (default: all, uncopied); with label
    noise the loader also yields the true labels, for ``train_acc_clean`` and ``val_acc_clean``.
    """
    if part == "test":
        images, targets, clean = dataset.x_test, dataset.y_test, None
    elif part in ("train", "eval"):
        targets = dataset.y_train if labels is None else labels
        noisy = config is not None and bool(config.label_noise)
        clean = dataset.y_train if noisy else None
        images = dataset.x_train
        if index is not None:
            images, targets = images[index], targets[index]
            clean = None if clean is None else clean[index]
    else:
        raise ValueError(f"build_loader: part got {part!r}; expected 'train', 'eval' or 'test'")
    augment: dict[str, Any] = {}
    if part == "train":
        if config is None:
            raise ValueError("build_loader: part 'train' needs the run's config")
        on = config.augment
        cutout = dataset.cutout if config.cutout is None else config.cutout
        augment = dict(
            crop_padding=dataset.crop_padding if on else 0,
            hflip=dataset.hflip and on,
            cutout=cutout if on else 0,
            seed=config.seed,
        )
    return BatchLoader(
        images,
        targets,
        clean_labels=clean,
        batch_size=batch_size,
        mean=dataset.mean,
        std=dataset.std,
        train=part == "train",
        rank=rank,
        world_size=world_size,
        device=device,
        **augment,
    )


def base_optimizer(config: RunConfig) -> tuple[type[torch.optim.Optimizer], dict[str, Any]]:
    """The class and hyperparameters of ``--base-optimizer``: SGD (momentum, Nesterov, L2 weight
    decay) or AdamW (Loshchilov & Hutter, ICLR 2019: decoupled weight decay)."""
    if config.base_optimizer == "adamw":
        hyper = dict(lr=config.lr, betas=config.betas, weight_decay=config.weight_decay)
        return torch.optim.AdamW, hyper
    hyper = dict(
        lr=config.lr,
        momentum=config.momentum,
        weight_decay=config.weight_decay,
        nesterov=config.nesterov,
    )
    return torch.optim.SGD, hyper


def build_optimizer(model: nn.Module, config: RunConfig) -> torch.optim.Optimizer:
    """The base optimizer alone (``--optimizer sgd``), or SAM around it with the rule the
    optimizer name stands for (:data:`aace.training.config.OPTIMIZER_TABLE`)."""
    base, hyper = base_optimizer(config)
    info = config.info
    if not info.second_pass:
        return base(model.parameters(), **hyper)
    return SAM(
        model.parameters(),
        base,
        rho=config.resolved_rho,
        perturbation=info.rule,
        adaptive=info.adaptive,
        perturbation_weight_decay=config.perturbation_weight_decay,
        track_stats=True,
        **hyper,
    )


def build_schedule(config: RunConfig, total_steps: int) -> SAMSchedule | None:
    """The run's :class:`SAMSchedule`, or None when every step is a SAM step (or for SGD).
    ``--sam-start F`` makes the steps before ``ceil(F * total_steps)`` plain."""
    if not config.info.second_pass:
        return None
    if config.sam_every == 1 and config.sam_start == 0 and config.sam_adaptive is None:
        return None
    return SAMSchedule(
        every=config.sam_every,
        start_step=math.ceil(config.sam_start * total_steps),
        adaptive=config.sam_adaptive,
    )


def lr_milestones(config: RunConfig) -> list[int]:
    """The paper code's step schedule: x0.2 at 30 %, 60 % and 80 % of training."""
    return [max(1, round(config.epochs * f)) for f in (0.3, 0.6, 0.8)]


def build_scheduler(
    optimizer: torch.optim.Optimizer, config: RunConfig
) -> torch.optim.lr_scheduler.LRScheduler:
    if config.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.epochs)
    return torch.optim.lr_scheduler.MultiStepLR(optimizer, lr_milestones(config), gamma=0.2)


@dataclass
class TrainingParts:
    """What one process of a run trains with (:func:`build_training`)."""

    model: nn.Module  # the bare model (what checkpoints hold)
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    step: TrainStep  # on the DDP wrapper and/or torch.compile of the model, when used
    train_loader: BatchLoader
    test_loader: BatchLoader
    val_loader: BatchLoader | None  # the validation split, when the run has one
    train_size: int  # images in the training part (all ranks)
    val_size: int


def build_training(
    config: RunConfig, dataset: InMemoryDataset, device: torch.device, context: Distributed
) -> TrainingParts:
    """The model (the same initial weights on every rank, from ``config.seed``), wrapped for
    DDP under torchrun, its optimizer, scheduler and step, and this rank's loaders of the
    training part, the test set and the validation split. Errors that depend only on the
    data and the config are raised alike on every rank."""
    try:
        labels, train_part, val_part = split_training_set(config, dataset)
    except ValueError as error:  # a function of the data and the config: alike on all ranks
        raise on_all_ranks(error) from None
    if config.batch_size > len(train_part):
        what = "training part" if config.val_split else "training set"
        raise on_all_ranks(
            ConfigError(
                f"--batch-size: got {config.batch_size}, larger than the {dataset.name} "
                f"{what} ({len(train_part)} images); expected at most {len(train_part)}"
            )
        )
    torch.manual_seed(config.seed)  # the same initial model on every rank
    model = build_model(config, dataset).to(device)
    model, ddp = distributed.wrap_model(model, context, device, config.sync_bn)
    if context.enabled:
        # Dropout masks and AACE's "rand" weights differ across ranks.
        torch.manual_seed(derive_seed(config.seed, context.rank))
    optimizer = build_optimizer(model, config)
    shard = dict(rank=context.rank, world_size=context.world_size)
    whole = len(train_part) == len(labels)  # no split: no copy
    train_loader = build_loader(
        dataset, "train", device, config=config, labels=labels,
        index=None if whole else train_part,
        batch_size=config.per_rank_batch_size(context.world_size), **shard,
    )  # fmt: skip
    step_model = ddp if ddp is not None else model
    if config.compile:
        step_model = torch.compile(step_model)
    schedule = build_schedule(config, config.epochs * len(train_loader))
    val_loader = None
    if len(val_part):
        val_loader = build_loader(
            dataset, "eval", device, config=config, labels=labels, index=val_part, **shard
        )
    return TrainingParts(
        model=model,
        optimizer=optimizer,
        scheduler=build_scheduler(optimizer, config),
        step=TrainStep(step_model, optimizer, config, device, ddp=ddp, schedule=schedule),
        train_loader=train_loader,
        test_loader=build_loader(dataset, "test", device, **shard),
        val_loader=val_loader,
        train_size=len(train_part),
        val_size=len(val_part),
    )
