"""Observed information, Fisher, empirical Fisher and their metrics against closed forms."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call
from torch.utils.data import DataLoader, TensorDataset

from nncurv import MatrixOperator
from nncurv.information import (
    InformationOperator,
    condition_number,
    conjugate_gradients,
    effective_dimension,
    empirical_fisher,
    fisher_information,
    gradient_covariance,
    information_metrics,
    log_determinant,
    observed_fisher_gap,
    observed_information,
    standard_errors,
    takeuchi_criterion,
)
from tests.conftest import assert_close

D64 = torch.float64
ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------- references
def _flat(model: nn.Module) -> Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def _split(model: nn.Module, flat: Tensor) -> dict[str, Tensor]:
    out, i = {}, 0
    for n, p in model.named_parameters():
        out[n] = flat[i : i + p.numel()].reshape(p.shape)
        i += p.numel()
    return out


def dense_hessian_of(model: nn.Module, nll: object, X: Tensor, y: Tensor) -> Tensor:
    """``torch.func.hessian`` of the summed NLL ``nll(outputs, y)`` in the flat parameters."""

    def f(flat: Tensor) -> Tensor:
        return nll(functional_call(model, _split(model, flat), (X,)), y)  # type: ignore[operator]

    return torch.func.hessian(f)(_flat(model))


def jacobian_of(model: nn.Module, X: Tensor) -> Tensor:
    flat = _flat(model)
    J = torch.func.jacrev(lambda f: functional_call(model, _split(model, f), (X,)))(flat)
    return J.reshape(-1, flat.numel())


def per_sample_grads(model: nn.Module, nll: object, X: Tensor, y: Tensor) -> Tensor:
    def one(flat: Tensor, x: Tensor, t: Tensor) -> Tensor:
        return nll(functional_call(model, _split(model, flat), (x,)), t)  # type: ignore[operator]

    g = torch.func.grad(one)
    return torch.stack([g(_flat(model), X[i : i + 1], y[i : i + 1]) for i in range(len(X))])


def breast_cancer() -> tuple[Tensor, Tensor]:
    """Standardised breast-cancer data, the ten "mean ..." features.

    With all 30 features the classes are linearly separable and the unpenalised MLE does not
    exist (Newton's iterates diverge); the ten mean features give a finite MLE.
    """
    from sklearn.datasets import load_breast_cancer

    X, y = load_breast_cancer(return_X_y=True)
    X = torch.tensor(X[:, :10], dtype=D64)
    X = (X - X.mean(0)) / X.std(0)
    return X, torch.tensor(y, dtype=D64).unsqueeze(1)


def fit_logistic(X: Tensor, y: Tensor, steps: int = 30) -> tuple[nn.Module, Tensor]:
    """Newton steps on nncurv's own observed information; returns the model and final gradient."""
    torch.manual_seed(0)
    model = nn.Linear(X.shape[1], 1).double()
    with torch.no_grad():
        model.weight.zero_()
        model.bias.zero_()
    for _ in range(steps):
        info = observed_information(
            model, nn.BCEWithLogitsLoss(reduction="sum"), (X, y), reduction="sum"
        )
        _, g = info.problem.loss_and_gradient()
        step = torch.linalg.solve(info.to_dense(), g)
        with torch.no_grad():
            offset = 0
            for p in model.parameters():
                p -= step[offset : offset + p.numel()].reshape(p.shape)
                offset += p.numel()
        if float(step.abs().max()) < 1e-12:
            break
    info = observed_information(
        model, nn.BCEWithLogitsLoss(reduction="sum"), (X, y), reduction="sum"
    )
    return model, info.problem.loss_and_gradient()[1]


@pytest.fixture(scope="module")
def logistic() -> tuple[nn.Module, Tensor, Tensor, Tensor]:
    X, y = breast_cancer()
    model, g = fit_logistic(X, y)
    return model, X, y, g


# ---------------------------------------------------------------------- logistic regression
def test_logistic_regression_breast_cancer_closed_form(logistic) -> None:
    model, X, y, g = logistic
    assert float(g.abs().max()) < 1e-9, f"not at the MLE: gradient {float(g.abs().max()):.2e}"
    A = torch.cat([X, torch.ones(X.shape[0], 1, dtype=D64)], dim=1)  # weight columns, then bias
    p = torch.sigmoid(model(X)).detach()
    XtWX = A.T @ (p * (1 - p) * A)
    se_closed = torch.linalg.inv(XtWX).diagonal().sqrt()
    for reduction in ("mean", "sum"):
        loss = nn.BCEWithLogitsLoss(reduction=reduction)
        info = observed_information(model, loss, (X, y), reduction=reduction)
        assert_close(info.to_dense(), XtWX, rtol=1e-10, atol=1e-10, what=f"I ({reduction})")
        se = standard_errors(info)
        assert se.method == "dense" and se.converged
        assert_close(se.values, se_closed, rtol=1e-8, what=f"SE ({reduction})")
        # the Fisher is the same matrix (canonical link)
        Fi = fisher_information(model, loss, (X, y), reduction=reduction)
        assert_close(Fi.to_dense(), XtWX, rtol=1e-10, atol=1e-10, what="Fisher")
    assert se.names[0] == "weight[0, 0]" and se.names[-1] == "bias[0]"


def test_logistic_standard_errors_by_cg_on_a_subset(logistic) -> None:
    model, X, y, _ = logistic
    A = torch.cat([X, torch.ones(X.shape[0], 1, dtype=D64)], dim=1)
    p = torch.sigmoid(model(X)).detach()
    se_closed = torch.linalg.inv(A.T @ (p * (1 - p) * A)).diagonal().sqrt()
    info = observed_information(model, nn.BCEWithLogitsLoss(), (X, y), reduction="mean")
    r = standard_errors(info, subset="bias", method="cg", tol=1e-13)
    assert r.method == "cg" and r.converged and r.indices.tolist() == [10]
    assert_close(r.values, se_closed[10:], rtol=1e-8, what="CG SE of the bias")
    # marginal, not conditional: differs from the bias-only information's 1/sqrt(I_bb)
    conditional = 1 / math.sqrt(float((p * (1 - p)).sum()))
    assert abs(float(r.values[0]) - conditional) > 1e-3 * conditional


def test_bce_on_probabilities_observed_and_expected_fisher(logistic) -> None:
    _, X, y, _ = logistic
    torch.manual_seed(1)
    lin = nn.Linear(X.shape[1], 1).double()
    model = nn.Sequential(lin, nn.Sigmoid())
    A = torch.cat([X, torch.ones(X.shape[0], 1, dtype=D64)], dim=1)
    p = torch.sigmoid(lin(X)).detach()
    XtWX = A.T @ (p * (1 - p) * A)
    info = observed_information(model, nn.BCELoss(), (X, y), reduction="mean")
    assert_close(info.to_dense(), XtWX, rtol=1e-8, atol=1e-8, what="I with BCELoss")
    Fi = fisher_information(model, nn.BCELoss(), (X, y), reduction="mean")
    assert Fi.likelihood.fisher == "expected"
    assert_close(Fi.to_dense(), XtWX, rtol=1e-8, atol=1e-8, what="expected Fisher, BCELoss")


# ---------------------------------------------------------------------- linear-Gaussian
def _linear_gaussian(n: int = 80, d: int = 4, out: int = 1, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=gen, dtype=D64)
    beta = torch.randn(d, out, generator=gen, dtype=D64)
    y = X @ beta + 0.3 * torch.randn(n, out, generator=gen, dtype=D64)
    torch.manual_seed(seed)
    model = nn.Linear(d, out, bias=False).double()
    return model, X, y


def test_linear_gaussian_closed_forms(device) -> None:
    model, X, y = _linear_gaussian()
    model, X, y = model.to(device), X.to(device), y.to(device)
    s2 = 0.09
    XtX = X.T @ X
    info_ref = XtX / s2
    lam = torch.linalg.eigvalsh(info_ref)
    for reduction in ("mean", "sum"):
        info = observed_information(
            model, nn.MSELoss(reduction=reduction), (X, y), reduction=reduction, noise_variance=s2
        )
        assert info.likelihood.noise_variance_source == "stated"
        assert_close(info.to_dense(), info_ref, rtol=1e-10, what=f"I ({reduction})")
        se = standard_errors(info)
        assert_close(se.values, (s2 * torch.linalg.inv(XtX)).diagonal().sqrt(), rtol=1e-10)
        Fi = fisher_information(
            model, nn.MSELoss(reduction=reduction), (X, y), reduction=reduction, noise_variance=s2
        )
        assert_close(Fi.to_dense(), info_ref, rtol=1e-10, what=f"Fisher ({reduction})")
    ld = log_determinant(info, 2.0, method="dense")
    assert abs(ld.value - float(torch.log(lam + 2.0).sum())) < 1e-9
    ed = effective_dimension(info, 50.0, method="dense")
    assert abs(ed.value - float((lam / (lam + 50.0)).sum())) < 1e-12
    cond = condition_number(info)
    assert abs(cond.condition_number - float(lam[-1] / lam[0])) < 1e-6 * float(lam[-1] / lam[0])
    assert not cond.indefinite and cond.num_negative == 0


def test_slq_logdet_and_effective_dimension_are_unbiased_within_error() -> None:
    gen = torch.Generator().manual_seed(3)
    X = torch.randn(200, 40, generator=gen, dtype=D64) * torch.linspace(0.1, 3, 40, dtype=D64)
    y = torch.randn(200, 1, generator=gen, dtype=D64)
    model = nn.Linear(40, 1, bias=False).double()
    info = observed_information(model, nn.MSELoss(), (X, y), reduction="mean", noise_variance=1.0)
    lam = torch.linalg.eigvalsh(X.T @ X)
    exact_ld = float(torch.log(lam + 1.0).sum())
    exact_ed = float((lam / (lam + 100.0)).sum())
    ld = log_determinant(info, 1.0, num_probes=40, num_steps=40, seed=1)
    ed = effective_dimension(info, 100.0, num_probes=40, num_steps=40, seed=2)
    assert ld.standard_error > 0 and ed.standard_error > 0
    assert abs(ld.value - exact_ld) < 4 * ld.standard_error + 1e-8, (ld, exact_ld)
    assert abs(ed.value - exact_ed) < 4 * ed.standard_error + 1e-8, (ed, exact_ed)
    assert ld.num_matvecs == 40 * 40


def test_mse_multi_output_and_estimated_noise_variance() -> None:
    model, X, y = _linear_gaussian(n=30, d=3, out=2)
    rss = float(((model(X).detach() - y) ** 2).sum())
    s2_hat = rss / (30 * 2)
    info = observed_information(
        model, nn.MSELoss(), (X, y), reduction="mean", noise_variance="estimate"
    )
    lk = info.likelihood
    assert lk.terms_per_sample == 2 and lk.noise_variance_source.startswith("estimated")
    assert abs(lk.noise_variance - s2_hat) < 1e-12 * s2_hat
    H_sum = dense_hessian_of(model, nn.MSELoss(reduction="sum"), X, y)
    assert_close(info.to_dense(), H_sum / (2 * s2_hat), rtol=1e-10, what="I = H_sum/(2 s2)")


# ---------------------------------------------------------------------- reductions
def test_mean_and_sum_give_the_same_observed_information() -> None:
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(23, 4, generator=gen, dtype=D64)
    y = torch.randint(0, 3, (23,), generator=gen)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    ds = TensorDataset(X, y)
    mean = observed_information(
        model, nn.CrossEntropyLoss(), DataLoader(ds, batch_size=5), reduction="mean"
    ).to_dense()
    summ = observed_information(
        model, nn.CrossEntropyLoss(reduction="sum"), (X, y), reduction="sum"
    ).to_dense()
    ref = dense_hessian_of(model, nn.CrossEntropyLoss(reduction="sum"), X, y)
    assert_close(mean, ref, rtol=1e-10, atol=1e-12, what="mean, 5 batches")
    assert_close(summ, ref, rtol=1e-10, atol=1e-12, what="sum")
    # element-wise losses with several targets per sample: mean divides by N*D
    Y = torch.randint(0, 2, (23, 3), generator=gen).double()
    m = observed_information(model, nn.BCEWithLogitsLoss(), (X, Y), reduction="mean")
    s = observed_information(model, nn.BCEWithLogitsLoss(reduction="sum"), (X, Y), reduction="sum")
    assert m.likelihood.terms_per_sample == 3 and m.scale == 23 * 3
    assert_close(m.to_dense(), s.to_dense(), rtol=1e-10, atol=1e-12, what="BCE mean vs sum")


# ---------------------------------------------------------------------- Fisher and gap
def test_softmax_regression_fisher_equals_observed_and_hidden_layer_gap() -> None:
    gen = torch.Generator().manual_seed(5)
    X = torch.randn(40, 4, generator=gen, dtype=D64)
    y = torch.randint(0, 3, (40,), generator=gen)
    torch.manual_seed(5)
    soft = nn.Linear(4, 3).double()  # arbitrary parameters, not a minimum
    args = (soft, nn.CrossEntropyLoss(), (X, y))
    info = observed_information(*args, reduction="mean")
    Fi = fisher_information(*args, reduction="mean")
    assert_close(Fi.to_dense(), info.to_dense(), rtol=1e-10, atol=1e-12, what="softmax F = I")
    assert observed_fisher_gap(info, Fi, method="dense").value < 1e-12
    assert observed_fisher_gap(info, Fi, num_probes=10).value < 1e-10

    mlp = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    args = (mlp, nn.CrossEntropyLoss(), (X, y))
    info = observed_information(*args, reduction="mean")
    Fi = fisher_information(*args, reduction="mean")
    H = dense_hessian_of(mlp, nn.CrossEntropyLoss(reduction="sum"), X, y)
    p = torch.softmax(mlp(X), 1).detach()
    J = jacobian_of(mlp, X).reshape(40, 3, -1)
    Hout = torch.diag_embed(p) - p.unsqueeze(2) * p.unsqueeze(1)
    F_ref = torch.einsum("nop,noq,nqr->pr", J, Hout, J)
    assert_close(Fi.to_dense(), F_ref, rtol=1e-10, atol=1e-12, what="Fisher hidden layer")
    exact = float((H - F_ref).norm() / H.norm())
    assert exact > 0.01
    dense = observed_fisher_gap(info, Fi, method="dense")
    assert abs(dense.value - exact) < 1e-10
    est = observed_fisher_gap(info, Fi, num_probes=100, seed=1)
    assert est.standard_error > 0
    assert abs(est.value - exact) < 4 * est.standard_error, (est, exact)


def test_gap_estimator_converges_with_probes() -> None:
    gen = torch.Generator().manual_seed(0)
    Q = torch.linalg.qr(torch.randn(30, 30, generator=gen, dtype=D64))[0]
    A = Q @ torch.diag(torch.linspace(1, 10, 30, dtype=D64)) @ Q.T
    B = A + 0.3 * torch.diag(torch.linspace(-1, 1, 30, dtype=D64))
    exact = float((A - B).norm() / A.norm())
    errs = []
    for m in (16, 256, 4096):
        r = observed_fisher_gap(MatrixOperator(A), MatrixOperator(B), num_probes=m, seed=m)
        assert abs(r.value - exact) < 4.5 * r.standard_error
        errs.append(r.standard_error)
    assert errs[2] < errs[0] / 8  # SE shrinks like 1/sqrt(m)


def test_poisson_and_gaussian_nll_fisher() -> None:
    gen = torch.Generator().manual_seed(2)
    X = torch.randn(30, 3, generator=gen, dtype=D64)
    counts = torch.poisson(torch.exp(0.5 * X[:, :1]), generator=gen)
    torch.manual_seed(2)
    glm = nn.Linear(3, 1).double()
    args = (glm, nn.PoissonNLLLoss(), (X, counts))
    I_p = observed_information(*args, reduction="mean").to_dense()
    mu = torch.exp(glm(X)).detach()
    A = torch.cat([X, torch.ones(30, 1, dtype=D64)], 1)
    assert_close(I_p, A.T @ (mu * A), rtol=1e-10, what="Poisson GLM I = X^T diag(mu) X")
    assert_close(fisher_information(*args, reduction="mean").to_dense(), I_p, rtol=1e-10)

    class Hetero(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))

        def forward(self, x: Tensor) -> Tensor:
            h = self.body(x)
            return torch.cat([h[:, :1], F.softplus(h[:, 1:]) + 0.1], dim=1)

    net = Hetero().double()
    y = torch.randn(30, 1, generator=gen, dtype=D64)
    info = observed_information(net, nn.GaussianNLLLoss(), (X, y), reduction="mean")
    assert info.likelihood.name == "gaussian-heteroscedastic"

    def nll(out: Tensor, t: Tensor) -> Tensor:
        return F.gaussian_nll_loss(out[:, :1], t, out[:, 1:], reduction="sum")

    assert_close(info.to_dense(), dense_hessian_of(net, nll, X, y), rtol=1e-9, what="I Gaussian")
    out = net(X).detach()
    v = out[:, 1]
    M = torch.stack([1 / v, 0.5 / v**2], 1)  # Fisher of N(mu, v) in (mu, v)
    J = jacobian_of(net, X).reshape(30, 2, -1)
    F_ref = torch.einsum("nop,no,noq->pq", J, M, J)
    Fi = fisher_information(net, nn.GaussianNLLLoss(), (X, y), reduction="mean")
    assert_close(Fi.to_dense(), F_ref, rtol=1e-9, what="expected Fisher, Gaussian NLL")


