r"""Diagonal estimation: exact (``n`` products), Hutchinson and XDiag, with per-entry errors.

* Hutchinson (Bekas, Kokiopoulou & Saad 2007): :math:`\hat d = \frac1m\sum_k v_k \odot A v_k`;
  with Rademacher probes the per-entry variance is :math:`\sum_{j\ne i} A_{ij}^2` per probe, so
  it is poor when off-diagonal mass dominates.
* XDiag (Epperly, Tropp & Webber 2024): the exchangeable version of Diag++
  (Baston & Nakatsukasa 2022): removes the dominant range found from half of the budget and
  runs Hutchinson on the rest, every probe serving both purposes.
* ``"auto"`` (the default of :func:`diagonal`): XDiag's sketch first, then XDiag or Hutchinson
  with the whole budget, whichever the sketch predicts to have the smaller summed variance.
"""

from __future__ import annotations

import time
from typing import Literal

import torch
from torch import Tensor

from nncurv.linalg._checks import (
    Distribution,
    check_distribution,
    check_finite,
    check_int,
    check_operator,
    make_generator,
    random_probes,
)
from nncurv.linalg._results import DiagonalResult, _unflatten_or_none
from nncurv.linalg.trace import (
    _check_budget,
    _deflate,
    _loo_range_residual,
    _loo_vectors,
    _numerical_rank,
    _sketch,
    _wide,
)
from nncurv.operators.base import LinearOperator

__all__ = ["DiagonalMethod", "diagonal", "exact_diagonal", "hutchinson_diagonal", "xdiag"]

DiagonalMethod = Literal["auto", "xdiag", "hutchinson", "exact"]


def _finish(
    op: LinearOperator, est: Tensor, se: Tensor, nmv: int, t0: float, method: str
) -> DiagonalResult:
    check_finite(est, f"the {method} diagonal estimate")
    return DiagonalResult(
        estimate=est,
        standard_error=se,
        num_matvecs=nmv,
        wall_time=time.perf_counter() - t0,
        method=method,
        converged=True,
        estimate_dict=_unflatten_or_none(op, est),
    )


def _sem(samples: Tensor) -> Tensor:
    """Per-row standard error of the mean over the columns of ``samples``."""
    m = samples.shape[1]
    if m < 2:
        return torch.full_like(samples[:, 0], float("inf"))
    return samples.std(dim=1) / m**0.5


def exact_diagonal(op: LinearOperator, *, chunk_size: int = 64) -> DiagonalResult:
    r"""Compute :math:`A_{ii} = e_i^\top A e_i` for all :math:`i` with ``n`` products.

    Unit vectors are applied ``chunk_size`` at a time (memory ``O(n · chunk_size)``); use it for
    small operators and as a reference.

    Example:
        >>> import torch
        >>> from nncurv import MatrixOperator
        >>> A = torch.tensor([[2.0, 1.0], [1.0, 3.0]])
        >>> exact_diagonal(MatrixOperator(A)).estimate
        tensor([2., 3.])
    """
    t0 = time.perf_counter()
    check_operator(op, symmetric=False)
    check_int(chunk_size, "chunk_size", minimum=1)
    n = op.shape[0]
    out = torch.empty(n, dtype=op.dtype, device=op.device)
    for start in range(0, n, chunk_size):
        c = min(chunk_size, n - start)
        E = torch.zeros(n, c, dtype=op.dtype, device=op.device)
        idx = torch.arange(c, device=op.device)
        E[start + idx, idx] = 1.0
        out[start : start + c] = op.matmat(E)[start + idx, idx]
    return _finish(op, out, torch.zeros_like(out), n, t0, "exact")


