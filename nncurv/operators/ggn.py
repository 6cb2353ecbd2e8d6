r"""The generalized Gauss-Newton matrix (the Fisher information for exponential-family losses)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import grad, jvp, vmap

from nncurv.operators._parameter import (
    BatchProduct,
    ParameterOperator,
    Params,
    grad_products,
    pullback_of,
)
from nncurv.problem import Batch, CurvatureProblem

__all__ = ["GGNOperator", "GGNMode", "ggn"]

GGNMode = Literal["auto", "cached", "forward", "reverse"]


def _is_nll(loss_fn: Any) -> bool:
    return isinstance(loss_fn, nn.NLLLoss) or loss_fn is F.nll_loss


def output_curvature(
    problem: CurvatureProblem, batch: Batch, outputs: Tensor
) -> Callable[[Tensor], Tensor]:
    r"""Return ``w ↦ H_out w``, the curvature of the weighted batch loss w.r.t. the outputs.

    For convex losses in the outputs (MSE, cross-entropy, BCE-with-logits) this is the Hessian
    of the loss with respect to the model outputs, computed by reverse-over-reverse autodiff at
    fixed outputs. For the negative log-likelihood loss on log-probabilities (``nn.NLLLoss``),
    whose Hessian in the log-probabilities vanishes, it is the Fisher information of the
    categorical distribution in those coordinates, :math:`\operatorname{diag}(p)` with
    :math:`p = \exp(\text{outputs})`, which gives the same GGN as splitting at the logits.
    """
    o = outputs.detach()
    if _is_nll(problem.loss_fn):
        loss_red = getattr(problem.loss_fn, "reduction", problem.reduction)
        if getattr(problem.loss_fn, "weight", None) is not None:
            raise ValueError("the GGN of NLLLoss with class weights is not supported")
        scale = batch.weight / (batch.size if loss_red == "mean" else 1)
        probs = o.exp() * scale
        return lambda w: probs * w
    weight = batch.weight
    _, pullback = pullback_of(grad(lambda out: problem.output_loss(out, batch) * weight), o)
    return pullback


class _Functional(BatchProduct):
    """GGN products with torch.func: ``J v`` by ``jvp`` (forward) or a double ``vjp`` (reverse)."""

    def __init__(self, problem: CurvatureProblem, batch: Batch, forward: bool) -> None:
        self.params = problem.params
        self.out_fn = lambda p: problem.output(p, batch)
        out, self.pullback = pullback_of(self.out_fn, self.params)
        self.h_out = output_curvature(problem, batch, out)
        self.forward = forward
        if not forward:
            _, self.push = pullback_of(self.pullback, torch.zeros_like(out))

    def mv(self, v: Params) -> Params:
        Jv = jvp(self.out_fn, (self.params,), (v,))[1] if self.forward else self.push(v)
        return self.pullback(self.h_out(Jv))

    def mm(self, V: Params) -> Params:
        return vmap(self.mv, randomness="same")(V)


class _Cached(BatchProduct):
    """GGN products over a retained graph of the outputs (three backward passes per product)."""

    def __init__(self, problem: CurvatureProblem, batch: Batch) -> None:
        self.names = problem.param_names
        self.leaves = [problem.params[n].detach().requires_grad_(True) for n in self.names]
        self.out = problem.output(dict(zip(self.names, self.leaves)), batch)
        self.h_out = output_curvature(problem, batch, self.out)
        self.u = torch.zeros_like(self.out, requires_grad=True)
        self.ju = list(
            torch.autograd.grad(
                self.out,
                self.leaves,
                self.u,
                create_graph=True,
                allow_unused=True,
                materialize_grads=True,
            )
        )

    def _product(self, v: Params, batched: bool) -> Params:
        Jv = grad_products(self.ju, [self.u], [v[n] for n in self.names], batched=batched)[0]
        w = vmap(self.h_out)(Jv) if batched else self.h_out(Jv)
        out = grad_products([self.out], self.leaves, [w], batched=batched)
        return dict(zip(self.names, out))

    def mv(self, v: Params) -> Params:
        return self._product(v, batched=False)

    def mm(self, V: Params) -> Params:
        try:
            return self._product(V, batched=True)
        except RuntimeError:
            return super().mm(V)


class GGNOperator(ParameterOperator):
    r"""Generalized Gauss-Newton matrix of the data-set loss.

    .. math::

        G = \sum_b w_b\, J_b^\top H^{\text{out}}_b J_b, \qquad
        J_b = \frac{\partial f(x_b;\theta)}{\partial\theta}, \quad
        H^{\text{out}}_b = \nabla^2_{f}\, \ell(f, y_b),

    the Hessian with the second-order effect of the network dropped. It is positive
    semi-definite whenever the loss is convex in the outputs. For mean-squared error,
    cross-entropy, BCE-with-logits (and NLL on log-probabilities, see
    :func:`output_curvature`) it equals the Fisher information of the matching likelihood
    (Schraudolph 2002; Martens 2020), up to the noise scale for MSE.

    Modes: ``"forward"`` (``jvp`` for :math:`Jv`), ``"reverse"`` (double ``vjp``),
    ``"cached"`` (retained output graph; three backward passes per product) and ``"auto"``.

    Args:
        problem: The model, loss and data.
        mode: Product mode.
        chunk_size: Columns per vectorised batch in :meth:`matmat`.
        max_cached_batches: Largest number of batches for which ``"auto"`` may pick ``"cached"``.

    Example:
        For a linear model with MSE the GGN equals the Hessian, :math:`2X^\top X/N`.

        >>> import torch
        >>> from nncurv import CurvatureProblem
        >>> X, y = torch.randn(16, 3, dtype=torch.float64), torch.randn(16, 1, dtype=torch.float64)
        >>> model = torch.nn.Linear(3, 1, bias=False).double()
        >>> G = GGNOperator(CurvatureProblem(model, torch.nn.MSELoss(), (X, y)))
        >>> torch.allclose(G.to_dense(), 2 * X.T @ X / 16)
        True
    """

    modes = ("cached", "forward", "reverse")

    def __init__(
        self,
        problem: CurvatureProblem,
        *,
        mode: GGNMode = "auto",
        chunk_size: int | None = 16,
        max_cached_batches: int = 8,
    ) -> None:
        super().__init__(
            problem, mode=mode, chunk_size=chunk_size, max_cached_batches=max_cached_batches
        )

    def _prepare(self, batch: Batch, mode: str) -> BatchProduct:
        if mode == "cached":
            return _Cached(self.problem, batch)
        return _Functional(self.problem, batch, forward=mode == "forward")


def ggn(
    model: nn.Module,
    loss_fn: Any,
    data: Any,
    *,
    mode: GGNMode = "auto",
    chunk_size: int | None = 16,
    **problem_kwargs: Any,
) -> GGNOperator:
    """Build a :class:`GGNOperator` from a model, a loss and data (see :func:`nncurv.hessian`).

    Example:
        >>> import torch
        >>> X, y = torch.randn(10, 2), torch.randint(0, 3, (10,))
        >>> G = ggn(torch.nn.Linear(2, 3), torch.nn.CrossEntropyLoss(), (X, y))
        >>> G.shape
        (9, 9)
    """
    return GGNOperator(
        CurvatureProblem(model, loss_fn, data, **problem_kwargs), mode=mode, chunk_size=chunk_size
    )
