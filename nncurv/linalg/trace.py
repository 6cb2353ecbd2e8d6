r"""Stochastic trace estimation under a budget of matrix-vector products.

Three estimators, each returning a :class:`~nncurv.linalg.TraceResult` with a standard error:

* Girard–Hutchinson: :math:`\hat t = \frac1m \sum_k v_k^\top A v_k` with Rademacher (default) or
  Gaussian probes; variance :math:`2(\lVert A\rVert_F^2 - \sum_i A_{ii}^2)/m` (Rademacher),
  :math:`2\lVert A\rVert_F^2/m` (Gaussian).
* Hutch++ (Meyer, Musco, Musco & Woodruff 2021): a third of the budget finds the dominant
  range, a third takes its trace exactly, a third runs Hutchinson on the rest.
* XTrace (Epperly, Tropp & Webber 2024): Hutch++'s variance reduction made exchangeable with
  leave-one-out corrections, so every product serves both purposes.
* ``"auto"`` (the default of :func:`trace`): XTrace and the Hutchinson estimate read off
  XTrace's own probes and products, whichever has the smaller estimated standard error.

On spectra with a few outliers over a bulk (network Hessians) Hutch++ and XTrace are far more
accurate than Hutchinson at equal budget; on flat spectra XTrace is up to about twice worse
than Hutchinson, which is why the default chooses between them at no extra product.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Literal

import torch
from torch import Tensor

from nncurv.linalg._checks import (
    check_finite,
    check_int,
    check_operator,
    make_generator,
    random_probes,
)
from nncurv.linalg._results import TraceResult
from nncurv.operators.base import LinearOperator

__all__ = ["TraceMethod", "trace", "hutchinson_trace", "hutchpp_trace", "xtrace", "exact_trace"]

TraceMethod = Literal["auto", "xtrace", "hutch++", "hutchinson"]


def _sem(samples: Tensor) -> float:
    m = samples.shape[0]
    if m < 2:
        return math.inf
    return float(samples.std() / math.sqrt(m))


def _finish(
    op: LinearOperator,
    est: Tensor,
    samples: Tensor | None,
    se: float,
    nmv: int,
    t0: float,
    method: str,
) -> TraceResult:
    check_finite(est, f"the {method} trace estimate")
    return TraceResult(
        estimate=float(est),
        standard_error=se,
        num_matvecs=nmv,
        wall_time=time.perf_counter() - t0,
        method=method,
        converged=True,
        samples=samples,
    )


def exact_trace(op: LinearOperator, *, chunk_size: int = 64) -> TraceResult:
    r"""Compute :math:`\operatorname{tr}(A) = \sum_i e_i^\top A e_i` exactly with ``n`` products.

    Example:
        >>> import torch
        >>> from nncurv import MatrixOperator
        >>> exact_trace(MatrixOperator(torch.diag(torch.tensor([1.0, 2.0, 3.0])))).estimate
        6.0
    """
    from nncurv.linalg.diagonal import exact_diagonal

    t0 = time.perf_counter()
    d = exact_diagonal(op, chunk_size=chunk_size)
    return _finish(op, d.estimate.sum(), None, 0.0, d.num_matvecs, t0, "exact")


def hutchinson_trace(
    op: LinearOperator,
    num_matvecs: int = 100,
    *,
    distribution: Literal["rademacher", "gaussian"] = "rademacher",
    chunk_size: int = 32,
    generator: torch.Generator | None = None,
    seed: int = 0,
) -> TraceResult:
    r"""Girard–Hutchinson trace estimate with ``num_matvecs`` probes.

    .. math::
        \hat t = \frac1m \sum_{k=1}^m v_k^\top A v_k, \qquad E[v v^\top] = I,

    with standard error :math:`s/\sqrt m` from the sample standard deviation :math:`s`. Probes
    are drawn ``chunk_size`` at a time, so memory is bounded by the chunk, not by the budget.

    Args:
        op: A square operator (symmetry is not required).
        num_matvecs: Number of probes (``>= 1``; the standard error needs ``>= 2``).
        distribution: ``"rademacher"`` (never a larger variance) or ``"gaussian"``.
        chunk_size: Probes per ``matmat`` call.
        generator: ``torch.Generator`` on the operator's device.
        seed: Seed when ``generator`` is ``None``.

    References:
        Girard 1989; Hutchinson, "A stochastic estimator of the trace of the influence matrix
        for Laplacian smoothing splines", 1990; Avron & Toledo, JACM 58(2), 2011.

    Example:
        >>> import torch
        >>> from nncurv import MatrixOperator
        >>> A = MatrixOperator(torch.diag(torch.arange(1.0, 6.0, dtype=torch.float64)))
        >>> r = hutchinson_trace(A, 10)  # exact for diagonal A with Rademacher probes
        >>> r.estimate, r.standard_error, r.num_matvecs
        (15.0, 0.0, 10)
    """
    t0 = time.perf_counter()
    check_operator(op, symmetric=False)
    check_int(num_matvecs, "num_matvecs", minimum=1)
    check_int(chunk_size, "chunk_size", minimum=1)
    gen = make_generator(op, generator, seed)
    random_probes(op, 0, distribution, gen)  # validates `distribution` before any product
    parts = []
    for start in range(0, num_matvecs, chunk_size):
        c = min(chunk_size, num_matvecs - start)
        V = random_probes(op, c, distribution, gen)
        parts.append((V * op.matmat(V)).sum(0))
    samples = torch.cat(parts)
    return _finish(op, samples.mean(), samples, _sem(samples), num_matvecs, t0, "hutchinson")


def hutchpp_trace(
    op: LinearOperator,
    num_matvecs: int = 99,
    *,
    distribution: Literal["rademacher", "gaussian"] = "rademacher",
    generator: torch.Generator | None = None,
    seed: int = 0,
) -> TraceResult:
    r"""Hutch++ trace estimate (Meyer, Musco, Musco & Woodruff 2021).

    With :math:`s = \lfloor m/3\rfloor`, :math:`Q = \operatorname{orth}(A S)` for :math:`s`
    probes :math:`S`, and :math:`g = m - 2s` probes :math:`G`,

    .. math::
        \hat t = \operatorname{tr}(Q^\top A Q)
        + \frac1g \operatorname{tr}\big(G^\top (I - QQ^\top) A (I - QQ^\top) G\big).

    Unbiased; for PSD :math:`A` it reaches relative error :math:`\varepsilon` with
    :math:`O(1/\varepsilon)` products instead of Hutchinson's :math:`O(1/\varepsilon^2)`. The
    standard error is that of the Hutchinson part. Stores :math:`O(n m)` numbers. When
    ``num_matvecs >= n`` the exact trace is returned instead (``n`` products).

    Args:
        op: A square operator.
        num_matvecs: Budget, at least 3.
        distribution: Probe distribution, ``"rademacher"`` or ``"gaussian"``.
        generator: ``torch.Generator`` on the operator's device.
        seed: Seed when ``generator`` is ``None``.

    References:
        Meyer, Musco, Musco & Woodruff, "Hutch++: Optimal stochastic trace estimation",
        SOSA 2021, arXiv:2010.09649.

    Example:
        >>> import torch
        >>> from nncurv import MatrixOperator
        >>> A = torch.diag(torch.tensor([100.0, 50.0] + [0.0] * 98, dtype=torch.float64))
        >>> r = hutchpp_trace(MatrixOperator(A), 9)  # rank 2 <= m/3: the sketch is exact
        >>> round(r.estimate, 8), r.num_matvecs
        (150.0, 9)
    """
    t0 = time.perf_counter()
    check_operator(op, symmetric=False)
    if isinstance(num_matvecs, int) and not isinstance(num_matvecs, bool) and num_matvecs < 3:
        raise ValueError(f"Hutch++ needs at least 3 products, got num_matvecs={num_matvecs!r}")
    check_int(num_matvecs, "num_matvecs", minimum=3)
    n = op.shape[0]
    if num_matvecs >= n:
        return _relabel(exact_trace(op), t0)
    gen = make_generator(op, generator, seed)
    s = num_matvecs // 3
    g = num_matvecs - 2 * s
    S = random_probes(op, s, distribution, gen)
    Q, _ = torch.linalg.qr(op.matmat(S))
    t1 = (Q * op.matmat(Q)).sum()
    G = random_probes(op, g, distribution, gen)
    G = G - Q @ (Q.T @ G)
    samples = (G * op.matmat(G)).sum(0)
    est = t1 + samples.mean()
    return _finish(op, est, samples, _sem(samples), 2 * s + g, t0, "hutch++")


def xtrace(
    op: LinearOperator,
    num_matvecs: int = 100,
    *,
    distribution: Literal["rademacher", "gaussian"] = "rademacher",
    generator: torch.Generator | None = None,
    seed: int = 0,
) -> TraceResult:
    r"""XTrace estimate (Epperly, Tropp & Webber 2024).

    With :math:`s = \lfloor m/2\rfloor` probes :math:`\Omega`, :math:`Y = A\Omega = QR`, and
    :math:`Q_{(i)}` an orthonormal basis of :math:`A\Omega` without column :math:`i`,

    .. math::
        \hat t = \frac1s \sum_{i=1}^s \Big[\operatorname{tr}(Q_{(i)}^\top A Q_{(i)})
        + \omega_i^\top (I - Q_{(i)}Q_{(i)}^\top) A (I - Q_{(i)}Q_{(i)}^\top)\omega_i\Big].

    Each term is an unbiased Hutch++-type estimate whose low-rank part excludes its own probe;
    the leave-one-out bases come from :math:`Q` and :math:`R^{-\top}` in closed form. The
    standard error is :math:`\operatorname{std}(t_i)/\sqrt s`, as in the paper. If
    :math:`A\Omega` is rank deficient (rank :math:`r < s`), the range of :math:`A` has been
    found and :math:`\operatorname{tr}(Q_r^\top A Q_r)` is exact. When ``num_matvecs >= n`` the
    exact trace is returned (``n`` products).

    Args:
        op: A square operator.
        num_matvecs: Budget, at least 2 (an odd budget uses ``num_matvecs - 1``).
        distribution: Probe distribution, ``"rademacher"`` or ``"gaussian"``.
        generator: ``torch.Generator`` on the operator's device.
        seed: Seed when ``generator`` is ``None``.

    References:
        Epperly, Tropp & Webber, "XTrace: Making the most of every sample in stochastic trace
        estimation", SIAM J. Matrix Anal. Appl. 45(1), 2024, arXiv:2301.07825.

    Example:
        >>> import torch
        >>> from nncurv import MatrixOperator
        >>> u = torch.linspace(-1.0, 2.0, 1000, dtype=torch.float64)
        >>> u = u / u.norm()
        >>> A = 100 * torch.outer(u, u) + 1e-3 * torch.eye(1000, dtype=torch.float64)
        >>> r = xtrace(MatrixOperator(A), 20)  # the outlier is removed, the bulk is flat
        >>> abs(r.estimate - 101.0) < 0.01, r.standard_error < 0.01, r.num_matvecs
        (True, True, 20)
        >>> h = hutchinson_trace(MatrixOperator(A), 20)
        >>> h.standard_error > 100 * r.standard_error
        True
    """
    t0 = time.perf_counter()
    x, _ = _xtrace_and_hutchinson(op, num_matvecs, distribution, generator, seed, t0)
    return x


def _xtrace_and_hutchinson(
    op: LinearOperator,
    num_matvecs: int,
    distribution: str,
    generator: torch.Generator | None,
    seed: int,
    t0: float,
) -> tuple[TraceResult, TraceResult | None]:
    """XTrace and the Hutchinson estimate from its own probes (``None`` on the exact paths)."""
    check_operator(op, symmetric=False)
    if isinstance(num_matvecs, int) and not isinstance(num_matvecs, bool) and num_matvecs < 2:
        raise ValueError(f"XTrace needs at least 2 products, got num_matvecs={num_matvecs!r}")
    check_int(num_matvecs, "num_matvecs", minimum=2)
    n = op.shape[0]
    if num_matvecs >= n:
        return _relabel(exact_trace(op), t0), None
    gen = make_generator(op, generator, seed)
    s = num_matvecs // 2
    Om = random_probes(op, s, distribution, gen)
    Y = op.matmat(Om)
    check_finite(Y.norm(), "the XTrace sketch")
    Om, Y = _wide(Om), _wide(Y)  # the leave-one-out algebra needs float64 (R is ill-conditioned)
    h = (Om * Y).sum(0)  # Hutchinson samples w_i^T A w_i from the same probes, E[w w^T] = I
    Q, R = torch.linalg.qr(Y)
    rank = _numerical_rank(R, n)
    if rank < s:  # range(A) found: tr(A) = tr(Q_r^T A Q_r) exactly
        U = torch.linalg.svd(Y, full_matrices=False).U[:, :rank]
        est = (U * _wide(op.matmat(U.to(op.dtype)))).sum()
        nmv = s + rank
        hutch = _finish(op, h.mean(), h, _sem(h), nmv, t0, "hutchinson")
        return _finish(op, est, None, 0.0, nmv, t0, "xtrace"), hutch
    Z = _wide(op.matmat(Q.to(op.dtype)))
    H = Q.T @ Z
    S = _loo_vectors(R)
    t = torch.diagonal(H).sum() - (S * (H @ S)).sum(0)
    W = Q.T @ Om
    AP = Y - Z @ _deflate(W, S)
    PT = AP - Q @ _deflate(Q.T @ AP, S)
    t = t + (Om * PT).sum(0)
    hutch = _finish(op, h.mean(), h, _sem(h), 2 * s, t0, "hutchinson")
    return _finish(op, t.mean(), t, _sem(t), 2 * s, t0, "xtrace"), hutch


def _wide(x: Tensor) -> Tensor:
    """``x`` in float64 (sketch algebra); products with the operator stay in its dtype."""
    return x if x.dtype == torch.float64 else x.to(torch.float64)


def _numerical_rank(R: Tensor, n: int) -> int:
    d = torch.diagonal(R).abs()
    tol = 10 * max(n, R.shape[0]) * torch.finfo(R.dtype).eps * float(d.max())
    return int((d > tol).sum())


def _loo_vectors(R: Tensor) -> Tensor:
    r"""Return the normalised columns :math:`s_i` of :math:`R^{-\top}`.

    They give the leave-one-out projections :math:`Q_{(i)}Q_{(i)}^\top = Q(I - s_i s_i^\top)Q^\top`.
    """
    eye = torch.eye(R.shape[0], dtype=R.dtype, device=R.device)
    RTinv = torch.linalg.solve_triangular(R.T, eye, upper=False)
    return RTinv / RTinv.norm(dim=0, keepdim=True)


def _deflate(X: Tensor, S: Tensor) -> Tensor:
    r"""Apply :math:`(I - s_i s_i^\top)` to column ``i`` of ``X``."""
    return X - S * (S * X).sum(0, keepdim=True)


def _relabel(res: TraceResult, t0: float) -> TraceResult:
    return TraceResult(
        estimate=res.estimate,
        standard_error=0.0,
        num_matvecs=res.num_matvecs,
        wall_time=time.perf_counter() - t0,
        method="exact",
        converged=res.converged,
    )


def _auto_trace(
    op: LinearOperator,
    num_matvecs: int = 100,
    *,
    distribution: Literal["rademacher", "gaussian"] = "rademacher",
    generator: torch.Generator | None = None,
    seed: int = 0,
) -> TraceResult:
    """XTrace or Hutchinson from XTrace's own products, by the smaller estimated SE."""
    t0 = time.perf_counter()
    x, h = _xtrace_and_hutchinson(op, num_matvecs, distribution, generator, seed, t0)
    if h is None:  # exact trace (budget >= n)
        return x
    best = x if x.standard_error <= h.standard_error else h
    return dataclasses.replace(
        best, method=f"auto:{best.method}", wall_time=time.perf_counter() - t0
    )


