r"""Observed information, Fisher information and the empirical Fisher, with their metrics.

Conventions:
    The **observed information** is the Hessian of the *summed* negative log-likelihood,

    .. math::
        I(\theta) = \sum_{n=1}^N \nabla^2_\theta \big[-\log p(y_n \mid x_n, \theta)\big],

    so that :math:`\sqrt{\operatorname{diag}(I^{-1})}` are standard errors. The user states how
    the loss reduces (``reduction="mean"`` or ``"sum"``; nncurv does not guess) and nncurv
    scales: a torch loss with ``reduction="mean"`` averages over its :math:`N \cdot D` loss
    terms (:math:`D` target elements per sample; spatial positions for cross-entropy), so
    :math:`I = N D\, \nabla^2 \mathcal L`. Under ``torch.distributed``, :math:`N` counts the
    samples of all ranks.

    Per-sample likelihoods: cross-entropy / NLL (categorical), BCE-with-logits and BCE
    (Bernoulli), Poisson NLL, Gaussian NLL (mean and variance from the model, see
    :class:`GaussianNLLAdapter`), and MSE as a Gaussian with noise variance :math:`\sigma^2`:
    :math:`-\log p = (y-f)^2/(2\sigma^2) + \text{const}`, so
    :math:`I = \nabla^2 \mathcal L_{\text{sum}} / (2\sigma^2)`. :math:`\sigma^2` is stated
    (``noise_variance=0.25``) or estimated (``noise_variance="estimate"``: the MLE
    :math:`\text{RSS}/(ND)`); :attr:`Likelihood.noise_variance_source` says which. Other losses
    raise ``ValueError`` unless ``assume_nll=True`` (then ``"mean"`` means a mean over samples).

    The **Fisher information** :math:`F = \sum_n \mathbb E_{y \sim p(\cdot|x_n,\theta)}
    [\nabla\log p\,\nabla\log p^\top]` is the GGN for these losses with a canonical link
    (logits, MSE, Poisson log-rate; Schraudolph 2002, Martens 2020), scaled the same way, and an
    expected output curvature otherwise (BCE on probabilities, Poisson rate, Gaussian NLL). It
    equals :math:`I` for generalised linear models with canonical link at any parameters.

    The **empirical Fisher** :math:`\sum_n g_n g_n^\top` uses the *observed* labels. It is not
    the Fisher: Kunstner, Balles & Hennig ("Limitations of the empirical Fisher approximation
    for natural gradient descent", NeurIPS 2019) show that it captures curvature only under
    conditions (a well-specified model, at a minimum, with many samples) that rarely hold in
    practice, and that preconditioning with it can distort the geometry. nncurv offers it for
    the gradient covariance of Takeuchi's criterion and for comparison.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import torch
from torch import Tensor, nn

from nncurv._information_cg import CGResult, NotPositiveDefiniteError, conjugate_gradients
from nncurv._information_likelihood import (
    GaussianNLLAdapter,
    Likelihood,
    LikelihoodName,
    check_loss,
    resolve_scale,
)
from nncurv._information_metrics import (
    ConditionResult,
    GapResult,
    SpectralSumResult,
    StandardErrors,
    TICResult,
    condition_number,
    effective_dimension,
    log_determinant,
    observed_fisher_gap,
    standard_errors,
    takeuchi_criterion,
)
from nncurv._information_operators import (
    EmpiricalFisherOperator,
    ExpectedFisherOperator,
    InformationOperator,
)
from nncurv.linalg import EigenResult, TraceResult, eigenvalues, spectral_density, trace
from nncurv.operators import CallableOperator, GGNOperator, HessianOperator
from nncurv.problem import CurvatureProblem, ParamSelection

__all__ = [
    "ALL_METRICS",
    "CGResult",
    "ConditionResult",
    "EmpiricalFisherOperator",
    "GapResult",
    "GaussianNLLAdapter",
    "InformationMetrics",
    "InformationOperator",
    "Likelihood",
    "NotPositiveDefiniteError",
    "SpectralSumResult",
    "StandardErrors",
    "TICResult",
    "condition_number",
    "conjugate_gradients",
    "effective_dimension",
    "empirical_fisher",
    "fisher_information",
    "gradient_covariance",
    "information_metrics",
    "log_determinant",
    "observed_fisher_gap",
    "observed_information",
    "standard_errors",
    "takeuchi_criterion",
]


def _problem(
    model: nn.Module,
    nll_loss: Any,
    data: Any,
    reduction: str,
    params: ParamSelection,
    assume_nll: bool,
    likelihood: LikelihoodName | None,
    noise_variance: float | str | None,
    problem_kwargs: dict[str, Any],
) -> tuple[CurvatureProblem, Likelihood]:
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be stated as 'mean' or 'sum', got {reduction!r}")
    if "reduction" in problem_kwargs:
        raise TypeError("reduction is given twice")
    if isinstance(nll_loss, nn.GaussianNLLLoss):
        nll_loss = GaussianNLLAdapter(nll_loss)
    name, output, loss_name = check_loss(nll_loss, reduction, assume_nll)
    if likelihood is not None and likelihood != name:
        raise ValueError(f"likelihood={likelihood!r} was stated but {loss_name} is {name!r}")
    problem = CurvatureProblem(
        model,
        nll_loss,
        data,
        reduction=reduction,  # type: ignore[arg-type]
        params=params,
        **problem_kwargs,
    )
    lk = resolve_scale(
        problem,
        nll_loss,
        name=name,
        output=output,
        loss_name=loss_name,
        noise_variance=noise_variance,
    )
    return problem, lk


def observed_information(
    model: nn.Module,
    nll_loss: Any,
    data: Any,
    *,
    reduction: Literal["mean", "sum"],
    params: ParamSelection = None,
    assume_nll: bool = False,
    likelihood: LikelihoodName | None = None,
    noise_variance: float | Literal["estimate"] | None = None,
    mode: str = "auto",
    chunk_size: int | None = 16,
    **problem_kwargs: Any,
) -> InformationOperator:
    r"""The observed information :math:`I = \sum_n \nabla^2_\theta[-\log p(y_n|x_n,\theta)]`.

    A scaled :class:`~nncurv.HessianOperator` (see the module conventions for the scale).

    Args:
        model: The network.
        nll_loss: A loss that is a negative log-likelihood (see the module docstring).
        data: A batch or an iterable of batches.
        reduction: How the loss reduces over a batch, ``"mean"`` or ``"sum"`` (required).
        params: Parameter selection (see :class:`~nncurv.CurvatureProblem`).
        assume_nll: Accept an unrecognised loss as the NLL (mean over samples if ``"mean"``).
        likelihood: Optional check: the likelihood the loss must be (``"categorical"``, ...).
        noise_variance: :math:`\sigma^2` of the Gaussian for MSE, or ``"estimate"``.
        mode: Hessian product mode (``"auto"``, ``"cached"``, ...).
        chunk_size: Columns per vectorised product.
        **problem_kwargs: Other :class:`~nncurv.CurvatureProblem` options.

    Raises:
        ValueError: The loss is not a recognised NLL (and ``assume_nll`` is off), the stated
            reduction differs from the loss's, weights or label smoothing, MSE without a noise
            variance, a parameter selection that matches nothing.

    Example:
        Logistic regression: :math:`I = X^\top W X` with :math:`W = \operatorname{diag}(p(1-p))`.

        >>> import torch
        >>> X = torch.randn(50, 3, dtype=torch.float64)
        >>> y = torch.randint(0, 2, (50, 1)).double()
        >>> model = torch.nn.Linear(3, 1, bias=False).double()
        >>> info = observed_information(model, torch.nn.BCEWithLogitsLoss(), (X, y),
        ...                             reduction="mean")
        >>> p = torch.sigmoid(model(X)).detach()
        >>> torch.allclose(info.to_dense(), X.T @ (p * (1 - p) * X))
        True
    """
    problem, lk = _problem(
        model,
        nll_loss,
        data,
        reduction,
        params,
        assume_nll,
        likelihood,
        noise_variance,
        problem_kwargs,
    )
    base = HessianOperator(problem, mode=mode, chunk_size=chunk_size)  # type: ignore[arg-type]
    return InformationOperator(base, lk.scale, kind="observed", likelihood=lk)


def _fisher_of(
    problem: CurvatureProblem, lk: Likelihood, mode: str, chunk_size: int | None
) -> InformationOperator:
    if lk.fisher is None:
        raise ValueError(
            f"the Fisher of a custom NLL ({lk.loss_name}, assume_nll=True) is unknown: its GGN is "
            "the Fisher only for exponential families in natural parameters; use a recognised loss"
        )
    if lk.fisher == "ggn":
        ggn = GGNOperator(problem, mode=mode, chunk_size=chunk_size)  # type: ignore[arg-type]
        return InformationOperator(ggn, lk.scale, kind="fisher", likelihood=lk)
    exp = ExpectedFisherOperator(problem, lk, chunk_size=chunk_size)
    return InformationOperator(exp, 1.0, kind="fisher", likelihood=lk)


def fisher_information(
    model: nn.Module,
    nll_loss: Any,
    data: Any,
    *,
    reduction: Literal["mean", "sum"],
    params: ParamSelection = None,
    likelihood: LikelihoodName | None = None,
    noise_variance: float | Literal["estimate"] | None = None,
    mode: str = "auto",
    chunk_size: int | None = 16,
    **problem_kwargs: Any,
) -> InformationOperator:
    r"""The Fisher information :math:`\sum_n J_n^\top \mathbb E_y[-\nabla_f^2 \log p]\,J_n`.

    The GGN scaled like :func:`observed_information` for canonical links, an expected output
    curvature for BCE on probabilities, the Poisson rate and the Gaussian NLL. Arguments as in
    :func:`observed_information` (``mode`` is a :class:`~nncurv.GGNOperator` mode).

    Example:
        Softmax regression: Fisher = observed information at any parameters.

        >>> import torch
        >>> X, y = torch.randn(40, 3, dtype=torch.float64), torch.randint(0, 4, (40,))
        >>> model = torch.nn.Linear(3, 4).double()
        >>> args = (model, torch.nn.CrossEntropyLoss(), (X, y))
        >>> F = fisher_information(*args, reduction="mean").to_dense()
        >>> I = observed_information(*args, reduction="mean").to_dense()
        >>> torch.allclose(F, I)
        True
    """
    problem, lk = _problem(
        model,
        nll_loss,
        data,
        reduction,
        params,
        False,
        likelihood,
        noise_variance,
        problem_kwargs,
    )
    return _fisher_of(problem, lk, mode, chunk_size)


def empirical_fisher(
    model: nn.Module,
    nll_loss: Any,
    data: Any,
    *,
    reduction: Literal["mean", "sum"],
    params: ParamSelection = None,
    assume_nll: bool = False,
    likelihood: LikelihoodName | None = None,
    noise_variance: float | Literal["estimate"] | None = None,
    cache: bool | str = "auto",
    **problem_kwargs: Any,
) -> InformationOperator:
    r"""The empirical Fisher :math:`\sum_n g_n g_n^\top` at the observed labels.

    :math:`g_n = -\nabla_\theta \log p(y_n|x_n,\theta)`, per-sample gradients by
    ``vmap(grad)``.

    Not the Fisher (Kunstner, Balles & Hennig 2019; see the module docstring). Products are
    :math:`\sum_n g_n (g_n^\top v)`; per-sample gradients are kept when ``cache`` allows.

    Example:
        >>> import torch
        >>> X, y = torch.randn(6, 2, dtype=torch.float64), torch.randn(6, 1, dtype=torch.float64)
        >>> model = torch.nn.Linear(2, 1, bias=False).double()
        >>> EF = empirical_fisher(model, torch.nn.MSELoss(reduction="sum"), (X, y),
        ...                       reduction="sum", noise_variance=1.0)
        >>> g = (model(X).detach() - y) * X  # per-sample gradients of (y - w.x)^2 / 2
        >>> torch.allclose(EF.to_dense(), g.T @ g)
        True
    """
    problem, lk = _problem(
        model,
        nll_loss,
        data,
        reduction,
        params,
        assume_nll,
        likelihood,
        noise_variance,
        problem_kwargs,
    )
    ef = EmpiricalFisherOperator(problem, lk.per_sample_factor, cache=cache)
    return InformationOperator(ef, 1.0, kind="empirical-fisher", likelihood=lk)


def _empirical_of(info: InformationOperator) -> InformationOperator:
    lk = info.likelihood
    ef = EmpiricalFisherOperator(info.problem, lk.per_sample_factor)
    return InformationOperator(ef, 1.0, kind="empirical-fisher", likelihood=lk)


def gradient_covariance(empirical: InformationOperator) -> CallableOperator:
    r"""The gradient scatter :math:`C = \sum_n (g_n-\bar g)(g_n-\bar g)^\top` as an operator.

    :math:`C = EF - N\bar g\bar g^\top` is :math:`N` times the covariance of the per-sample
    gradients.
    """
    ef = empirical.base
    if not isinstance(ef, EmpiricalFisherOperator):
        raise TypeError(f"expected an empirical Fisher operator, got {empirical!r}")
    gbar = ef.mean_gradient()
    N = ef.problem.num_samples

    def mm(V: Tensor) -> Tensor:
        return empirical.matmat(V) - N * torch.outer(gbar, gbar @ V)

    n = empirical.shape[0]
    return CallableOperator(
        lambda v: mm(v.unsqueeze(1)).squeeze(1),
        n,
        dtype=empirical.dtype,
        device=empirical.device,
        matmat=mm,
    )


# ---------------------------------------------------------------------- all metrics
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
            ef = empirical if empirical is not None else _empirical_of(info)
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
                else _fisher_of(info.problem, info.likelihood, "auto", 16)
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
