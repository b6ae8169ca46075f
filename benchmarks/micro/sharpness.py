"""Cost of aace.analysis on a CPU, and PyHessian 0.1 side by side on the same model and data.

    pip install pyhessian==0.1       # only for the comparison; aace does not depend on it
    python -m benchmarks.micro.sharpness --dataset npz:../shared/data/cifar10_5k.npz \\
        --model wrn16_4 --images 1024 --batch-size 128 --repeats 5 --warmup 1 --tol 1e-3 \\
        --trace-samples 10

Three measurements, each with the variants interleaved round-robin (so a change of machine load
hits them alike), reported as medians with n:

1. One batch: a forward-backward pass; a Hessian-vector product by double backward (what
   aace.analysis uses); the same product by torch.func forward-over-reverse (jvp of grad); and
   PyHessian's (double backward through ``loss.backward(create_graph=True)`` and ``.grad``).
2. The top Hessian eigenvalue over ``--images`` training images: aace (Lanczos) against
   PyHessian (power iteration), both to ``--tol`` (each by its own stopping rule: Lanczos's
   residual, PyHessian's relative change between iterations) with at most 100 products.
3. The Hessian trace by Hutchinson with ``--trace-samples`` Rademacher probes for both
   (PyHessian's early stop disabled so both use the same count).

The model is ``--model`` at its seeded initialization with BatchNorm statistics computed on the
same images (cumulative average), then in eval mode, float32: a fixed, reproducible model; no
trained WRN-16-4 checkpoint is part of the repository.
Writes ``benchmarks/results/sharpness.{json,md}``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.func import functional_call, grad, jvp

from aace.analysis import hessian_eigen, hessian_trace_estimate, hessian_vector_product
from aace.data import load_dataset
from aace.models import create_model
from benchmarks.harness import (
    add_common_arguments,
    markdown_table,
    positive_int,
    setup,
    summarize,
    synchronizer,
    time_interleaved,
    write_results,
)


def _batches(args, device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    dataset = load_dataset(args.dataset, args.data_dir)
    n = min(args.images, len(dataset.y_train))
    index = torch.randperm(len(dataset.y_train), generator=torch.Generator().manual_seed(0))[:n]
    mean = torch.tensor(dataset.mean).view(1, -1, 1, 1)
    std = torch.tensor(dataset.std).view(1, -1, 1, 1)
    x = (dataset.x_train[index].float() / 255 - mean) / std
    y = dataset.y_train[index]
    return [
        (x[i : i + args.batch_size].to(device), y[i : i + args.batch_size].to(device))
        for i in range(0, n, args.batch_size)
    ]


def _model(args, batches, device, num_classes: int) -> torch.nn.Module:
    torch.manual_seed(0)
    model = create_model(args.model, num_classes=num_classes, in_channels=3).to(device)
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.momentum = None  # cumulative average over the calibration batches
            module.reset_running_stats()
    model.train()
    with torch.no_grad():
        for x, _ in batches:
            model(x)
    return model.eval()


def _forward_backward(model, x, y) -> None:
    model.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()


def _func_hvp(model, batches, vector: torch.Tensor) -> torch.Tensor:
    """H v by torch.func: forward-mode derivative (jvp) of the reverse-mode gradient."""
    names = [name for name, _ in model.named_parameters()]
    params = tuple(p.detach() for p in model.parameters())
    tangents = tuple(
        t.view_as(p) for t, p in zip(vector.split([p.numel() for p in params]), params)
    )
    buffers = dict(model.named_buffers())
    total = torch.zeros_like(vector)
    count = 0
    for x, y in batches:

        def loss_of(values, x=x, y=y):
            state = {**dict(zip(names, values)), **buffers}
            return F.cross_entropy(functional_call(model, state, (x,)), y)

        _, product = jvp(grad(loss_of), (params,), (tangents,))
        total += torch.cat([p.reshape(-1) for p in product]) * len(y)
        count += len(y)
    return total / count


def _pyhessian(model, batches):
    try:
        from pyhessian import hessian
    except ImportError:
        return None
    computer = hessian(model, torch.nn.CrossEntropyLoss(), dataloader=batches, cuda=False)
    calls = {"n": 0}
    original = computer.dataloader_hv_product

    def counted(v):
        calls["n"] += 1
        return original(v)

    computer.dataloader_hv_product = counted
    return computer, calls


def _solver_runs(
    solvers: dict[str, Callable[[int], dict[str, Any]]],
    repeats: int,
    sync: Callable[[], None],
    describe: Callable[[str, dict[str, Any]], str],
) -> dict[str, list[dict[str, Any]]]:
    """``repeats`` calls of each solver (``solver(repeat)`` -> its record), interleaved with the
    order reversed every other repetition; each record gets its seconds under ``"s"``."""
    records: dict[str, list[dict[str, Any]]] = {tool: [] for tool in solvers}
    for repeat in range(repeats):
        order = list(solvers) if repeat % 2 == 0 else list(reversed(solvers))
        calls = {
            tool: (lambda tool=tool, repeat=repeat: records[tool].append(solvers[tool](repeat)))
            for tool in order
        }
        seconds = time_interleaved(calls, repeats=1, warmup=0, synchronize=sync)
        for tool in order:
            records[tool][-1]["s"] = seconds[tool][0]
            print(describe(tool, records[tool][-1]), flush=True)
    return records


def _solver_rows(
    what: str,
    records: dict[str, list[dict[str, Any]]],
    value: Callable[[list[dict[str, Any]]], str],
    products: Callable[[list[dict[str, Any]]], object],
) -> list[list[object]]:
    """Table rows of :func:`_solver_runs`' records: median seconds, value and products, n."""
    return [
        [f"{what}, {tool}", f"{statistics.median(e['s'] for e in entries):.1f}",
         value(entries), products(entries), len(entries)]
        for tool, entries in records.items()
        if entries
    ]  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="npz:../shared/data/cifar10_5k.npz")
    parser.add_argument("--data-dir", default="data")
    parser.add_argument("--model", default="wrn16_4")
    parser.add_argument("--images", type=positive_int, default=1024)
    parser.add_argument("--batch-size", type=positive_int, default=128)
    parser.add_argument("--tol", type=float, default=1e-3)
    parser.add_argument("--trace-samples", type=positive_int, default=10)
    parser.add_argument(
        "--solver-repeats", type=positive_int, default=1, help="repetitions of 2. and 3."
    )
    parser.add_argument("--name", default="sharpness", help="results file name (sharpness)")
    parser.add_argument("--skip", action="append", default=[], choices=("hvp", "eigen", "trace"))
    add_common_arguments(parser, repeats=5, warmup=1)
    args = parser.parse_args()
    device = setup(parser, args)
    sync = synchronizer(device)
    batches = _batches(args, device)
    num_classes = int(max(int(y.max()) for _, y in batches)) + 1
    model = _model(args, batches, device, num_classes)
    n_params = sum(p.numel() for p in model.parameters())
    loss_fn = F.cross_entropy
    pyhessian = _pyhessian(model, batches)
    rows: list[list[object]] = []
    results: dict = {"parameters": n_params, "images": sum(len(y) for _, y in batches)}
    solver_rows: list[list[object]] = []
    print(f"{args.model}: {n_params:,} parameters; {results['images']} images", flush=True)

    def write() -> str:
        """Write the results so far (after every section, so a stopped run keeps them)."""
        text = ""
        if rows:
            text += "### Cost of one Hessian-vector product\n\n"
            text += markdown_table(["what", "median s", "x forward-backward", "n"], rows) + "\n\n"
        if solver_rows:
            text += (
                f"### Top eigenvalue (tol {args.tol:g}) and trace, {results['images']} images\n\n"
            )
            headers = ["what", "median s", "value", "Hessian-vector products", "n"]
            text += markdown_table(headers, solver_rows) + "\n"
        return write_results(
            args.name,
            [results],
            text,
            args.out_dir,
            device=device,
            config={k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            notes="The CPU was shared with other jobs while this ran; see the load average.",
        )

    if "hvp" not in args.skip:
        x, y = batches[0]
        one = [(x, y)]
        v = torch.randn(n_params, generator=torch.Generator().manual_seed(1)).to(device)
        variants = {
            "forward-backward": lambda: _forward_backward(model, x, y),
            "HVP, double backward (aace)": lambda: hessian_vector_product(model, loss_fn, one, v),
            "HVP, torch.func jvp(grad)": lambda: _func_hvp(model, one, v),
        }
        if pyhessian is not None:
            computer, _ = pyhessian
            pv = [
                t.view_as(p)
                for t, p in zip(
                    v.split([p.numel() for p in model.parameters()]), model.parameters()
                )
            ]
            variants["HVP, PyHessian 0.1"] = lambda: computer.dataloader_hv_product(pv)
        ours, theirs = hessian_vector_product(model, loss_fn, one, v), _func_hvp(model, one, v)
        results["hvp_max_relative_difference_func_vs_double_backward"] = float(
            (ours - theirs).abs().max() / ours.abs().max()
        )
        samples = time_interleaved(variants, args.repeats, args.warmup, sync)
        base = statistics.median(samples["forward-backward"])
        results["one_batch"] = {k: summarize(v) for k, v in samples.items()}
        for name, values in samples.items():
            rows.append(
                [f"one batch of {len(y)}: {name}", f"{statistics.median(values):.3f}",
                 f"{statistics.median(values) / base:.2f}", len(values)]
            )  # fmt: skip
        write()

    def tools(aace: Callable[[int], dict[str, Any]], theirs: Callable[[int], dict[str, Any]]):
        return {"aace": aace} | ({} if pyhessian is None else {"pyhessian": theirs})

    if "eigen" not in args.skip:

        def aace_eigen(repeat: int) -> dict[str, Any]:
            result = hessian_eigen(
                model, loss_fn, batches, k=1, tol=args.tol, max_iter=100, seed=repeat
            )
            return {"eigenvalue": result.eigenvalues[0], "products": result.iterations}

        def pyhessian_eigen(repeat: int) -> dict[str, Any]:
            computer, calls = pyhessian
            calls["n"] = 0
            torch.manual_seed(repeat)
            values, _ = computer.eigenvalues(maxIter=100, tol=args.tol, top_n=1)
            return {"eigenvalue": values[0], "products": calls["n"]}

        records = {"aace": [], "pyhessian": []} | _solver_runs(
            tools(aace_eigen, pyhessian_eigen), args.solver_repeats, sync,
            lambda tool, e: f"top eigenvalue, {tool}: {e['eigenvalue']:.6g} in {e['s']:.1f} s, "
            f"{e['products']} HVPs",
        )  # fmt: skip
        results["top_eigenvalue"] = records
        solver_rows += _solver_rows(
            "top eigenvalue", records,
            lambda entries: f"{statistics.median(e['eigenvalue'] for e in entries):.6g}",
            lambda entries: f"{statistics.median(e['products'] for e in entries):g}",
        )  # fmt: skip
        write()

    if "trace" not in args.skip:

        def aace_trace(repeat: int) -> dict[str, Any]:
            estimate = hessian_trace_estimate(
                model, loss_fn, batches, samples=args.trace_samples, seed=repeat
            )
            return {"trace": estimate.trace, "stderr": estimate.stderr}

        def pyhessian_trace(repeat: int) -> dict[str, Any]:
            computer, _ = pyhessian
            torch.manual_seed(repeat)
            forms = computer.trace(maxIter=args.trace_samples, tol=float("-inf"))
            stderr = statistics.stdev(forms) / len(forms) ** 0.5
            return {"trace": statistics.fmean(forms), "stderr": stderr}

        records = {"aace": [], "pyhessian": []} | _solver_runs(
            tools(aace_trace, pyhessian_trace), args.solver_repeats, sync,
            lambda tool, e: f"trace, {tool}: {e['trace']:.6g} ± {e['stderr']:.3g} in "
            f"{e['s']:.1f} s",
        )  # fmt: skip
        results["trace"] = records
        solver_rows += _solver_rows(
            f"trace ({args.trace_samples} probes)", records,
            lambda entries: f"{statistics.median(e['trace'] for e in entries):.6g} "
            f"± {statistics.median(e['stderr'] for e in entries):.2g}",
            lambda entries: args.trace_samples,
        )  # fmt: skip

    print(write())
    return 0


if __name__ == "__main__":
    sys.exit(main())
