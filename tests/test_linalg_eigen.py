"""Eigenvalues against explicit float64 matrices with known spectra."""

from __future__ import annotations

import math

import pytest
import torch

from nncurv.linalg import NonFiniteError, check_symmetric, eigenvalues
from nncurv.operators.base import CallableOperator, LinearOperator, MatrixOperator
from tests.conftest import assert_close

N = 120


def _rotate(lam: torch.Tensor, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(lam.shape[0], lam.shape[0], generator=g, dtype=lam.dtype))
    A = Q @ torch.diag(lam) @ Q.T
    return (A + A.T) / 2


def _spectrum(kind: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    d = torch.float64
    if kind in ("diagonal", "rotated"):
        return torch.linspace(-3.0, 10.0, N, dtype=d)
    if kind == "clustered":
        return torch.cat(
            [
                torch.full((40,), 1.0, dtype=d),
                torch.full((40,), 2.0, dtype=d),
                5.0 + 1e-3 * torch.randn(N - 80, generator=g, dtype=d),
            ]
        )
    if kind == "outliers":  # a few large outliers on a bulk near zero (typical network Hessian)
        bulk = 0.05 * torch.randn(N - 5, generator=g, dtype=d)
        return torch.cat([torch.tensor([100.0, 60.0, 35.0, 20.0, 11.0], dtype=d), bulk])
    if kind == "indefinite":  # most negative eigenvalue is larger in magnitude than the top
        return torch.cat(
            [
                torch.tensor([-40.0, -25.0, 30.0, 18.0], dtype=d),
                torch.randn(N - 4, generator=g, dtype=d),
            ]
        )
    if kind == "rank_deficient":
        return torch.cat([torch.linspace(1.0, 8.0, 30, dtype=d), torch.zeros(N - 30, dtype=d)])
    raise AssertionError(kind)


KINDS = ["diagonal", "rotated", "clustered", "outliers", "indefinite", "rank_deficient"]


def _matrix(kind: str, device: torch.device) -> torch.Tensor:
    lam = _spectrum(kind)
    A = torch.diag(lam) if kind == "diagonal" else _rotate(lam, seed=2)
    return A.to(device)


def _expected(lam: torch.Tensor, k: int, which: str) -> torch.Tensor:
    s = torch.sort(lam).values
    if which == "LA":
        return s.flip(0)[:k]
    if which == "SA":
        return s[:k]
    if which == "LM":
        return lam[torch.argsort(lam.abs(), descending=True)][:k]
    return torch.cat([s[: k // 2], s[len(s) - (k + 1) // 2 :]])


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("which", ["LA", "SA", "LM", "BE"])
@pytest.mark.parametrize("method", ["lanczos", "block"])
def test_eigenvalues_match_eigh(kind: str, which: str, method: str) -> None:
    A = _matrix(kind, torch.device("cpu"))
    k = 4
    res = eigenvalues(
        MatrixOperator(A),
        k=k,
        which=which,
        method=method,
        tol=1e-10,
        return_eigenvectors=True,
        max_matvecs=3000,
    )
    assert res.converged, (kind, which, method, res.num_matvecs)
    lam = torch.linalg.eigvalsh(A)
    expected = _expected(lam, k, which)
    scale = float(lam.abs().max())
    if method == "lanczos" and kind in ("clustered", "rank_deficient") and which in ("SA", "BE"):
        # exact multiplicities at the wanted end: single-vector Krylov methods (like ARPACK) see
        # one copy of a multiple eigenvalue; every value returned must still be an eigenvalue
        dist = (res.eigenvalues[:, None] - lam[None, :]).abs().min(dim=1).values
        assert float(dist.max()) <= 1e-8 * scale
        assert abs(float(res.eigenvalues[0] - expected[0])) <= 1e-8 * scale
    elif which == "LM":  # ties in magnitude: compare magnitudes
        assert_close(res.eigenvalues.abs(), expected.abs(), rtol=0, atol=1e-8 * scale, what="LM")
    else:
        assert_close(res.eigenvalues, expected, rtol=0, atol=1e-8 * scale, what=which)
    V = res.eigenvectors
    assert V is not None and V.shape == (N, k)
    assert_close(V.T @ V, torch.eye(k, dtype=A.dtype), rtol=0, atol=1e-8, what="orthonormality")
    true_res = (A @ V - V * res.eigenvalues).norm(dim=0)
    # reported residuals are the true ones (up to rounding), and small
    assert_close(res.residuals, true_res, rtol=0, atol=1e-9 * scale, what="residuals")
    assert float(true_res.max()) <= 1e-9 * scale


def test_eigenvectors_match_for_separated_spectrum(device: torch.device) -> None:
    A = _matrix("outliers", device)
    lam, U = torch.linalg.eigh(A)
    res = eigenvalues(MatrixOperator(A), k=3, return_eigenvectors=True, tol=1e-12)
    assert res.eigenvectors is not None
    overlap = (U[:, -3:].flip(1) * res.eigenvectors).sum(0).abs()
    assert_close(overlap, torch.ones(3, dtype=A.dtype, device=device), rtol=1e-10, what="|u.v|")
    assert res.eigenvalues.device.type == device.type


def test_power_iteration_lm_and_shifted_ends() -> None:
    A = _matrix("indefinite", torch.device("cpu"))
    lam = torch.linalg.eigvalsh(A)
    lm = eigenvalues(
        MatrixOperator(A), k=2, which="LM", method="power", tol=1e-12, max_matvecs=5000
    )
    assert lm.converged
    assert_close(lm.eigenvalues, torch.tensor([-40.0, 30.0], dtype=A.dtype), rtol=1e-6)
    la = eigenvalues(
        MatrixOperator(A), k=2, which="LA", method="power", tol=1e-12, max_matvecs=5000
    )
    assert_close(la.eigenvalues, lam.flip(0)[:2], rtol=1e-6, what="power LA")
    sa = eigenvalues(
        MatrixOperator(A), k=1, which="SA", method="power", tol=1e-12, max_matvecs=5000
    )
    assert_close(sa.eigenvalues, lam[:1], rtol=1e-6, what="power SA")


def test_lanczos_is_cheaper_than_power_for_same_accuracy() -> None:
    A = _matrix("outliers", torch.device("cpu"))
    lam = torch.linalg.eigvalsh(A).flip(0)
    lz = eigenvalues(MatrixOperator(A), k=3, tol=1e-6)
    pw = eigenvalues(MatrixOperator(A), k=3, method="power", tol=1e-10, max_matvecs=5000)
    assert float(((lz.eigenvalues - lam[:3]) / lam[:3]).abs().max()) < 1e-9
    assert lz.num_matvecs < pw.num_matvecs


def test_warm_start_needs_fewer_products() -> None:
    A = _matrix("rotated", torch.device("cpu"))
    g = torch.Generator().manual_seed(5)
    E = torch.randn(N, N, generator=g, dtype=A.dtype)
    B = A + 1e-3 * (E + E.T) / (2 * N**0.5)  # a nearby operator (a few optimiser steps later)
    prev = eigenvalues(MatrixOperator(A), k=5, tol=1e-8, return_eigenvectors=True)
    truth = torch.linalg.eigvalsh(B).flip(0)[:5]
    for method in ("lanczos", "block"):
        cold = eigenvalues(MatrixOperator(B), k=5, tol=1e-3, method=method)
        warm = eigenvalues(MatrixOperator(B), k=5, tol=1e-3, method=method, v0=prev.eigenvectors)
        for r in (cold, warm):
            assert r.converged
            assert_close(r.eigenvalues, truth, rtol=1e-5)
        assert warm.num_matvecs <= cold.num_matvecs / 2, (
            method,
            warm.num_matvecs,
            cold.num_matvecs,
        )
    # a single warm vector (top-1 tracking)
    cold1 = eigenvalues(MatrixOperator(B), k=1, tol=1e-6)
    warm1 = eigenvalues(MatrixOperator(B), k=1, tol=1e-6, v0=prev.eigenvectors[:, 0])
    assert_close(warm1.eigenvalues, truth[:1], rtol=1e-10)
    assert warm1.num_matvecs <= cold1.num_matvecs / 2, (warm1.num_matvecs, cold1.num_matvecs)


def test_budget_exhausted_is_flagged_not_converged() -> None:
    A = _matrix("clustered", torch.device("cpu"))
    res = eigenvalues(MatrixOperator(A), k=3, which="SA", tol=1e-12, max_matvecs=5)
    assert not res.converged
    assert res.num_matvecs <= 5


def test_small_operator_k_equals_n_is_exact() -> None:
    A = _rotate(torch.tensor([3.0, -1.0, 2.0, 0.5], dtype=torch.float64), seed=0)
    res = eigenvalues(MatrixOperator(A), k=4, which="LA")
    assert res.converged
    assert_close(res.eigenvalues, torch.tensor([3.0, 2.0, 0.5, -1.0], dtype=A.dtype), 1e-12)


def test_invariant_start_vector_breakdown_recovers() -> None:
    # start inside a 1-D invariant subspace: Lanczos must continue with a fresh direction
    A = torch.diag(torch.arange(1.0, 31.0, dtype=torch.float64))
    v0 = torch.zeros(30, dtype=torch.float64)
    v0[3] = 1.0
    res = eigenvalues(MatrixOperator(A), k=2, v0=v0, tol=1e-10)
    assert res.converged
    assert_close(res.eigenvalues, torch.tensor([30.0, 29.0], dtype=A.dtype), 1e-10)


@pytest.mark.parametrize(("block_size", "ncv"), [(3, 5), (2, 6), (2, 5)])
def test_block_that_shrinks_near_the_end_of_the_space_survives_restarts(
    block_size: int, ncv: int
) -> None:
    # n = 7: the block shrinks when fewer than block_size dimensions are left, and a thick
    # restart then frees dimensions again; the next block must not be wider than the residual
    # it comes from (this raised a shape error or a false asymmetry error before)
    A = MatrixOperator(torch.diag(torch.arange(1.0, 8.0, dtype=torch.float64)))
    for k in (1, 2):
        for seed in range(3):
            r = eigenvalues(A, k, method="block", block_size=block_size, ncv=ncv, seed=seed)
            assert r.converged
            assert_close(r.eigenvalues, torch.tensor([7.0, 6.0][:k], dtype=torch.float64), 1e-10)


@pytest.mark.parametrize("scale", [1e30, 1e-30])
def test_warm_start_whose_squares_overflow_or_underflow_is_used_as_given(scale: float) -> None:
    # float32: 1e30**2 overflows and 1e-30**2 underflows; the direction is what counts
    A = MatrixOperator(torch.diag(torch.arange(1.0, 31.0)))
    v = torch.zeros(30)
    v[-1], v[-2] = 1.0, 0.5
    ref = eigenvalues(A, 1, v0=v, tol=1e-4, max_matvecs=3)
    res = eigenvalues(A, 1, v0=v * scale, tol=1e-4, max_matvecs=3)
    assert_close(res.eigenvalues, ref.eigenvalues, 1e-6)
    assert res.num_matvecs == ref.num_matvecs
    with pytest.raises(ValueError, match="zero column"):
        eigenvalues(A, 1, v0=torch.stack([v * scale, torch.zeros(30)], dim=1))


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_warm_start_is_rejected_naming_the_column(bad: float) -> None:
    A = MatrixOperator(torch.diag(torch.arange(1.0, 31.0, dtype=torch.float64)))
    V = torch.ones(30, 3, dtype=torch.float64)
    V[4, 1] = bad
    with pytest.raises(ValueError, match=r"v0 must be finite; column\(s\) \[1\]"):
        eigenvalues(A, 1, v0=V)
    assert A.num_matvecs == 0


def test_float32_operator_default_tol() -> None:
    A = _matrix("outliers", torch.device("cpu")).float()
    res = eigenvalues(MatrixOperator(A), k=2)
    assert res.converged and res.eigenvalues.dtype == torch.float32
    assert_close(res.eigenvalues.double(), torch.tensor([100.0, 60.0], dtype=torch.float64), 1e-5)


class _ParamOp(MatrixOperator):
    def unflatten(self, v: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"w": v[:6].reshape(2, 3), "b": v[6:]}


def test_eigenvector_dicts_for_parameter_operators() -> None:
    A = _rotate(torch.arange(1.0, 9.0, dtype=torch.float64), seed=3)
    res = eigenvalues(_ParamOp(A), k=2, return_eigenvectors=True)
    assert res.eigenvector_dicts is not None and len(res.eigenvector_dicts) == 2
    d = res.eigenvector_dicts[0]
    assert d["w"].shape == (2, 3) and d["b"].shape == (2,)
    assert res.eigenvectors is not None
    assert torch.equal(torch.cat([d["w"].reshape(-1), d["b"]]), res.eigenvectors[:, 0])
    assert eigenvalues(_ParamOp(A), k=1).eigenvector_dicts is None


# ----------------------------------------------------------------------------- bad input
def test_bad_arguments_raise_before_any_product() -> None:
    op = MatrixOperator(torch.eye(5, dtype=torch.float64))
    with pytest.raises(ValueError, match="k=6"):
        eigenvalues(op, k=6)
    with pytest.raises(ValueError, match="0"):
        eigenvalues(op, k=0)
    with pytest.raises(TypeError, match="True"):
        eigenvalues(op, k=True)
    with pytest.raises(ValueError, match="'XX'"):
        eigenvalues(op, which="XX")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="'arnoldi'"):
        eigenvalues(op, method="arnoldi")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="BE"):
        eigenvalues(op, k=2, which="BE", method="power")
    with pytest.raises(ValueError, match=r"\(5,\)"):
        eigenvalues(op, v0=torch.ones(4, dtype=torch.float64))
    with pytest.raises(ValueError, match="tol"):
        eigenvalues(op, tol=-1.0)
    with pytest.raises(TypeError, match="LinearOperator"):
        eigenvalues(torch.eye(3))  # type: ignore[arg-type]
    for which in ("LA", "BE"):  # k pairs need at least k products
        with pytest.raises(ValueError, match="max_matvecs must be >= 3, got 2"):
            eigenvalues(op, k=3, which=which, max_matvecs=2)  # type: ignore[arg-type]
    assert op.num_matvecs == 0


def test_non_symmetric_operator_is_rejected() -> None:
    g = torch.Generator().manual_seed(0)
    M = torch.randn(20, 20, generator=g, dtype=torch.float64)
    with pytest.raises(ValueError, match="symmetric"):
        eigenvalues(MatrixOperator(M, symmetric=False))
    # an explicit matrix declared symmetric is checked when it is wrapped
    with pytest.raises(ValueError, match=r"A is not symmetric: max \|A - A\^T\| = "):
        MatrixOperator(M)
    MatrixOperator(M + M.T)  # symmetric up to rounding: accepted
    # an operator declared symmetric but not: detected from the projections, before any
    # number is returned
    lying = CallableOperator(lambda v: M @ v, 20, dtype=M.dtype, device=M.device)
    with pytest.raises(ValueError, match="not symmetric"):
        eigenvalues(lying)
    with pytest.raises(ValueError, match="not symmetric"):
        check_symmetric(lying)
    assert check_symmetric(MatrixOperator(M + M.T)) < 1e-12


def test_non_square_operator_is_rejected() -> None:
    class Rect(LinearOperator):
        def __init__(self) -> None:
            super().__init__(4, dtype=torch.float64, device="cpu")
            self.shape = (4, 3)

    with pytest.raises(ValueError, match="square"):
        eigenvalues(Rect())


@pytest.mark.parametrize("method", ["lanczos", "block", "power"])
@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_nan_from_operator_raises(method: str, bad: float) -> None:
    calls = {"n": 0}

    def mv(v: torch.Tensor) -> torch.Tensor:
        calls["n"] += 1
        out = torch.arange(1.0, 11.0, dtype=v.dtype) * v
        if calls["n"] >= 3:
            out = out.clone()
            out[0] = bad
        return out

    op = CallableOperator(mv, 10, dtype=torch.float64, device="cpu")
    with pytest.raises(NonFiniteError, match="NaN or Inf"):
        eigenvalues(op, k=2, method=method, tol=1e-14)
