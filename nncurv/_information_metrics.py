r"""Metrics of an information operator.

Log-determinant, effective dimension, condition number, standard errors, Takeuchi's criterion
and the observed-vs-Fisher gap. Each function takes a symmetric operator (usually from
:func:`~nncurv.information.observed_information`), returns a frozen result with its cost
(products, seconds) and accuracy (standard error or residuals), and raises ``ValueError`` before
any work on bad options.
"""

from __future__ import annotations

import fnmatch
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from nncurv._information_cg import NotPositiveDefiniteError, conjugate_gradients
from nncurv.linalg import NonFiniteError, eigenvalues, spectral_density
from nncurv.linalg._checks import check_finite, check_int, check_operator, make_generator
from nncurv.linalg.density import SpectralDensity
from nncurv.operators.base import LinearOperator

__all__ = [
    "SpectralSumResult",
    "ConditionResult",
    "StandardErrors",
    "TICResult",
    "GapResult",
    "log_determinant",
    "effective_dimension",
    "condition_number",
    "standard_errors",
    "takeuchi_criterion",
    "observed_fisher_gap",
]

SpectralMethod = Literal["slq", "dense"]


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
        num_negative_is_lower_bound: ``True`` when every computed bottom eigenvalue was
            negative (there may be more).
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
def _dense(op: LinearOperator) -> Tensor:
    A = op.to_dense()
    check_finite(A, "the dense information matrix")
    return 0.5 * (A + A.T)


def _eigh(op: LinearOperator) -> tuple[Tensor, Tensor]:
    return torch.linalg.eigh(_dense(op))  # type: ignore[return-value]


def _dense_tol(evals: Tensor) -> float:
    n = evals.shape[0]
    return 10.0 * n * torch.finfo(evals.dtype).eps * max(float(evals.abs().max()), 1e-300)


def _check_method(method: str, allowed: tuple[str, ...]) -> None:
    if method not in allowed:
        raise ValueError(f"method must be one of {allowed}, got {method!r}")


def _check_dense_size(op: LinearOperator, max_dense: int, what: str) -> None:
    check_int(max_dense, "max_dense", minimum=1)
    n = op.shape[0]
    if n > max_dense:
        raise ValueError(
            f"{what} by a dense matrix: the operator has {n} parameters > max_dense={max_dense} "
            f"({n * n * 8 / 2**30:.1f} GiB in float64); use method='cg' (with subset=... for "
            "standard errors) or raise max_dense"
        )


def _not_pd(smallest: float, largest: float, what: str, damping: float) -> ValueError:
    tol = 10.0 * math.sqrt(torch.finfo(torch.float64).eps) * abs(largest)
    kind = "indefinite" if smallest < -tol else "singular"
    return ValueError(
        f"{what} a positive definite information, but it is {kind}: smallest eigenvalue "
        f"{smallest:.6e} (largest {largest:.6e}, damping {damping!r}); evaluate at a minimum, "
        "restrict params, or add a prior precision with damping=..."
    )


