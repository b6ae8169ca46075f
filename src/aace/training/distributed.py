"""torchrun/DDP for ``aace train``: process group, per-rank device, reductions, rank-0 I/O.

``torchrun --nproc-per-node=N -m aace train ...`` starts N processes with ``RANK``,
``LOCAL_RANK`` and ``WORLD_SIZE`` in their environment. :func:`setup` turns that into a
:class:`Distributed` context: with ``WORLD_SIZE > 1`` it initializes the default process group
(``nccl`` on CUDA, ``gloo`` on the CPU) and gives each process its own device (``cuda:LOCAL_RANK``);
otherwise it is a one-process context whose collectives are no-ops, so one process behaves
exactly as without torchrun. A process group that the caller already initialized is used as is
(and left for the caller to destroy).

Rules the trainer follows with it:

* every rank runs the same collectives in the same order; values that decide control flow
  (errors, skipped steps, the epoch's non-finite check) are agreed on by all ranks;
* rank 0 alone touches the run directory: it checks it, reads the checkpoint and broadcasts it,
  writes the config, metrics, checkpoints and summary, and logs. The run directory therefore only
  has to exist on rank 0's node;
* metrics are reduced across ranks once per epoch (:meth:`Distributed.gather`), never per step.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist

# Imported before any process group exists, on purpose. DistributedDataParallel's constructor
# imports torch._dynamo, which imports torch.distributed.nn.functional, whose collectives take
# ``group=group.WORLD`` as a default argument. Imported after init_process_group, those defaults
# hold the default group until the interpreter is torn down: destroy_process_group cannot free
# it, and gloo (which has no shutdown) keeps its worker and TCP-loop threads running through
# interpreter shutdown, where the process can die of SIGABRT ("terminate called without an
# active exception"). Imported first, the defaults are None and destroying the group joins them.
import torch.distributed.nn  # noqa: F401
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from aace.training.config import ConfigError

__all__ = [
    "Distributed",
    "broadcast_buffers",
    "max_across_ranks_",
    "on_all_ranks",
    "raised_on_all_ranks",
    "setup",
    "wrap_model",
]

T = TypeVar("T")


def on_all_ranks(error: BaseException) -> BaseException:
    """Mark ``error`` as raised identically on every rank (an agreed decision, or a check of
    inputs that every rank shares), so that the CLI reports it once, from rank 0."""
    error.aace_on_all_ranks = True  # type: ignore[attr-defined]
    return error


def raised_on_all_ranks(error: BaseException) -> bool:
    return getattr(error, "aace_on_all_ranks", False)


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        message = f"environment variable {name}: got {value!r}; expected an integer"
        raise ConfigError(message) from None


@dataclass
class Distributed:
    """Where this process stands in the job. ``world_size == 1``: no process group is used."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owns_group: bool = False  # initialized by setup(), so destroyed by close()
    # A second gloo group for host-side agreements (stop requests) that must neither wait for a
    # GPU nor interleave with DDP's collectives.
    control_group: Any = None

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the only process that writes files and logs."""
        return self.rank == 0

    def close(self) -> None:
        """Destroy the process group if :func:`setup` created it (the control group with it)."""
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()
        self.owns_group = False
        self.control_group = None

    # -- agreement and reductions ----------------------------------------------------------

    def gather(self, values: torch.Tensor) -> torch.Tensor:
        """``(world_size, *values.shape)``: every rank's ``values``, on every rank (one
        collective). The caller reduces the rows (sum, min, ...) as each quantity needs."""
        if not self.enabled:
            return values.unsqueeze(0)
        rows = [torch.empty_like(values) for _ in range(self.world_size)]
        dist.all_gather(rows, values.contiguous())
        return torch.stack(rows)

    def gather_objects(self, value: T) -> list[T]:
        """Every rank's picklable ``value``, in rank order."""
        if not self.enabled:
            return [value]
        values: list[Any] = [None] * self.world_size
        dist.all_gather_object(values, value)
        return values

    def run_on_main(self, fn: Callable[[], T]) -> T:
        """Rank 0 calls ``fn``; its result, or its exception, reaches every rank."""
        result, error = None, None
        if self.is_main:
            result, error = _call(fn)
        if self.enabled:
            payload = [(result, _picklable(error))]
            dist.broadcast_object_list(payload, src=0)
            if not self.is_main:
                result, error = payload[0]
        if error is not None:
            raise on_all_ranks(error)
        return result  # type: ignore[return-value]

    def main_first(self, fn: Callable[[], T]) -> T:
        """Every rank calls ``fn``, rank 0 before the others (so a download happens once); an
        exception on any rank is raised on every rank."""
        result, error = None, None
        if self.is_main:
            result, error = _call(fn)
        self._raise_any(error)
        if not self.is_main:
            result, error = _call(fn)
        self._raise_any(error)
        return result  # type: ignore[return-value]

    def _raise_any(self, error: BaseException | None) -> None:
        errors = self.gather_objects(_picklable(error))
        failed = [rank for rank, e in enumerate(errors) if e is not None]
        if failed:  # every rank raises the same error: the lowest failing rank's
            raise on_all_ranks(error if failed[0] == self.rank else errors[failed[0]])


