r"""Operators for observed information, Fisher information and the empirical Fisher.

:class:`InformationOperator` is a scaled view of a parameter operator (Hessian, GGN or the
expected-curvature Fisher below) carrying the :class:`Likelihood` it was built with.
:class:`EmpiricalFisherOperator` keeps per-sample gradients (``vmap(grad)``) and multiplies by
:math:`\sum_n g_n g_n^\top`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import grad, jvp, vmap
from torch.utils._pytree import tree_map

from nncurv._information_likelihood import (
    GaussianNLLAdapter,
    Likelihood,
    LikelihoodName,
    check_loss,
    expected_output_fisher,
    resolve_scale,
)
from nncurv.operators import CallableOperator, GGNOperator
from nncurv.operators._parameter import BatchProduct, ParameterOperator, Params, pullback_of
from nncurv.operators.base import LinearOperator
from nncurv.problem import Batch, CurvatureProblem, ParamSelection

__all__ = [
    "InformationOperator",
    "EmpiricalFisherOperator",
    "ExpectedFisherOperator",
    "build_problem",
    "fisher_of",
    "empirical_of",
    "gradient_covariance",
]


class InformationOperator(LinearOperator):
    r"""``scale * base``: an information matrix in the units of the summed log-likelihood.

    Behaves like a :class:`~nncurv.operators.ParameterOperator` (``flatten``, ``unflatten``,
    ``param_names``, ``problem``, ``release``) and works with every :mod:`nncurv.linalg`
    algorithm.

    Attributes:
        base: The operator being scaled (``HessianOperator``, ``GGNOperator``, ...).
        scale: The factor :math:`s`.
        kind: ``"observed"``, ``"fisher"`` or ``"empirical-fisher"``.
        likelihood: The :class:`~nncurv.information.Likelihood` (noise variance and its source,
            terms per sample, :math:`N`).
        problem: The :class:`~nncurv.problem.CurvatureProblem`.
    """

    def __init__(
        self, base: LinearOperator, scale: float, *, kind: str, likelihood: Likelihood
    ) -> None:
        if not math.isfinite(scale) or scale <= 0:
            raise ValueError(f"scale must be positive and finite, got {scale!r}")
        super().__init__(base.shape[0], dtype=base.dtype, device=base.device)
        self.base = base
        self.scale = float(scale)
        self.kind = kind
        self.likelihood = likelihood
        self.problem: CurvatureProblem = base.problem  # type: ignore[attr-defined]
        self.matmat_chunk_size = None  # the base operator chunks
        self.is_symmetric = base.is_symmetric

    @property
    def param_names(self) -> list[str]:
        """Names of the parameters, in the order of the flat vectors."""
        return self.problem.param_names

    @property
    def mode(self) -> str | None:
        """Product mode of the base operator."""
        return getattr(self.base, "mode", None)

    def flatten(self, tensors: Mapping[str, Tensor | None]) -> Tensor:
        """Concatenate a dict of parameter-shaped tensors into a flat vector."""
        return self.problem.flatten(tensors)

    def unflatten(self, vector: Tensor) -> dict[str, Tensor]:
        """Split a flat vector into a dict of parameter-shaped tensors."""
        return self.problem.unflatten(vector)

    def release(self) -> None:
        """Free cached graphs or gradients of the base operator."""
        release = getattr(self.base, "release", None)
        if release is not None:
            release()

    def _matvec(self, v: Tensor) -> Tensor:
        return self.base.matvec(v) * self.scale

    def _matmat(self, V: Tensor) -> Tensor:
        return self.base.matmat(V) * self.scale

    def __repr__(self) -> str:
        lk = self.likelihood
        extra = f", sigma2={lk.noise_variance:.4g} ({lk.noise_variance_source})"
        return (
            f"InformationOperator(kind={self.kind!r}, n={self.shape[0]}, likelihood={lk.name!r}, "
            f"scale={self.scale:.6g}{extra if lk.noise_variance is not None else ''}, "
            f"base={type(self.base).__name__})"
        )


# ---------------------------------------------------------------------- expected Fisher
class _ExpectedProduct(BatchProduct):
    r""":math:`J^\top M J` with :math:`M` the expected output curvature (no loss derivatives)."""

    def __init__(
        self, problem: CurvatureProblem, batch: Batch, likelihood: Likelihood, forward: bool
    ) -> None:
        self.params = problem.params
        self.out_fn = lambda p: problem.output(p, batch)
        out, self.pullback = pullback_of(self.out_fn, self.params)
        self.m = expected_output_fisher(likelihood, problem.loss_fn, out)
        self.forward = forward
        if not forward:
            _, self.push = pullback_of(self.pullback, torch.zeros_like(out))

    def mv(self, v: Params) -> Params:
        Jv = jvp(self.out_fn, (self.params,), (v,))[1] if self.forward else self.push(v)
        return self.pullback(self.m(Jv))

    def mm(self, V: Params) -> Params:
        return vmap(self.mv, randomness="same")(V)


class ExpectedFisherOperator(ParameterOperator):
    r"""Fisher :math:`\sum_n J_n^\top \mathbb E_{y\sim p}[-\nabla^2_f \log p]\, J_n`.

    For non-canonical parametrisations (BCE on probabilities, Poisson on the rate, Gaussian on
    mean and variance), where the GGN of the loss is not the Fisher. Already in the units of the
    summed log-likelihood (scale 1).
    """

    modes = ("forward", "reverse")
    cached_mode = "none"

    def __init__(
        self,
        problem: CurvatureProblem,
        likelihood: Likelihood,
        *,
        mode: str = "auto",
        chunk_size: int | None = 16,
    ) -> None:
        self.likelihood = likelihood
        super().__init__(problem, mode=mode, chunk_size=chunk_size, max_cached_batches=0)

    def _prepare(self, batch: Batch, mode: str) -> BatchProduct:
        return _ExpectedProduct(self.problem, batch, self.likelihood, forward=mode == "forward")


# ---------------------------------------------------------------------- empirical Fisher
def _one_sample(x: Any) -> Any:
    return tree_map(lambda t: t.unsqueeze(0) if isinstance(t, Tensor) else t, x)


def per_sample_gradients(problem: CurvatureProblem, factor: float, batch: Batch) -> Tensor:
    r"""``(n_b, P)`` matrix of :math:`g_n = \nabla_\theta\, c\,\ell(f(x_n), y_n)` by ``vmap(grad)``.

    Must run inside ``problem.evaluating()``.
    """

    def loss_one(params: Params, x: Any, y: Any) -> Tensor:
        b = Batch(_one_sample(x), _one_sample(y), 1, 1.0, batch.index)
        return problem.output_loss(problem.output(params, b), b) * factor

    y_dim = None if batch.targets is None else 0
    grads = vmap(grad(loss_one), in_dims=(None, 0, y_dim))(
        problem.params, batch.inputs, batch.targets
    )
    return torch.cat([grads[n].reshape(batch.size, -1) for n in problem.param_names], dim=1)


class EmpiricalFisherOperator(ParameterOperator):
    r"""Empirical Fisher :math:`\sum_n g_n g_n^\top`, products :math:`\sum_n g_n (g_n^\top v)`.

    :math:`g_n = -\nabla_\theta \log p(y_n|x_n,\theta)` at the observed labels.

    Per-sample gradients come from ``vmap(grad)`` one batch at a time; they are kept
    (``(N, P)`` numbers) when ``cache`` says so, and recomputed on every product otherwise.
    Under ``torch.distributed`` each rank keeps its own samples and products are all-reduced.

    Args:
        problem: The model, loss and data (BatchNorm in eval mode, dropout off).
        per_sample_factor: :math:`c` with :math:`-\log p(y_n|x_n) = c\,\ell` (one sample).
        cache: ``True``, ``False`` or ``"auto"`` (keep when ``N·P <= max_cached_elements``).
        max_cached_elements: Threshold of ``"auto"``.
    """

    modes = ("per-sample",)
    cached_mode = "none"

    def __init__(
        self,
        problem: CurvatureProblem,
        per_sample_factor: float,
        *,
        cache: bool | str = "auto",
        max_cached_elements: int = 2**24,
    ) -> None:
        if problem.batchnorm != "eval":
            raise ValueError(
                "per-sample gradients need batchnorm='eval' (batch statistics couple the samples), "
                f"got batchnorm={problem.batchnorm!r}"
            )
        if problem.dropout != "off":
            raise ValueError(f"per-sample gradients need dropout='off', got {problem.dropout!r}")
        if cache not in (True, False, "auto"):
            raise ValueError(f"cache must be True, False or 'auto', got {cache!r}")
        self.factor = float(per_sample_factor)
        local = sum(problem.batch_sizes)
        self.keep = cache is True or (
            cache == "auto" and local * problem.num_params <= max_cached_elements
        )
        self._grads: list[Tensor] | None = None
        super().__init__(problem, mode="per-sample", chunk_size=None, max_cached_batches=0)

    def _batch_gradients(self) -> list[Tensor] | None:
        if self._grads is None and self.keep:
            with self.problem.evaluating():
                self._grads = [
                    per_sample_gradients(self.problem, self.factor, b)
                    for b in self.problem.batches()
                ]
        return self._grads

    def gradient_blocks(self) -> list[Tensor]:
        """Local per-sample gradients, one ``(n_b, P)`` block per batch (computed if needed)."""
        kept = self._batch_gradients()
        if kept is not None:
            return kept
        with self.problem.evaluating():
            return [
                per_sample_gradients(self.problem, self.factor, b) for b in self.problem.batches()
            ]

    def mean_gradient(self) -> Tensor:
        r""":math:`\bar g = \frac1N\sum_n g_n` over all samples (all ranks)."""
        total = torch.zeros(self.shape[0], dtype=self.dtype, device=self.device)
        for G in self.gradient_blocks():
            total = total + G.sum(0)
        return self.problem.all_reduce(total) / self.problem.num_samples

    def _apply(self, V: Tensor) -> Tensor:
        out = torch.zeros_like(V)
        kept = self._batch_gradients()
        if kept is not None:
            for G in kept:
                out = out + G.T @ (G @ V)
        else:
            with self.problem.evaluating():
                for b in self.problem.batches():
                    G = per_sample_gradients(self.problem, self.factor, b)
                    out = out + G.T @ (G @ V)
        return self.problem.all_reduce(out)

    def _matvec(self, v: Tensor) -> Tensor:
        return self._apply(v.unsqueeze(1)).squeeze(1)

    def _matmat(self, V: Tensor) -> Tensor:
        return self._apply(V)

    def release(self) -> None:
        """Drop the kept per-sample gradients."""
        self._grads = None


# ---------------------------------------------------------------------- builders
def build_problem(
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


def fisher_of(
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


def empirical_of(info: InformationOperator) -> InformationOperator:
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
