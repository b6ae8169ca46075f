"""Forward + backward time of ``aace_loss`` against ``F.cross_entropy`` on random logits.

Rerun the reported measurement from the repository root with:

    .venv/bin/python -m benchmarks.micro.loss_cost

For each number of classes C (10, 100, 1000 by default) both losses get the same random
float32 logits of shape (N, C) (N = 256 by default) and random targets. One call is the loss
(mean reduction) plus ``torch.autograd.grad`` of it with respect to the logits. Each timed
sample runs ``--inner`` calls and is divided by that number, since a single call takes only
microseconds. The two losses are timed interleaved (see
``benchmarks.harness.time_interleaved``); the table gives medians and the ratio AACE / CE of the
medians (and the median of per-repetition ratios). ``aace_loss`` is used with its defaults (mode
"ada", threshold 0), which includes its input check (on the CPU, reading the target's min and
max).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from aace import aace_loss
from benchmarks import harness

LOSSES: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "cross_entropy": F.cross_entropy,
    "aace_loss": aace_loss,
}


def _forward_backward(
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    logits: torch.Tensor,
    target: torch.Tensor,
    inner: int,
) -> Callable[[], None]:
    def run() -> None:
        for _ in range(inner):
            torch.autograd.grad(loss_fn(logits, target), logits)

    return run


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--classes",
        type=harness.positive_int,
        nargs="+",
        default=[10, 100, 1000],
        help="numbers of classes C (default: 10 100 1000)",
    )
    parser.add_argument(
        "--num-samples", "-n", type=harness.positive_int, default=256, help="rows N of the logits"
    )
    parser.add_argument(
        "--inner",
        type=harness.positive_int,
        default=50,
        help="forward-backward calls per timed sample (default: %(default)s)",
    )
    harness.add_common_arguments(parser, repeats=20, warmup=3)
    args = parser.parse_args(argv)
    device = harness.setup(parser, args)
    synchronize = harness.synchronizer(device)

    rows: list[dict[str, Any]] = []
    table_rows = []
    for num_classes in args.classes:
        logits = torch.randn(args.num_samples, num_classes, device=device, requires_grad=True)
        target = torch.randint(0, num_classes, (args.num_samples,), device=device)
        variants = {
            name: _forward_backward(loss_fn, logits, target, args.inner)
            for name, loss_fn in LOSSES.items()
        }
        samples = harness.time_interleaved(variants, args.repeats, args.warmup, synchronize)
        per_call = {name: [s / args.inner for s in samples[name]] for name in LOSSES}
        summaries = {name: harness.summarize(per_call[name]) for name in LOSSES}
        ce, aace = summaries["cross_entropy"], summaries["aace_loss"]
        ratio = aace["median"] / ce["median"]
        paired = harness.paired_ratio(per_call["aace_loss"], per_call["cross_entropy"])
        rows.append(
            {
                "num_classes": num_classes,
                "num_samples": args.num_samples,
                "seconds_per_call": summaries,
                "samples_s_per_call": per_call,
                "aace_over_ce": {"ratio_of_medians": ratio, "median_paired_ratio": paired},
            }
        )
        table_rows.append(
            [
                num_classes,
                f"{ce['median'] * 1e6:.1f}",
                f"{ce['q1'] * 1e6:.1f}-{ce['q3'] * 1e6:.1f}",
                f"{aace['median'] * 1e6:.1f}",
                f"{aace['q1'] * 1e6:.1f}-{aace['q3'] * 1e6:.1f}",
                f"{ratio:.2f} ({paired:.2f})",
            ]
        )

    table = "\n\n".join(
        [
            f"N = {args.num_samples} float32 logits, {args.repeats} timed samples of "
            f"{args.inner} calls each after {args.warmup} warm-up rounds. Microseconds per "
            "forward + backward call.",
            harness.markdown_table(
                [
                    "C",
                    "cross_entropy median us",
                    "CE IQR us",
                    "aace_loss median us",
                    "AACE IQR us",
                    "AACE / CE",
                ],
                table_rows,
            ),
        ]
    )
    notes = (
        "AACE / CE: ratio of medians (median of per-repetition ratios). `aace_loss` with its "
        'defaults (mode "ada", threshold 0); backward is `torch.autograd.grad` with respect to '
        "the logits."
    )
    config = {
        "classes": args.classes,
        "num_samples": args.num_samples,
        "inner": args.inner,
        "repeats": args.repeats,
        "warmup": args.warmup,
        "device": str(device),
        "threads": args.threads,
        "dtype": "float32",
    }
    text = harness.write_results(
        "loss_cost", rows, table, args.out_dir, device=device, config=config, notes=notes
    )
    print(text)


if __name__ == "__main__":
    main()
