"""The application half: run configuration, the training step, the trainer, checkpoints."""

from aace.training.config import PRESETS, ConfigError, RunConfig
from aace.training.trainer import Trainer

__all__ = ["PRESETS", "ConfigError", "RunConfig", "Trainer"]
