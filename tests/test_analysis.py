"""aace.analysis against independent computations: the exact Hessian (float64,
torch.autograd.functional.hessian over torch.func.functional_call), quadratics with a known
spectrum, brute-force maxima and Gauss-Hermite quadrature on a 2-parameter model."""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from aace.analysis import (
    adaptive_average_sharpness,
    adaptive_sharpness,
    filter_normalized_direction,
    hessian_eigen,
    hessian_eigenvalues,
    hessian_trace,
    hessian_trace_estimate,
    hessian_vector_product,
    interpolation,
    plot_landscape,
    random_line,
    random_plane,
)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models gain nothing from threads, and on a busy machine OpenMP threads that wait for
    each other make them many times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# -- fixtures: a tiny MLP, its data and its exact Hessian ------------------------------------------


def _mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).double()


def _data(seed: int = 0, sizes=(5, 3, 4)) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randn(n, 3, generator=g, dtype=torch.float64),
            torch.randint(0, 3, (n,), generator=g),
        )
        for n in sizes
    ]


def _flat_loss(model: nn.Module, batches, loss_fn=F.cross_entropy):
    """theta -> sample-weighted mean loss, through functional_call (not the library's path)."""
    names = [name for name, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    sizes = [p.numel() for p in model.parameters()]
    total = sum(n for _, y in batches for n in [len(y)])

    def f(theta):
        params = {k: t.view(s) for k, t, s in zip(names, theta.split(sizes), shapes)}
        return (
            sum(len(y) * loss_fn(functional_call(model, params, (x,)), y) for x, y in batches)
            / total
        )

    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    return f, theta


def _exact_hessian(model, batches, loss_fn=F.cross_entropy) -> torch.Tensor:
    f, theta = _flat_loss(model, batches, loss_fn)
    return torch.autograd.functional.hessian(f, theta)


@pytest.fixture(scope="module")
def mlp_hessian() -> torch.Tensor:
    """The exact Hessian of _mlp() on _data(), computed once for the tests that need it."""
    return _exact_hessian(_mlp(), _data())


class _Quadratic(nn.Module):
    """loss(w) = 1/2 w^T A w, whatever the data: its Hessian is A."""

    def __init__(self, matrix: torch.Tensor, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.w = nn.Parameter(torch.randn(matrix.shape[0], generator=g, dtype=torch.float64))
        self.register_buffer("matrix", matrix)

    def forward(self, x):
        return (self.w @ self.matrix @ self.w / 2).expand(x.shape[0])


def _output_mean(output, target):
    return output.mean()


def _matrix_with_spectrum(eigenvalues, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    n = len(eigenvalues)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    return q @ torch.diag(torch.tensor(eigenvalues, dtype=torch.float64)) @ q.T


ONE_BATCH = [(torch.zeros(2, 1, dtype=torch.float64), torch.zeros(2))]


# -- Hessian-vector products and eigenvalues -------------------------------------------------


def test_hessian_vector_product_equals_exact_hessian_times_vector(mlp_hessian):
    model, batches = _mlp(), _data()
    hessian = mlp_hessian
    v = torch.randn(
        hessian.shape[0], generator=torch.Generator().manual_seed(1), dtype=torch.float64
    )
    product = hessian_vector_product(model, F.cross_entropy, batches, v)
    torch.testing.assert_close(product, hessian @ v, rtol=1e-10, atol=1e-12)


def test_top_eigenvalues_of_a_small_network_match_the_exact_hessian(mlp_hessian):
    model, batches = _mlp(), _data()
    hessian = mlp_hessian
    exact = torch.linalg.eigvalsh(hessian).flip(0)[:3]
    result = hessian_eigen(model, F.cross_entropy, batches, k=3, max_iter=60, tol=1e-10)
    assert result.converged
    assert result.eigenvalues == sorted(result.eigenvalues, reverse=True)
    np.testing.assert_allclose(result.eigenvalues, exact.numpy(), rtol=1e-6)
    # The Ritz vectors are eigenvectors: ||H u - theta u|| small, ||u|| = 1.
    for theta, u in zip(result.eigenvalues, result.eigenvectors):
        assert float(u.norm()) == pytest.approx(1.0, abs=1e-9)
        assert float((hessian @ u - theta * u).norm()) < 1e-6 * abs(exact[0])


def test_quadratic_largest_algebraic_not_largest_magnitude():
    # -20 has the largest magnitude (power iteration would find it); the top three are 10, 9, 8.5.
    spectrum = [10.0, 9.0, 8.5, -20.0, *np.linspace(-3.0, 3.0, 36).tolist()]
    model = _Quadratic(_matrix_with_spectrum(spectrum))
    values = hessian_eigenvalues(model, _output_mean, ONE_BATCH, k=3, tol=1e-10)
    np.testing.assert_allclose(values, [10.0, 9.0, 8.5], rtol=1e-8)


def test_quadratic_repeated_eigenvalue_is_found_once_per_exhausted_krylov_space():
    # Two distinct eigenvalues: each Krylov space is exhausted after 2 steps and holds one copy
    # of 5; the breakdown is detected and the iteration continues from a fresh vector, so all
    # three copies are found. (A multiplicity the iteration converges past before an exact
    # breakdown is the documented limitation of single-vector Lanczos.)
    spectrum = [5.0, 5.0, 5.0, 1.0, 1.0, 1.0, 1.0, 1.0]
    model = _Quadratic(_matrix_with_spectrum(spectrum, seed=2))
    values = hessian_eigenvalues(model, _output_mean, ONE_BATCH, k=3, tol=1e-10)
    np.testing.assert_allclose(values, [5.0, 5.0, 5.0], rtol=1e-8)


def test_k_equal_to_the_parameter_count_gives_the_whole_spectrum():
    spectrum = [3.0, -2.0, 1.5, 0.5]
    model = _Quadratic(_matrix_with_spectrum(spectrum))
    values = hessian_eigenvalues(model, _output_mean, ONE_BATCH, k=4)
    np.testing.assert_allclose(values, sorted(spectrum, reverse=True), rtol=1e-9)


def test_not_converged_warns():
    model = _Quadratic(_matrix_with_spectrum(np.linspace(0, 1, 200).tolist()))
    with pytest.warns(RuntimeWarning, match="did not reach tol"):
        result = hessian_eigen(model, _output_mean, ONE_BATCH, k=1, max_iter=3, tol=1e-12)
    assert not result.converged and result.iterations == 3


# -- trace -----------------------------------------------------------------------------------------


def _rademacher_std(matrix: torch.Tensor) -> float:
    """std of v^T A v for Rademacher v: sqrt(2 (||A||_F^2 - sum_i A_ii^2))."""
    return math.sqrt(2 * float((matrix**2).sum() - (matrix.diagonal() ** 2).sum()))


def test_trace_of_a_known_spectrum_within_its_standard_error():
    matrix = _matrix_with_spectrum(np.linspace(-1.0, 4.0, 30).tolist())
    model = _Quadratic(matrix)
    samples = 400
    estimate = hessian_trace_estimate(model, _output_mean, ONE_BATCH, samples=samples, seed=3)
    exact = float(matrix.trace())
    assert abs(estimate.trace - exact) < 4 * estimate.stderr
    expected_stderr = _rademacher_std(matrix) / math.sqrt(samples)
    assert estimate.stderr == pytest.approx(expected_stderr, rel=0.2)
    # Rademacher probes: every single quadratic form is exact on a diagonal matrix.
    diagonal = _Quadratic(torch.diag(torch.arange(1.0, 6.0, dtype=torch.float64)))
    forms = hessian_trace_estimate(diagonal, _output_mean, ONE_BATCH, samples=3).quadratic_forms
    np.testing.assert_allclose(forms, [15.0] * 3, rtol=1e-12)


def test_trace_of_a_small_network_within_its_standard_error(mlp_hessian):
    model, batches = _mlp(), _data()
    hessian = mlp_hessian
    estimate = hessian_trace_estimate(model, F.cross_entropy, batches, samples=120, seed=0)
    assert abs(estimate.trace - float(hessian.trace())) < 4 * estimate.stderr
    assert estimate.stderr == pytest.approx(_rademacher_std(hessian) / math.sqrt(120), rel=0.35)
    assert hessian_trace(model, F.cross_entropy, batches, samples=120, seed=0) == estimate.trace


def test_results_are_deterministic_under_seed():
    model, batches = _mlp(), _data()
    first = hessian_trace(model, F.cross_entropy, batches, samples=5, seed=7)
    assert hessian_trace(model, F.cross_entropy, batches, samples=5, seed=7) == first
    assert hessian_trace(model, F.cross_entropy, batches, samples=5, seed=8) != first
    eig = hessian_eigenvalues(model, F.cross_entropy, batches, k=2, seed=4)
    assert hessian_eigenvalues(model, F.cross_entropy, batches, k=2, seed=4) == eig


def test_batching_does_not_change_the_objective():
    """Sample-weighted: one batch of 12 and batches of 5 + 3 + 4 give the same Hessian."""
    model, batches = _mlp(), _data()
    whole = [(torch.cat([x for x, _ in batches]), torch.cat([y for _, y in batches]))]
    v = torch.randn(31, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    torch.testing.assert_close(
        hessian_vector_product(model, F.cross_entropy, batches, v),
        hessian_vector_product(model, F.cross_entropy, whole, v),
    )


def test_float32_inputs_are_cast_to_the_model_dtype_and_frozen_parameters_excluded():
    model, batches = _mlp(), _data()
    model[0].requires_grad_(False)  # 16 of 31 parameters frozen: the Hessian of the other 15
    hessian = _exact_hessian(model, batches)[16:, 16:]
    float32 = [(x.float(), y) for x, y in batches]
    values = hessian_eigenvalues(model, F.cross_entropy, float32, k=2, tol=1e-10)
    np.testing.assert_allclose(values, torch.linalg.eigvalsh(hessian).flip(0)[:2], rtol=1e-6)


# -- the model is left as found --------------------------------------------------------------------


def _bn_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 5), nn.BatchNorm1d(5), nn.ReLU(), nn.Linear(5, 3)).double()


def test_analyses_leave_parameters_buffers_mode_and_grads_unchanged():
    model, batches = _bn_model(), _data()
    model.train()
    model[1].eval()  # a mixed mode must survive too
    before = {k: v.clone() for k, v in model.state_dict().items()}
    hessian_eigenvalues(model, F.cross_entropy, batches, k=2)
    hessian_trace(model, F.cross_entropy, batches, samples=2)
    adaptive_sharpness(model, F.cross_entropy, batches, rho=0.1, steps=2)
    adaptive_average_sharpness(model, F.cross_entropy, batches, rho=0.1, samples=2)
    random_plane(model, F.cross_entropy, batches, steps=2)
    interpolation(model, F.cross_entropy, batches, _bn_model(), alphas=[0.5])
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert model.training and model[0].training and not model[1].training
    assert all(p.grad is None for p in model.parameters())


# -- errors ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda m, b: hessian_eigenvalues(m, F.cross_entropy, b, k=32), "k must be <= .*31.*32"),
        (lambda m, b: hessian_eigenvalues(m, F.cross_entropy, b, k=0), "k must be an integer >= 1"),
        (lambda m, b: hessian_eigenvalues(m, F.cross_entropy, b, tol=0), "tol must be > 0"),
        (lambda m, b: hessian_eigenvalues(m, F.cross_entropy, []), "batches: got no samples"),
        (lambda m, b: hessian_trace(m, F.cross_entropy, iter(b)), "re-iterable"),
        (lambda m, b: hessian_trace(m, F.cross_entropy, b, samples=1), "samples must be .* >= 2"),
        (lambda m, b: adaptive_sharpness(m, F.cross_entropy, b, rho=-1), "rho must be > 0"),
        (lambda m, b: adaptive_sharpness(m, F.cross_entropy, b, rho=1, norm="l1"), "norm must be"),
        (lambda m, b: random_plane(m, F.cross_entropy, b, steps=1), "steps must be .* >= 2"),
        (
            lambda m, b: interpolation(m, F.cross_entropy, b, _bn_model()),
            "other: its state dict does not match .*unexpected: 1.bias, 1.num_batches_tracked",
        ),
        (
            lambda m, b: hessian_trace(m, F.cross_entropy, [(x, y) for x, y in b if len(y) < 0]),
            "got no samples",
        ),
    ],
)
def test_bad_input_is_a_value_error_naming_the_argument(call, message):
    with pytest.raises(ValueError, match=message):
        call(_mlp(), _data())