def hutchinson_diagonal(
    op: LinearOperator,
    num_matvecs: int = 100,
    *,
    distribution: Literal["rademacher", "gaussian"] = "rademacher",
    chunk_size: int = 32,
    generator: torch.Generator | None = None,
    seed: int = 0,
) -> DiagonalResult:
    r"""Hutchinson's diagonal estimate with per-entry standard errors.

    .. math::
        \hat d = \frac1m \sum_{k=1}^m v_k \odot A v_k,\qquad
        \operatorname{Var}[\hat d_i] = \frac1m \sum_{j\ne i} A_{ij}^2 \ \text{(Rademacher)},
        \ \frac1m\Big(\sum_j A_{ij}^2 + A_{ii}^2\Big)\ \text{(Gaussian)}.

    Memory is bounded by ``chunk_size`` probes; running sums give the standard errors.

    Args:
        op: A square operator.
        num_matvecs: Number of probes (``>= 1``; standard errors need ``>= 2``).
        distribution: ``"rademacher"`` or ``"gaussian"``.
        chunk_size: Probes per ``matmat`` call.
        generator: ``torch.Generator`` on the operator's device.
        seed: Seed when ``generator`` is ``None``.

    References:
        Bekas, Kokiopoulou & Saad, "An estimator for the diagonal of a matrix", Appl. Numer.
        Math. 57, 2007; Dharangutte & Musco, "A tight analysis of Hutchinson's diagonal
        estimator", SOSA 2023.

    Example:
        >>> import torch
        >>> from nncurv import MatrixOperator
        >>> A = MatrixOperator(torch.diag(torch.tensor([1.0, -2.0, 3.0], dtype=torch.float64)))
        >>> hutchinson_diagonal(A, 4).estimate  # exact for a diagonal matrix
        tensor([ 1., -2.,  3.], dtype=torch.float64)
    """
    t0 = time.perf_counter()
    check_operator(op, symmetric=False)
    check_int(num_matvecs, "num_matvecs", minimum=1)
    check_int(chunk_size, "chunk_size", minimum=1)
    gen = make_generator(op, generator, seed)
    check_distribution(distribution)
    est, se = _hutchinson_moments(op, num_matvecs, distribution, gen, chunk_size)
    return _finish(op, est, se, num_matvecs, t0, "hutchinson")