def _cg_breakdown(
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


def _spectral(
    op: LinearOperator,
    f: str,
    parameter: float,
    method: str,
    num_probes: int,
    num_steps: int,
    seed: int,
    density: SpectralDensity | None,
) -> SpectralSumResult:
    t0 = time.perf_counter()
    if method == "dense":
        lam = torch.linalg.eigvalsh(_dense(op))
        nmv = op.shape[0]
        lo = float(lam[0])
        if f == "logdet":
            if lo + parameter <= 0:
                raise ValueError(
                    f"logdet(I + lambda*Id) needs lambda_min + lambda > 0, but the smallest "
                    f"eigenvalue is {lo:.6e} and prior_precision={parameter!r}"
                )
            value = float(torch.log(lam + parameter).sum())
        else:
            if lo + parameter <= 0:
                raise ValueError(
                    f"effective dimension needs lambda_min + alpha > 0, but the smallest "
                    f"eigenvalue is {lo:.6e} and alpha={parameter!r}"
                )
            value = float((lam / (lam + parameter)).sum())
        return SpectralSumResult(value, 0.0, parameter, nmv, time.perf_counter() - t0, "dense")
    shared = density is not None
    if density is None:
        density = spectral_density(op, num_probes=num_probes, num_steps=num_steps, seed=seed)
    if f == "logdet":
        est, se = density.logdet(shift=parameter)
    else:
        est, se = density.effective_dimension(parameter)
    return SpectralSumResult(
        value=est,
        standard_error=se,
        parameter=parameter,
        num_matvecs=0 if shared else density.num_matvecs,
        wall_time=time.perf_counter() - t0 + (0.0 if shared else 0.0),
        method="slq (shared run)" if shared else "slq",
        converged=density.converged,
    )


# ---------------------------------------------------------------------- spectral sums
def log_determinant(
    op: LinearOperator,
    prior_precision: float = 1.0,
    *,
    method: SpectralMethod = "slq",
    num_probes: int = 10,
    num_steps: int = 50,
    seed: int = 0,
    density: SpectralDensity | None = None,
) -> SpectralSumResult:
    r"""Log-determinant :math:`\log\det(I + \lambda\,\mathrm{Id})` by SLQ or dense eigenvalues.

    :math:`\sum_i \log(\lambda_i + \lambda)` is the Occam factor of the Laplace evidence with a
    Gaussian prior of precision :math:`\lambda`.

    Stochastic Lanczos quadrature (Ubaru, Chen & Saad 2017) with ``num_probes`` probes of
    ``num_steps`` steps each, or the dense eigenvalues (``method="dense"``, ``n`` products).

    Args:
        op: Symmetric operator (the information).
        prior_precision: :math:`\lambda > 0`.
        method: ``"slq"`` or ``"dense"``.
        num_probes: SLQ probes (the standard error needs at least 2).
        num_steps: Lanczos steps per probe.
        seed: Probe seed.
        density: A :func:`~nncurv.linalg.spectral_density` result of ``op`` to reuse.

    Raises:
        ValueError: ``prior_precision <= 0``; an eigenvalue (Ritz value) :math:`\le -\lambda`.

    Example:
        >>> import torch
        >>> from nncurv import MatrixOperator
        >>> op = MatrixOperator(torch.diag(torch.tensor([1.0, 3.0], dtype=torch.float64)))
        >>> r = log_determinant(op, 1.0, method="dense")
        >>> import math
        >>> abs(r.value - math.log(8.0)) < 1e-12
        True
    """
    check_operator(op, symmetric=True)
    if not prior_precision > 0:
        raise ValueError(f"prior_precision must be positive, got {prior_precision!r}")
    _check_method(method, ("slq", "dense"))
    check_int(num_probes, "num_probes", minimum=1)
    check_int(num_steps, "num_steps", minimum=1)
    return _spectral(op, "logdet", prior_precision, method, num_probes, num_steps, seed, density)


def effective_dimension(
    op: LinearOperator,
    alpha: float = 1.0,
    *,
    method: SpectralMethod = "slq",
    num_probes: int = 10,
    num_steps: int = 50,
    seed: int = 0,
    density: SpectralDensity | None = None,
) -> SpectralSumResult:
    r"""Effective dimension :math:`\sum_i \lambda_i/(\lambda_i + \alpha)` (MacKay 1992).

    The number of parameter directions the data determine more sharply than a prior of
    precision :math:`\alpha`.

    Args and errors as :func:`log_determinant` (``alpha`` in place of the prior precision).

    References:
        MacKay, "Bayesian interpolation", Neural Computation 4(3), 1992; Maddox, Benton &
        Wilson, "Rethinking parameter counting in deep models", arXiv:2003.02139, 2020.

    Example:
        >>> import torch
        >>> from nncurv import MatrixOperator
        >>> op = MatrixOperator(torch.diag(torch.tensor([1.0, 3.0], dtype=torch.float64)))
        >>> effective_dimension(op, 1.0, method="dense").value  # 1/2 + 3/4
        1.25
    """
    check_operator(op, symmetric=True)
    if not alpha > 0:
        raise ValueError(f"alpha must be positive, got {alpha!r}")
    _check_method(method, ("slq", "dense"))
    check_int(num_probes, "num_probes", minimum=1)
    check_int(num_steps, "num_steps", minimum=1)
    return _spectral(op, "effdim", alpha, method, num_probes, num_steps, seed, density)


# ---------------------------------------------------------------------- condition number
def condition_number(
    op: LinearOperator,
    *,
    method: Literal["lanczos", "dense"] = "lanczos",
    num_bottom: int = 5,
    tol: float | None = None,
    max_matvecs: int | None = None,
    seed: int = 0,
) -> ConditionResult:
    r"""Condition number from both ends of the spectrum, flagging negative eigenvalues.

    Lanczos (:func:`~nncurv.linalg.eigenvalues`) for :math:`\lambda_{\max}` and the
    ``num_bottom`` smallest eigenvalues; away from a minimum the observed information is
    indefinite, which is reported (``indefinite``, ``num_negative``), never clipped.

    Args:
        op: Symmetric operator.
        method: ``"lanczos"`` or ``"dense"`` (all eigenvalues; exact negative count).
        num_bottom: Bottom eigenvalues computed by Lanczos.
        tol: Lanczos tolerance (see :func:`~nncurv.linalg.eigenvalues`).
        max_matvecs: Lanczos budget per end.
        seed: Start-vector seed.

    Example:
        >>> import torch
        >>> from nncurv import MatrixOperator
        >>> op = MatrixOperator(torch.diag(torch.tensor([-2.0, 1.0, 4.0], dtype=torch.float64)))
        >>> r = condition_number(op, method="dense")
        >>> r.indefinite, r.num_negative, r.condition_number
        (True, 1, inf)
    """
    t0 = time.perf_counter()
    check_operator(op, symmetric=True)
    _check_method(method, ("lanczos", "dense"))
    n = op.shape[0]
    check_int(num_bottom, "num_bottom", minimum=1)
    if method == "dense":
        lam = torch.linalg.eigvalsh(_dense(op))
        lam_max, bottom, nmv, conv = float(lam[-1]), lam, n, True
        ztol = _dense_tol(lam)
        lower_bound = False
    else:
        kb = min(num_bottom, n)
        top = eigenvalues(op, 1, which="LA", tol=tol, max_matvecs=max_matvecs, seed=seed)
        bot = eigenvalues(op, kb, which="SA", tol=tol, max_matvecs=max_matvecs, seed=seed + 1)
        lam_max = float(top.eigenvalues[0])
        bottom = torch.sort(bot.eigenvalues).values
        nmv, conv = top.num_matvecs + bot.num_matvecs, top.converged and bot.converged
        ztol = math.sqrt(torch.finfo(op.dtype).eps) * max(abs(lam_max), 1e-300)
        lower_bound = bool((bottom < -ztol).all()) and kb < n
    lam_min = float(bottom[0])
    neg = int((bottom < -ztol).sum())
    cond = lam_max / lam_min if lam_min > ztol else math.inf
    return ConditionResult(
        lambda_max=lam_max,
        lambda_min=lam_min,
        condition_number=cond,
        num_negative=neg,
        num_negative_is_lower_bound=lower_bound,
        indefinite=neg > 0,
        bottom_eigenvalues=bottom[: min(num_bottom, n)] if method == "dense" else bottom,
        zero_tolerance=ztol,
        num_matvecs=nmv,
        wall_time=time.perf_counter() - t0,
        method=method,
        converged=conv,
    )


# ---------------------------------------------------------------------- standard errors
def _labels(op: LinearOperator, indices: Tensor) -> tuple[str, ...]:
    names = getattr(op, "param_names", None)
    shapes = getattr(getattr(op, "problem", None), "shapes", None)
    if names is None or shapes is None:
        return tuple(f"[{i}]" for i in indices.tolist())
    starts, offset = [], 0
    for n in names:
        starts.append((offset, n))
        offset += shapes[n].numel()
    out = []
    for i in indices.tolist():
        start, name = max((s for s in starts if s[0] <= i), key=lambda s: s[0])
        shape = tuple(shapes[name])
        j = i - start
        if not shape:
            out.append(name)
            continue
        idx = []
        for d in reversed(shape):
            idx.append(j % d)
            j //= d
        out.append(f"{name}[{', '.join(str(x) for x in reversed(idx))}]")
    return tuple(out)


def resolve_subset(op: LinearOperator, subset: str | Sequence[str] | Tensor | None) -> Tensor:
    """Flat indices of the parameters named by ``subset`` (glob patterns or names)."""
    n = op.shape[0]
    if subset is None:
        return torch.arange(n, device=op.device)
    if isinstance(subset, Tensor):
        idx = subset.to(device=op.device, dtype=torch.long).reshape(-1)
        if idx.numel() == 0 or bool((idx < 0).any()) or bool((idx >= n).any()):
            raise ValueError(f"subset indices must be in [0, {n}), got {subset!r}")
        return idx
    names = getattr(op, "param_names", None)
    shapes = getattr(getattr(op, "problem", None), "shapes", None)
    if names is None or shapes is None:
        raise TypeError("subset by name needs a parameter-space operator; pass flat indices")
    patterns = [subset] if isinstance(subset, str) else list(subset)
    if not patterns or not all(isinstance(p, str) for p in patterns):
        raise TypeError(f"subset must be a name pattern or a list of them, got {subset!r}")
    chosen, offset, parts = set(), 0, []
    for pat in patterns:
        hits = [
            nm
            for nm in names
            if fnmatch.fnmatchcase(nm, pat) or fnmatch.fnmatchcase(nm, pat + ".*")
        ]
        if not hits:
            raise ValueError(f"subset {pat!r} matches no parameter; available: {names[:12]}")
        chosen.update(hits)
    for nm in names:
        size = shapes[nm].numel()
        if nm in chosen:
            parts.append(torch.arange(offset, offset + size, device=op.device))
        offset += size
    return torch.cat(parts)


def standard_errors(
    op: LinearOperator,
    *,
    subset: str | Sequence[str] | Tensor | None = None,
    method: Literal["auto", "dense", "cg"] = "auto",
    damping: float = 0.0,
    max_dense: int = 4096,
    tol: float = 1e-10,
    max_iter: int | None = None,
    block_size: int = 32,
    seed: int = 0,
) -> StandardErrors:
    r"""Standard errors :math:`\sqrt{[(I + \delta\,\mathrm{Id})^{-1}]_{jj}}` (asymptotic, Wald).

    ``"dense"`` forms :math:`I` (``n`` products) and inverts it through its eigendecomposition,
    up to ``max_dense`` parameters. ``"cg"`` solves :math:`(I+\delta)x = e_j` by conjugate
    gradients for each chosen entry ``j`` (``subset``), with the *full* operator: the result is
    the marginal standard error, not the one with the other parameters held fixed (for that,
    build the information with ``params=`` instead). ``"auto"`` is dense up to ``max_dense``.

    Args:
        op: The information (symmetric positive definite).
        subset: Entries to report: a name or glob (``"fc.*"``), a list of them, or flat indices;
            ``None`` for all.
        method: ``"auto"``, ``"dense"`` or ``"cg"``.
        damping: :math:`\delta \ge 0` (a prior precision; Laplace posterior standard deviations).
        max_dense: Largest dimension for the dense route.
        tol: CG relative residual tolerance.
        max_iter: CG iteration cap.
        block_size: Right-hand sides solved together.
        seed: Seed of the Lanczos run that names the smallest eigenvalue after a CG breakdown.

    Raises:
        ValueError: The information is singular or indefinite (the message names the smallest
            eigenvalue), the dense route is too large, or ``subset`` matches nothing.

    Example:
        >>> import torch
        >>> from nncurv import MatrixOperator
        >>> op = MatrixOperator(torch.diag(torch.tensor([4.0, 25.0], dtype=torch.float64)))
        >>> standard_errors(op).values.tolist()
        [0.5, 0.2]
    """
    t0 = time.perf_counter()
    check_operator(op, symmetric=True)
    _check_method(method, ("auto", "dense", "cg"))
    if not (damping >= 0 and math.isfinite(damping)):
        raise ValueError(f"damping must be >= 0, got {damping!r}")
    check_int(block_size, "block_size", minimum=1)
    idx = resolve_subset(op, subset)
    n = op.shape[0]
    if method == "auto":
        check_int(max_dense, "max_dense", minimum=1)
        method = "dense" if n <= max_dense else "cg"
    names = _labels(op, idx)
    if method == "dense":
        _check_dense_size(op, max_dense, "standard errors")
        lam, U = _eigh(op)
        lam = lam + damping
        if float(lam[0]) <= _dense_tol(lam):
            raise _not_pd(float(lam[0]), float(lam[-1]), "standard errors need", damping)
        Ui = U[idx]
        var = (Ui**2 / lam).sum(1)
        return StandardErrors(
            values=var.sqrt(),
            indices=idx,
            names=names,
            method="dense",
            damping=damping,
            smallest_eigenvalue=float(lam[0]),
            residuals=torch.zeros_like(var),
            converged=True,
            num_matvecs=n,
            wall_time=time.perf_counter() - t0,
        )
    var_parts, res_parts, nmv, conv = [], [], 0, True
    for start in range(0, idx.numel(), block_size):
        cols = idx[start : start + block_size]
        E = torch.zeros(n, cols.numel(), dtype=op.dtype, device=op.device)
        E[cols, torch.arange(cols.numel(), device=op.device)] = 1.0
        try:
            r = conjugate_gradients(op, E, shift=damping, tol=tol, max_iter=max_iter)
        except NotPositiveDefiniteError as err:
            raise _cg_breakdown(op, err, "standard errors need", damping, seed) from err
        nmv += r.num_matvecs
        conv = conv and r.converged
        var_parts.append(r.solution[cols, torch.arange(cols.numel(), device=op.device)])
        res_parts.append(r.residuals)
    var = torch.cat(var_parts)
    if bool((var <= 0).any()):
        bad = NotPositiveDefiniteError("a diagonal entry of the inverse is not positive")
        raise _cg_breakdown(op, bad, "standard errors need", damping, seed)
    return StandardErrors(
        values=var.sqrt(),
        indices=idx,
        names=names,
        method="cg",
        damping=damping,
        smallest_eigenvalue=None,
        residuals=torch.cat(res_parts),
        converged=conv,
        num_matvecs=nmv,
        wall_time=time.perf_counter() - t0,
    )


# ---------------------------------------------------------------------- TIC
def takeuchi_criterion(
    op: LinearOperator,
    covariance: LinearOperator,
    *,
    method: Literal["auto", "dense", "cg"] = "auto",
    damping: float = 0.0,
    num_probes: int = 20,
    max_dense: int = 4096,
    tol: float = 1e-8,
    max_iter: int | None = None,
    seed: int = 0,
) -> TICResult:
    r"""Takeuchi's penalty :math:`\operatorname{tr}((I+\delta)^{-1} C)` for a gradient scatter C.

    See :class:`TICResult` for the scaling of :math:`C`.

    Dense (``n`` products of each, eigendecomposition) up to ``max_dense``; otherwise Hutchinson
    with Rademacher probes, :math:`\frac1m\sum_k x_k^\top C v_k` with :math:`x_k` the CG solution
    of :math:`(I+\delta)x_k = v_k` (unbiased up to the CG tolerance).

    References:
        Takeuchi, "Distribution of information statistics and validity criteria of models",
        Mathematical Sciences 153, 1976; Thomas, Pedregosa, van Merriënboer, Manzagol, Bengio &
        Le Roux, "On the interplay between noise and curvature and its effect on optimization
        and generalization", AISTATS 2020.
    """
    t0 = time.perf_counter()
    check_operator(op, symmetric=True)
    check_operator(covariance, symmetric=True)
    if covariance.shape != op.shape:
        raise ValueError(f"covariance has shape {covariance.shape}, information {op.shape}")
    _check_method(method, ("auto", "dense", "cg"))
    if not (damping >= 0 and math.isfinite(damping)):
        raise ValueError(f"damping must be >= 0, got {damping!r}")
    check_int(num_probes, "num_probes", minimum=1)
    n = op.shape[0]
    if method == "auto":
        check_int(max_dense, "max_dense", minimum=1)
        method = "dense" if n <= max_dense else "cg"
    if method == "dense":
        _check_dense_size(op, max_dense, "TIC")
        lam, U = _eigh(op)
        lam = lam + damping
        if float(lam[0]) <= _dense_tol(lam):
            raise _not_pd(float(lam[0]), float(lam[-1]), "TIC needs", damping)
        C = _dense(covariance)
        value = float(((U.T @ C @ U).diagonal() / lam).sum())
        return TICResult(value, 0.0, n, damping, "dense", n, time.perf_counter() - t0, True)
    gen = make_generator(op, None, seed)
    V = (2 * torch.randint(0, 2, (n, num_probes), generator=gen, device=op.device) - 1).to(op.dtype)
    try:
        r = conjugate_gradients(op, V, shift=damping, tol=tol, max_iter=max_iter)
    except NotPositiveDefiniteError as err:
        raise _cg_breakdown(op, err, "TIC needs", damping, seed) from err
    samples = (r.solution * covariance.matmat(V)).sum(0)
    check_finite(samples, "the TIC probes")
    se = float(samples.std() / math.sqrt(num_probes)) if num_probes > 1 else math.inf
    return TICResult(
        float(samples.mean()),
        se,
        n,
        damping,
        "cg",
        r.num_matvecs,
        time.perf_counter() - t0,
        r.converged,
    )


# ---------------------------------------------------------------------- gap
def observed_fisher_gap(
    op: LinearOperator,
    fisher: LinearOperator,
    *,
    method: Literal["probes", "dense"] = "probes",
    num_probes: int = 30,
    seed: int = 0,
) -> GapResult:
    r"""Relative Frobenius distance :math:`\lVert I - F\rVert_F/\lVert I\rVert_F`.

    With Gaussian probes :math:`\mathbb E\lVert Av\rVert^2 = \lVert A\rVert_F^2`, so
    :math:`a_k = \lVert (I-F)v_k\rVert^2` and :math:`b_k = \lVert I v_k\rVert^2` estimate the
    squared norms without bias; the ratio :math:`\bar a/\bar b` is consistent and its standard
    error comes from the delta method. Cost: ``num_probes`` products with each operator.

    Example:
        >>> import torch
        >>> from nncurv import MatrixOperator
        >>> I = MatrixOperator(torch.eye(3, dtype=torch.float64))
        >>> F = MatrixOperator(torch.diag(torch.tensor([1.0, 1.0, 0.0], dtype=torch.float64)))
        >>> round(observed_fisher_gap(I, F, method="dense").value ** 2, 12)  # 1/3
        0.333333333333
    """
    t0 = time.perf_counter()
    check_operator(op, symmetric=True)
    check_operator(fisher, symmetric=True)
    if fisher.shape != op.shape:
        raise ValueError(f"fisher has shape {fisher.shape}, information {op.shape}")
    _check_method(method, ("probes", "dense"))
    check_int(num_probes, "num_probes", minimum=2)
    n = op.shape[0]
    if method == "dense":
        A, B = _dense(op), _dense(fisher)
        diff, norm = float((A - B).norm()), float(A.norm())
        if not norm > 0:
            raise ValueError("the observed information is zero; the relative gap is undefined")
        return GapResult(diff / norm, 0.0, diff, norm, 2 * n, time.perf_counter() - t0, "dense")
    gen = make_generator(op, None, seed)
    V = torch.randn(n, num_probes, generator=gen, device=op.device, dtype=op.dtype)
    IV, FV = op.matmat(V), fisher.matmat(V)
    a = ((IV - FV) ** 2).sum(0).to(torch.float64)
    b = (IV**2).sum(0).to(torch.float64)
    if not bool(torch.isfinite(a).all() and torch.isfinite(b).all()):
        raise NonFiniteError("the operators produced NaN or Inf in the gap probes")
    am, bm = float(a.mean()), float(b.mean())
    if not bm > 0:
        raise ValueError("the observed information is zero; the relative gap is undefined")
    R = am / bm
    m = num_probes
    cov = torch.cov(torch.stack([a, b]))
    var_r = (float(cov[0, 0]) - 2 * R * float(cov[0, 1]) + R * R * float(cov[1, 1])) / (m * bm**2)
    gap = math.sqrt(max(R, 0.0))
    se = math.sqrt(max(var_r, 0.0)) / (2 * gap) if gap > 0 else math.sqrt(max(var_r, 0.0))
    return GapResult(
        gap, se, math.sqrt(am), math.sqrt(bm), 2 * m, time.perf_counter() - t0, "probes"
    )
