"""timm architectures by name: ``--model timm:NAME`` and ``create_model("timm:NAME", ...)``.

The model is built with the dataset's ``num_classes`` and ``in_chans``; architectures with a
fixed input size (vision transformers, whose position embeddings depend on it) are built for the
dataset's image size, e.g. ``timm:vit_tiny_patch16_224`` at 32 px has 2 x 2 patches of 16 px.

Weights are random unless ``pretrained=True``, and then they come only from a local cache: the
Hugging Face hub cache (``HF_HUB_CACHE``) or torch.hub's (``TORCH_HOME``), where an earlier
``timm.create_model(NAME, pretrained=True)`` with network access put them. Nothing is downloaded;
timm adapts the classifier and the first convolution to ``num_classes`` and ``in_chans``.
"""

from __future__ import annotations

import difflib
import os
from typing import Any

from torch import nn

from aace.integrations import require

__all__ = ["PREFIX", "create_timm_model"]

PREFIX = "timm:"
"""A model name that starts with this (``timm:resnet18``) is built by timm."""
_HUB_FILES = ("model.safetensors", "pytorch_model.bin")


def _timm() -> Any:
    return require("timm", "timm", "--model timm:NAME")


def _unknown(name: str, timm: Any) -> ValueError:
    close = difflib.get_close_matches(name, timm.list_models(), n=3, cutoff=0.7)
    hint = f"did you mean {', '.join(PREFIX + c for c in close)}? " if close else ""
    return ValueError(
        f'unknown timm model {PREFIX + name!r}; {hint}list names with: python -c "import timm; '
        f"print(timm.list_models('*vit*'))\""
    )


def _cached_weights(name: str, pretrained_cfg: Any) -> str:
    """The path of the model's pretrained weights in a local cache, or a ValueError saying how to
    put them there."""
    hub_id = getattr(pretrained_cfg, "hf_hub_id", None)
    if hub_id:
        from huggingface_hub import try_to_load_from_cache

        for filename in _HUB_FILES:
            path = try_to_load_from_cache(hub_id, filename)
            if isinstance(path, str):
                return path
    url = getattr(pretrained_cfg, "url", None)
    if url:
        import torch.hub

        path = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(url))
        if os.path.isfile(path):
            return path
    where = f"Hugging Face hub {hub_id!r}" if hub_id else (url or "nowhere: it has none")
    raise ValueError(
        f"--pretrained: no cached weights for {PREFIX}{name} (from {where}); aace never downloads "
        f"them: run python -c \"import timm; timm.create_model('{name}', pretrained=True)\" once "
        "with network access, or train without --pretrained"
    )


def create_timm_model(
    name: str,
    num_classes: int,
    in_channels: int = 3,
    dropout: float = 0.0,
    image_size: tuple[int, int] | int | None = None,
    pretrained: bool = False,
) -> nn.Module:
    """``timm.create_model(name)`` for a dataset.

    Args:
        name: a timm architecture (without the ``timm:`` prefix); it may carry timm's
            pretrained tag (``vit_tiny_patch16_224.augreg_in21k``).
        num_classes: the number of logits.
        in_channels: input channels (1 for grey images, 3 for RGB).
        dropout: dropout probability before the classifier (timm's ``drop_rate``).
        image_size: the dataset's image size in pixels (an int or (height, width)); passed as
            ``img_size`` to architectures with a fixed input size (vision transformers).
        pretrained: load the pretrained weights, from the local cache only.

    Returns:
        The model; it maps ``(N, in_channels, H, W)`` images to ``(N, num_classes)`` logits.

    Raises:
        MissingExtraError: timm is not installed (``pip install 'aace[timm]'``).
        ValueError: an unknown name (with close ones suggested), ``pretrained`` for an
            architecture without weights or without them in the local cache, or a
            configuration timm cannot build.
    """
    timm = _timm()
    if not timm.is_model(name):
        raise _unknown(name, timm)
    pretrained_cfg = timm.models.get_pretrained_cfg(name, allow_unregistered=True)
    kwargs: dict[str, Any] = dict(num_classes=num_classes, in_chans=in_channels)
    if dropout > 0:
        kwargs["drop_rate"] = dropout
    if image_size is not None and pretrained_cfg is not None and pretrained_cfg.fixed_input_size:
        kwargs["img_size"] = image_size
    if pretrained:
        if pretrained_cfg is None:
            raise ValueError(f"--pretrained: timm model {PREFIX}{name} has no pretrained weights")
        kwargs["pretrained_cfg_overlay"] = dict(file=_cached_weights(name, pretrained_cfg))
    try:
        return timm.create_model(name, pretrained=pretrained, **kwargs)
    except (TypeError, ValueError, AssertionError, RuntimeError) as error:
        first_line = (str(error).strip().splitlines() or [repr(error)])[0]
        raise ValueError(
            f"timm could not build {PREFIX}{name} for {in_channels}-channel images of size "
            f"{image_size} and {num_classes} classes ({first_line})"
        ) from error
