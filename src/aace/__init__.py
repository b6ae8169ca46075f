"""aace: Sharpness-Aware Minimization with the Adaptive Adversarial Cross-Entropy loss."""

from importlib.metadata import PackageNotFoundError, version

from aace.batchnorm import frozen_batchnorm_stats, frozen_running_stats
from aace.losses import AACE_MODES, BISAM_BOUNDS, AACELoss, BiSAMLoss, aace_loss, bisam_loss
from aace.sam import PERTURBATIONS, SAM

try:
    __version__ = version("aace")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0"

__all__ = [
    "AACE_MODES",
    "AACELoss",
    "BISAM_BOUNDS",
    "BiSAMLoss",
    "PERTURBATIONS",
    "SAM",
    "__version__",
    "aace_loss",
    "bisam_loss",
    "frozen_batchnorm_stats",
    "frozen_running_stats",
]
