"""Input pipeline: images/s of ``BatchLoader`` against torchvision's ``DataLoader`` + PIL.

Rerun the reported measurement from the repository root with:

    .venv/bin/python -m benchmarks.micro.pipeline

(``--dataset npz:PATH`` for other data, ``--workers N`` repeatable for the DataLoader worker
counts, ``--repeats``/``--warmup`` epochs, ``--train-steps`` for the data-wait loop.)

Both pipelines read the same in-memory uint8 training images (default: the 5085-image CIFAR-10
subset ``../shared/data/cifar10_5k.npz``, loaded with ``aace.data.load_dataset``) and apply the
same training augmentation, normalising with the dataset's own mean/std, batch 128, drop_last:

* ``BatchLoader``: ``aace.data.BatchLoader(train=True, crop_padding=4, hflip=True, cutout=16)``,
  batched tensor ops on the whole batch, on the CPU here.
* ``DataLoader W=n``: a ``torch.utils.data.Dataset`` over the same arrays as uint8 HWC numpy,
  each item turned into a ``PIL.Image`` and passed through
  ``T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor(),
  T.Normalize(mean, std), Cutout(16)])`` (:class:`Cutout` below, the davda54/sam per-image
  Cutout), ``DataLoader(batch_size=128, shuffle=True, num_workers=n, drop_last=True)``. With
  ``n > 0`` the workers are persistent (started once, in the first warm-up epoch), so the timed
  epochs do not pay the worker start-up; that cost is reported separately as the time to the
  first batch of the very first epoch ("cold first batch").

Epoch timing: one epoch = iterating every batch of the loader (``set_epoch(e)`` first for
``BatchLoader``). ``--warmup`` untimed epochs, then ``--repeats`` timed epochs per variant,
interleaved round-robin with a rotating start (``benchmarks.harness.time_interleaved``). The
speedup is BatchLoader images/s over each DataLoader's, given as the ratio of medians and the
median of per-round (paired) ratios.

Data-wait share: a short SGD training loop (``wrn10_1``, 10 classes, lr 0.1, momentum 0.9,
weight decay 5e-4, every pipeline starting from the same initial weights) fed by each pipeline;
each step times ``next(iterator)`` (the wait for data) and the whole step (fetch + forward +
backward + ``opt.step()``). The share is total fetch time / total step time over
``--train-steps`` steps, after ``--train-warmup`` untimed steps. DataLoader workers prefetch in
the background, so their wait can hide behind compute, but on a small CPU they also compete
with it for cores.

On a GPU (``--device cuda``; ``benchmarks/gpu/run_all.sh`` runs it with ``--model wrn16_8``),
``BatchLoader`` keeps the dataset on the GPU and builds each batch there; the DataLoader
variants use ``pin_memory=True`` and copy each batch with ``non_blocking=True``, and the copy
counts as part of fetching. Epochs are timed with ``torch.cuda.synchronize()`` before reading
the clock. Because CUDA work is queued asynchronously, the data-wait share is measured three
ways, each over ``--train-steps`` steps after ``--train-warmup`` untimed ones:

* synchronized: ``torch.cuda.synchronize()`` before and after ``next(iterator)`` and after the
  step, host clock. Batch production and training are serialised: an upper bound.
* CUDA events: events recorded before ``next``, after it and after the step, no host
  synchronisation in the loop; fetch = GPU-stream time between the first two (the loader's
  kernels, the copy, and any time the GPU sat idle waiting for the host to queue them),
  share = fetch / step. This is the share in the pipelined loop ``aace train`` runs.
* end to end: wall time of the training loop fed by the pipeline against the same loop fed
  one fixed, already produced batch (``--repeats`` interleaved rounds);
  share = 1 - fixed / pipeline, the training time the pipeline costs.

``--amp bf16`` (repeatable) runs the loop under bf16 autocast as well: a faster step makes the
same loader a larger share.

Threads matter on a small, shared CPU: ``BatchLoader`` runs on PyTorch's intra-op threads, and
with the default thread count it slows down several-fold when other processes keep the cores
busy (oversubscription), while the DataLoader workers use one thread each. ``--threads 1``
gives a load-robust comparison there; the JSON records the thread count and load average.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms as T
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset

from aace.data import BatchLoader, DatasetError, load_dataset
from aace.models import create_model
from aace.training.step import autocast
from benchmarks import harness
from benchmarks.baselines import CIFAR_SGD_KWARGS

DEFAULT_DATASET = "npz:../shared/data/cifar10_5k.npz"
BATCH_SIZE = 128
CROP_PADDING = 4
CUTOUT = 16
MODEL = "wrn10_1"


class Cutout:
    """Per-image Cutout in the style of davda54/sam ``example/utility/cutout.py``.

    With probability ``p`` zero the ``size`` x ``size`` square (all channels) whose top-left
    corner is drawn uniformly from ``[-size // 2, H - size // 2)`` x ``[-size // 2, W - size //
    2)``, clipped to the image. Works in place on a ``(C, H, W)`` tensor and returns it.
    """

    def __init__(self, size: int = 16, p: float = 0.5) -> None:
        self.size = size
        self.half_size = size // 2
        self.p = p

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        if torch.rand([1]).item() > self.p:
            return image
        h, w = image.size(1), image.size(2)
        top = torch.randint(-self.half_size, h - self.half_size, [1]).item()
        left = torch.randint(-self.half_size, w - self.half_size, [1]).item()
        bottom = min(h, top + self.size)
        right = min(w, left + self.size)
        image[:, max(0, top) : bottom, max(0, left) : right] = 0
        return image


class PILDataset(Dataset):
    """Items ``(transform(PIL.Image.fromarray(images[i])), labels[i])`` of uint8 HWC arrays."""

    def __init__(self, images_hwc: np.ndarray, labels: np.ndarray, transform: Callable) -> None:
        self.images = images_hwc
        self.labels = labels
        self.transform = transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = Image.fromarray(self.images[index])
        return self.transform(image), int(self.labels[index])


def make_dataloader(
    images_hwc: np.ndarray,
    labels: np.ndarray,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    workers: int,
    batch_size: int = BATCH_SIZE,
    pin_memory: bool = False,
) -> DataLoader:
    size = images_hwc.shape[1]
    transform = T.Compose(
        [
            T.RandomCrop(size, padding=CROP_PADDING),
            T.RandomHorizontalFlip(),
            T.ToTensor(),
            T.Normalize(mean, std),
            Cutout(CUTOUT),
        ]
    )
    return DataLoader(
        PILDataset(images_hwc, labels, transform),
        batch_size=batch_size,
        shuffle=True,
        num_workers=workers,
        drop_last=True,
        persistent_workers=workers > 0,
        pin_memory=pin_memory,
    )


class Pipeline:
    """One loader behind a common interface: epochs, counted images, an endless batch stream.

    Batches of a host loader are copied to ``device`` (``non_blocking``: from pinned memory the
    copy is asynchronous); a ``BatchLoader`` already yields them there.
    """

    def __init__(
        self, loader: BatchLoader | DataLoader, device: torch.device | None = None
    ) -> None:
        self.loader = loader
        self.device = device if device is not None else torch.device("cpu")
        self.epoch = 0
        self.images_per_epoch = 0

    def _epoch_iter(self) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
        if isinstance(self.loader, BatchLoader):
            self.loader.set_epoch(self.epoch)
            self.epoch += 1
            return self.loader
        self.epoch += 1
        if self.device.type == "cpu":
            return self.loader
        return (
            (x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True))
            for x, y in self.loader
        )

    def run_epoch(self) -> None:
        images = 0
        for x, _ in self._epoch_iter():
            images += x.shape[0]
        self.images_per_epoch = images

    def cold_first_batch(self) -> float:
        """Seconds from creating the first epoch's iterator to its first batch (then drained)."""

        def first_batch() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
            iterator = iter(self._epoch_iter())
            next(iterator)
            return iterator

        iterator, elapsed = harness.timed(first_batch, harness.synchronizer(self.device))
        for _ in iterator:
            pass
        return elapsed

    def stream(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        while True:
            yield from self._epoch_iter()


def measure_data_wait(
    pipeline: Pipeline,
    base: nn.Module,
    steps: int,
    warmup: int,
    amp: str = "off",
    repeats: int = 3,
) -> dict[str, Any]:
    """Per-step fetch (``next``) and total seconds of an SGD loop fed by ``pipeline``.

    On the CPU the host clock (the only one). On CUDA also the CUDA-event and end-to-end
    shares of the module docstring.
    """
    device = pipeline.device
    model = copy.deepcopy(base).to(device).train()
    opt = torch.optim.SGD(model.parameters(), **CIFAR_SGD_KWARGS)
    stream = pipeline.stream()
    synchronize = harness.synchronizer(device)

    def train_step(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with autocast(device, amp):
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    last: dict[str, Any] = {}

    def one_step(laps: harness.Laps) -> None:
        laps.start()
        x, y = next(stream)
        laps.lap("fetch")
        last["loss"], last["batch_size"] = train_step(x, y), int(y.shape[0])
        laps.lap("train")

    phases = harness.time_phases({"step": one_step}, steps, warmup, synchronize)["step"]
    fetch_s = phases["fetch"]
    step_s = [fetch + train for fetch, train in zip(fetch_s, phases["train"])]
    loss, batch_size = last["loss"], last["batch_size"]
    result: dict[str, Any] = {
        "fetch_s": fetch_s,
        "step_s": step_s,
        "wait_share": sum(fetch_s) / sum(step_s),
        "train_images_per_s": batch_size * steps / sum(step_s),
        "final_loss": float(loss.detach()),
    }
    if device.type != "cuda":
        return result
    result["timing"] = "synchronized"
    event = lambda: torch.cuda.Event(enable_timing=True)  # noqa: E731
    result["cuda_events"] = event_shares(train_step, stream, steps, warmup, event)
    torch.cuda.synchronize(device)
    result["end_to_end"] = end_to_end_share(train_step, stream, steps, repeats, synchronize)
    return result


Batch = tuple[torch.Tensor, torch.Tensor]


def event_shares(
    train_step: Callable[[torch.Tensor, torch.Tensor], object],
    stream: Iterator[Batch],
    steps: int,
    warmup: int,
    event: Callable[[], Any],
) -> dict[str, Any]:
    """Device-stream milliseconds of each fetch and step, from events (``event()`` makes one
    with ``record()`` and ``elapsed_time(other)``) and no host synchronisation in the loop."""
    marks: list[tuple[Any, Any, Any]] = []

    def one_step(laps: harness.Laps) -> None:
        begin, fetched, end = event(), event(), event()
        laps.start()  # the host's time to queue the fetch, not synchronized
        begin.record()
        x, y = next(stream)
        fetched.record()
        laps.lap("host fetch")
        train_step(x, y)
        end.record()
        marks.append((begin, fetched, end))

    host_fetch_s = harness.time_phases({"step": one_step}, steps, warmup)["step"]["host fetch"]
    marks = marks[warmup:]
    marks[-1][2].synchronize()  # the last event: every earlier one has completed too
    fetch_ms = [begin.elapsed_time(fetched) for begin, fetched, _ in marks]
    step_ms = [begin.elapsed_time(end) for begin, _, end in marks]
    return {
        "fetch_ms": fetch_ms,
        "step_ms": step_ms,
        "host_fetch_s": host_fetch_s,
        "wait_share": sum(fetch_ms) / sum(step_ms),
    }


def end_to_end_share(
    train_step: Callable[[torch.Tensor, torch.Tensor], object],
    stream: Iterator[Batch],
    steps: int,
    repeats: int,
    synchronize: Callable[[], None],
) -> dict[str, Any]:
    """Wall time of ``steps`` training steps fed by ``stream`` against the same steps fed one
    fixed batch, ``repeats`` interleaved rounds after one warm-up round."""
    fixed = next(stream)
    batch_size = int(fixed[1].shape[0])

    def loop(source: Callable[[], Batch]) -> None:
        for _ in range(steps):
            train_step(*source())

    samples = harness.time_interleaved(
        {
            "pipeline": lambda: loop(lambda: next(stream)),
            "fixed batch": lambda: loop(lambda: fixed),
        },
        repeats,
        1,
        synchronize,
    )
    pipeline_s, fixed_s = samples["pipeline"], samples["fixed batch"]
    return {
        "steps_per_sample": steps,
        "pipeline_s": pipeline_s,
        "fixed_batch_s": fixed_s,
        "wait_share": 1 - statistics.median(fixed_s) / statistics.median(pipeline_s),
        "median_paired_wait_share": 1 - harness.paired_ratio(fixed_s, pipeline_s),
        "train_images_per_s": batch_size * steps / statistics.median(pipeline_s),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--dataset",
        default=DEFAULT_DATASET,
        help="aace.data.load_dataset spec, e.g. npz:PATH (default: %(default)s)",
    )
    parser.add_argument(
        "--workers",
        type=harness.non_negative_int,
        action="append",
        default=None,
        help="DataLoader num_workers; repeat for several (default: 0 and 2)",
    )
    parser.add_argument(
        "--train-steps",
        type=harness.positive_int,
        default=20,
        help="timed training steps per pipeline for the data-wait share (default: %(default)s)",
    )
    parser.add_argument(
        "--train-warmup",
        type=harness.non_negative_int,
        default=3,
        help="untimed training steps before those (default: %(default)s)",
    )
    parser.add_argument(
        "--model",
        default=MODEL,
        help="model of the data-wait training loop (default: %(default)s; the GPU figure uses "
        "wrn16_8)",
    )
    parser.add_argument(
        "--batch-size",
        type=harness.positive_int,
        default=BATCH_SIZE,
        help="batch of every pipeline (default: %(default)s)",
    )
    parser.add_argument(
        "--amp",
        choices=("off", "bf16"),
        action="append",
        default=None,
        help="autocast of the data-wait training loop (default: off); repeat for several",
    )
    harness.add_name_argument(parser, "pipeline")
    harness.add_common_arguments(parser, repeats=3, warmup=1)
    args = parser.parse_args(argv)
    device = harness.setup(parser, args)
    if device.type not in ("cpu", "cuda"):
        parser.error(f"--device {args.device}: expected a CPU or CUDA device")
    workers = args.workers if args.workers is not None else [0, 2]
    amps = list(dict.fromkeys(args.amp or ["off"]))
    batch_size = args.batch_size

    if args.dataset.lower().startswith("npz:") and not os.path.isfile(args.dataset[4:]):
        print(f"error: dataset file not found: {args.dataset[4:]}", file=sys.stderr)
        sys.exit(2)
    try:
        data = load_dataset(args.dataset)
    except DatasetError as error:
        print(f"error: cannot load dataset {args.dataset!r}: {error}", file=sys.stderr)
        sys.exit(2)
    n, c, h, w = (int(s) for s in data.x_train.shape)

    images_hwc = np.ascontiguousarray(data.x_train.permute(0, 2, 3, 1).numpy())
    if c == 1:
        images_hwc = images_hwc[..., 0]
    labels_np = data.y_train.numpy()
    pipelines: dict[str, Pipeline] = {
        "BatchLoader": Pipeline(
            BatchLoader(
                data.x_train,
                data.y_train,
                batch_size=batch_size,
                mean=data.mean,
                std=data.std,
                train=True,
                crop_padding=CROP_PADDING,
                hflip=True,
                cutout=CUTOUT,
                device=device,
            ),
            device,
        )
    }
    for count in workers:
        loader = make_dataloader(
            images_hwc,
            labels_np,
            data.mean,
            data.std,
            count,
            batch_size=batch_size,
            pin_memory=device.type == "cuda",
        )
        pipelines[f"DataLoader W={count}"] = Pipeline(loader, device)
    names = list(pipelines)

    # The very first batch of each pipeline: includes starting the workers when W > 0.
    cold = {name: pipelines[name].cold_first_batch() for name in names}
    samples = harness.time_interleaved(
        {name: pipelines[name].run_epoch for name in names},
        args.repeats,
        args.warmup,
        harness.synchronizer(device),
    )
    images = {name: pipelines[name].images_per_epoch for name in names}
    rates = {name: [images[name] / s for s in samples[name]] for name in names}

    rows: list[dict[str, Any]] = []
    epoch_rows = []
    for name in names:
        r = harness.summarize(rates[name])
        s = harness.summarize(samples[name])
        rows.append(
            {
                "variant": name,
                "images_per_epoch": images[name],
                "epoch_s": s,
                "epoch_samples_s": samples[name],
                "images_per_s": r,
                "cold_first_batch_s": cold[name],
            }
        )
        epoch_rows.append(
            [
                name,
                f"{r['median']:,.0f}",
                f"{r['q1']:,.0f}-{r['q3']:,.0f}",
                f"{r['min']:,.0f}-{r['max']:,.0f}",
                f"{s['median']:.3f}",
                harness.milliseconds(cold[name]),
                r["n"],
            ]
        )

    base_name = names[0]
    speedups: dict[str, Any] = {}
    speedup_rows = []
    for name in names[1:]:
        of_medians = statistics.median(rates[base_name]) / statistics.median(rates[name])
        # Same images per epoch, so images/s ratio = epoch time of `name` / that of BatchLoader.
        paired = harness.paired_ratio(
            [images[base_name] / s for s in samples[base_name]],
            [images[name] / s for s in samples[name]],
        )
        speedups[f"{base_name} / {name}"] = {
            "ratio_of_medians": of_medians,
            "median_paired_ratio": paired,
        }
        speedup_rows.append([f"{base_name} / {name}", f"{of_medians:.1f}x", f"{paired:.1f}x"])

    torch.manual_seed(0)
    base = create_model(args.model, num_classes=data.num_classes, in_channels=c)
    waits: dict[str, Any] = {}
    wait_rows = []
    gpu_wait_rows = []
    for amp in amps:
        for name in names:
            result = measure_data_wait(
                pipelines[name], base, args.train_steps, args.train_warmup, amp, args.repeats
            )
            result["amp"] = amp
            waits[name if amp == "off" else f"{name} amp={amp}"] = result
            wait_rows.append(
                [
                    name if len(amps) == 1 else f"{name}, amp {amp}",
                    harness.milliseconds(statistics.median(result["fetch_s"])),
                    harness.milliseconds(statistics.median(result["step_s"])),
                    f"{result['wait_share']:.1%}",
                    f"{result['train_images_per_s']:,.0f}",
                ]
            )
            if "cuda_events" in result:
                events, end_to_end = result["cuda_events"], result["end_to_end"]
                paired_share = end_to_end["median_paired_wait_share"]
                gpu_wait_rows.append(
                    [
                        name,
                        amp,
                        f"{statistics.median(events['fetch_ms']):.3f}",
                        f"{statistics.median(events['step_ms']):.2f}",
                        f"{events['wait_share']:.1%}",
                        f"{end_to_end['wait_share']:.1%} ({paired_share:.1%})",
                        f"{result['wait_share']:.1%}",
                        f"{end_to_end['train_images_per_s']:,.0f}",
                    ]
                )

    tables = [
        f"Dataset `{args.dataset}`: {n} training images {c}x{h}x{w}; batch {batch_size}, "
        f"drop_last, {images[base_name]} images per epoch. Augmentation: crop padding "
        f"{CROP_PADDING}, horizontal flip, Cutout {CUTOUT} (p 0.5). {args.repeats} timed epochs "
        f"per variant after {args.warmup} warm-up epoch(s), interleaved.",
        harness.markdown_table(
            [
                "variant",
                "median images/s",
                "IQR images/s",
                "min-max images/s",
                "median epoch s",
                "cold first batch ms",
                "n",
            ],
            epoch_rows,
        ),
        "Speedup in images/s: ratio of medians, median of per-round paired ratios.",
        harness.markdown_table(["ratio", "of medians", "paired"], speedup_rows),
        f"Data-wait share of a training step: `{args.model}`, SGD, {args.train_steps} timed "
        f"steps after {args.train_warmup} untimed; fetch = `next(iterator)`"
        + ("." if device.type == "cpu" else ", device synchronized before each clock reading."),
        harness.markdown_table(
            ["pipeline", "median fetch ms", "median step ms", "wait share", "train images/s"],
            wait_rows,
        ),
    ]
    if gpu_wait_rows:
        tables += [
            f"Data-wait share on the GPU, three ways (see notes): `{args.model}`, SGD, batch "
            f"{batch_size}, {args.train_steps} steps per measurement; end to end: ratio of "
            f"medians of {args.repeats} interleaved rounds (median of paired ratios).",
            harness.markdown_table(
                [
                    "pipeline",
                    "amp",
                    "median fetch ms (events)",
                    "median step ms (events)",
                    "share (CUDA events)",
                    "share (end to end)",
                    "share (synchronized)",
                    "train images/s (end to end)",
                ],
                gpu_wait_rows,
            ),
        ]
    notes = (
        "BatchLoader: batched tensor ops over the whole batch (index, crop, flip, normalise, "
        "Cutout). DataLoader: per-image PIL `RandomCrop`/`RandomHorizontalFlip`, `ToTensor`, "
        "`Normalize`, davda54/sam-style Cutout; `persistent_workers=True` for W > 0, so the "
        "worker start-up is paid once (see the cold first batch, which is the first batch of the "
        "first epoch before any warm-up) and not in the timed epochs. Wait share = total fetch "
        "time / total step time."
    )
    if device.type == "cuda":
        notes += (
            " On CUDA the DataLoader batches are pinned and copied with `non_blocking=True`. "
            "Shares: CUDA events = GPU-stream time from before `next()` to after it, over the "
            "time to the end of the step, no host sync in the loop (what the pipelined training "
            "loop sees); end to end = 1 - (loop fed one fixed batch) / (loop fed by the "
            "pipeline), wall clock; synchronized = host clock with `torch.cuda.synchronize()` "
            "around `next()` and the step (serialised, an upper bound)."
        )
    config = {
        "dataset": args.dataset,
        "train_images": n,
        "image_shape": [c, h, w],
        "mean": list(data.mean),
        "std": list(data.std),
        "batch_size": batch_size,
        "crop_padding": CROP_PADDING,
        "hflip": True,
        "cutout": CUTOUT,
        "workers": workers,
        "repeats": args.repeats,
        "warmup": args.warmup,
        "train_steps": args.train_steps,
        "train_warmup": args.train_warmup,
        "model": args.model,
        "amp": amps[0] if len(amps) == 1 else amps,
        "sgd": CIFAR_SGD_KWARGS,
        "threads": args.threads,
        "device": str(device),
    }
    text = harness.write_results(
        args.name,
        rows,
        "\n\n".join(tables),
        args.out_dir,
        device=device,
        config=config,
        extra={"speedups": speedups, "data_wait": waits},
        notes=notes,
    )
    print(text)


if __name__ == "__main__":
    main()
