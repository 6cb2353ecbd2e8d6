r"""Which likelihood a loss is, and the factor that turns its Hessian into observed information.

A torch loss with ``reduction="sum"`` over a batch is :math:`\kappa \sum_n
-\log p(y_n \mid x_n, \theta)` up to constants, with :math:`\kappa = 2\sigma^2` for the squared
error and :math:`1` otherwise; with ``reduction="mean"`` torch divides by the number of loss
*terms*: :math:`N \cdot D` for element-wise losses with :math:`D` target elements per sample,
:math:`N` (times spatial positions) for cross-entropy. :class:`Likelihood` records the factor
:math:`s` with :math:`I = s\,\nabla^2\mathcal L` and how the per-sample NLL is obtained.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nncurv.problem import CurvatureProblem

__all__ = ["Likelihood", "LikelihoodName", "GaussianNLLAdapter", "recognise", "resolve_scale"]

LikelihoodName = Literal[
    "categorical", "bernoulli", "gaussian", "gaussian-heteroscedastic", "poisson", "custom"
]

# loss -> (likelihood, input kind); the input kind decides how the Fisher is formed
_MODULES: list[tuple[type[nn.Module], str, str]] = [
    (nn.CrossEntropyLoss, "categorical", "logits"),
    (nn.NLLLoss, "categorical", "log-probabilities"),
    (nn.BCEWithLogitsLoss, "bernoulli", "logits"),
    (nn.BCELoss, "bernoulli", "probabilities"),
    (nn.GaussianNLLLoss, "gaussian-heteroscedastic", "mean-and-variance"),
    (nn.PoissonNLLLoss, "poisson", "log-rate"),
    (nn.MSELoss, "gaussian", "mean"),
]
_FUNCTIONS: dict[Any, tuple[str, str]] = {
    F.cross_entropy: ("categorical", "logits"),
    F.nll_loss: ("categorical", "log-probabilities"),
    F.binary_cross_entropy_with_logits: ("bernoulli", "logits"),
    F.binary_cross_entropy: ("bernoulli", "probabilities"),
    F.poisson_nll_loss: ("poisson", "log-rate"),
    F.mse_loss: ("gaussian", "mean"),
}
_SUPPORTED = (
    "CrossEntropyLoss, NLLLoss, BCEWithLogitsLoss, BCELoss, GaussianNLLLoss, PoissonNLLLoss, "
    "MSELoss (and their torch.nn.functional forms)"
)


class GaussianNLLAdapter(nn.Module):
    r"""Call :class:`torch.nn.GaussianNLLLoss` as ``loss(outputs, targets)``.

    The model returns the mean and the variance side by side in its last dimension,
    ``outputs = cat([mean, variance], -1)`` (make the variance positive in the model, e.g. with
    ``softplus``); the adapter splits them with ``outputs.chunk(2, -1)``.
    """

    def __init__(self, loss: nn.GaussianNLLLoss) -> None:
        super().__init__()
        self.loss = loss
        self.reduction = loss.reduction

    def forward(self, outputs: Tensor, targets: Tensor) -> Tensor:
        if outputs.shape[-1] % 2:
            raise ValueError(
                "GaussianNLLLoss needs model outputs cat([mean, variance], -1) with an even last "
                f"dimension, got shape {tuple(outputs.shape)}"
            )
        mean, var = outputs.chunk(2, dim=-1)
        return self.loss(mean, targets.reshape(mean.shape), var)


@dataclass(frozen=True)
class Likelihood:
    r"""How the loss maps to a per-sample negative log-likelihood.

    Attributes:
        name: ``"categorical"``, ``"bernoulli"``, ``"gaussian"`` (MSE with a noise variance),
            ``"gaussian-heteroscedastic"``, ``"poisson"`` or ``"custom"`` (``assume_nll=True``).
        output: What the model outputs: ``"logits"``, ``"log-probabilities"``,
            ``"probabilities"``, ``"mean"``, ``"mean-and-variance"``, ``"log-rate"``, ``"rate"``
            or ``"unknown"``.
        loss_name: Name of the loss.
        reduction: The reduction the user stated.
        terms_per_sample: Loss terms per sample :math:`D` that a mean-reduced loss averages over.
        noise_variance: :math:`\sigma^2` for ``"gaussian"``, else ``None``.
        noise_variance_source: ``"stated"``, ``"estimated (MLE, RSS/(N·D))"`` or ``None``.
        per_sample_factor: :math:`c` with :math:`-\log p(y_n|x_n) = c\,\ell(f(x_n), y_n)` +
            const for the loss evaluated on one sample.
        scale: :math:`s` with observed information :math:`I = s \nabla^2 \mathcal L` for the
            data-set loss of :class:`~nncurv.problem.CurvatureProblem`.
        num_samples: :math:`N` (over all ranks).
        fisher: How the Fisher is formed: ``"ggn"`` (canonical link: the GGN is the Fisher),
            ``"expected"`` (expected output curvature) or ``None`` (unknown, custom losses).
    """

    name: str
    output: str
    loss_name: str
    reduction: str
    terms_per_sample: int
    noise_variance: float | None
    noise_variance_source: str | None
    per_sample_factor: float
    scale: float
    num_samples: int
    fisher: str | None


def _unwrap_partial(loss: Any) -> tuple[Any, dict[str, Any]]:
    if isinstance(loss, functools.partial):
        return loss.func, dict(loss.keywords)
    return loss, {}


def recognise(loss: Any) -> tuple[str, str] | None:
    """Return ``(likelihood, output kind)`` for a supported loss, ``None`` otherwise."""
    fn, kw = _unwrap_partial(loss)
    for cls, name, out in _MODULES:
        if isinstance(fn, cls):
            if name == "poisson" and not fn.log_input:
                out = "rate"
            return name, out
    if isinstance(fn, GaussianNLLAdapter):
        return "gaussian-heteroscedastic", "mean-and-variance"
    hit = _FUNCTIONS.get(fn)
    if hit is not None and hit[0] == "poisson" and kw.get("log_input", True) is False:
        return "poisson", "rate"
    return hit


def _loss_option(loss: Any, name: str, default: Any) -> Any:
    fn, kw = _unwrap_partial(loss)
    if isinstance(fn, nn.Module):
        fn = fn.loss if isinstance(fn, GaussianNLLAdapter) else fn
        return getattr(fn, name, default)
    return kw.get(name, default)


def check_loss(loss: Any, reduction: str, assume_nll: bool) -> tuple[str, str, str]:
    """Validate the loss as a likelihood; return ``(likelihood, output, loss_name)``."""
    fn, _ = _unwrap_partial(loss)
    loss_name = type(fn).__name__ if isinstance(fn, nn.Module) else getattr(fn, "__name__", "loss")
    hit = recognise(loss)
    if hit is None:
        if assume_nll:
            return "custom", "unknown", loss_name
        raise ValueError(
            f"{loss_name} ({loss!r}) is not a recognised negative log-likelihood; supported: "
            f"{_SUPPORTED}. If it is the negative log-likelihood of your model (reduced over "
            "samples as `reduction` says), pass assume_nll=True"
        )
    own = _loss_option(loss, "reduction", "mean")
    if own != reduction:
        raise ValueError(
            f"reduction={reduction!r} was stated but {loss_name} reduces with {own!r}; "
            "state the reduction the loss actually uses ('mean' or 'sum')"
        )
    problems = []
    if _loss_option(loss, "weight", None) is not None:
        problems.append("class/element weights")
    if _loss_option(loss, "pos_weight", None) is not None:
        problems.append("pos_weight")
    if float(_loss_option(loss, "label_smoothing", 0.0)) > 0:
        problems.append("label smoothing")
    if problems:
        raise ValueError(
            f"{loss_name} with {', '.join(problems)} is not a likelihood of the observed data; "
            "use the plain loss, or pass assume_nll=True with a callable that is one"
        )
    return hit[0], hit[1], loss_name


def _terms_per_sample(name: str, output: str, problem: CurvatureProblem, loss: Any) -> int:
    """Loss terms per sample (what a mean-reduced torch loss divides by, per sample)."""
    if name == "custom":
        return 1
    ignore = _loss_option(loss, "ignore_index", -100)
    counts = set()
    for batch in problem.batches():
        y = batch.targets
        if not isinstance(y, Tensor):
            raise ValueError(f"a {name} likelihood needs tensor targets, got {type(y).__name__}")
        per = y.numel() // batch.size
        if name == "categorical":
            if y.is_floating_point():  # class probabilities: (N, C, ...)
                per = per // y.shape[1] if y.ndim > 1 else per
            elif problem.reduction == "mean" and bool((y == ignore).any()):
                raise ValueError(
                    f"targets contain ignore_index={ignore}: a mean-reduced loss then divides by "
                    "the number of kept targets, which is not a likelihood; drop those samples"
                )
        counts.add(per)
    if len(counts) > 1:
        raise ValueError(f"batches have different numbers of targets per sample: {sorted(counts)}")
    return counts.pop() if counts else 1


def resolve_scale(
    problem: CurvatureProblem,
    loss: Any,
    *,
    name: str,
    output: str,
    loss_name: str,
    noise_variance: float | str | None,
) -> Likelihood:
    r"""Compute :math:`D`, :math:`\sigma^2` and the scale of the information for ``problem``."""
    red = problem.reduction
    D = _terms_per_sample(name, output, problem, loss)
    N = problem.num_samples
    kappa, source, sigma2 = 1.0, None, None
    if name == "gaussian":
        if noise_variance is None:
            raise ValueError(
                "MSE is a Gaussian likelihood only with a noise variance: pass "
                "noise_variance=<sigma^2> or noise_variance='estimate' (the MLE RSS/(N·D))"
            )
        if isinstance(noise_variance, str):
            if noise_variance != "estimate":
                raise ValueError(
                    f"noise_variance must be a positive float or 'estimate', got {noise_variance!r}"
                )
            rss = float(problem.loss()) * (N * D if red == "mean" else 1.0)
            sigma2 = rss / (N * D)
            if not sigma2 > 0:
                raise ValueError(f"cannot estimate the noise variance: the residuals are {rss!r}")
            source = "estimated (MLE, RSS/(N·D))"
        else:
            sigma2 = float(noise_variance)
            if not sigma2 > 0 or sigma2 != sigma2 or sigma2 == float("inf"):
                raise ValueError(f"noise_variance must be positive and finite, got {sigma2!r}")
            source = "stated"
        kappa = 1.0 / (2.0 * sigma2)
    elif noise_variance is not None:
        raise ValueError(
            f"noise_variance applies to MSELoss only (the Gaussian likelihood), not {loss_name}"
        )
    per_sample = (D if red == "mean" else 1) * kappa
    scale = (N if red == "mean" else 1) * per_sample
    if name == "custom":
        fisher = None
    elif output in ("probabilities", "rate", "mean-and-variance"):
        fisher = "expected"
    else:
        fisher = "ggn"
    return Likelihood(
        name=name,
        output=output,
        loss_name=loss_name,
        reduction=red,
        terms_per_sample=D,
        noise_variance=sigma2,
        noise_variance_source=source,
        per_sample_factor=float(per_sample),
        scale=float(scale),
        num_samples=N,
        fisher=fisher,
    )


def expected_output_fisher(
    likelihood: Likelihood, loss: Any, outputs: Tensor
) -> Callable[[Tensor], Tensor]:
    r"""``w ↦ M w`` with :math:`M` the Fisher of one sample's NLL in the output coordinates.

    For the non-canonical parametrisations: Bernoulli on probabilities
    :math:`1/(p(1-p))`, Poisson on the rate :math:`\mu/(\mu+\epsilon)^2 \approx 1/\mu`, and the
    Gaussian on (mean, variance) :math:`\operatorname{diag}(1/v, 1/(2v^2))`, all per element.
    """
    o = outputs.detach()
    if likelihood.output == "probabilities":
        eps = torch.finfo(o.dtype).eps
        p = o.clamp(eps, 1 - eps)
        m = 1.0 / (p * (1 - p))
    elif likelihood.output == "rate":
        eps = float(_loss_option(loss, "eps", 1e-8))
        m = o / (o + eps) ** 2
    elif likelihood.output == "mean-and-variance":
        eps = float(_loss_option(loss, "eps", 1e-6))
        _, var = o.chunk(2, dim=-1)
        v = var.clamp(min=eps)
        m = torch.cat([1.0 / v, 0.5 / v**2], dim=-1)
    else:  # pragma: no cover - guarded by Likelihood.fisher
        raise ValueError(f"no expected Fisher for outputs {likelihood.output!r}")
    return lambda w: m * w
