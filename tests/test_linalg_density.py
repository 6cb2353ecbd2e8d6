"""Stochastic Lanczos quadrature against exact spectra."""

from __future__ import annotations

import math

import pytest
import torch

from nncurv.linalg import NonFiniteError, plot_spectral_density, spectral_density
from nncurv.operators.base import CallableOperator, MatrixOperator
from tests.conftest import assert_close

D = torch.float64


def _rotated(lam: torch.Tensor, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(len(lam), len(lam), generator=g, dtype=D))
    A = Q @ torch.diag(lam) @ Q.T
    return (A + A.T) / 2


def _bulk_outliers(n: int = 200, neg: bool = True) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    bulk = 0.5 * torch.rand(n - 4, generator=g, dtype=D) - (0.2 if neg else -0.01)
    return torch.cat([torch.tensor([40.0, 25.0, 12.0, 6.0], dtype=D), bulk])


def test_full_krylov_space_gives_exact_nodes_and_weights(device: torch.device) -> None:
    lam = _bulk_outliers(60)
    A = _rotated(lam).to(device)
    slq = spectral_density(MatrixOperator(A), num_probes=2, num_steps=60)
    assert slq.nodes.shape == (2, 60) and slq.num_matvecs == 120
    assert_close(slq.weights.sum(1), torch.ones(2, dtype=D), rtol=1e-12, what="weights sum")
    for row in slq.nodes:
        assert_close(torch.sort(row).values, torch.sort(lam).values, rtol=0, atol=1e-9)
    assert slq.nodes.device.type == device.type


@pytest.mark.parametrize("reorthogonalize", [True, False])
def test_spectral_sums_unbiased_over_probes(reorthogonalize: bool) -> None:
    lam = _bulk_outliers(200, neg=False)  # PSD with a bulk near zero
    A = _rotated(lam, seed=3)
    slq = spectral_density(
        MatrixOperator(A), num_probes=64, num_steps=30, reorthogonalize=reorthogonalize
    )
    checks = {
        "trace": (slq.trace(), float(lam.sum())),
        "logdet": (slq.logdet(0.1), float(torch.log(lam + 0.1).sum())),
        "effdim": (slq.effective_dimension(0.1), float((lam / (lam + 0.1)).sum())),
    }
    for name, ((est, se), truth) in checks.items():
        assert math.isfinite(se) and se > 0, name
        assert abs(est - truth) <= 4 * se + 1e-3 * abs(truth), (name, est, truth, se)


def test_negative_mass_and_extremes() -> None:
    lam = _bulk_outliers(200)
    A = _rotated(lam, seed=4)
    slq = spectral_density(MatrixOperator(A), num_probes=16, num_steps=60)
    truth = float((lam < 0).double().mean())
    assert abs(slq.negative_mass() - truth) < 0.05, (slq.negative_mass(), truth)
    assert abs(slq.lambda_max - 40.0) < 1e-8
    assert abs(slq.lambda_min - float(lam.min())) < 1e-2
    with pytest.raises(ValueError, match="positive definite"):
        slq.logdet(0.0)
    with pytest.raises(ValueError, match="alpha"):
        slq.effective_dimension(-1.0)


def _w1(slq_nodes: torch.Tensor, slq_w: torch.Tensor, lam: torch.Tensor) -> float:
    """Wasserstein-1 distance between the averaged quadrature measure and the exact ESD."""
    grid = torch.linspace(float(lam.min()) - 1, float(lam.max()) + 1, 20001, dtype=D)
    F_true = (lam[None, :] <= grid[:, None]).double().mean(1)
    F_slq = (slq_nodes.reshape(-1)[None, :] <= grid[:, None]) * slq_w.reshape(-1)[None, :]
    F_slq = F_slq.sum(1) / slq_nodes.shape[0]
    return float(torch.trapezoid((F_true - F_slq).abs(), grid))


def test_density_integrates_to_one_and_w1_shrinks_with_steps() -> None:
    lam = _bulk_outliers(400)
    A = _rotated(lam, seed=5)
    dists = []
    for m in (4, 16, 64):
        slq = spectral_density(MatrixOperator(A), num_probes=4, num_steps=m, seed=1)
        grid, phi = slq.density()
        assert abs(float(torch.trapezoid(phi, grid)) - 1.0) < 1e-3
        assert bool((phi >= 0).all())
        dists.append(_w1(slq.nodes, slq.weights, lam))
    assert dists[0] > dists[1] > dists[2], dists
    assert dists[2] < 0.05 * float(lam.max() - lam.min()), dists


