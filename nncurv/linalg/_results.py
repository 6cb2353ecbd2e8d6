"""Frozen result records returned by the algorithms of :mod:`nncurv.linalg`.

Every result carries the estimate, an accuracy measure (residuals or standard errors), a
``converged`` flag, the number of matrix-vector products it spent and its wall time, so that a
logger can record how much a number can be trusted and what it cost.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import Tensor

__all__ = ["EigenResult", "TraceResult", "DiagonalResult"]


@dataclass(frozen=True)
class EigenResult:
    r"""Eigenvalues (and optionally eigenvectors) of a symmetric operator.

    Attributes:
        eigenvalues: ``(k,)`` tensor, ordered by the ``which`` rule (``"LA"``: descending,
            ``"SA"``: ascending, ``"LM"``: descending magnitude, ``"BE"``: ascending).
        eigenvectors: ``(n, k)`` tensor with orthonormal columns, or ``None`` if not requested.
        residuals: ``(k,)`` tensor of residual norms :math:`\lVert A v - \lambda v\rVert`.
        converged: Whether every requested pair met the method's stopping rule.
        num_matvecs: Matrix-vector products spent (a ``matmat`` column counts as one).
        wall_time: Seconds spent.
        method: The method used (``"lanczos"``, ``"block"`` or ``"power"``).
        which: The part of the spectrum requested.
        eigenvector_dicts: For parameter-space operators (those with ``unflatten``), one
            parameter dict per eigenvector; otherwise ``None``.
        krylov_basis: With ``return_basis=True`` (Lanczos methods): the ``(n, m)`` orthonormal
            basis :math:`V` of the final Krylov subspace, which holds the computed eigenvectors
            and the directions found on the way; otherwise ``None``.
        krylov_projection: The ``(m, m)`` projection :math:`V^\top A V`, known without further
            products; its trace is the exact trace of :math:`A` on that subspace (see
            :func:`~nncurv.linalg.deflated_hutchinson_trace`).
    """

    eigenvalues: Tensor
    eigenvectors: Tensor | None
    residuals: Tensor
    converged: bool
    num_matvecs: int
    wall_time: float
    method: str
    which: str
    eigenvector_dicts: list[dict[str, Tensor]] | None = None
    krylov_basis: Tensor | None = None
    krylov_projection: Tensor | None = None


@dataclass(frozen=True)
class TraceResult:
    r"""A stochastic (or exact) estimate of :math:`\operatorname{tr}(A)`.

    Attributes:
        estimate: The trace estimate.
        standard_error: Estimated standard error of ``estimate`` (``0.0`` when exact,
            ``inf`` when the budget leaves too few samples to estimate it).
        num_matvecs: Matrix-vector products spent.
        wall_time: Seconds spent.
        method: ``"hutchinson"``, ``"hutch++"``, ``"xtrace"``, ``"exact"``, or for the default
            ``method="auto"`` the branch it took: ``"auto:xtrace"`` or ``"auto:hutchinson"``.
        converged: ``True`` when the estimate is finite (stochastic estimators have no
            stopping rule; read ``standard_error``).
        samples: Per-sample values whose mean is the estimate (Hutchinson samples, Hutch++
            residual samples, XTrace leave-one-out estimates), or ``None``.
    """

    estimate: float
    standard_error: float
    num_matvecs: int
    wall_time: float
    method: str
    converged: bool = True
    samples: Tensor | None = None


@dataclass(frozen=True)
class DiagonalResult:
    r"""A stochastic (or exact) estimate of :math:`\operatorname{diag}(A)`.

    Attributes:
        estimate: ``(n,)`` tensor.
        standard_error: ``(n,)`` tensor of per-entry standard errors (zeros when exact).
        num_matvecs: Matrix-vector products spent (or backward passes for GGN diagonals).
        wall_time: Seconds spent.
        method: Name of the estimator (``"auto:xdiag"`` or ``"auto:hutchinson"`` for the
            default ``method="auto"``).
        converged: ``True`` when every entry is finite.
        estimate_dict: The estimate as a parameter dict (same shapes as the parameters)
            when the operator or problem knows its parameters, else ``None``.
    """

    estimate: Tensor
    standard_error: Tensor
    num_matvecs: int
    wall_time: float
    method: str
    converged: bool = True
    estimate_dict: dict[str, Tensor] | None = None


def _unflatten_or_none(op: Any, vec: Tensor) -> dict[str, Tensor] | None:
    """Return ``op.unflatten(vec)`` when the operator lives in parameter space."""
    fn = getattr(op, "unflatten", None)
    if fn is None:
        return None
    return dict(fn(vec))