# ---------------------------------------------------------------------- empirical Fisher, TIC
def _mlp_problem(n: int = 25, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(n, 4, generator=gen, dtype=D64)
    y = torch.randint(0, 3, (n,), generator=gen)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    return model, X, y


@pytest.mark.parametrize("cache", [True, False])
def test_empirical_fisher_is_sum_of_per_sample_outer_products(cache: bool) -> None:
    model, X, y = _mlp_problem()
    loader = DataLoader(TensorDataset(X, y), batch_size=7)
    ef = empirical_fisher(model, nn.CrossEntropyLoss(), loader, reduction="mean", cache=cache)
    G = per_sample_grads(model, nn.CrossEntropyLoss(reduction="sum"), X, y)
    assert_close(ef.to_dense(), G.T @ G, rtol=1e-10, atol=1e-12, what="EF")
    v = torch.randn(ef.shape[0], dtype=D64)
    assert_close(ef @ v, G.T @ (G @ v), rtol=1e-10, atol=1e-12, what="EF matvec")


def test_tic_dense_and_cg_against_direct_formula() -> None:
    model, X, y = _mlp_problem(n=60, seed=1)
    # a few Newton-free steps of gradient descent are not a minimum; damp to make I + d PD
    info = observed_information(model, nn.CrossEntropyLoss(), (X, y), reduction="mean")
    ef = empirical_fisher(model, nn.CrossEntropyLoss(), (X, y), reduction="mean")
    C = gradient_covariance(ef)
    G = per_sample_grads(model, nn.CrossEntropyLoss(reduction="sum"), X, y)
    Gc = G - G.mean(0)
    assert_close(C.to_dense(), Gc.T @ Gc, rtol=1e-9, atol=1e-12, what="gradient scatter")
    H = dense_hessian_of(model, nn.CrossEntropyLoss(reduction="sum"), X, y)
    d = float(-torch.linalg.eigvalsh(H)[0]) + 1.0
    exact = float(
        torch.trace(torch.linalg.solve(H + d * torch.eye(H.shape[0], dtype=D64), Gc.T @ Gc))
    )
    dense = takeuchi_criterion(info, C, method="dense", damping=d)
    assert abs(dense.value - exact) < 1e-9 * abs(exact)
    cg = takeuchi_criterion(info, C, method="cg", damping=d, num_probes=30, tol=1e-10, seed=3)
    assert cg.converged and cg.standard_error > 0
    assert abs(cg.value - exact) < 4 * cg.standard_error, (cg, exact)
    with pytest.raises(ValueError, match="smallest eigenvalue"):
        takeuchi_criterion(info, C, method="dense")  # indefinite away from a minimum


def test_tic_near_parameter_count_for_well_specified_logistic(logistic) -> None:
    model, X, y, _ = logistic
    info = observed_information(model, nn.BCEWithLogitsLoss(), (X, y), reduction="mean")
    m = information_metrics(info, metrics=("tic",))
    assert m.tic is not None and m.tic.method == "dense"
    # well-specified-ish model at its MLE: TIC penalty is of the order of P = 11
    assert 3 < m.tic.value < 40, m.tic


# ---------------------------------------------------------------------- CG, condition
def test_conjugate_gradients_block_and_breakdown() -> None:
    gen = torch.Generator().manual_seed(0)
    Q = torch.linalg.qr(torch.randn(20, 20, generator=gen, dtype=D64))[0]
    A = Q @ torch.diag(torch.logspace(0, 3, 20, dtype=D64)) @ Q.T
    B = torch.randn(20, 3, generator=gen, dtype=D64)
    r = conjugate_gradients(MatrixOperator(A), B, shift=0.5, tol=1e-12)
    assert r.converged
    assert_close(r.solution, torch.linalg.solve(A + 0.5 * torch.eye(20, dtype=D64), B), 1e-9)
    indefinite = Q @ torch.diag(torch.linspace(-1, 5, 20, dtype=D64)) @ Q.T
    with pytest.raises(ValueError, match="not positive definite"):
        conjugate_gradients(MatrixOperator(indefinite), B)


def test_condition_number_flags_negative_eigenvalues_away_from_a_minimum() -> None:
    model, X, y = _mlp_problem(seed=4)
    info = observed_information(model, nn.CrossEntropyLoss(), (X, y), reduction="mean")
    lam = torch.linalg.eigvalsh(dense_hessian_of(model, nn.CrossEntropyLoss(reduction="sum"), X, y))
    n_neg = int((lam < -1e-8 * lam[-1]).sum())
    assert n_neg > 0
    dense = condition_number(info, method="dense")
    assert dense.indefinite and dense.num_negative == n_neg and dense.condition_number == math.inf
    lz = condition_number(info, num_bottom=n_neg + 2)
    assert lz.indefinite and lz.num_negative == n_neg and not lz.num_negative_is_lower_bound
    assert abs(lz.lambda_min - float(lam[0])) < 1e-6 * float(lam[-1])
    assert abs(lz.lambda_max - float(lam[-1])) < 1e-6 * float(lam[-1])
    if n_neg >= 2:
        assert condition_number(info, num_bottom=1).num_negative_is_lower_bound


# ---------------------------------------------------------------------- all metrics
def test_information_metrics_at_the_mle_and_away_from_it(logistic) -> None:
    model, X, y, _ = logistic
    info = observed_information(model, nn.BCEWithLogitsLoss(), (X, y), reduction="mean")
    m = information_metrics(info, num_top=3, slq_probes=3, slq_steps=11)
    assert not m.errors, m.errors
    lam = torch.linalg.eigvalsh(info.to_dense())
    assert abs(m.trace.estimate - float(lam.sum())) < 1e-8 * float(lam.sum())  # n <= budget
    assert_close(m.top_eigenvalues.eigenvalues, lam.flip(0)[:3], rtol=1e-8)
    # 11 Lanczos steps on an 11-dim operator: the quadrature is exact per probe
    assert m.logdet.method == "slq" and m.effective_dimension.method == "slq (shared run)"
    assert m.gap is not None and m.gap.value < 1e-12
    assert (
        set(m.wall_times)
        == set(m.num_matvecs)
        == {
            "trace",
            "top_eigenvalues",
            "logdet",
            "effective_dimension",
            "condition",
            "standard_errors",
            "tic",
            "gap",
        }
    )
    text = m.summary()
    assert "standard errors" in text and "TIC" in text and "undefined" not in text

    mlp, X2, y2 = _mlp_problem(seed=4)
    info = observed_information(mlp, nn.CrossEntropyLoss(), (X2, y2), reduction="mean")
    m = information_metrics(info, slq_probes=2, slq_steps=10)
    assert m.condition.indefinite and m.condition.num_negative > 0
    assert m.standard_errors is None and "smallest eigenvalue" in m.errors["standard_errors"]
    assert m.tic is None and "tic" in m.errors
    assert m.gap is not None and m.gap.value > 0.01
    assert "undefined" in m.summary()


def test_analyses_leave_model_state_untouched() -> None:
    model, X, y = _mlp_problem()
    model.train()
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    before = [p.detach().clone() for p in model.parameters()]
    rng = torch.get_rng_state()
    info = observed_information(model, nn.CrossEntropyLoss(), (X, y), reduction="mean")
    information_metrics(info, slq_probes=2, slq_steps=8, damping=100.0)
    assert model.training
    assert torch.equal(torch.get_rng_state(), rng)
    for p, b in zip(model.parameters(), before):
        assert torch.equal(p.detach(), b) and torch.equal(p.grad, torch.ones_like(p))


# ---------------------------------------------------------------------- bad input
def test_bad_inputs_raise_clear_errors() -> None:
    model, X, y = _mlp_problem()
    data = (X, y)
    with pytest.raises(ValueError, match="assume_nll=True"):
        observed_information(model, nn.L1Loss(), (X, X[:, :3]), reduction="mean")
    custom = observed_information(
        model, lambda o, t: F.cross_entropy(o, t), data, reduction="mean", assume_nll=True
    )
    assert custom.likelihood.name == "custom" and custom.scale == 25
    with pytest.raises(ValueError, match="Fisher of a custom NLL"):
        from nncurv._information_operators import fisher_of

        fisher_of(custom.problem, custom.likelihood, "auto", 16)
    with pytest.raises(ValueError, match="reduces with 'mean'"):
        observed_information(model, nn.CrossEntropyLoss(), data, reduction="sum")
    with pytest.raises(TypeError):
        observed_information(model, nn.CrossEntropyLoss(), data)  # type: ignore[call-arg]
    with pytest.raises(ValueError, match="reduction must be stated"):
        observed_information(model, nn.CrossEntropyLoss(), data, reduction="none")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="weights"):
        observed_information(
            model, nn.CrossEntropyLoss(weight=torch.ones(3, dtype=D64)), data, reduction="mean"
        )
    with pytest.raises(ValueError, match="label smoothing"):
        observed_information(
            model, nn.CrossEntropyLoss(label_smoothing=0.1), data, reduction="mean"
        )
    Y = torch.randn(25, 3, dtype=D64)
    with pytest.raises(ValueError, match="noise_variance"):
        observed_information(model, nn.MSELoss(), (X, Y), reduction="mean")
    with pytest.raises(ValueError, match="positive"):
        observed_information(model, nn.MSELoss(), (X, Y), reduction="mean", noise_variance=-1.0)
    with pytest.raises(ValueError, match="MSELoss only"):
        observed_information(
            model, nn.CrossEntropyLoss(), data, reduction="mean", noise_variance=1.0
        )
    with pytest.raises(ValueError, match="likelihood='bernoulli'"):
        observed_information(
            model, nn.CrossEntropyLoss(), data, reduction="mean", likelihood="bernoulli"
        )
    with pytest.raises(ValueError, match="matches no trainable parameter"):
        observed_information(
            model, nn.CrossEntropyLoss(), data, reduction="mean", params="decoder.*"
        )
    with pytest.raises(ValueError, match="ignore_index"):
        observed_information(
            model, nn.CrossEntropyLoss(), (X, torch.full((25,), -100)), reduction="mean"
        )
    info = observed_information(model, nn.CrossEntropyLoss(), data, reduction="mean")
    with pytest.raises(ValueError, match="matches no parameter"):
        standard_errors(info, subset="nothing.*", damping=100.0)
    with pytest.raises(ValueError, match="max_dense"):
        standard_errors(info, method="dense", max_dense=10)
    with pytest.raises(ValueError, match=r"indefinite: smallest eigenvalue -\d"):
        standard_errors(info)
    with pytest.raises(ValueError, match="smallest eigenvalue"):
        standard_errors(info, subset="0.bias", method="cg")
    with pytest.raises(ValueError, match="metrics must be"):
        information_metrics(info, metrics=("trace", "nope"))
    with pytest.raises(ValueError, match="prior_precision"):
        log_determinant(info, 0.0)
    with pytest.raises(TypeError, match="InformationOperator"):
        information_metrics(MatrixOperator(torch.eye(2, dtype=D64)))  # type: ignore[arg-type]


