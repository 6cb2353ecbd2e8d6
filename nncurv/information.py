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

from typing import Any, Literal

from torch import nn

from nncurv._information_cg import CGResult, NotPositiveDefiniteError, conjugate_gradients
from nncurv._information_inverse import standard_errors, takeuchi_criterion
from nncurv._information_likelihood import GaussianNLLAdapter, Likelihood, LikelihoodName
from nncurv._information_operators import (
    EmpiricalFisherOperator,
    ExpectedFisherOperator,
    InformationOperator,
    build_problem,
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
from nncurv._information_summary import ALL_METRICS, InformationMetrics, information_metrics
from nncurv.operators import HessianOperator
from nncurv.problem import ParamSelection

__all__ = [
    "ALL_METRICS",
    "CGResult",
    "ConditionResult",
    "EmpiricalFisherOperator",
    "ExpectedFisherOperator",
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
    problem, lk = build_problem(
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
    problem, lk = build_problem(
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
    return fisher_of(problem, lk, mode, chunk_size)


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
    problem, lk = build_problem(
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
