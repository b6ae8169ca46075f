"""Why aace's Hessian-vector product is double backward and not a finite difference of gradients.

A central difference of gradients, H v ~ (g(w + h v) - g(w - h v)) / (2 h), costs two
forward-backward passes, under the <= 2.2x goal that double backward (about 3.5x here) misses.
This script measures what it would give up: the relative error ||Hv_fd - Hv|| / ||Hv|| against
the exact product (``aace.analysis.hessian_vector_product``) for several steps h, in float32 and
float64, with the time of each against one forward-backward pass.

    python -m benchmarks.micro.hvp_finite_difference --model wrn16_4 --images 64

The model is freshly initialized and in train mode (BatchNorm on batch statistics, so the
Hessian is that of a well-scaled network); the data are random images, the direction v a random
unit vector. A ReLU network's gradient is only piecewise smooth: a step h v large enough to rise
above float32 rounding flips many ReLUs, and the difference then measures the kinks rather than
the Hessian (which autograd defines as zero across them). Writes
``benchmarks/results/hvp_finite_difference.{json,md}``.
"""

from __future__ import annotations

import argparse

import torch

from aace.analysis import hessian_vector_product
from aace.models import create_model
from benchmarks.harness import DEFAULT_OUT_DIR, markdown_table, positive_int, timed, write_results


def _gradient(model, params, x, y, flat: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        torch._foreach_copy_(params, [t.view_as(p) for p, t in zip(params, flat.split(
            [p.numel() for p in params]))])  # fmt: skip
    loss = torch.nn.functional.cross_entropy(model(x), y)
    return torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)])


def measure(model_name: str, images: int, dtype: torch.dtype, steps: list[float]) -> list[dict]:
    torch.manual_seed(0)
    model = create_model(model_name, num_classes=10).to(dtype).train()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(images, 3, 32, 32, dtype=dtype)
    y = torch.randint(0, 10, (images,))
    params = [p for p in model.parameters() if p.requires_grad]
    w = torch.cat([p.detach().reshape(-1) for p in params])
    v = torch.randn(w.numel(), dtype=dtype)
    v /= v.norm()
    _gradient(model, params, x, y, w)  # warm-up
    _, forward_backward = timed(lambda: _gradient(model, params, x, y, w))
    exact, seconds = timed(
        lambda: hessian_vector_product(model, torch.nn.functional.cross_entropy, [(x, y)], v)
    )
    rows = [
        {"dtype": str(dtype).removeprefix("torch."), "method": "double backward (aace)",
         "h": None, "relative_error": 0.0, "x_forward_backward": seconds / forward_backward},
    ]  # fmt: skip
    for h in steps:
        difference, seconds = timed(
            lambda h=h: (
                _gradient(model, params, x, y, w + h * v)
                - _gradient(model, params, x, y, w - h * v)
            )
        )
        approx = difference / (2 * h)
        rows.append(
            {"dtype": rows[0]["dtype"], "method": "central difference", "h": h,
             "relative_error": float((approx - exact).norm() / exact.norm()),
             "x_forward_backward": seconds / forward_backward}
        )  # fmt: skip
    model.load_state_dict(state)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="wrn16_4")
    parser.add_argument("--images", type=positive_int, default=64)
    parser.add_argument("--threads", type=positive_int, default=1)
    parser.add_argument("--out-dir", default=str(DEFAULT_OUT_DIR))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = measure(args.model, args.images, torch.float32, [1e-1, 1e-2, 1e-3])
    rows += measure(args.model, args.images, torch.float64, [1e-2, 1e-4, 1e-6])
    table = markdown_table(
        ["dtype", "method", "h", "‖Hv_fd − Hv‖ / ‖Hv‖", "time / forward-backward"],
        [
            [r["dtype"], r["method"], "-" if r["h"] is None else f"{r['h']:g}",
             f"{r['relative_error']:.3g}", f"{r['x_forward_backward']:.2f}"]
            for r in rows
        ],
    )  # fmt: skip
    print(
        write_results(
            "hvp_finite_difference",
            rows,
            table,
            args.out_dir,
            device=torch.device("cpu"),
            config=vars(args),
            notes="One measurement each (n = 1): the times show the order of cost, the errors "
            "are deterministic.",
        )  # fmt: skip
    )


if __name__ == "__main__":
    main()
