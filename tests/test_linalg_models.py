"""Algorithms on the curvature operators of small networks, against dense references."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from nncurv import CurvatureProblem, GGNOperator, HessianOperator
from nncurv.linalg import (
    diagonal,
    eigenvalues,
    ggn_diagonal,
    spectral_density,
    trace,
)
from tests.conftest import assert_close

D = torch.float64


def _mlp_problem(loss: nn.Module, device: torch.device | str = "cpu") -> CurvatureProblem:
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).to(D).to(device)
    X = torch.randn(20, 4, generator=g, dtype=D)
    if isinstance(loss, nn.CrossEntropyLoss):
        Y = torch.randint(0, 3, (20,), generator=g)
    else:
        Y = torch.randn(20, 3, generator=g, dtype=D)
    data = [(X[:8].to(device), Y[:8].to(device)), (X[8:].to(device), Y[8:].to(device))]
    return CurvatureProblem(model, loss, data, reduction=loss.reduction)  # type: ignore[arg-type]


def _cnn_problem() -> CurvatureProblem:
    g = torch.Generator().manual_seed(1)
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(2 * 4 * 4, 3)).to(
        D
    )
    X = torch.randn(6, 1, 6, 6, generator=g, dtype=D)
    y = torch.randint(0, 3, (6,), generator=g)
    return CurvatureProblem(model, nn.CrossEntropyLoss(), (X, y))


LOSSES = [
    nn.CrossEntropyLoss(),
    nn.CrossEntropyLoss(reduction="sum"),
    nn.MSELoss(),
    nn.MSELoss(reduction="sum"),
]


@pytest.mark.parametrize("loss", LOSSES, ids=lambda x: f"{type(x).__name__}-{x.reduction}")
def test_exact_ggn_diagonal_matches_dense_ggn(loss: nn.Module, device: torch.device) -> None:
    problem = _mlp_problem(loss, device)
    dense = GGNOperator(problem).to_dense().diagonal()
    d = ggn_diagonal(problem)
    assert_close(d.estimate, dense, rtol=1e-10, atol=1e-14, what="exact GGN diagonal")
    assert d.num_matvecs == 20 * 3 and bool((d.standard_error == 0).all())
    assert d.estimate_dict is not None
    for n, p in problem.params.items():
        assert d.estimate_dict[n].shape == p.shape


def test_exact_ggn_diagonal_cnn() -> None:
    problem = _cnn_problem()
    dense = GGNOperator(problem).to_dense().diagonal()
    assert_close(ggn_diagonal(problem, sample_chunk=4).estimate, dense, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("method", ["mc", "gnb"])
def test_monte_carlo_ggn_diagonals_are_unbiased(method: str) -> None:
    problem = _mlp_problem(nn.CrossEntropyLoss())
    exact = ggn_diagonal(problem).estimate
    reps = 60
    est = torch.stack([ggn_diagonal(problem, method=method, seed=s).estimate for s in range(reps)])
    mc_se = est.std(0) / math.sqrt(reps)
    z = (est.mean(0) - exact).abs() / mc_se.clamp_min(1e-15)
    assert float(z.max()) <= 4.5, float(z.max())
    # the reported SE (several draws) is honest
    r = ggn_diagonal(problem, method=method, mc_samples=8, seed=999)
    assert r.num_matvecs == (8 * 20 if method == "mc" else 8 * 2)
    ratio = float((est.std(0) / math.sqrt(8) / r.standard_error.clamp_min(1e-15)).median())
    assert 0.6 <= ratio <= 1.7, ratio


def test_per_sample_mc_has_lower_variance_than_gnb() -> None:
    problem = _mlp_problem(nn.CrossEntropyLoss())
    exact = ggn_diagonal(problem).estimate
    err = {}
    for method in ("mc", "gnb"):
        est = torch.stack(
            [ggn_diagonal(problem, method=method, seed=s).estimate for s in range(40)]
        )
        err[method] = float(((est - exact) ** 2).sum(1).mean())
    assert err["mc"] < err["gnb"], err


def test_mse_monte_carlo_is_unbiased() -> None:
    problem = _mlp_problem(nn.MSELoss())
    exact = ggn_diagonal(problem).estimate
    r = ggn_diagonal(problem, method="mc", mc_samples=400, seed=3)
    z = (r.estimate - exact).abs() / r.standard_error
    assert float(z.max()) <= 4.5


def test_ggn_diagonal_bad_input() -> None:
    problem = _mlp_problem(nn.CrossEntropyLoss())
    with pytest.raises(ValueError, match="'fisher'"):
        ggn_diagonal(problem, method="fisher")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="mc_samples"):
        ggn_diagonal(problem, method="mc", mc_samples=0)
    with pytest.raises(ValueError, match="L1Loss"):
        ggn_diagonal(
            CurvatureProblem(
                problem.model, nn.L1Loss(), (torch.randn(4, 4, dtype=D), torch.randn(4, 3, dtype=D))
            )
        )
    with pytest.raises(ValueError, match="gnb"):
        ggn_diagonal(_mlp_problem(nn.MSELoss()), method="gnb")
    weighted = nn.CrossEntropyLoss(weight=torch.ones(3, dtype=D))
    with pytest.raises(ValueError, match="class weights"):
        ggn_diagonal(
            CurvatureProblem(
                problem.model, weighted, (torch.randn(4, 4, dtype=D), torch.tensor([0, 1, 2, 0]))
            )
        )
    with pytest.raises(ValueError, match="ignore_index"):
        ggn_diagonal(
            CurvatureProblem(
                problem.model,
                nn.CrossEntropyLoss(),
                (torch.randn(4, 4, dtype=D), torch.tensor([0, -100, 2, 0])),
            )
        )
    with pytest.raises(TypeError, match="CurvatureProblem"):
        ggn_diagonal(GGNOperator(problem))  # type: ignore[arg-type]


# ------------------------------------------------------------------ operators on models
def test_eigenvalues_of_network_hessian_match_dense() -> None:
    problem = _mlp_problem(nn.MSELoss())  # an indefinite Hessian
    H = HessianOperator(problem)
    dense = H.to_dense()
    dense = (dense + dense.T) / 2
    lam = torch.linalg.eigvalsh(dense)
    for which in ("LA", "SA", "BE"):
        res = eigenvalues(H, k=4, which=which, tol=1e-9, return_eigenvectors=True)
        assert res.converged
        expected = {"LA": lam.flip(0)[:4], "SA": lam[:4], "BE": torch.cat([lam[:2], lam[-2:]])}
        assert_close(res.eigenvalues, expected[which], rtol=0, atol=1e-8 * float(lam.abs().max()))
        assert res.eigenvector_dicts is not None and len(res.eigenvector_dicts) == 4
        for n, p in problem.params.items():
            assert res.eigenvector_dicts[0][n].shape == p.shape
        assert res.eigenvectors is not None
        assert torch.equal(H.flatten(res.eigenvector_dicts[1]), res.eigenvectors[:, 1])


def test_trace_diagonal_and_density_of_network_ggn() -> None:
    problem = _mlp_problem(nn.CrossEntropyLoss())
    G = GGNOperator(problem)
    dense = G.to_dense()
    n = G.shape[0]
    t = trace(G, n)  # budget >= n: exact
    assert t.method == "exact" and abs(t.estimate - float(dense.trace())) < 1e-10
    x = diagonal(G, 40, seed=0)
    assert x.estimate_dict is not None and x.estimate.shape == (n,)
    assert float((x.estimate - dense.diagonal()).norm()) < float(dense.diagonal().norm())
    slq = spectral_density(G, num_steps=n)  # full Krylov space (up to breakdown): exact nodes
    lam = torch.linalg.eigvalsh((dense + dense.T) / 2)
    assert abs(slq.lambda_max - float(lam[-1])) < 1e-8
    assert slq.negative_mass(-1e-8) == 0.0  # the GGN is PSD


@pytest.mark.parametrize(
    "name", ["mlp_gelu_ce_sum", "cnn_ce_mean", "bn_eval_ce_mean", "transformer_ce_mean"]
)
def test_both_ends_of_zoo_hessians_match_an_independent_dense_hessian(name: str) -> None:
    from tests.reference import dense_hessian
    from tests.zoo import case

    model, loss_fn, (X, y) = case(name).make("cpu")
    reduction = getattr(loss_fn, "reduction", "mean")
    problem = CurvatureProblem(model, loss_fn, (X, y), reduction=reduction)
    ref = dense_hessian(model, loss_fn, X, y, problem)  # torch.func.hessian, not nncurv
    lam = torch.linalg.eigvalsh((ref + ref.T) / 2)
    res = eigenvalues(HessianOperator(problem), k=4, which="BE", tol=1e-9)
    assert res.converged
    expected = torch.cat([lam[:2], lam[-2:]])
    assert_close(res.eigenvalues, expected, rtol=0, atol=1e-7 * float(lam.abs().max()), what=name)