def test_functional_losses_and_per_sample_policies() -> None:
    import functools

    model, X, y = _mlp_problem()
    ref = observed_information(
        model,
        nn.CrossEntropyLoss(reduction="sum"),
        (X, y),
        reduction="sum",
        likelihood="categorical",
    ).to_dense()
    part = functools.partial(F.cross_entropy, reduction="sum")
    got = observed_information(model, part, (X, y), reduction="sum")
    assert got.likelihood.name == "categorical"
    assert_close(got.to_dense(), ref, rtol=1e-12, atol=1e-14, what="functools.partial loss")
    with pytest.raises(ValueError, match="reduces with 'mean'"):
        observed_information(model, F.cross_entropy, (X, y), reduction="sum")
    bn = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.Linear(5, 3)).double()
    with pytest.raises(ValueError, match="batchnorm='eval'"):
        empirical_fisher(bn, nn.CrossEntropyLoss(), (X, y), reduction="mean", batchnorm="batch")
    with pytest.raises(ValueError, match="dropout='off'"):
        empirical_fisher(model, nn.CrossEntropyLoss(), (X, y), reduction="mean", dropout="on")


def test_singular_information_names_the_smallest_eigenvalue() -> None:
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(30, 3, generator=gen, dtype=D64)
    X = torch.cat([X, X[:, :1]], 1)  # duplicated column: X^T X is singular
    y = torch.randn(30, 1, generator=gen, dtype=D64)
    model = nn.Linear(4, 1, bias=False).double()
    info = observed_information(model, nn.MSELoss(), (X, y), reduction="mean", noise_variance=1.0)
    with pytest.raises(ValueError, match="singular: smallest eigenvalue"):
        standard_errors(info)
    assert isinstance(info, InformationOperator)
    ok = standard_errors(info, damping=1.0)  # a prior precision makes it well posed
    ref = torch.linalg.inv(X.T @ X + torch.eye(4, dtype=D64)).diagonal().sqrt()
    assert_close(ok.values, ref, rtol=1e-10)