def _hutchinson_moments(
    op: LinearOperator,
    num_matvecs: int,
    distribution: Distribution,
    gen: torch.Generator,
    chunk_size: int,
    first: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    r"""Mean and standard error of ``num_matvecs`` Hutchinson samples :math:`v \odot Av`.

    The columns of ``first`` are samples already computed; fresh probes make up the rest,
    ``chunk_size`` at a time. Running sums (shifted by the first chunk's mean, for a stable
    variance) keep the memory at a few ``n``-vectors whatever the number of samples.
    """
    total = torch.zeros(op.shape[0], dtype=op.dtype, device=op.device)
    total_sq = torch.zeros_like(total)
    shift: Tensor | None = None

    def add(X: Tensor) -> None:
        nonlocal shift
        if shift is None:
            shift = X.mean(dim=1)
        Xc = X - shift[:, None]
        total.add_(Xc.sum(dim=1))
        total_sq.add_((Xc * Xc).sum(dim=1))

    done = 0
    if first is not None:
        add(first)
        done = first.shape[1]
    for start in range(done, num_matvecs, chunk_size):
        V = random_probes(op, min(chunk_size, num_matvecs - start), distribution, gen)
        add(V * op.matmat(V))
    assert shift is not None
    m = num_matvecs
    mean_c = total / m
    est = shift + mean_c
    if m < 2:
        return est, torch.full_like(est, float("inf"))
    var = ((total_sq - m * mean_c * mean_c) / (m - 1)).clamp_min(0.0)
    return est, (var / m).sqrt()


def xdiag(
    op: LinearOperator,
    num_matvecs: int = 100,
    *,
    generator: torch.Generator | None = None,
    seed: int = 0,
) -> DiagonalResult:
    r"""XDiag diagonal estimate (Epperly, Tropp & Webber 2024), symmetric form.

    With :math:`s = \lfloor m/2\rfloor` Rademacher probes :math:`\Omega`,
    :math:`A\Omega = QR`, leave-one-out projections :math:`P_i = Q_{(i)}Q_{(i)}^\top` onto
    :math:`A\Omega` without column :math:`i`, and :math:`A` symmetric,

    .. math::
        \operatorname{diag}(A) = \operatorname{diag}(P A P)
        + 2\operatorname{diag}\big((I - P) A P\big)
        + \operatorname{diag}\big((I - P) A (I - P)\big),

    so each term :math:`i` takes the first two exactly from :math:`AQ` and estimates only the
    last with its own probe, :math:`\omega_i \odot (I - P_i) A (I - P_i)\omega_i`, which is
    independent of :math:`P_i`; :math:`\hat d` is the mean of the :math:`s` terms (unbiased)
    and the per-entry standard error their standard deviation over :math:`\sqrt s`. The
    original XDiag (as in curvlinops) estimates :math:`\operatorname{diag}((I-P)AP)`
    stochastically as well; computing it exactly costs no product and lowered the error by
    20–40 % on decaying spectra in our tests (equal on flat spectra, where Hutchinson with the
    whole budget is better than both). Needs symmetry (:math:`Q^\top A = (AQ)^\top`). If
    :math:`A\Omega` has rank :math:`r < s` the range of :math:`A` was found and
    :math:`\operatorname{diag}(Q_r Q_r^\top A)` is exact. With ``num_matvecs >= n`` the exact
    diagonal is returned.

    Args:
        op: A symmetric operator.
        num_matvecs: Budget, at least 2 (an odd budget uses ``num_matvecs - 1``).
        generator: ``torch.Generator`` on the operator's device.
        seed: Seed when ``generator`` is ``None``.

    References:
        Epperly, Tropp & Webber, SIMAX 45(1), 2024, arXiv:2301.07825 (XDiag); Baston &
        Nakatsukasa, "Stochastic diagonal estimation: probabilistic bounds and an improved
        algorithm", 2022 (Diag++).

    Example:
        >>> import torch
        >>> from nncurv import MatrixOperator
        >>> u = torch.linspace(-1, 1, 300, dtype=torch.float64)
        >>> A = 50 * torch.outer(u, u) + torch.diag(u.abs())  # rank-1 outlier over a diagonal
        >>> x = (xdiag(MatrixOperator(A), 20).estimate - A.diagonal()).norm()
        >>> h = (hutchinson_diagonal(MatrixOperator(A), 20).estimate - A.diagonal()).norm()
        >>> bool(x < h / 20)
        True
    """
    t0 = time.perf_counter()
    _check_budget(op, num_matvecs, "XDiag", symmetric=True)
    if num_matvecs >= op.shape[0]:
        r = exact_diagonal(op)
        return _finish(op, r.estimate, r.standard_error, r.num_matvecs, t0, "exact")
    gen = make_generator(op, generator, seed)
    Om, Y = _sketch(op, num_matvecs // 2, "rademacher", gen, "the XDiag sketch")
    return _xdiag_finish(op, Om, Y, t0, "xdiag")


def _xdiag_finish(
    op: LinearOperator, Om: Tensor, Y: Tensor, t0: float, method: str
) -> DiagonalResult:
    """XDiag from the sketch ``Y = A Om``: ``s`` more products (``AQ``)."""
    n, s = Om.shape
    Om, Y = _wide(Om), _wide(Y)  # the leave-one-out algebra needs float64 (R is ill-conditioned)
    Q, R = torch.linalg.qr(Y)
    rank = _numerical_rank(R, n)
    if rank < s:  # range(A) found: A = U U^T A exactly
        U = torch.linalg.svd(Y, full_matrices=False).U[:, :rank]
        est = (U * _wide(op.matmat(U.to(op.dtype)))).sum(1).to(op.dtype)
        return _finish(op, est, torch.zeros_like(est), s + rank, t0, method)
    Z = _wide(op.matmat(Q.to(op.dtype)))
    S = _loo_vectors(R)
    H = Q.T @ Z
    HS = H @ S
    QS, ZS = Q @ S, Z @ S
    d_pa = (Q * Z).sum(1)[:, None] - QS * ZS  # diag(P_i A)
    d_pap = (Q @ H * Q).sum(1)[:, None] - 2 * QS * (Q @ HS) + (S * HS).sum(0) * QS**2
    # diag(A) = diag(P A P) + 2 diag((I - P) A P) + diag((I - P) A (I - P)), A symmetric
    samples = 2 * d_pa - d_pap
    A_P = Y - Z @ _deflate(Q.T @ Om, S)  # A (I - P_i) w_i
    samples = samples + Om * (A_P - Q @ _deflate(Q.T @ A_P, S))
    est, se = samples.mean(1).to(op.dtype), _sem(samples).to(op.dtype)
    return _finish(op, est, se, 2 * s, t0, method)


def _auto_diagonal(
    op: LinearOperator,
    num_matvecs: int,
    generator: torch.Generator | None,
    seed: int,
    chunk_size: int = 32,
) -> DiagonalResult:
    """Half the budget as a sketch, then XDiag or Hutchinson, whichever is predicted better."""
    t0 = time.perf_counter()
    _check_budget(op, num_matvecs, "the auto diagonal estimate", symmetric=True)
    if num_matvecs >= op.shape[0]:
        r = exact_diagonal(op)
        return _finish(op, r.estimate, r.standard_error, r.num_matvecs, t0, "exact")
    gen = make_generator(op, generator, seed)
    s = num_matvecs // 2
    Om, Y = _sketch(op, s, "rademacher", gen, "the XDiag sketch")
    X = Om * Y  # Hutchinson samples w_i * A w_i (Rademacher, E[w w^T] = I)
    var_hutchinson = float(_wide(X).var(dim=1).sum()) / num_matvecs
    var_xdiag = _loo_range_residual(Y) / s
    if var_xdiag < var_hutchinson:
        return _xdiag_finish(op, Om, Y, t0, "auto:xdiag")
    est, se = _hutchinson_moments(op, num_matvecs, "rademacher", gen, chunk_size, first=X)
    return _finish(op, est, se, num_matvecs, t0, "auto:hutchinson")


def diagonal(
    op: LinearOperator,
    num_matvecs: int = 100,
    *,
    method: DiagonalMethod = "auto",
    generator: torch.Generator | None = None,
    seed: int = 0,
) -> DiagonalResult:
    r"""Estimate :math:`\operatorname{diag}(A)` with at most ``num_matvecs`` products.

    ``method="auto"`` (default, symmetric operators) decides between XDiag and Hutchinson
    halfway through the budget, as :func:`~nncurv.linalg.trace` does: it spends
    :math:`s = \lfloor m/2\rfloor` products on XDiag's sketch :math:`Y = A\Omega` (Rademacher
    :math:`\omega_i`, :math:`E[\omega\omega^\top] = I`) and compares, without further
    products, the summed per-entry variances

    .. math::
        V_H = \frac1m \sum_j \widehat{\operatorname{Var}}\big((\omega_i \odot
        A\omega_i)_j\big), \qquad
        V_X = \frac1s \cdot \frac1s\sum_{i=1}^s \lVert (I - P_{(i)})A\omega_i\rVert^2,

    that of Hutchinson with all ``m`` probes and a proxy for XDiag's (its stochastic part is a
    Hutchinson diagonal of :math:`(I-P_{(i)})A(I-P_{(i)})`, whose summed per-entry variance is
    at most :math:`\lVert (I-P_{(i)})A\rVert_F^2`, estimated without bias by the squared
    leave-one-out residuals). If :math:`V_X < V_H` it completes XDiag (``method=
    "auto:xdiag"``), otherwise it draws ``m - s`` fresh probes and returns Hutchinson over all
    ``m`` (``method="auto:hutchinson"``); ``"exact"`` when ``num_matvecs >= n``. Spectra with
    outliers pick XDiag, flat spectra Hutchinson with the whole budget.

    Selection effect: both candidates are unbiased, but the choice depends on the first ``s``
    probes, which both reuse, so the result is not exactly unbiased (the usual "pick the
    smaller estimated variance" heuristic). The bias matters only where :math:`V_X \approx
    V_H`, when the candidates are about equally good: at most 0.17 standard deviations per
    entry (mean 0.05) over 2000 seeds on a matrix where the choice splits 60/40, none where
    the choice is clear; the tests bound it. Use ``method="xdiag"`` or ``"hutchinson"`` for a
    strictly unbiased estimate.

    ``method="xdiag"``, ``"hutchinson"`` and ``"exact"`` dispatch to :func:`xdiag`,
    :func:`hutchinson_diagonal` and :func:`exact_diagonal` (which ignores the budget and spends
    ``n`` products). For parameter-space operators the result also carries ``estimate_dict``.

    Args:
        op: A square operator (symmetric for ``"auto"`` and ``"xdiag"``).
        num_matvecs: Budget of products (``"auto"``/``"xdiag"``: at least 2; XDiag uses
            ``num_matvecs - 1`` of an odd budget).
        method: ``"auto"``, ``"xdiag"``, ``"hutchinson"`` or ``"exact"``.
        generator: ``torch.Generator`` on the operator's device.
        seed: Seed when ``generator`` is ``None``.

    References:
        Epperly, Tropp & Webber, SIMAX 45(1), 2024, arXiv:2301.07825 (XDiag); Bekas,
        Kokiopoulou & Saad 2007 (Hutchinson's diagonal estimator).

    Example:
        >>> import torch
        >>> from nncurv import MatrixOperator
        >>> A = MatrixOperator(torch.diag(torch.arange(1.0, 5.0)))
        >>> diagonal(A, method="exact").estimate
        tensor([1., 2., 3., 4.])
        >>> u = torch.linspace(-1, 1, 300, dtype=torch.float64)
        >>> B = MatrixOperator(50 * torch.outer(u, u) + torch.eye(300, dtype=torch.float64))
        >>> r = diagonal(B, 20)  # a rank-1 outlier over the identity: XDiag removes it
        >>> r.method, r.num_matvecs
        ('auto:xdiag', 20)
    """
    if method == "auto":
        return _auto_diagonal(op, num_matvecs, generator, seed)
    if method == "xdiag":
        return xdiag(op, num_matvecs, generator=generator, seed=seed)
    if method == "hutchinson":
        return hutchinson_diagonal(op, num_matvecs, generator=generator, seed=seed)
    if method == "exact":
        return exact_diagonal(op)
    raise ValueError(f"method must be 'auto', 'xdiag', 'hutchinson' or 'exact', got {method!r}")
