"""Sharpness of a trained model: Hessian spectrum and trace, adaptive sharpness, loss landscapes.

The library half of ``aace sharpness``; it imports nothing from ``aace.training``, ``aace.data``
or ``aace.cli``. Every function takes ``(model, loss_fn, batches)``: the loss is the
sample-weighted mean of ``loss_fn(model(x), y)`` over the re-iterable ``batches``, with respect
to the parameters that have ``requires_grad``; the model's mode (train/eval) is the caller's, and
the model is left as it was found.
"""

from aace.analysis.hessian import (
    HessianEigen,
    TraceEstimate,
    hessian_eigen,
    hessian_eigenvalues,
    hessian_trace,
    hessian_trace_estimate,
    hessian_vector_product,
)
from aace.analysis.landscape import (
    Landscape,
    filter_normalized_direction,
    interpolation,
    plot_landscape,
    random_line,
    random_plane,
)
from aace.analysis.sharpness import (
    NORMS,
    SharpnessEstimate,
    adaptive_average_sharpness,
    adaptive_sharpness,
)

__all__ = [
    "NORMS",
    "HessianEigen",
    "Landscape",
    "SharpnessEstimate",
    "TraceEstimate",
    "adaptive_average_sharpness",
    "adaptive_sharpness",
    "filter_normalized_direction",
    "hessian_eigen",
    "hessian_eigenvalues",
    "hessian_trace",
    "hessian_trace_estimate",
    "hessian_vector_product",
    "interpolation",
    "plot_landscape",
    "random_line",
    "random_plane",
]