# ---------------------------------------------------------------------- example
@pytest.mark.slow
def test_example_runs_quickly() -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "2"}
    out = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "observed_information.py"), "--quick"],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        cwd=ROOT,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "mean radius" in out.stdout and "TIC" in out.stdout


# ---------------------------------------------------------------------- distributed
def _dist_data() -> tuple[nn.Module, Tensor, Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    gen = torch.Generator().manual_seed(1)
    X = torch.randn(13, 4, generator=gen, dtype=D64)
    return model, X, torch.randint(0, 3, (13,), generator=gen)


def _dist_worker(rank: int, world: int, store: str, out: str) -> None:
    import torch.distributed as dist

    # a file rendezvous: no fixed port that another process could take in the meantime
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        model, X, y = _dist_data()
        idx = torch.arange(rank, 13, world)  # 7 and 6 samples
        loader = DataLoader(TensorDataset(X[idx], y[idx]), batch_size=3)
        info = observed_information(model, nn.CrossEntropyLoss(), loader, reduction="mean")
        ef = empirical_fisher(model, nn.CrossEntropyLoss(), loader, reduction="mean")
        res = {
            "scale": torch.tensor(info.scale),
            "I": info.to_dense(),
            "EF": ef.to_dense(),
            "C": gradient_covariance(ef).to_dense(),
            "se": standard_errors(info, damping=20.0).values,
        }
        if rank == 0:
            torch.save(res, out)
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
def test_two_gloo_ranks_count_all_samples(tmp_path) -> None:
    import torch.multiprocessing as mp

    out = str(tmp_path / "rank0.pt")
    mp.spawn(_dist_worker, args=(2, str(tmp_path / "store"), out), nprocs=2, join=True)
    got = torch.load(out)
    model, X, y = _dist_data()
    info = observed_information(model, nn.CrossEntropyLoss(), (X, y), reduction="mean")
    ef = empirical_fisher(model, nn.CrossEntropyLoss(), (X, y), reduction="mean")
    assert float(got["scale"]) == 13.0
    assert_close(got["I"], info.to_dense(), rtol=1e-10, atol=1e-12, what="I over ranks")
    assert_close(got["EF"], ef.to_dense(), rtol=1e-10, atol=1e-12, what="EF over ranks")
    assert_close(got["C"], gradient_covariance(ef).to_dense(), rtol=1e-9, atol=1e-12)
    assert_close(got["se"], standard_errors(info, damping=20.0).values, rtol=1e-10)