# -- adaptive sharpness against brute force on a 2-parameter model ---------------------------------


class _TwoParameter(nn.Module):
    """f(x) = w_0 tanh(w_1 x)."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.tensor([0.8, -1.3], dtype=torch.float64))

    def forward(self, x):
        return self.w[0] * torch.tanh(self.w[1] * x)


def _two_parameter_data():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(10, generator=g, dtype=torch.float64)
    y = 0.7 * torch.tanh(-1.1 * x) + 0.1 * torch.randn(10, generator=g, dtype=torch.float64)
    return [(x[:6], y[:6]), (x[6:], y[6:])]


def _grid_losses(w0, w1, x, y) -> torch.Tensor:
    """MSE at every (w0, w1) of a grid, in closed form (G, M) -> (G,)."""
    return ((w0[:, None] * torch.tanh(w1[:, None] * x[None]) - y[None]) ** 2).mean(1)


def _brute_force_worst(w, batches, rho, norm, adaptive, points=1201) -> float:
    c = w.abs() if adaptive else torch.ones(2, dtype=torch.float64)
    if norm == "linf":
        t = torch.linspace(-rho, rho, points, dtype=torch.float64)
        g0, g1 = torch.meshgrid(t, t, indexing="ij")
    else:
        r = torch.linspace(0, rho, points // 2, dtype=torch.float64)
        phi = torch.linspace(0, 2 * math.pi, 2 * points, dtype=torch.float64)
        rr, pp = torch.meshgrid(r, phi, indexing="ij")
        g0, g1 = rr * torch.cos(pp), rr * torch.sin(pp)
    w0, w1 = (w[0] + c[0] * g0).reshape(-1), (w[1] + c[1] * g1).reshape(-1)
    total = sum(
        len(y) * (_grid_losses(w0, w1, x, y).max() - _grid_losses(w[:1], w[1:], x, y)[0])
        for x, y in batches
    )
    return float(total) / sum(len(y) for _, y in batches)


@pytest.mark.parametrize(
    ("norm", "adaptive", "rho"), [("linf", True, 0.3), ("l2", True, 0.4), ("linf", False, 0.25)]
)
def test_worst_case_sharpness_matches_brute_force(norm, adaptive, rho):
    model, batches = _TwoParameter(), _two_parameter_data()
    result = adaptive_sharpness(
        model, F.mse_loss, batches, rho=rho, norm=norm, adaptive=adaptive, steps=60
    )
    brute = _brute_force_worst(model.w.detach(), batches, rho, norm, adaptive)
    assert brute > 0.01  # a real increase, so a wrong radius or scale would show
    assert result.sharpness == pytest.approx(brute, rel=1e-4)
    assert result.perturbed_loss - result.loss == pytest.approx(result.sharpness)


def test_worst_case_sharpness_is_per_batch_m_sharpness():
    """Each batch gets its own perturbation: merging batches whose worst directions differ gives
    a smaller value."""
    model, batches = _TwoParameter(), _two_parameter_data()
    (x1, y1), (x2, _) = batches
    with torch.no_grad():  # batch 1 is worst at a larger |w_0|, batch 2 at a smaller one
        batches = [(x1, torch.zeros_like(y1)), (x2, 3 * model(x2))]
    whole = [(torch.cat([x for x, _ in batches]), torch.cat([y for _, y in batches]))]
    per_batch = adaptive_sharpness(model, F.mse_loss, batches, rho=0.3, steps=60).sharpness
    merged = adaptive_sharpness(model, F.mse_loss, whole, rho=0.3, steps=60).sharpness
    brute_merged = _brute_force_worst(model.w.detach(), whole, 0.3, "linf", True)
    assert merged == pytest.approx(brute_merged, rel=1e-4)
    assert per_batch > merged


def test_average_sharpness_matches_gauss_hermite_quadrature():
    model, batches = _TwoParameter(), _two_parameter_data()
    rho = 0.3
    nodes, weights = np.polynomial.hermite_e.hermegauss(60)  # for the weight exp(-z^2 / 2)
    weights = torch.tensor(weights / math.sqrt(2 * math.pi))
    z0, z1 = torch.meshgrid(torch.tensor(nodes), torch.tensor(nodes), indexing="ij")
    w = model.w.detach()
    w0, w1 = (w[0] * (1 + rho * z0)).reshape(-1), (w[1] * (1 + rho * z1)).reshape(-1)
    weight = (weights[:, None] * weights[None, :]).reshape(-1)
    exact = sum(
        len(y) * ((weight * _grid_losses(w0, w1, x, y)).sum() - _grid_losses(w[:1], w[1:], x, y)[0])
        for x, y in batches
    ) / sum(len(y) for _, y in batches)
    result = adaptive_average_sharpness(model, F.mse_loss, batches, rho=rho, samples=3000)
    assert float(exact) > 20 * result.stderr  # a wrong noise scale would be far outside
    assert abs(result.sharpness - float(exact)) < 4 * result.stderr


# -- landscapes ------------------------------------------------------------------------------------


def _loss(model, batches) -> float:
    f, theta = _flat_loss(model, batches)
    return float(f(theta))


def test_filter_normalized_direction_has_the_filter_norms_of_the_weights():
    model = _bn_model()
    direction = filter_normalized_direction(model, seed=3)
    for p, d in zip(model.parameters(), direction):
        if p.dim() <= 1:
            assert torch.count_nonzero(d) == 0
        else:
            torch.testing.assert_close(d.flatten(1).norm(dim=1), p.detach().flatten(1).norm(dim=1))
    assert not torch.equal(direction[0], filter_normalized_direction(model, seed=4)[0])


def test_random_plane_values_equal_the_loss_at_the_perturbed_weights():
    model, batches = _mlp(), _data()
    plane = random_plane(model, F.cross_entropy, batches, span=0.5, steps=5, seed=1)
    assert plane.losses.shape == (5, 5)
    assert plane.losses[2, 2] == pytest.approx(_loss(model, batches), rel=1e-12)  # the origin
    f, theta = _flat_loss(model, batches)
    d1, d2 = (torch.cat([t.reshape(-1) for t in d]) for d in plane.directions)
    a, b = plane.coordinates
    for i, j in [(0, 4), (3, 1), (4, 4)]:
        expected = float(f(theta + a[i] * d1 + b[j] * d2))
        assert plane.losses[i, j] == pytest.approx(expected, rel=1e-12)
    line = random_line(model, F.cross_entropy, batches, span=0.5, steps=3, seed=1)
    assert line.losses[1] == pytest.approx(_loss(model, batches), rel=1e-12)
    assert line.losses[0] == pytest.approx(float(f(theta - 0.5 * d1)), rel=1e-12)


def test_interpolation_reaches_both_models_exactly_including_batchnorm_statistics():
    first, second, batches = _bn_model(), _bn_model(), _data()
    torch.manual_seed(1)
    for model in (first, second):
        model.train()
        with torch.no_grad():
            for x, _ in batches:  # give each its own running statistics
                model(x + torch.randn(1, dtype=torch.float64))
            for p in model.parameters():
                p.add_(0.1 * torch.randn_like(p))
        model.eval()
    curve = interpolation(first, F.cross_entropy, batches, second, alphas=[0.0, 0.5, 1.0])
    midpoint = _bn_model().eval()
    midpoint.load_state_dict(
        {k: (v + second.state_dict()[k]) / 2 for k, v in first.state_dict().items()}
    )
    expected = [_loss(first, batches), _loss(midpoint, batches), _loss(second, batches)]
    np.testing.assert_allclose(curve.losses, expected, rtol=1e-12)
    from_state_dict = interpolation(first, F.cross_entropy, batches, second.state_dict())
    assert from_state_dict.losses[5] == pytest.approx(expected[0], rel=1e-12)  # alpha = 0


def _initial_and_trained_bn_models():
    """An initial BN model (running variance 1) and a trained one (running variances 0.12-0.18,
    as in the public report of NaN landscapes), both in eval mode."""
    initial, trained = _bn_model().eval(), _bn_model().eval()
    torch.manual_seed(2)
    with torch.no_grad():
        for p in trained.parameters():
            p.add_(0.5 * torch.randn_like(p))
        trained[1].running_var.copy_(torch.linspace(0.12, 0.18, 5, dtype=torch.float64))
        trained[1].running_mean.normal_()
    return initial, trained


def test_interpolation_of_batchnorm_models_holds_statistics_beyond_the_two_models():
    initial, trained = _initial_and_trained_bn_models()
    batches = _data()
    curve = interpolation(initial, F.cross_entropy, batches, trained)  # the default grid
    assert np.isfinite(curve.losses).all()
    # Independently: at alpha = 1.5 the parameters extrapolated, the buffers those of `trained`;
    # at alpha = -0.5 those of `initial`; at 0.25 both interpolated.
    a, b = initial.state_dict(), trained.state_dict()
    params = {name for name, _ in initial.named_parameters()}
    for index, alpha, held in [(20, 1.5, 1.0), (0, -0.5, 0.0), (7, 0.2, 0.2)]:
        assert curve.coordinates[0][index] == pytest.approx(alpha)
        expected_model = _bn_model().eval()
        expected_model.load_state_dict(
            {
                k: a[k] + (alpha if k in params else held) * (b[k] - a[k])
                if a[k].is_floating_point()
                else a[k]
                for k in a
            }
        )
        assert curve.losses[index] == pytest.approx(_loss(expected_model, batches), rel=1e-12)


def test_random_landscapes_of_a_batchnorm_model_are_finite_over_the_default_grid():
    _, trained = _initial_and_trained_bn_models()
    batches = _data()
    for mode in ("eval", "train"):
        getattr(trained, mode)()
        line = random_line(trained, F.cross_entropy, batches)
        plane = random_plane(trained, F.cross_entropy, batches)
        assert line.losses.shape == (21,) and plane.losses.shape == (21, 21)
        assert np.isfinite(line.losses).all() and np.isfinite(plane.losses).all()


def test_plots_are_written(tmp_path):
    model, batches = _mlp(), _data()
    plane = random_plane(model, F.cross_entropy, batches, steps=3)
    line = interpolation(model, F.cross_entropy, batches, _mlp(seed=1), alphas=[0, 1])
    for landscape, name in ((plane, "plane.png"), (line, "line.png")):
        path = plot_landscape(landscape, tmp_path / name, log=True)
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert plane.to_dict()["losses"][1][1] == pytest.approx(_loss(model, batches))


# -- aace sharpness and aace compare ---------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory):
    """Two one-epoch runs on a tiny npz dataset: wrn10_1 (SGD) and wrn10_2 (another model)."""
    from aace.cli import main

    tmp = tmp_path_factory.mktemp("sharpness")
    rng = np.random.default_rng(0)
    data = tmp / "tiny.npz"
    np.savez(
        data,
        x_train=rng.integers(0, 256, (24, 8, 8), dtype=np.uint8),
        y_train=np.arange(24) % 3,
        x_test=rng.integers(0, 256, (9, 8, 8), dtype=np.uint8),
        y_test=np.arange(9) % 3,
    )
    runs = {}
    for model in ("wrn10_1", "wrn10_2"):
        out = tmp / model
        argv = ["train", "--dataset", f"npz:{data}", "--model", model, "--epochs", "1"]
        assert main([*argv, "--batch-size", "8", "--optimizer", "sgd", "--out", str(out)]) == 0
        runs[model] = out
    return data, runs


FAST_SHARPNESS = ["--images", "24", "--batch-size", "8", "--samples", "2", "--steps", "2"]
FAST_SHARPNESS += ["--average-samples", "2", "--max-iter", "12", "--tol", "1e-2"]


def test_sharpness_command_writes_its_json_and_compare_shows_it(tiny_runs, capsys):
    from aace.cli import main
    from aace.data import load_dataset
    from aace.models import create_model

    data, runs = tiny_runs
    run = runs["wrn10_1"]
    argv = ["sharpness", str(run), *FAST_SHARPNESS, "--top-k", "2"]
    assert main([*argv, "--landscape", "1d", "--resolution", "3", "--against", str(run)]) == 0
    result = json.loads((run / "sharpness.json").read_text())
    eigenvalues = result["hessian_eigenvalues"]
    assert len(eigenvalues) == 2 and eigenvalues[0] >= eigenvalues[1]
    assert result["hessian_trace_stderr"] > 0 and result["adaptive_sharpness"] > 0
    assert result["settings"]["images_measured"] == 24 and result["seconds"]["total"] > 0
    # The measured loss is the eval-mode cross-entropy over all 24 normalized training images.
    dataset = load_dataset(f"npz:{data}")
    model = create_model("wrn10_1", num_classes=3, in_channels=1)
    model.load_state_dict(torch.load(run / "checkpoint.pt", weights_only=True)["model"])
    mean, std = (torch.tensor(v).view(1, -1, 1, 1) for v in (dataset.mean, dataset.std))
    x = (dataset.x_train.float() / 255 - mean) / std
    with torch.no_grad():
        expected = float(F.cross_entropy(model.eval()(x), dataset.y_train))
    assert result["loss"] == pytest.approx(expected, rel=1e-6)
    # Interpolating a model with itself is flat at that loss.
    landscape = result["landscape"]
    assert landscape["kind"] == "interpolation" and (run / landscape["png"]).is_file()
    np.testing.assert_allclose(landscape["losses"], expected, rtol=1e-6)
    capsys.readouterr()
    assert main(["compare", str(run), str(runs["wrn10_2"])]) == 0
    table = capsys.readouterr().out
    # One run: its value, with no spread to show (not "± 0").
    assert "top Hessian eigenvalue" in table and f"| {eigenvalues[0]:.4g} |" in table
    assert "| – | – | – |" in table  # the wrn10_2 run has no sharpness.json


def test_sharpness_output_file_and_its_old_spelling(tiny_runs, tmp_path, capsys):
    """``--output-file FILE`` names the JSON (``--out`` is a folder everywhere else); ``--out
    FILE``, its old spelling, still works for one release with one warning line."""
    from aace.cli import main

    _, runs = tiny_runs
    argv = ["sharpness", str(runs["wrn10_1"]), *FAST_SHARPNESS, "--top-k", "0", "--samples", "0"]
    argv += ["--average-samples", "0", "--steps", "1"]
    for flag, name in (("--output-file", "new.json"), ("--out", "old.json")):
        assert main([*argv, flag, str(tmp_path / name)]) == 0
        assert json.loads((tmp_path / name).read_text())["adaptive_sharpness"] >= 0
        warnings = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
        expected = (
            ["aace: warning: --out is deprecated; use --output-file"] if flag == "--out" else []
        )
        assert warnings == expected


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--images", "0"], "--images: got 0; expected an integer >= 1"),
        (["--samples", "1"], r"--samples: got 1; expected 0 \(skip\) or an integer >= 2"),
        (["--rho", "-1"], "--rho: got -1.0; expected a finite number > 0"),
        (["--against", "x.pt"], "--against: got 'x.pt'; expected to be used with --landscape 1d"),
        (["--landscape", "1d", "--against", "OTHER"], "--against: checkpoint '.*wrn10_2.*' is a "),
        (["--top-k", "100000000"], "k must be <= the number of analysed parameters"),
    ],
)
def test_sharpness_command_bad_input_is_one_line_and_exit_2(tiny_runs, extra, message, capsys):
    from aace.cli import main

    _, runs = tiny_runs
    extra = [str(runs["wrn10_2"] / "checkpoint.pt") if a == "OTHER" else a for a in extra]
    assert main(["sharpness", str(runs["wrn10_1"]), "--output-file", "/dev/null", *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("aace: error: ")
    assert re.search(message, err), err


def test_sharpness_command_on_a_directory_that_is_not_a_run(tmp_path, capsys):
    from aace.cli import main

    assert main(["sharpness", str(tmp_path)]) == 2
    assert "has no checkpoint.pt; expected an aace run directory" in capsys.readouterr().err
