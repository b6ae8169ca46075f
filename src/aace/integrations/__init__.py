"""Optional ecosystems, each in its own module and imported only when used.

* :mod:`aace.integrations.tensorboard`: ``aace train --tensorboard``
  (``pip install 'aace[tensorboard]'``)
* :mod:`aace.integrations.timm`: ``--model timm:NAME`` (``pip install 'aace[timm]'``)
* :mod:`aace.integrations.lightning`: SAM+AACE under ``lightning.Trainer``
  (``pip install 'aace[lightning]'``)

The core never imports these modules; a missing package gives a one-line ``ImportError`` that
names the extra which brings it (:func:`require`).
"""

from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["MissingExtraError", "require"]


class MissingExtraError(ImportError):
    """An optional dependency is not installed; the message names the extra that brings it."""


def require(module: str, extra: str, feature: str, package: str | None = None) -> ModuleType:
    """Import ``module``, or raise :class:`MissingExtraError` naming the extra to install.

    ``package`` is the missing distribution's name when it differs from the module's top level
    (``torch.utils.tensorboard`` needs ``tensorboard``)."""
    try:
        return importlib.import_module(module)
    except ImportError as error:
        package = package or module.split(".")[0]
        raise MissingExtraError(
            f"{feature} needs the package '{package}', which is not installed; "
            f"install it with: pip install 'aace[{extra}]'"
        ) from error
