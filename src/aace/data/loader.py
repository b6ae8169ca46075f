"""On-device mini-batches with batched (vectorised) augmentation and per-rank sharding.

:class:`BatchLoader` keeps the whole uint8 dataset on one device and builds every batch with a
handful of tensor ops on the whole batch: index -> random crop -> horizontal flip -> float and
normalise -> Cutout. There are no per-image Python loops and no host synchronisation
(``.item()``, ``.cpu()``, ``.tolist()``) on the hot path.

Randomness is a pure function of ``(seed, epoch, rank)``. Each ``__iter__`` creates two fresh
``torch.Generator`` objects on the loader's device:

* the *shuffle* generator, seeded from ``(seed, epoch)`` only, so every rank draws the same global
  permutation;
* the *augmentation* generator, seeded from ``(seed, epoch, rank)``.

Hence resuming at epoch ``e`` (``set_epoch(e)``) reproduces epoch ``e`` exactly without saving
any loader state, and iterating the same epoch twice gives identical batches. The random streams
depend on the device type (CPU and CUDA generators differ), not on the batch contents.
Random numbers are only drawn for enabled augmentations, in this order per batch: crop offsets
(rows, then columns), flip mask, Cutout (apply mask, top, left).

Sharding: training shuffles the global index set with the shared permutation, truncates it to a
multiple of ``world_size`` and gives rank ``r`` the elements ``perm[r::world_size]``, so all ranks
see the same number of samples (hence the same number of steps), the shards are disjoint and
together cover the dataset except for fewer than ``world_size`` samples. Evaluation
(``train=False``) uses no shuffle and no augmentation and gives rank ``r`` the indices
``r, r + world_size, ...`` with no padding: every sample is evaluated exactly once across ranks,
but ranks may get different numbers of samples/batches, so evaluation code must accumulate
per-rank *sums and counts* and reduce them once at the end (never per-batch collectives).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["BatchLoader", "derive_seed"]

_SHUFFLE_STREAM = 0
_AUGMENT_STREAM = 1


def derive_seed(*words: int) -> int:
    """A well-mixed 63-bit seed from non-negative integers (a pure function of ``words``)."""
    state = np.random.SeedSequence(list(words)).generate_state(2, dtype=np.uint32)
    return ((int(state[0]) << 32) | int(state[1])) & ((1 << 63) - 1)


def _random_crop(
    x: torch.Tensor, padding: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Batched ``RandomCrop(size=(H, W), padding=padding)`` with zero padding.

    Returns ``(crops, top, left)`` where ``top``/``left`` (int64, ``(B,)``) are the offsets of each
    crop in the padded image, drawn uniformly from ``[0, 2 * padding]`` (rows first).
    """
    b, c, h, w = x.shape
    dev = x.device
    top = torch.randint(0, 2 * padding + 1, (b,), generator=generator, device=dev)
    left = torch.randint(0, 2 * padding + 1, (b,), generator=generator, device=dev)
    padded = F.pad(x, (padding, padding, padding, padding))
    rows = (top[:, None] + torch.arange(h, device=dev))[:, None, :, None]  # (B, 1, H, 1)
    cols = (left[:, None] + torch.arange(w, device=dev))[:, None, None, :]  # (B, 1, 1, W)
    bidx = torch.arange(b, device=dev)[:, None, None, None]
    cidx = torch.arange(c, device=dev)[None, :, None, None]
    return padded[bidx, cidx, rows, cols], top, left


