r"""All information metrics in one call: :func:`information_metrics` and its frozen result."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from torch import Tensor

from nncurv._information_cg import NotPositiveDefiniteError
from nncurv._information_inverse import standard_errors, takeuchi_criterion
from nncurv._information_likelihood import Likelihood
from nncurv._information_operators import (
    InformationOperator,
    empirical_of,
    fisher_of,
    gradient_covariance,
)
from nncurv._information_results import (
    ConditionResult,
    GapResult,
    SpectralSumResult,
    StandardErrors,
    TICResult,
)
from nncurv._information_spectral import (
    condition_number,
    effective_dimension,
    log_determinant,
    observed_fisher_gap,
)
from nncurv.linalg import EigenResult, TraceResult, eigenvalues, spectral_density, trace

__all__ = ["ALL_METRICS", "InformationMetrics", "information_metrics"]

ALL_METRICS = (
    "trace",
    "top_eigenvalues",
    "logdet",
    "effective_dimension",
    "condition",
    "standard_errors",
    "tic",
    "gap",
)


@dataclass(frozen=True)
class InformationMetrics:
    r"""Everything :func:`information_metrics` computed, with per-metric time and products.

    A metric that is undefined at these parameters (standard errors of an indefinite
    information, a log-determinant below :math:`-\lambda`, a dense route over its limit) is
    ``None`` and its reason is in :attr:`errors`: reported, not hidden.

    Attributes:
        likelihood: The :class:`Likelihood` (scale, noise variance and its source).
        num_params: :math:`P`.
        num_samples: :math:`N`.
        trace, top_eigenvalues, logdet, effective_dimension, condition, standard_errors, tic,
            gap: The results (``None`` if not requested or undefined).
        wall_times: Seconds per metric.
        num_matvecs: Products per metric.
        errors: Why a requested metric is ``None``.
    """

    likelihood: Likelihood
    num_params: int
    num_samples: int
    trace: TraceResult | None = None
    top_eigenvalues: EigenResult | None = None
    logdet: SpectralSumResult | None = None
    effective_dimension: SpectralSumResult | None = None
    condition: ConditionResult | None = None
    standard_errors: StandardErrors | None = None
    tic: TICResult | None = None
    gap: GapResult | None = None
    wall_times: dict[str, float] = field(default_factory=dict)
    num_matvecs: dict[str, int] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)

    def summary(self) -> str:
        """A plain-text table: metric, value, error, products, seconds."""
        rows: list[tuple[str, str, str]] = []

        def fmt(x: float) -> str:
            return f"{x:.4g}"

        if self.trace is not None:
            rows.append(("trace", fmt(self.trace.estimate), f"± {fmt(self.trace.standard_error)}"))
        if self.top_eigenvalues is not None:
            ev = self.top_eigenvalues.eigenvalues.tolist()
            rows.append(("top eigenvalues", fmt(ev[0]), ", ".join(fmt(x) for x in ev)))
        if self.logdet is not None:
            rows.append(
                (
                    f"logdet(I + {self.logdet.parameter:g} Id)",
                    fmt(self.logdet.value),
                    f"± {fmt(self.logdet.standard_error)}",
                )
            )
        if self.effective_dimension is not None:
            e = self.effective_dimension
            rows.append(
                (
                    f"effective dim (alpha={e.parameter:g})",
                    fmt(e.value),
                    f"± {fmt(e.standard_error)}",
                )
            )
        if self.condition is not None:
            c = self.condition
            neg = f"{'>=' if c.num_negative_is_lower_bound else ''}{c.num_negative} negative"
            rows.append(
                (
                    "condition number",
                    fmt(c.condition_number),
                    f"lambda in [{fmt(c.lambda_min)}, {fmt(c.lambda_max)}], {neg}",
                )
            )
        if self.standard_errors is not None:
            s = self.standard_errors.values
            rows.append(
                (
                    "standard errors",
                    f"median {fmt(float(s.median()))}",
                    f"range [{fmt(float(s.min()))}, {fmt(float(s.max()))}], {s.numel()} entries",
                )
            )
        if self.tic is not None:
            rows.append(
                (
                    "TIC penalty tr(I^-1 C)",
                    fmt(self.tic.value),
                    f"± {fmt(self.tic.standard_error)} (P = {self.tic.num_parameters})",
                )
            )
        if self.gap is not None:
            rows.append(
                ("||I - F||_F / ||I||_F", fmt(self.gap.value), f"± {fmt(self.gap.standard_error)}")
            )
        key = {
            "trace": "trace",
            "top eigenvalues": "top_eigenvalues",
            "logdet": "logdet",
            "effective dim": "effective_dimension",
            "condition number": "condition",
            "standard errors": "standard_errors",
            "TIC": "tic",
            "||I - F||": "gap",
        }
        lines = [f"{'metric':<30} {'value':>12}  {'error / detail':<44} {'products':>8} {'s':>7}"]
        for name, value, detail in rows:
            k = next(v for p, v in key.items() if name.startswith(p))
            lines.append(
                f"{name:<30} {value:>12}  {detail:<44} {self.num_matvecs.get(k, 0):>8} "
                f"{self.wall_times.get(k, 0.0):>7.2f}"
            )
        for k, msg in self.errors.items():
            lines.append(
                f"{k:<30} {'undefined':>12}  {'(see below)':<44} {self.num_matvecs.get(k, 0):>8} "
                f"{self.wall_times.get(k, 0.0):>7.2f}\n    {msg}"
            )
        return "\n".join(lines)


def _timed(
    name: str,
    fn: Callable[[], Any],
    times: dict[str, float],
    mvs: dict[str, int],
    errors: dict[str, str],
    count: Callable[[Any], int],
) -> Any:
    t0 = time.perf_counter()
    try:
        out = fn()
    except (ValueError, NotPositiveDefiniteError) as err:
        errors[name] = str(err)
        out = None
    times[name] = time.perf_counter() - t0
    if out is not None:
        mvs[name] = count(out)
    return out


def information_metrics(
    info: InformationOperator,
    *,
    metrics: Sequence[str] = ALL_METRICS,
    num_top: int = 5,
    num_bottom: int = 3,
    condition_matvecs: int = 300,
    prior_precision: float = 1.0,
    alpha: float | None = None,
    trace_matvecs: int = 60,
    slq_probes: int = 4,
    slq_steps: int = 40,
    subset: str | Sequence[str] | Tensor | None = None,
    se_method: Literal["auto", "dense", "cg"] = "auto",
    damping: float = 0.0,
    max_dense: int = 4096,
    cg_tol: float = 1e-8,
    tic_probes: int = 10,
    gap_probes: int = 20,
    fisher: InformationOperator | None = None,
    empirical: InformationOperator | None = None,
    seed: int = 0,
) -> InformationMetrics:
    r"""All metrics of an observed information in one call, each timed and costed.

    Trace (:func:`~nncurv.linalg.trace`, XTrace), top eigenvalues (Lanczos),
    :math:`\log\det(I+\lambda\,\mathrm{Id})` and the effective dimension
    :math:`\sum\lambda_i/(\lambda_i+\alpha)` from one shared SLQ run, the condition number with
    negative eigenvalues flagged, standard errors (:func:`standard_errors`), Takeuchi's penalty
    (:func:`takeuchi_criterion`, with the gradient scatter of :func:`gradient_covariance`) and
    the observed-vs-Fisher gap (:func:`observed_fisher_gap`; exact dense norms up to 512
    parameters, probes above). Each is also available alone.

    Args:
        info: The observed information (from :func:`observed_information`).
        metrics: Which of ``ALL_METRICS`` to compute.
        num_top: Number of top eigenvalues.
        num_bottom: Bottom eigenvalues for the condition number and the negative count.
        condition_matvecs: Lanczos budget per end of the spectrum for the condition number.
        prior_precision: :math:`\lambda` of the log-determinant.
        alpha: :math:`\alpha` of the effective dimension (default ``prior_precision``).
        trace_matvecs: Budget of the trace estimate.
        slq_probes: SLQ probes (shared by logdet and effective dimension).
        slq_steps: Lanczos steps per SLQ probe.
        subset: Entries for the standard errors (see :func:`standard_errors`).
        se_method: ``"auto"``, ``"dense"`` or ``"cg"`` for the standard errors and TIC.
        damping: Prior precision added for standard errors and TIC.
        max_dense: Largest dimension for dense routes.
        cg_tol: Relative residual tolerance of the CG solves (standard errors, TIC).
        tic_probes: Probes of the CG route of TIC.
        gap_probes: Probes of the gap.
        fisher: Fisher operator for the gap (built from ``info`` when ``None``).
        empirical: Empirical Fisher for TIC (built from ``info`` when ``None``).
        seed: Base seed of all probes.

    Example:
        >>> import torch
        >>> from nncurv.information import observed_information
        >>> X = torch.randn(60, 3, dtype=torch.float64)
        >>> y = X @ torch.tensor([[1.0], [0.0], [-1.0]], dtype=torch.float64)
        >>> y = y + 0.5 * torch.randn(60, 1, dtype=torch.float64)
        >>> model = torch.nn.Linear(3, 1).double()
        >>> info = observed_information(model, torch.nn.MSELoss(), (X, y), reduction="mean",
        ...                             noise_variance=0.25)
        >>> m = information_metrics(info, metrics=("trace", "condition", "standard_errors"))
        >>> A = torch.cat([X, torch.ones(60, 1, dtype=torch.float64)], 1)
        >>> se = (0.25 * torch.linalg.inv(A.T @ A)).diagonal().sqrt()
        >>> torch.allclose(m.standard_errors.values, se)
        True
    """
    if not isinstance(info, InformationOperator):
        raise TypeError(f"info must be an InformationOperator, got {type(info).__name__}")
    unknown = [m for m in metrics if m not in ALL_METRICS]
    if unknown or isinstance(metrics, str):
        raise ValueError(f"metrics must be a sequence of {ALL_METRICS}, got {metrics!r}")
    if not prior_precision > 0:
        raise ValueError(f"prior_precision must be positive, got {prior_precision!r}")
    alpha = prior_precision if alpha is None else alpha
    if not alpha > 0:
        raise ValueError(f"alpha must be positive, got {alpha!r}")
    n = info.shape[0]
    times: dict[str, float] = {}
    mvs: dict[str, int] = {}
    errors: dict[str, str] = {}
    res: dict[str, Any] = {}

    def run(name: str, fn: Callable[[], Any], count: Callable[[Any], int]) -> None:
        if name in metrics:
            res[name] = _timed(name, fn, times, mvs, errors, count)

    def nmv(r: Any) -> int:
        return int(r.num_matvecs)

    run("trace", lambda: trace(info, min(trace_matvecs, max(n, 3)), seed=seed), nmv)
    run("top_eigenvalues", lambda: eigenvalues(info, min(num_top, n), seed=seed + 1), nmv)
    density_holder: dict[str, Any] = {}
    if "logdet" in metrics or "effective_dimension" in metrics:
        t0 = time.perf_counter()
        density_holder["d"] = spectral_density(
            info, num_probes=slq_probes, num_steps=slq_steps, seed=seed + 2
        )
        slq_time = time.perf_counter() - t0
        slq_mv = density_holder["d"].num_matvecs
        run(
            "logdet",
            lambda: log_determinant(info, prior_precision, density=density_holder["d"]),
            lambda r: slq_mv,
        )
        run(
            "effective_dimension",
            lambda: effective_dimension(info, alpha, density=density_holder["d"]),
            lambda r: 0 if "logdet" in metrics else slq_mv,
        )
        first = "logdet" if "logdet" in metrics else "effective_dimension"
        times[first] = times.get(first, 0.0) + slq_time
        if res.get(first) is not None:  # the first of the two carries the run's cost
            res[first] = replace(
                res[first],
                method="slq",
                num_matvecs=slq_mv,
                wall_time=res[first].wall_time + slq_time,
            )
    run(
        "condition",
        lambda: condition_number(
            info, num_bottom=num_bottom, max_matvecs=condition_matvecs, seed=seed + 3
        ),
        nmv,
    )
    cond = res.get("condition")
    if cond is not None and cond.lambda_min + damping < -cond.zero_tolerance:
        for name in ("standard_errors", "tic"):
            if name in metrics:  # known from the condition run: no solves wasted
                metrics = [m for m in metrics if m != name]
                errors[name] = (
                    f"{'TIC needs' if name == 'tic' else 'standard errors need'} a positive "
                    f"definite information, but I + damping*Id is indefinite: smallest "
                    f"eigenvalue of I {cond.lambda_min:.6e} (a Lanczos upper bound) < "
                    f"-damping = {-damping!r}; evaluate at a minimum, restrict params, or add "
                    "a larger prior precision with damping=..."
                )
    run(
        "standard_errors",
        lambda: standard_errors(
            info,
            subset=subset,
            method=se_method,
            damping=damping,
            max_dense=max_dense,
            tol=cg_tol,
            seed=seed + 4,
        ),
        nmv,
    )
    if "tic" in metrics:

        def tic() -> TICResult:
            ef = empirical if empirical is not None else empirical_of(info)
            C = gradient_covariance(ef)
            return takeuchi_criterion(
                info,
                C,
                method=se_method,
                damping=damping,
                num_probes=tic_probes,
                max_dense=max_dense,
                tol=cg_tol,
                seed=seed + 5,
            )

        run("tic", tic, nmv)
    if "gap" in metrics:

        def gap() -> GapResult:
            F = (
                fisher
                if fisher is not None
                else fisher_of(info.problem, info.likelihood, "auto", 16)
            )
            method: Literal["probes", "dense"] = "dense" if n <= min(max_dense, 512) else "probes"
            return observed_fisher_gap(info, F, method=method, num_probes=gap_probes, seed=seed + 6)

        run("gap", gap, nmv)
    return InformationMetrics(
        likelihood=info.likelihood,
        num_params=n,
        num_samples=info.problem.num_samples,
        trace=res.get("trace"),
        top_eigenvalues=res.get("top_eigenvalues"),
        logdet=res.get("logdet"),
        effective_dimension=res.get("effective_dimension"),
        condition=res.get("condition"),
        standard_errors=res.get("standard_errors"),
        tic=res.get("tic"),
        gap=res.get("gap"),
        wall_times=times,
        num_matvecs=mvs,
        errors=errors,
    )