_METHODS = {
    "auto": _auto_trace,
    "xtrace": xtrace,
    "hutch++": hutchpp_trace,
    "hutchinson": hutchinson_trace,
}


def trace(
    op: LinearOperator,
    num_matvecs: int = 100,
    *,
    method: TraceMethod = "auto",
    distribution: Literal["rademacher", "gaussian"] = "rademacher",
    generator: torch.Generator | None = None,
    seed: int = 0,
) -> TraceResult:
    r"""Estimate :math:`\operatorname{tr}(A)` with at most ``num_matvecs`` products.

    ``method="auto"`` (default) runs :func:`xtrace` and reads a second, Girard–Hutchinson
    estimate off the same products: XTrace's :math:`s = \lfloor m/2\rfloor` probes
    :math:`\omega_i` (Rademacher or Gaussian, :math:`E[\omega\omega^\top] = I`) and their
    products :math:`A\omega_i` give

    .. math::
        \hat t_H = \frac1s \sum_{i=1}^s \omega_i^\top A \omega_i, \qquad
        \widehat{\mathrm{SE}}_H = \operatorname{std}(\omega_i^\top A\omega_i)/\sqrt s,

    at no extra product. It returns the estimate with the smaller estimated standard error,
    with ``method`` set to ``"auto:xtrace"`` or ``"auto:hutchinson"`` (``"exact"`` when
    ``num_matvecs >= n``). Spectra with outliers (network Hessians) pick XTrace, whose error is
    then far below Hutchinson's; flat spectra, where XTrace's low-rank part removes little and
    its leave-one-out terms add variance, pick Hutchinson, whose error is then about
    :math:`\sqrt2` times that of Hutchinson with all ``num_matvecs`` probes (it has half of
    them).

    Selection effect: both candidates are unbiased, but choosing by standard errors estimated
    from the same probes is a data-dependent choice (the usual "pick the estimator with the
    smaller estimated variance" heuristic), so the returned estimate is not exactly unbiased
    and its reported standard error, the smaller of two noisy estimates, is slightly
    optimistic. Both effects only matter when the two standard errors are within their own
    sampling noise (relative :math:`\approx 1/\sqrt{2s}`, 10 % at ``m = 100``), i.e. when
    the two candidates are about equally good; then they are a fraction of a standard error.
    The tests bound the bias and check the coverage across seeds. Use ``method="xtrace"`` or
    ``"hutchinson"`` for a strictly unbiased estimate.

    Other methods dispatch to :func:`xtrace`, :func:`hutchpp_trace` or
    :func:`hutchinson_trace`; see those for the formulas, variances and references.

    Args:
        op: A square operator.
        num_matvecs: Budget of products (``"auto"`` and ``"xtrace"``: at least 2, an odd budget
            uses ``num_matvecs - 1``; ``"hutch++"``: at least 3).
        method: ``"auto"``, ``"xtrace"``, ``"hutch++"`` or ``"hutchinson"``.
        distribution: Probe distribution, ``"rademacher"`` or ``"gaussian"``.
        generator: ``torch.Generator`` on the operator's device.
        seed: Seed when ``generator`` is ``None``.

    References:
        Epperly, Tropp & Webber, SIMAX 45(1), 2024, arXiv:2301.07825 (XTrace; Section 5
        discusses its variance on flat spectra); Girard 1989; Hutchinson 1990.

    Example:
        >>> import torch
        >>> from nncurv import MatrixOperator
        >>> A = MatrixOperator(torch.diag(torch.arange(1.0, 201.0, dtype=torch.float64)))
        >>> r = trace(A, 40)  # diagonal A: Rademacher Hutchinson is exact, XTrace is not
        >>> r.estimate, r.standard_error, r.method, r.num_matvecs
        (20100.0, 0.0, 'auto:hutchinson', 40)
        >>> u = torch.linspace(-1.0, 2.0, 1000, dtype=torch.float64)
        >>> B = 100 * torch.outer(u / u.norm(), u / u.norm()) + torch.eye(1000, dtype=torch.float64)
        >>> r = trace(MatrixOperator(B), 40)  # an outlier over a flat bulk: XTrace removes it
        >>> r.method, abs(r.estimate - 1100.0) < 4 * r.standard_error
        ('auto:xtrace', True)
    """
    if method not in _METHODS:
        raise ValueError(f"method must be one of {tuple(_METHODS)}, got {method!r}")
    return _METHODS[method](
        op, num_matvecs, distribution=distribution, generator=generator, seed=seed
    )
