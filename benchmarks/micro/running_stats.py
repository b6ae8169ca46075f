"""What keeping the running statistics out of SAM's second pass costs per step, on its own.

Rerun the reported measurement from the repository root with:

    .venv/bin/python -m benchmarks.micro.running_stats --repeats 200 --threads 2

What is timed: entering and leaving the second pass's context manager around an empty block,
after a forward pass at w has written the model's statistics (untimed), as in every SAM step:

* ``frozen_running_stats``: aace's context manager (BatchNorm switched off; every other buffer
  watched by version counter, copied when a forward pass wrote it, put back on exit);
* ``BatchNorm flag only``: the former ``frozen_batchnorm_stats``, which switched BatchNorm's
  flag and left every other buffer alone (so it let the second pass write them).

Before each timed block the statistics are written in place (one ``_foreach_mul_`` by 1, as
the forward pass at w does every step; timed alone as "statistics written"), so that the context
manager copies what it must. Models: ``cnn13`` (``benchmarks.baselines``: 12 convolutions
with BatchNorm, where nothing is copied), and the same network with
``InstanceNorm2d(track_running_stats=True)`` in place of BatchNorm (each of its 12 layers has 3
buffers, copied and put back on every step). The forward pass of cnn13 on a batch of 64 images of
3x16x16 is timed alongside, for scale. Figures are the median and minimum over ``--repeats``
interleaved rounds; the minimum is the least disturbed by other load on the machine.
"""

from __future__ import annotations

import argparse
import statistics

import torch
from torch import nn

from aace import frozen_running_stats
from benchmarks import harness
from benchmarks.baselines import batchnorm_flag_only, cnn13


def instance_norm_cnn13() -> nn.Module:
    model = cnn13()
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, nn.BatchNorm2d):
                norm = nn.InstanceNorm2d(child.num_features, affine=True, track_running_stats=True)
                setattr(module, child_name, norm)
    return model


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    harness.add_name_argument(parser, "running_stats")
    harness.add_common_arguments(parser, repeats=200, warmup=10)
    args = parser.parse_args(argv)
    device = harness.setup(parser, args)
    x = torch.randn(64, 3, 16, 16, device=device)
    models = {"cnn13 (BatchNorm)": cnn13(), "cnn13 (InstanceNorm)": instance_norm_cnn13()}
    rows = []
    for model_name, model in models.items():
        model = model.to(device).train()
        managers = {"frozen_running_stats": frozen_running_stats, "BatchNorm flag only":
                    batchnorm_flag_only}  # fmt: skip

        def block(manager, model=model):
            with manager(model):
                pass

        with torch.no_grad():
            model(x)  # the forward pass at w writes the statistics
        # Every step's first pass writes the statistics again; one in-place pass over the
        # buffers stands for it (timed on its own as "statistics written").
        written = [b for b in model.buffers() if b.is_floating_point()]
        if model_name.endswith("(BatchNorm)"):  # BatchNorm's are never watched: no need
            written = []

        def write(written=written):
            if written:
                torch._foreach_mul_(written, 1.0)

        calls = {name: (lambda m=m: (write(), block(m))) for name, m in managers.items()}
        if written:
            calls["statistics written (included above)"] = write
        if model_name.startswith("cnn13 (BatchNorm)"):
            with torch.no_grad():
                calls["forward pass (for scale)"] = lambda model=model: model(x)
        samples = harness.time_interleaved(calls, args.repeats, args.warmup)
        for name, values in samples.items():
            rows.append(
                {
                    "model": model_name,
                    "variant": name,
                    "median_us": statistics.median(values) * 1e6,
                    "min_us": min(values) * 1e6,
                    "n": len(values),
                    "buffers": sum(1 for _ in model.buffers()),
                }
            )
    table = harness.markdown_table(
        ["model", "variant", "buffers", "median µs", "min µs"],
        [
            [r["model"], r["variant"], r["buffers"], f"{r['median_us']:.1f}", f"{r['min_us']:.1f}"]
            for r in rows
        ],  # fmt: skip
    )
    notes = (
        f"{args.repeats} interleaved rounds after {args.warmup} warm-up rounds per model; "
        f"{torch.get_num_threads()} threads. With InstanceNorm the former context manager does "
        "less work because it does not keep the statistics at all (the bug it had)."
    )
    text = harness.write_results(
        args.name, rows, table, args.out_dir, device=device,
        config=dict(repeats=args.repeats, warmup=args.warmup, threads=torch.get_num_threads()),
        notes=notes,
    )  # fmt: skip
    print(text)


if __name__ == "__main__":
    main()