def _random_hflip(x: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Flip each sample horizontally with probability 0.5; returns ``(out, flipped_mask)``."""
    flip = torch.rand(x.shape[0], generator=generator, device=x.device) < 0.5
    return torch.where(flip[:, None, None, None], x.flip(3), x), flip


def _cutout(
    x: torch.Tensor, size: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Batched Cutout as in davda54/sam ``example/utility/cutout.py`` (p = 0.5).

    For each sample, with probability 0.5, the square of side ``size`` whose top-left corner is
    drawn uniformly from ``[-size // 2, H - size // 2)`` x ``[-size // 2, W - size // 2)``,
    clipped to the image, is set to 0. Returns ``(out, mask)`` with ``mask`` (bool, ``(B, 1, H,
    W)``) marking the zeroed pixels.
    """
    b, _, h, w = x.shape
    dev = x.device
    half = size // 2
    apply = torch.rand(b, generator=generator, device=dev) < 0.5
    top = torch.randint(-half, h - half, (b,), generator=generator, device=dev)
    left = torch.randint(-half, w - half, (b,), generator=generator, device=dev)
    r = torch.arange(h, device=dev)[None, :]
    c = torch.arange(w, device=dev)[None, :]
    in_rows = (r >= top[:, None]) & (r < top[:, None] + size)  # (B, H)
    in_cols = (c >= left[:, None]) & (c < left[:, None] + size)  # (B, W)
    mask = (in_rows[:, :, None] & in_cols[:, None, :] & apply[:, None, None])[:, None]
    return x.masked_fill(mask, 0), mask


class BatchLoader:
    """Iterate ``(x, y)`` mini-batches of an in-memory uint8 image dataset on one device.

    Args:
        images: uint8 tensor ``(N, C, H, W)``; moved once to ``device`` and kept there.
        labels: integer tensor ``(N,)``; stored as int64 on ``device``.
        clean_labels: optional integer tensor ``(N,)``: the true labels when ``labels`` are
            corrupted (label-noise runs); batches then carry them as a third element.
        batch_size: samples per batch (per rank).
        mean: per-channel normalisation mean (length ``C``), subtracted from ``x / 255``.
        std: per-channel normalisation standard deviation (length ``C``), dividing the result.
        train: shuffle + augment (True) or sequential, unaugmented evaluation (False).
        crop_padding: zero padding of the random crop (0 disables it). Train only.
        hflip: random horizontal flips with probability 0.5. Train only.
        cutout: Cutout square side (0 disables it). Train only.
        seed: base seed (>= 0); see the module docstring for how randomness is derived.
        rank: this process's shard, ``0 <= rank < world_size``.
        world_size: the number of shards (processes).
        drop_last: drop the last incomplete batch; defaults to True for training, False for
            evaluation. Training ranks always have equal sample counts, so they run the same
            number of steps either way.
        device: where the data lives and batches are produced (default: ``images.device``).
        dtype: floating dtype of the produced images (default float32).

    Yields ``x`` of shape ``(B, C, H, W)`` and dtype ``dtype``, normalised, and ``y`` int64
    ``(B,)``, both on ``device``; with ``clean_labels``, ``(x, y, clean_y)``.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        *,
        clean_labels: torch.Tensor | None = None,
        batch_size: int,
        mean: Sequence[float] | torch.Tensor,
        std: Sequence[float] | torch.Tensor,
        train: bool,
        crop_padding: int = 0,
        hflip: bool = False,
        cutout: int = 0,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        drop_last: bool | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8 or images.ndim != 4:
            desc = (
                f"{images.dtype} tensor of shape {tuple(images.shape)}"
                if isinstance(images, torch.Tensor)
                else type(images).__name__
            )
            raise ValueError(f"images: got {desc}; expected a uint8 tensor of shape (N, C, H, W)")
        _check_labels("labels", labels, images.shape[0])
        if clean_labels is not None:
            _check_labels("clean_labels", clean_labels, images.shape[0])
        _check_int("batch_size", batch_size, minimum=1)
        _check_int("world_size", world_size, minimum=1)
        _check_int("rank", rank, minimum=0)
        if rank >= world_size:
            raise ValueError(f"rank: got {rank}; expected 0 <= rank < world_size={world_size}")
        _check_int("crop_padding", crop_padding, minimum=0)
        _check_int("cutout", cutout, minimum=0)
        _check_int("seed", seed, minimum=0)
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise ValueError(f"dtype: got {dtype!r}; expected a floating-point torch.dtype")

        self.device = torch.device(device) if device is not None else images.device
        channels = int(images.shape[1])
        mean_t = torch.as_tensor(mean, dtype=torch.float64).flatten()
        std_t = torch.as_tensor(std, dtype=torch.float64).flatten()
        if mean_t.numel() != channels:
            raise ValueError(
                f"mean: got {mean_t.numel()} values; expected one per channel ({channels})"
            )
        if std_t.numel() != channels:
            raise ValueError(
                f"std: got {std_t.numel()} values; expected one per channel ({channels})"
            )
        if not bool((std_t > 0).all()):
            raise ValueError(f"std: got {tuple(std_t.tolist())}; expected all values > 0")

        self.images = images.to(self.device).contiguous()
        self.labels = labels.to(device=self.device, dtype=torch.int64).contiguous()
        self.clean_labels = (
            None
            if clean_labels is None
            else clean_labels.to(device=self.device, dtype=torch.int64).contiguous()
        )
        self.mean = mean_t.to(device=self.device, dtype=dtype).view(1, channels, 1, 1)
        self.std = std_t.to(device=self.device, dtype=dtype).view(1, channels, 1, 1)
        self.batch_size = int(batch_size)
        self.train = bool(train)
        self.crop_padding = int(crop_padding)
        self.hflip = bool(hflip)
        self.cutout = int(cutout)
        self.seed = int(seed)
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.drop_last = self.train if drop_last is None else bool(drop_last)
        self.dtype = dtype
        self.epoch = 0
        self._resume: tuple[int, torch.Tensor | None] | None = None
        self._live_generator: torch.Generator | None = None
        self._position = 0

        if len(self) == 0 and images.shape[0] > 0:
            raise ValueError(
                f"batch_size: got {batch_size} with only {self.num_samples} samples on rank "
                f"{rank} and drop_last=True, which yields no batches; expected batch_size <= "
                f"{self.num_samples} (or pass drop_last=False)"
            )

    # ----------------------------------------------------------------------------------------

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose shuffle/augmentation the next ``__iter__`` reproduces."""
        _check_int("epoch", epoch, minimum=0)
        self.epoch = int(epoch)

    @property
    def num_samples(self) -> int:
        """Number of samples this rank sees per epoch."""
        n = int(self.images.shape[0])
        if self.train:
            return n // self.world_size
        return len(range(self.rank, n, self.world_size))

    def __len__(self) -> int:
        """Number of batches per epoch on this rank."""
        if self.drop_last:
            return self.num_samples // self.batch_size
        return -(-self.num_samples // self.batch_size)

    def _generator(self, seed: int) -> torch.Generator:
        g = torch.Generator(device=self.device)
        g.manual_seed(seed)
        return g

    def _shuffle_generator(self, epoch: int) -> torch.Generator:
        return self._generator(derive_seed(self.seed, epoch, _SHUFFLE_STREAM))

    def _augment_generator(self, epoch: int) -> torch.Generator:
        return self._generator(derive_seed(self.seed, epoch, _AUGMENT_STREAM, self.rank))

    def indices(self, epoch: int | None = None) -> torch.Tensor:
        """The sample indices this rank visits in ``epoch`` (default: the current epoch), in order.

        Includes the samples of a final incomplete batch even when ``drop_last`` drops them.
        """
        epoch = self.epoch if epoch is None else epoch
        n = int(self.images.shape[0])
        if not self.train:
            return torch.arange(self.rank, n, self.world_size, device=self.device)
        perm = torch.randperm(
            n, generator=self._shuffle_generator(epoch), device=self.device, dtype=torch.int64
        )
        total = (n // self.world_size) * self.world_size
        return perm[:total][self.rank :: self.world_size]

    def _augment(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """uint8 batch -> augmented, normalised float batch (crop, flip, normalise, Cutout)."""
        if self.crop_padding > 0:
            x, _, _ = _random_crop(x, self.crop_padding, generator)
        if self.hflip:
            x, _ = _random_hflip(x, generator)
        x = self._normalize(x)
        if self.cutout > 0:
            x, _ = _cutout(x, self.cutout, generator)
        return x

    def _normalize(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.dtype)
        x.div_(255.0).sub_(self.mean).div_(self.std)
        return x

    def state_dict(self) -> dict[str, Any]:
        """Where the current epoch's iteration stands: the epoch, the number of batches yielded
        and the augmentation generator's state after them. :meth:`load_state_dict` makes the
        next ``__iter__`` continue from there, batch for batch (for mid-epoch checkpoints)."""
        generator = self._live_generator
        return {
            "epoch": self.epoch,
            "position": self._position,
            "augment_state": generator.get_state() if generator is not None else None,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue the epoch of ``state`` at its position. Without ``augment_state`` (a
        checkpoint of another rank layout) the augmentation stream restarts from its seed."""
        self.set_epoch(int(state["epoch"]))
        _check_int("position", state["position"], minimum=0)
        if state["position"] > len(self):
            raise ValueError(
                f"position: got {state['position']}; expected at most {len(self)} batches"
            )
        self._resume = (int(state["position"]), state.get("augment_state"))

    def __iter__(self) -> Iterator[tuple[torch.Tensor, ...]]:
        epoch = self.epoch
        idx = self.indices(epoch)
        generator = self._augment_generator(epoch) if self.train else None
        start, augment_state = self._resume or (0, None)
        self._resume = None
        if generator is not None and augment_state is not None:
            generator.set_state(augment_state)
        self._live_generator, self._position = generator, start
        bs = self.batch_size
        for b in range(start, len(self)):
            batch = idx[b * bs : (b + 1) * bs]
            x = self.images.index_select(0, batch)
            y = self.labels.index_select(0, batch)
            if generator is not None:
                x = self._augment(x, generator)
            else:
                x = self._normalize(x)
            self._position = b + 1
            if self.clean_labels is None:
                yield x, y
            else:
                yield x, y, self.clean_labels.index_select(0, batch)

    def __repr__(self) -> str:
        c, h, w = (int(s) for s in self.images.shape[1:])
        return (
            f"BatchLoader(n={self.images.shape[0]}, shape=({c}, {h}, {w}), "
            f"batch_size={self.batch_size}, train={self.train}, "
            f"crop_padding={self.crop_padding}, hflip={self.hflip}, cutout={self.cutout}, "
            f"rank={self.rank}/{self.world_size}, drop_last={self.drop_last}, "
            f"batches={len(self)}, device={self.device})"
        )


def _check_labels(name: str, labels: object, n: int) -> None:
    if not isinstance(labels, torch.Tensor) or labels.ndim != 1:
        desc = (
            f"tensor of shape {tuple(labels.shape)}"
            if isinstance(labels, torch.Tensor)
            else type(labels).__name__
        )
        raise ValueError(f"{name}: got {desc}; expected a 1-D integer tensor")
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise ValueError(f"{name}: got dtype {labels.dtype}; expected an integer tensor")
    if labels.shape[0] != n:
        raise ValueError(
            f"{name}: got {labels.shape[0]} labels for {n} images; expected the same length"
        )


def _check_int(name: str, value: object, *, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < minimum:
        raise ValueError(f"{name}: got {value!r}; expected an integer >= {minimum}")
