r"""Frozen results of the information metrics, and helpers shared by the metric modules."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from nncurv._information_cg import NotPositiveDefiniteError
from nncurv.linalg import eigenvalues
from nncurv.linalg._checks import check_finite, check_int
from nncurv.operators.base import LinearOperator

__all__ = ["SpectralSumResult", "ConditionResult", "StandardErrors", "TICResult", "GapResult"]


# ---------------------------------------------------------------------- results
@dataclass(frozen=True)
class SpectralSumResult:
    r"""A spectral sum :math:`\sum_i f(\lambda_i)` (log-determinant, effective dimension).

    Attributes:
        value: The estimate.
        standard_error: Spread over SLQ probes over :math:`\sqrt L` (``0.0`` when dense,
            ``inf`` with one probe).
        parameter: The prior precision :math:`\lambda` (logdet) or :math:`\alpha` (effective
            dimension).
        num_matvecs: Products spent (``0`` when reusing another metric's SLQ run).
        wall_time: Seconds.
        method: ``"slq"``, ``"slq (shared run)"`` or ``"dense"``.
        converged: Whether the SLQ run (or the dense eigendecomposition) finished normally.
    """

    value: float
    standard_error: float
    parameter: float
    num_matvecs: int
    wall_time: float
    method: str
    converged: bool = True


@dataclass(frozen=True)
class ConditionResult:
    r"""Both ends of the spectrum, the condition number and the negative eigenvalues.

    Attributes:
        lambda_max: Largest eigenvalue.
        lambda_min: Smallest eigenvalue (negative away from a minimum).
        condition_number: :math:`\lambda_{\max}/\lambda_{\min}` when the operator is positive
            definite, ``inf`` when :math:`\lambda_{\min}` is zero or negative (within
            ``zero_tolerance``).
        num_negative: Eigenvalues below :math:`-\text{zero\_tolerance}` among those computed.
        num_negative_is_lower_bound: ``True`` when there may be more negative eigenvalues
            than counted: every computed bottom eigenvalue was negative, or Lanczos stopped
            before converging (Ritz values bound eigenvalues from above, so the count never
            overstates).
        indefinite: Whether a negative eigenvalue was found.
        bottom_eigenvalues: The computed bottom eigenvalues, ascending.
        zero_tolerance: Eigenvalues with :math:`|\lambda| \le` this count as zero
            (:math:`\sqrt{\varepsilon}\lambda_{\max}` for Lanczos,
            :math:`10 n \varepsilon \lambda_{\max}` dense).
        num_matvecs: Products spent.
        wall_time: Seconds.
        method: ``"lanczos"`` or ``"dense"``.
        converged: Whether both eigenvalue runs converged.
    """

    lambda_max: float
    lambda_min: float
    condition_number: float
    num_negative: int
    num_negative_is_lower_bound: bool
    indefinite: bool
    bottom_eigenvalues: Tensor
    zero_tolerance: float
    num_matvecs: int
    wall_time: float
    method: str
    converged: bool


@dataclass(frozen=True)
class StandardErrors:
    r"""Standard errors :math:`\sqrt{[(I + \delta\,\mathrm{Id})^{-1}]_{jj}}` of chosen entries.

    Attributes:
        values: ``(k,)`` standard errors.
        indices: ``(k,)`` positions in the flat parameter vector.
        names: ``k`` labels such as ``"fc.weight[0, 3]"``.
        method: ``"dense"`` or ``"cg"``.
        damping: :math:`\delta` (a prior precision; ``0`` for the plain inverse).
        smallest_eigenvalue: Smallest eigenvalue of the damped information (dense only).
        residuals: ``(k,)`` relative CG residuals (zeros when dense).
        converged: Whether all solves converged.
        num_matvecs: Products spent.
        wall_time: Seconds.
    """

    values: Tensor
    indices: Tensor
    names: tuple[str, ...]
    method: str
    damping: float
    smallest_eigenvalue: float | None
    residuals: Tensor
    converged: bool
    num_matvecs: int
    wall_time: float

    def as_dict(self) -> dict[str, float]:
        """``{label: standard error}``."""
        return dict(zip(self.names, self.values.tolist()))


@dataclass(frozen=True)
class TICResult:
    r"""Takeuchi's penalty :math:`\operatorname{tr}(I^{-1} C)`.

    :math:`C = \sum_n (g_n - \bar g)(g_n - \bar g)^\top` is :math:`N` times the covariance of
    the per-sample gradients; for a well-specified model at its MLE the penalty is close to the
    number of parameters (AIC's penalty). TIC is :math:`2\,\mathrm{NLL} + 2\,\text{value}`.

    Attributes:
        value: The penalty estimate.
        standard_error: Probe spread over :math:`\sqrt m` (``0.0`` dense).
        num_parameters: :math:`P`, for comparison.
        damping: :math:`\delta` added to :math:`I`.
        method: ``"dense"`` or ``"cg"``.
        num_matvecs: Products with the information (gradient-covariance products not counted).
        wall_time: Seconds.
        converged: Whether all CG solves converged.
    """

    value: float
    standard_error: float
    num_parameters: int
    damping: float
    method: str
    num_matvecs: int
    wall_time: float
    converged: bool


@dataclass(frozen=True)
class GapResult:
    r"""Relative Frobenius gap :math:`\lVert I - F\rVert_F / \lVert I\rVert_F`.

    Attributes:
        value: The relative gap.
        standard_error: Delta-method standard error over the probes (``0.0`` dense).
        frobenius_difference: :math:`\lVert I - F\rVert_F` estimate.
        frobenius_observed: :math:`\lVert I\rVert_F` estimate.
        num_matvecs: Products (with both operators).
        wall_time: Seconds.
        method: ``"probes"`` or ``"dense"``.
        converged: Whether the estimate is finite.
    """

    value: float
    standard_error: float
    frobenius_difference: float
    frobenius_observed: float
    num_matvecs: int
    wall_time: float
    method: str
    converged: bool = True


# ---------------------------------------------------------------------- helpers
def dense_matrix(op: LinearOperator) -> Tensor:
    A = op.to_dense()
    check_finite(A, "the dense information matrix")
    return 0.5 * (A + A.T)


def dense_eigh(op: LinearOperator) -> tuple[Tensor, Tensor]:
    return torch.linalg.eigh(dense_matrix(op))  # type: ignore[return-value]


def dense_tol(evals: Tensor) -> float:
    n = evals.shape[0]
    return 10.0 * n * torch.finfo(evals.dtype).eps * max(float(evals.abs().max()), 1e-300)


def check_method(method: str, allowed: tuple[str, ...]) -> None:
    if method not in allowed:
        raise ValueError(f"method must be one of {allowed}, got {method!r}")


def check_dense_size(op: LinearOperator, max_dense: int, what: str) -> None:
    check_int(max_dense, "max_dense", minimum=1)
    n = op.shape[0]
    if n > max_dense:
        raise ValueError(
            f"{what} by a dense matrix: the operator has {n} parameters > max_dense={max_dense} "
            f"({n * n * 8 / 2**30:.1f} GiB in float64); use method='cg' (with subset=... for "
            "standard errors) or raise max_dense"
        )


def not_pd(smallest: float, largest: float, what: str, damping: float) -> ValueError:
    tol = 10.0 * math.sqrt(torch.finfo(torch.float64).eps) * abs(largest)
    kind = "indefinite" if smallest < -tol else "singular"
    return ValueError(
        f"{what} a positive definite information, but it is {kind}: smallest eigenvalue "
        f"{smallest:.6e} (largest {largest:.6e}, damping {damping!r}); evaluate at a minimum, "
        "restrict params, or add a prior precision with damping=..."
    )


def cg_breakdown(
    op: LinearOperator, err: NotPositiveDefiniteError, what: str, damping: float, seed: int
) -> ValueError:
    """Name the smallest eigenvalue after CG met non-positive curvature (a short Lanczos run)."""
    r = eigenvalues(op, 1, which="SA", seed=seed, max_matvecs=120)
    lanczos = float(r.eigenvalues[0])
    if r.converged:
        how = f"smallest eigenvalue of I {lanczos:.6e} (Lanczos)"
    else:  # Ritz values and Rayleigh quotients are upper bounds of the smallest eigenvalue
        bound = min(lanczos, err.rayleigh - damping) if err.rayleigh == err.rayleigh else lanczos
        how = f"smallest eigenvalue of I at most {bound:.6e} (Lanczos and CG bounds)"
    return ValueError(
        f"{what} a positive definite I + damping*Id (damping {damping!r}), but it is not: "
        f"{how}; {err}; evaluate at a minimum, restrict params, or add a prior precision "
        "with damping=..."
    )
