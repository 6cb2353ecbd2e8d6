r"""Conjugate gradients on a symmetric positive definite operator, several right-hand sides at once.

Each column of :math:`B` runs its own CG recursion (Hestenes & Stiefel 1952); the products of
all active columns are one ``matmat``. A non-positive curvature :math:`p^\top A p \le 0` means
the operator is not positive definite: CG stops with :class:`NotPositiveDefiniteError`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import Tensor

from nncurv.linalg._checks import check_finite
from nncurv.operators.base import LinearOperator

__all__ = ["CGResult", "NotPositiveDefiniteError", "conjugate_gradients"]


class NotPositiveDefiniteError(ValueError):
    r"""CG met a direction of non-positive curvature: the operator is not positive definite.

    Attributes:
        rayleigh: The Rayleigh quotient :math:`p^\top (A+\delta I) p / p^\top p \le 0` of that
            direction, an upper bound on the smallest eigenvalue of :math:`A + \delta I`.
    """

    def __init__(self, message: str, rayleigh: float = float("nan")) -> None:
        super().__init__(message)
        self.rayleigh = rayleigh


@dataclass(frozen=True)
class CGResult:
    r"""Solutions of :math:`(A + \delta I) X = B`.

    Attributes:
        solution: ``(n, k)`` tensor.
        residuals: ``(k,)`` relative residual norms :math:`\lVert b - (A+\delta I)x\rVert /
            \lVert b\rVert` (from the recursion).
        iterations: CG iterations of the slowest column.
        converged: Whether every column reached ``tol``.
        num_matvecs: Products with ``A``.
        wall_time: Seconds.
    """

    solution: Tensor
    residuals: Tensor
    iterations: int
    converged: bool
    num_matvecs: int
    wall_time: float


def conjugate_gradients(
    op: LinearOperator,
    B: Tensor,
    *,
    shift: float = 0.0,
    tol: float = 1e-10,
    max_iter: int | None = None,
) -> CGResult:
    r"""Solve :math:`(A + \delta I) X = B` column by column with conjugate gradients.

    Args:
        op: A symmetric positive definite operator of dimension ``n``.
        B: ``(n,)`` or ``(n, k)`` right-hand sides on the operator's device and dtype.
        shift: :math:`\delta \ge 0` (a damping or prior precision).
        tol: Relative residual tolerance per column.
        max_iter: Iteration cap (default ``2 n``, at least 50).

    Returns:
        A :class:`CGResult`; ``solution`` is ``(n, k)`` (``(n, 1)`` for a vector ``B``).

    Raises:
        NotPositiveDefiniteError: A search direction has :math:`p^\top(A+\delta I)p \le 0`.

    Example:
        >>> import torch
        >>> from nncurv import MatrixOperator
        >>> A = torch.tensor([[4.0, 1.0], [1.0, 3.0]], dtype=torch.float64)
        >>> r = conjugate_gradients(MatrixOperator(A), torch.eye(2, dtype=torch.float64))
        >>> torch.allclose(r.solution, torch.linalg.inv(A)), r.converged
        (True, True)
    """
    t0 = time.perf_counter()
    if not tol > 0:
        raise ValueError(f"tol must be positive, got {tol!r}")
    if shift < 0:
        raise ValueError(f"shift must be >= 0, got {shift!r}")
    n = op.shape[0]
    X0 = B.unsqueeze(1) if B.ndim == 1 else B
    if X0.ndim != 2 or X0.shape[0] != n:
        raise ValueError(f"B must have shape ({n},) or ({n}, k), got {tuple(B.shape)}")
    max_iter = max(2 * n, 50) if max_iter is None else max_iter
    k = X0.shape[1]
    X = torch.zeros_like(X0)
    R = X0.clone()
    P = R.clone()
    bnorm = X0.norm(dim=0).clamp_min(torch.finfo(X0.dtype).tiny)
    rr = (R * R).sum(0)
    active = torch.ones(k, dtype=torch.bool, device=X0.device)
    active &= rr.sqrt() / bnorm > tol
    nmv, it = 0, 0
    while bool(active.any()) and it < max_iter:
        idx = active.nonzero().squeeze(1)
        Pa = P[:, idx]
        AP = op.matmat(Pa) + shift * Pa
        nmv += len(idx)
        check_finite(AP, "a conjugate-gradient product")
        pap = (Pa * AP).sum(0)
        bad = pap <= 0
        if bool(bad.any()):
            first = int(bad.nonzero()[0, 0])
            j = int(idx[first])
            rq = float(pap[first] / (Pa[:, first] ** 2).sum())
            raise NotPositiveDefiniteError(
                f"conjugate gradients met non-positive curvature p^T A p / p^T p = {rq:.3e} "
                f"(column {j}, iteration {it + 1}): the operator (shift {shift!r}) is not "
                "positive definite",
                rq,
            )
        alpha = rr[idx] / pap
        X[:, idx] += alpha * Pa
        R[:, idx] -= alpha * AP
        rr_new = (R[:, idx] ** 2).sum(0)
        beta = rr_new / rr[idx]
        P[:, idx] = R[:, idx] + beta * Pa
        rr[idx] = rr_new
        active[idx] = rr_new.sqrt() / bnorm[idx] > tol
        it += 1
    res = rr.sqrt() / bnorm
    return CGResult(
        solution=X,
        residuals=res,
        iterations=it,
        converged=not bool(active.any()),
        num_matvecs=nmv,
        wall_time=time.perf_counter() - t0,
    )