def test_density_on_given_grid_and_sigma() -> None:
    A = torch.diag(torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=D))
    slq = spectral_density(MatrixOperator(A), num_steps=4)
    grid = torch.tensor([1.0, 2.5, 100.0], dtype=D)
    g, phi = slq.density(grid, sigma=0.1)
    expected = (
        0.25
        * torch.exp(-0.5 * ((grid[:, None] - torch.arange(1.0, 5.0, dtype=D)) / 0.1) ** 2).sum(1)
        / (math.sqrt(2 * math.pi) * 0.1)
    )
    assert_close(phi, expected, rtol=1e-8, atol=1e-300, what="density")
    with pytest.raises(ValueError, match="sigma"):
        slq.density(sigma=0.0)


def test_breakdown_on_small_operator_pads_weights() -> None:
    A = torch.diag(torch.tensor([2.0, 2.0, 5.0, 5.0, 5.0, 7.0], dtype=D))  # 3 distinct values
    slq = spectral_density(MatrixOperator(A), num_steps=6)
    assert slq.converged
    assert_close(slq.weights.sum(1), torch.ones(1, dtype=D), rtol=1e-12)
    support = slq.nodes[slq.weights > 1e-12]
    assert len(support) == 3
    assert_close(torch.sort(support).values, torch.tensor([2.0, 5.0, 7.0], dtype=D), 1e-10)
    assert abs(slq.trace()[0] - 26.0) < 1e-10


def test_plot_helper_returns_a_figure() -> None:
    import matplotlib

    matplotlib.use("Agg")
    slq = spectral_density(MatrixOperator(_rotated(_bulk_outliers(50))), num_steps=20)
    fig = plot_spectral_density(slq)
    ax = fig.axes[0]
    assert ax.get_yscale() == "log" and len(ax.lines) == 1
    import matplotlib.pyplot as plt

    plt.close(fig)


def test_bad_input() -> None:
    op = MatrixOperator(torch.eye(5, dtype=D))
    with pytest.raises(ValueError, match="num_steps"):
        spectral_density(op, num_steps=0)
    with pytest.raises(TypeError, match="num_probes"):
        spectral_density(op, num_probes=1.5)  # type: ignore[arg-type]
    g = torch.Generator().manual_seed(0)
    M = torch.randn(30, 30, generator=g, dtype=D)
    with pytest.raises(ValueError, match="symmetric"):
        spectral_density(MatrixOperator(M, symmetric=False))
    lying = CallableOperator(lambda v: M @ v, 30, dtype=D, device=M.device)  # claims symmetry
    with pytest.raises(ValueError, match="not symmetric"):
        spectral_density(lying, num_steps=10)

    def mv(v: torch.Tensor) -> torch.Tensor:
        out = 3.0 * v
        out[0] = math.inf
        return out

    with pytest.raises(NonFiniteError, match="NaN or Inf"):
        spectral_density(CallableOperator(mv, 10, dtype=D, device="cpu"))


def test_resolved_negative_mass_ignores_the_sign_of_a_bulk_at_zero() -> None:
    # 90 % of the spectrum is a bulk within ±1e-6 of zero, 5 % clearly negative, 5 % positive
    n = 400
    g = torch.Generator().manual_seed(7)
    bulk = (torch.rand(360, generator=g, dtype=torch.float64) - 0.5) * 2e-6
    lam = torch.cat([bulk, -torch.linspace(0.5, 1.0, 20, dtype=torch.float64),
                     torch.linspace(1.0, 10.0, 20, dtype=torch.float64)])  # fmt: skip
    A = _rotated(lam, seed=8)
    slq = spectral_density(MatrixOperator(A), num_probes=16, num_steps=40)
    assert abs(slq.resolved_negative_mass() - 20 / n) < 0.03, slq.resolved_negative_mass()
    assert slq.resolved_negative_mass() <= slq.negative_mass() + 1e-12