def _call(fn: Callable[[], T]) -> tuple[T | None, Exception | None]:
    try:
        return fn(), None
    except Exception as error:  # re-raised on every rank by the caller
        return None, error


def _picklable(error: BaseException | None) -> BaseException | None:
    if error is None:
        return None
    try:
        pickle.loads(pickle.dumps(error))
        return error
    except Exception:
        return RuntimeError(f"{type(error).__name__}: {error}")


def setup(device: torch.device) -> tuple[Distributed, torch.device]:
    """The process's :class:`Distributed` context and training device.

    ``device`` is the resolved ``--device`` (its type is what matters). Under torchrun
    (``WORLD_SIZE > 1``) the default process group is initialized here with ``nccl`` for CUDA and
    ``gloo`` for the CPU, and a CUDA process gets ``cuda:LOCAL_RANK``.
    """
    if dist.is_available() and dist.is_initialized():
        rank, world_size, owns = dist.get_rank(), dist.get_world_size(), False
    else:
        rank, world_size, owns = _env_int("RANK", 0), _env_int("WORLD_SIZE", 1), False
    local_rank = _env_int("LOCAL_RANK", rank)
    context = Distributed(rank=rank, world_size=world_size, local_rank=local_rank)
    if world_size <= 1:
        return context, device
    if device.type not in ("cuda", "cpu"):
        raise ConfigError(
            f"--device: got {device.type} with {world_size} processes; distributed training "
            "runs on cuda (nccl) or cpu (gloo)"
        )
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise ConfigError(
                f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} CUDA device(s) "
                "visible; expected --nproc-per-node <= the number of GPUs per node"
            )
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        if not dist.is_available():
            raise ConfigError("WORLD_SIZE > 1 but this PyTorch build has no torch.distributed")
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(
            backend=backend,
            device_id=device if device.type == "cuda" else None,
            **_restart_store(rank, world_size),
        )
        owns = True
    context.owns_group = owns
    context.control_group = dist.new_group(backend="gloo")
    return context, device


def _restart_store(rank: int, world_size: int) -> dict[str, Any]:
    """Under ``torchrun --max-restarts``: the rendezvous store, with keys under this launch's
    restart count. torchrun reuses its store across restarts, and a restarted group that reads
    the previous launch's addresses fails to connect or hangs (seen with torch 2.14 and gloo);
    a prefix per restart keeps the launches apart. Empty (``env://`` as usual) otherwise."""
    restart = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    if restart is None:
        return {}
    store, _, _ = next(dist.rendezvous("env://", rank=rank, world_size=world_size))
    prefixed = dist.PrefixStore(f"/aace/restart_{restart}", store)
    return {"store": prefixed, "rank": rank, "world_size": world_size}


def wrap_model(
    model: nn.Module, context: Distributed, device: torch.device, sync_bn: bool = False
) -> tuple[nn.Module, DistributedDataParallel | None]:
    """``(model, ddp)``: with several processes, ``model`` with SyncBatchNorm if asked, and its
    ``DistributedDataParallel`` wrapper (which broadcasts rank 0's parameters and buffers);
    with one process, ``(model, None)``. Call before building the optimizer: SyncBatchNorm
    conversion keeps the parameters but replaces the BatchNorm modules.
    """
    if not context.enabled:
        return model, None
    if sync_bn:
        if device.type != "cuda":
            raise ConfigError(
                f"--sync-bn: SyncBatchNorm needs CUDA devices, got {device.type}; "
                "use --no-sync-bn on the CPU"
            )
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    device_ids = [device.index] if device.type == "cuda" else None
    return model, DistributedDataParallel(model, device_ids=device_ids)


def broadcast_buffers(model: nn.Module, context: Distributed) -> None:
    """Copy rank 0's buffers (BatchNorm running statistics) to every rank.

    DDP broadcasts them at the start of each synchronized forward pass, but a rank's last
    forward pass updates its own copy from its own shard; before evaluation every rank takes
    rank 0's, which are the ones checkpointed.
    """
    if not context.enabled:
        return
    for buffer in model.buffers():
        dist.broadcast(buffer, src=0)


def max_across_ranks_(tensor: torch.Tensor) -> torch.Tensor:
    """All-reduce ``tensor`` with ``MAX`` in place (a no-op without a process group of more
    than one rank); for flags that every rank must agree on, such as "skip this step"."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor
